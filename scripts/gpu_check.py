"""One-GPU check of the FSDP2 training path: mixed precision, activation checkpointing, clipping, resume, export,
packed scoring in bf16, validate under inference mode. Prints one JSON object (figures and pass/fail per check).

    python scripts/gpu_check.py                 # one CUDA GPU, Qwen2.5-0.5B-shaped random model (< 8 min on one H200)
    python scripts/gpu_check.py --cpu --small   # the CPU-possible part, a tiny shape (seconds; run by make test)

Needs only torch, lightning, transformers (and lit_sapo itself): no vLLM, datasets, math-verify or jsonargparse,
no network (random weights, a word-level tokenizer built here). One process: FSDP2 over a 1-rank mesh (the code
path of N ranks, without the collectives' traffic). Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lit_sapo.distributed import shard_policy  # noqa: E402
from lit_sapo.models import export_hf_folder  # noqa: E402
from lit_sapo.scoring import completion_logprobs, install_scoring_head  # noqa: E402

# Qwen2.5-0.5B's shape (vocab cut to the local tokenizer's size is not used: the head keeps its 151 936 rows)
FULL = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
            num_attention_heads=14, num_key_value_heads=2)
SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)


def local_tokenizer():
    """A word-level tokenizer trained on a few strings (no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["what is 2 + 3 ? the answer is 5", "compute 7 * 6 = 42"],
                            trainers.WordLevelTrainer(special_tokens=["<unk>", "<pad>", "<eos>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def build_model(shape: dict, dtype: torch.dtype, device: str, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**shape, max_position_embeddings=4096, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    install_scoring_head(model)
    return model.train()


def batch(shape: dict, device: str, rows: int, prompt: int, completion: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    vocab = shape["vocab_size"]
    p_ids = torch.randint(3, vocab, (rows, prompt), generator=g)
    c_ids = torch.randint(3, vocab, (rows, completion), generator=g)
    p_mask = torch.ones(rows, prompt, dtype=torch.long)
    p_mask[1::2, : prompt // 2] = 0  # every other prompt left-padded
    c_mask = torch.ones(rows, completion)
    c_mask[::2, completion // 2:] = 0
    adv = torch.randn(rows, generator=g)
    groups = torch.arange(rows) // 2  # pairs share a prompt (packed scoring), as GRPO groups
    p_ids[1::2] = p_ids[::2]
    p_mask[1::2] = p_mask[::2]
    out = dict(prompt_ids=p_ids * p_mask, prompt_mask=p_mask, completion_ids=c_ids * c_mask.long(),
               completion_mask=c_mask, adv=adv, group_ids=groups)
    return {k: v.to(device) for k, v in out.items()}


def loss_of(model, b, packed: bool = False):
    head = model.get_output_embeddings()
    logp, _ = completion_logprobs(model, head, b["prompt_ids"], b["prompt_mask"], b["completion_ids"],
                                  b["completion_mask"], chunk_size=256, group_ids=b["group_ids"] if packed else None)
    mask = b["completion_mask"]
    return -((logp * mask).sum(1) / mask.sum(1).clamp(min=1) * b["adv"]).mean(), logp


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu().clone()  # never a view


def train(model, b, steps: int, lr: float, max_norm: float = 1.0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    norms = []
    for _ in range(steps):
        loss, _ = loss_of(model, b)
        loss.backward()
        norms.append(float(full(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt, norms


def changed_fraction(before: dict, model) -> float:
    changed = total = 0
    for name, p in model.named_parameters():
        now = full(p)
        changed += int((now != before[name]).sum())
        total += now.numel()
    return changed / total


def check_mixed_precision(shape, device, mesh, b, steps: int) -> dict:
    """fp32 master weights + bf16 compute vs bf16 parameters, at lr 1e-6."""
    model = shard_policy(build_model(shape, torch.float32, device), mesh, compute_dtype=torch.bfloat16)
    seen = {}
    layer = model.model.layers[0].self_attn.q_proj
    hook = layer.register_forward_hook(lambda m, i, o: seen.update(input=i[0].dtype, output=o.dtype,
                                                                   weight=m.weight.dtype))
    params_fp32_dtensor = all(type(p).__name__ == "DTensor" and p.dtype == torch.float32 for p in model.parameters())
    before = {n: full(p) for n, p in model.named_parameters()}
    loss, _ = loss_of(model, b)
    loss.backward()
    hook.remove()
    grads_fp32 = all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    model.zero_grad(set_to_none=True)
    train(model, b, steps, lr=1e-6)
    fp32_master = changed_fraction(before, model)

    bf16 = shard_policy(build_model(shape, torch.bfloat16, device), mesh, compute_dtype=torch.bfloat16)
    before = {n: full(p) for n, p in bf16.named_parameters()}
    train(bf16, b, steps, lr=1e-6)
    bf16_params = changed_fraction(before, bf16)
    ok = (params_fp32_dtensor and grads_fp32 and seen.get("weight") == torch.bfloat16
          and seen.get("output") == torch.bfloat16 and fp32_master > 0.9 and bf16_params < 0.2)
    return {"ok": ok, "params_fp32_dtensor": params_fp32_dtensor, "grads_fp32": grads_fp32,
            "forward_dtype": str(seen.get("output")), "changed_fp32_master": fp32_master,
            "changed_bf16_params": bf16_params, "steps": steps}


def check_activation_checkpointing_and_clipping(shape, device, mesh, b) -> dict:
    plain = shard_policy(build_model(shape, torch.float32, device), mesh)
    ckpt = shard_policy(build_model(shape, torch.float32, device), mesh, activation_checkpointing=True)
    for m in (plain, ckpt):
        loss_of(m, b)[0].backward()
    worst = max(float((full(p.grad) - full(q.grad)).abs().max())
                for p, q in zip(plain.parameters(), ckpt.parameters()))
    by_hand = float(torch.sqrt(sum((full(p.grad) ** 2).sum() for p in plain.parameters())))
    max_norm = by_hand / 2
    total = float(full(torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm)))
    after = float(torch.sqrt(sum((full(p.grad) ** 2).sum() for p in plain.parameters())))
    ok = worst < 1e-5 and abs(total - by_hand) <= 1e-4 * by_hand and abs(after - max_norm) <= 1e-3 * max_norm
    return {"ok": ok, "ckpt_grad_max_diff": worst, "grad_norm": total, "grad_norm_by_hand": by_hand,
            "norm_after_clip": after, "max_norm": max_norm}


def check_resume_and_export(shape, device, mesh, b, tokenizer, work: Path) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from transformers import AutoModelForCausalLM

    from lit_sapo.export import full_state_dict

    model = shard_policy(build_model(shape, torch.float32, device), mesh, compute_dtype=torch.bfloat16)
    opt, _ = train(model, b, 2, lr=1e-4)
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(work / "ckpt"))
    _continue(model, opt, b, 2)
    straight = {n: full(p) for n, p in model.named_parameters()}

    fresh = shard_policy(build_model(shape, torch.float32, device, seed=99), mesh, compute_dtype=torch.bfloat16)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-4)
    loss_of(fresh, b)[0].backward()  # AdamW state exists only after a step: make one to load into
    fresh_opt.step()
    fresh_opt.zero_grad(set_to_none=True)
    model_sd, opt_sd = get_state_dict(fresh, fresh_opt)
    state = {"model": model_sd, "optim": opt_sd}
    dcp.load(state, checkpoint_id=str(work / "ckpt"))
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _continue(fresh, fresh_opt, b, 2)
    resume_diff = max(float((full(p) - straight[n]).abs().max()) for n, p in fresh.named_parameters())

    state = full_state_dict(model)
    export_hf_folder(model, tokenizer, work / "hf", state_dict=state)
    loaded = AutoModelForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    export_diff = max(float((v.float() - state[k].float()).abs().max()) for k, v in loaded.state_dict().items()
                      if k in state)
    tied = loaded.lm_head.weight is loaded.model.embed_tokens.weight
    ok = resume_diff == 0.0 and export_diff == 0.0 and tied and (work / "hf" / "tokenizer.json").exists()
    return {"ok": ok, "resume_max_diff": resume_diff, "export_max_diff": export_diff, "export_tied": tied}


def _continue(model, opt, b, steps: int) -> None:
    for _ in range(steps):
        loss_of(model, b)[0].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)


def check_packed_bf16(shape, device, mesh, b) -> dict:
    model = shard_policy(build_model(shape, torch.float32, device), mesh, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        padded = loss_of(model, b)[1]
        packed = loss_of(model, b, packed=True)[1]
    mask = b["completion_mask"].bool()
    diff = float((padded - packed)[mask].abs().max())
    return {"ok": diff < 0.1, "packed_vs_padded_max_diff": diff, "tolerance": 0.1}


def check_validate_inference_mode(shape, device) -> dict:
    """Lightning's validate with inference_mode=True over a FSDP2-sharded model (ModelParallelStrategy, 1 rank)."""
    from lightning.pytorch import LightningModule, Trainer
    from lightning.pytorch.strategies import ModelParallelStrategy

    b = batch(shape, "cpu", 4, 6, 5)

    class Check(LightningModule):
        def __init__(self):
            super().__init__()
            self.model, self.grad_mode = None, {}

        def configure_model(self):
            self.model = shard_policy(build_model(shape, torch.float32, "cpu"), self.device_mesh,
                                      compute_dtype=torch.bfloat16)

        def val_dataloader(self):
            return [0]

        def validation_step(self, _, __):
            self.grad_mode = {"inference_mode": torch.is_inference_mode_enabled(),
                              "grad_enabled": torch.is_grad_enabled()}
            with torch.no_grad() if not torch.is_inference_mode_enabled() else torch.inference_mode():
                loss = loss_of(self.model, {k: v.to(self.device) for k, v in b.items()})[0]
            self.log("val_loss", loss, batch_size=1)

    module = Check()
    trainer = Trainer(accelerator="gpu" if device == "cuda" else "cpu", devices=1,
                      strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
                      inference_mode=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, verbose=False)[0]
    ok = bool(torch.isfinite(torch.tensor(metrics["val_loss"])))
    # Lightning keeps no_grad (not inference_mode) under gloo: on CPU this runs, but does not test inference mode
    return {"ok": ok, **module.grad_mode, "val_loss": metrics["val_loss"]}


def step_time(shape, device, mesh, b, steps: int = 3) -> dict:
    model = shard_policy(build_model(shape, torch.float32, device), mesh, compute_dtype=torch.bfloat16,
                         activation_checkpointing=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    times = []
    for _ in range(steps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        _continue(model, opt, b, 1)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    tokens = int(b["prompt_mask"].sum() + b["completion_mask"].sum())
    return {"step_s": min(times[1:]), "tokens_per_step": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU (gloo) instead of one CUDA GPU")
    parser.add_argument("--small", action="store_true", help="a tiny model shape instead of Qwen2.5-0.5B's")
    parser.add_argument("--steps", type=int, default=5, help="optimizer steps of the lr 1e-6 check")
    args = parser.parse_args(argv)
    device = "cpu" if args.cpu else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu", file=sys.stderr)
        return 2
    shape = SMALL if args.small else FULL
    rows, prompt, completion = (4, 6, 5) if args.small else (8, 256, 256)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    from torch.distributed.device_mesh import init_device_mesh

    if device == "cuda":
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    mesh = init_device_mesh(device, (1,))
    b = batch(shape, device, rows, prompt, completion)
    report: dict = {"device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "shape": shape,
                    "rows": rows, "prompt_len": prompt, "completion_len": completion}
    start = time.perf_counter()
    checks = {
        "mixed_precision": lambda: check_mixed_precision(shape, device, mesh, b, args.steps),
        "checkpointing_and_clipping": lambda: check_activation_checkpointing_and_clipping(shape, device, mesh, b),
        "resume_and_export": lambda: check_resume_and_export(shape, device, mesh, b, local_tokenizer(), work),
        "packed_bf16": lambda: check_packed_bf16(shape, device, mesh, b),
        "step": lambda: step_time(shape, device, mesh, b),
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, check in checks.items():
            t0 = time.perf_counter()
            try:
                report[name] = check()
            except Exception as err:  # report every check, not just the first failure
                report[name] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
            report[name]["seconds"] = round(time.perf_counter() - t0, 2)
    dist.destroy_process_group()  # Lightning starts its own for validate
    t0 = time.perf_counter()
    try:
        report["validate_inference_mode"] = check_validate_inference_mode(shape, device)
    except Exception as err:
        report["validate_inference_mode"] = {"ok": False, "error": f"{type(err).__name__}: {err}"[:500]}
    report["validate_inference_mode"]["seconds"] = round(time.perf_counter() - t0, 2)
    report["seconds"] = round(time.perf_counter() - start, 2)
    report["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    if device == "cuda":
        report["peak_cuda_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    report["ok"] = all(v.get("ok", True) for v in report.values() if isinstance(v, dict) and "seconds" in v)
    print(json.dumps(report, indent=1, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
