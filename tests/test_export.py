"""HF-folder export in one process: a module's policy (LoRA merged), a single-file checkpoint, the CLI entry.

The FSDP2 paths (gathering a sharded policy, a sharded checkpoint directory) are in tests/test_distributed.py.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lit_sapo.export import export_checkpoint, export_module, main, merge_lora
from lit_sapo.models import LoraSettings, ModelSpec, load_policy, load_tokenizer

TINY = "tiny-random-llama"


def _logits(model, seed=0):
    ids = torch.randint(3, 49152, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_merge_lora_folds_the_adapter_into_the_base_weight():
    w, a, b = torch.ones(3, 2), torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0], [0.0], [2.0]])
    state = {"base_model.model.model.q_proj.base_layer.weight": w,
             "base_model.model.model.q_proj.lora_A.default.weight": a,
             "base_model.model.model.q_proj.lora_B.default.weight": b,
             "base_model.model.model.norm.weight": torch.ones(2)}
    merged = merge_lora(state, ModelSpec(name=TINY, lora=LoraSettings(r=1, alpha=2)))
    assert sorted(merged) == ["model.norm.weight", "model.q_proj.weight"]
    expected = torch.tensor([[3.0, 5.0], [1.0, 1.0], [5.0, 9.0]])  # 1 + (alpha / r = 2) * b @ a
    assert torch.equal(merged["model.q_proj.weight"], expected)
    plain = {"model.norm.weight": torch.ones(2)}
    assert merge_lora(plain, ModelSpec(name=TINY)) is plain


def test_export_module_writes_a_folder_transformers_loads(tmp_path):
    spec = ModelSpec(name=TINY)
    policy = load_policy(spec).eval()
    module = SimpleNamespace(policy=policy, tokenizer=load_tokenizer(spec), spec=spec)
    out = export_module(module, tmp_path / "hf")
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    loaded = _load(out)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied
    assert torch.allclose(_logits(loaded), _logits(policy), atol=1e-5, rtol=0)


def test_export_module_merges_lora(tmp_path):
    pytest.importorskip("peft")
    spec = ModelSpec(name=TINY, lora=LoraSettings(r=4, alpha=8))
    policy = load_policy(spec).eval()
    with torch.no_grad():  # lora_B starts at zero: make the adapter matter
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    reference = _logits(policy)
    base = load_policy(ModelSpec(name=TINY)).eval()
    assert (reference - _logits(base)).abs().max() > 1e-3
    export_module(SimpleNamespace(policy=policy, tokenizer=None, spec=spec), tmp_path / "hf")
    assert torch.allclose(_logits(_load(tmp_path / "hf")), reference, atol=1e-4, rtol=0)


def test_export_checkpoint_from_a_single_file(tmp_path, capsys):
    spec = ModelSpec(name=TINY, seed=3)
    policy = load_policy(spec).eval()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"policy.{k}": v for k, v in policy.state_dict().items()},
                "hyper_parameters": {"model": vars(spec)}}, ckpt)
    out = export_checkpoint(ckpt, tmp_path / "hf")  # the model spec comes from the checkpoint (seed 3)
    assert torch.allclose(_logits(_load(out)), _logits(policy), atol=1e-5, rtol=0)
    main([str(ckpt), str(tmp_path / "hf2"), "--model", TINY])  # seed 0's random init, overwritten by the weights
    assert "wrote" in capsys.readouterr().out
    assert torch.allclose(_logits(_load(tmp_path / "hf2")), _logits(policy), atol=1e-5, rtol=0)


def test_export_checkpoint_refuses_a_plain_folder(tmp_path):
    with pytest.raises(ValueError, match="not a sharded Lightning checkpoint"):
        export_checkpoint(tmp_path, tmp_path / "hf")
