"""Group-relative advantages: one scalar per completion, from the rewards of the G completions of its prompt.

Pure functions with a small name -> function table (as verl's core_algos). No Lightning import.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

__all__ = ["ADVANTAGE_METHODS", "group_advantages"]


def _grpo(r: Tensor, eps: float) -> Tensor:
    # Unbiased std (divide by G - 1), as TRL's GRPOTrainer (`rewards.view(-1, G).std(dim=1)`), so that our
    # advantages match the peer we compare against. The biased std would scale them by sqrt(G / (G - 1)).
    return (r - r.mean(dim=1, keepdim=True)) / (r.std(dim=1, keepdim=True, correction=1) + eps)


def _dr_grpo(r: Tensor, eps: float) -> Tensor:
    # Dr. GRPO: no std division (the std normalisation biases towards too-easy/too-hard prompts).
    return r - r.mean(dim=1, keepdim=True)


def _rloo(r: Tensor, eps: float) -> Tensor:
    # Leave-one-out baseline: the mean reward of the other G - 1 completions of the same prompt.
    g = r.shape[1]
    return r - (r.sum(dim=1, keepdim=True) - r) / (g - 1)


_METHODS: dict[str, Callable[[Tensor, float], Tensor]] = {"grpo": _grpo, "dr_grpo": _dr_grpo, "rloo": _rloo}
ADVANTAGE_METHODS: tuple[str, ...] = tuple(_METHODS)


def group_advantages(rewards: Tensor, method: str = "grpo", eps: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Advantages [n_prompts, G] and zero_std_mask [n_prompts] (bool) from rewards [n_prompts, G].

    method: "grpo" (group z-score, unbiased std), "dr_grpo" (reward - group mean), "rloo" (reward - mean of
    the other G - 1). A group whose rewards are all equal carries no learning signal: its advantages are
    exactly zero (not a rounding residue of r - mean) and its mask entry is True.
    """
    if method not in _METHODS:
        raise ValueError(f"unknown advantage {method!r}; valid names: {', '.join(ADVANTAGE_METHODS)}")
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [n_prompts, num_generations], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"group advantages need num_generations >= 2, got {rewards.shape[1]}")
    r = rewards if rewards.is_floating_point() else rewards.float()
    if not torch.isfinite(r).all():
        raise ValueError("rewards contain NaN or inf")
    zero_std = (r == r[:, :1]).all(dim=1)
    adv = _METHODS[method](r, eps)
    adv = adv.masked_fill(zero_std[:, None], 0.0)
    return adv, zero_std
