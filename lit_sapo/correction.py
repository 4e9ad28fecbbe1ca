"""Sampler/trainer mismatch correction (pure math).

The sampler (vLLM, or HF generate with top-p) and the trainer score the same tokens slightly differently
(kernels, precision, sampling filters). With w = exp(trainer_old_logp - sampler_logp) per token:
- token_tis: truncated importance weight min(w, cap) per token;
- seq_tis:   min(prod_t w, cap) per sequence, on every token of it;
- token_mask: drop tokens with w outside [1/cap, cap];
- seq_mask:  drop sequences whose geometric-mean weight exp(mean_t log w) lies outside [1/cap, cap].
Weights are detached: they rescale the gradient, they are not optimised.
"""

from __future__ import annotations

import torch
from torch import Tensor

CORRECTION_MODES = ("none", "token_tis", "seq_tis", "token_mask", "seq_mask")


def rollout_correction_weights(trainer_logp: Tensor, sampler_logp: Tensor, mask: Tensor, *, mode: str,
                               cap: float = 2.0, max_log_ratio: float = 20.0) -> tuple[Tensor, dict[str, Tensor]]:
    if mode not in CORRECTION_MODES:
        raise ValueError(f"rollout_correction: unknown mode {mode!r}; use one of {list(CORRECTION_MODES)}")
    if cap <= 1.0 and mode != "none":
        raise ValueError(f"correction_cap: must be > 1, got {cap}")
    valid = mask > 0
    maskf = valid.to(trainer_logp.dtype)
    log_w = torch.where(valid, trainer_logp - sampler_logp, torch.zeros_like(trainer_logp)).detach()
    log_w = log_w.clamp(-max_log_ratio, max_log_ratio)
    lengths = maskf.sum(-1).clamp(min=1)
    if mode == "none":
        weights = maskf.clone()
    elif mode == "token_tis":
        weights = log_w.exp().clamp(max=cap) * maskf
    elif mode == "seq_tis":
        seq = (log_w * maskf).sum(-1).clamp(max=torch.log(torch.tensor(cap))).exp()
        weights = seq[:, None] * maskf
    elif mode == "token_mask":
        keep = log_w.abs() <= torch.log(torch.tensor(cap))
        weights = keep.to(maskf.dtype) * maskf
    else:  # seq_mask
        seq_log = (log_w * maskf).sum(-1) / lengths
        keep = seq_log.abs() <= torch.log(torch.tensor(cap))
        weights = keep[:, None].to(maskf.dtype) * maskf
    tokens = maskf.sum().clamp(min=1)
    # k3 estimate of KL(sampler || trainer) from the sampler's own tokens: E_sampler[(w - 1) - log w] with
    # w = trainer / sampler (unbiased, never negative). float64 + expm1: near w = 1 the terms are ~ (log w)^2 / 2,
    # which float32 rounds to exactly 0 below |log w| ~ 3e-4.
    log_w64 = log_w.double()
    kl = ((torch.expm1(log_w64) - log_w64) * maskf.double()).sum() / tokens.double()
    stats = {"kl": kl, "is_weight_mean": (weights * maskf).sum() / tokens,
             "masked_frac": ((weights == 0) & valid).sum() / tokens}
    return weights, stats
