"""Helpers imported by the multi-process test scripts and by the YAML of tests/test_distributed.py
(`PYTHONPATH=tests/scripts`): a reward that varies on a random model, a fixed scoring batch, a log-prob probe."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from lightning.pytorch import Callback


def char_reward(completions: list[str], answers: list[str], prompts: list[str]) -> list[float]:
    """Deterministic, varies between random completions: (characters mod 7) / 7."""
    return [(len(c) % 7) / 7 for c in completions]


def fixed_tokens(rows: int, prompt_len: int, completion_len: int, seed: int, vocab: int = 49152):
    """Random left-padded prompts and right-padded completions (ids, masks), the same in every process."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, vocab, (rows, prompt_len), generator=g)
    completion_ids = torch.randint(3, vocab, (rows, completion_len), generator=g)
    prompt_lens = torch.randint(2, prompt_len + 1, (rows,), generator=g)
    completion_lens = torch.randint(1, completion_len + 1, (rows,), generator=g)
    prompt_mask = (torch.arange(prompt_len) >= prompt_len - prompt_lens[:, None]).long()
    completion_mask = (torch.arange(completion_len) < completion_lens[:, None]).float()
    return prompt_ids * prompt_mask, prompt_mask, completion_ids * completion_mask.long(), completion_mask


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class LogprobProbe(Callback):
    """At the end of training, score a fixed batch with the trained policy (all ranks) and write it (rank 0)."""

    def __init__(self, path: str, seed: int = 123) -> None:
        self.path, self.seed = path, seed

    def on_train_end(self, trainer, pl_module) -> None:
        from lit_sapo.scoring import completion_logprobs

        p_ids, p_mask, c_ids, c_mask = fixed_tokens(4, 6, 5, self.seed)
        dev = pl_module.device
        with torch.no_grad():
            logp, _ = completion_logprobs(pl_module.policy, pl_module.head, p_ids.to(dev), p_mask.to(dev),
                                          c_ids.to(dev), c_mask.to(dev))
        if rank() == 0:
            Path(self.path).write_text(json.dumps({"seed": self.seed, "logprobs": logp.cpu().tolist(),
                                                   "weight_version": pl_module.weight_version}))
