"""Importance-ratio statistics: one implementation for the loss, the module's train/* logs and the monitors.

Pure math, no Lightning import. A `RatioMoments` holds, per group (all / A > 0 / A < 0 tokens, and any leading
dims such as the inner update), the token count, mean and centred second moment M2 = sum (x - mean)^2 of r and
of log r in float64, min and max of r, and the sums of f'(r) (EUR), f(r), gated (f' < 0.5) and clipped (f' = 0)
tokens. Parts merge exactly with Chan's parallel formula, so pooling micro-batches, inner updates or ranks gives
the variance of the union of their tokens, not E[r^2] - E[r]^2 (which cancels to noise when var(r) ~ 1e-8).

Which tokens: those with a policy-gradient term, mask & A != 0 (A = 0 tokens have no gradient through the gate).
r is stored shifted, as r - 1 = expm1(log r): near r = 1 that keeps every digit of the spread.
"""

from __future__ import annotations

import torch
from torch import Tensor

FIELDS = ("n", "mean_r1", "m2_r", "mean_log_r", "m2_log_r", "min_r", "max_r", "eur_sum", "gate_sum", "gated",
          "clipped")
_I = {name: i for i, name in enumerate(FIELDS)}
GROUPS = ("", "_pos", "_neg")  # all tokens with A != 0, A > 0, A < 0


def _moments(x: Tensor, m: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(count, mean, M2) of x over m, two-pass in float64; no host-device sync."""
    n = m.sum(dtype=torch.float64)
    xm = torch.where(m, x, 0.0)
    mean = xm.sum() / n.clamp(min=1)
    m2 = torch.where(m, (x - mean) ** 2, 0.0).sum()
    return n, mean, m2


def _group(log_ratio: Tensor, gate_value: Tensor | None, gate_grad: Tensor | None, m: Tensor) -> Tensor:
    lr = torch.where(m, log_ratio.double(), 0.0)
    r1 = torch.expm1(lr)
    n, mean_r1, m2_r = _moments(r1, m)
    _, mean_lr, m2_lr = _moments(lr, m)
    r = r1 + 1.0
    lo = torch.where(m, r, torch.inf).amin() if m.numel() else torch.tensor(torch.inf, dtype=torch.float64)
    hi = torch.where(m, r, -torch.inf).amax() if m.numel() else torch.tensor(-torch.inf, dtype=torch.float64)
    zero = torch.zeros((), dtype=torch.float64, device=lr.device)
    df = gate_grad.double() if gate_grad is not None else None
    eur = torch.where(m, df, 0.0).sum() if df is not None else zero
    gated = (m & (df < 0.5)).sum(dtype=torch.float64) if df is not None else zero
    clipped = (m & (df == 0)).sum(dtype=torch.float64) if df is not None else zero
    gate_sum = torch.where(m, gate_value.double(), 0.0).sum() if gate_value is not None else zero
    return torch.stack([n, mean_r1, m2_r, mean_lr, m2_lr, lo.to(lr.device), hi.to(lr.device), eur, gate_sum,
                        gated, clipped])


def ratio_moments(log_ratio: Tensor, advantages: Tensor, mask: Tensor, gate_grad: Tensor | None = None,
                  gate_value: Tensor | None = None) -> Tensor:
    """Moments [3, len(FIELDS)] (float64) of the tokens of one evaluation: all with A != 0, A > 0, A < 0.

    All inputs are per-token [B, T] (advantages already broadcast). Clipped = f'(r) = 0: for the sign-aware clip
    gate exactly PPO/TRL's clip ratio (r > 1 + eps_high with A > 0, r < 1 - eps_low with A < 0).
    """
    mask = mask.bool()
    adv = torch.where(mask, advantages, 0.0)
    groups = (mask & (adv != 0), mask & (adv > 0), mask & (adv < 0))
    return torch.stack([_group(log_ratio, gate_value, gate_grad, m) for m in groups])


def empty(*shape: int, device=None) -> Tensor:
    """Moments of no tokens: the identity of `merge`."""
    out = torch.zeros(*shape, len(FIELDS), dtype=torch.float64, device=device)
    out[..., _I["min_r"]] = torch.inf
    out[..., _I["max_r"]] = -torch.inf
    return out


def merge(a: Tensor, b: Tensor) -> Tensor:
    """Chan's parallel merge of two moment tensors [..., F] (elementwise over leading dims)."""
    na, nb = a[..., 0], b[..., 0]
    n = na + nb
    share = torch.where(n > 0, nb / n.clamp(min=1), 0.0)
    out = a + b  # counts and plain sums add
    for mean, m2 in (("mean_r1", "m2_r"), ("mean_log_r", "m2_log_r")):
        delta = b[..., _I[mean]] - a[..., _I[mean]]
        out[..., _I[mean]] = a[..., _I[mean]] + delta * share
        out[..., _I[m2]] = a[..., _I[m2]] + b[..., _I[m2]] + delta * delta * na * share
    out[..., _I["min_r"]] = torch.minimum(a[..., _I["min_r"]], b[..., _I["min_r"]])
    out[..., _I["max_r"]] = torch.maximum(a[..., _I["max_r"]], b[..., _I["max_r"]])
    return out


def merge_all(parts: Tensor, dim: int = 0) -> Tensor:
    """Merge moment tensors along `dim` (e.g. the ranks of an all-gather, or the inner updates)."""
    parts = parts.movedim(dim, 0)
    out = empty(*parts.shape[1:-1], device=parts.device)
    for p in parts:
        out = merge(out, p)
    return out


def summarize(m: Tensor) -> dict[str, Tensor]:
    """Statistics of moments [..., F]: population variances (ddof 0); nan where a group has no token."""
    n = m[..., 0]
    nan = torch.full_like(n, float("nan"))
    per = lambda x: torch.where(n > 0, x / n.clamp(min=1), nan)  # noqa: E731
    return {
        "tokens": n,
        "mean": torch.where(n > 0, 1.0 + m[..., _I["mean_r1"]], nan),
        "var": per(m[..., _I["m2_r"]]),
        "log_mean": torch.where(n > 0, m[..., _I["mean_log_r"]], nan),
        "log_var": per(m[..., _I["m2_log_r"]]),
        "min": torch.where(n > 0, m[..., _I["min_r"]], nan),
        "max": torch.where(n > 0, m[..., _I["max_r"]], nan),
        "eur": per(m[..., _I["eur_sum"]]),
        "gate_mean": per(m[..., _I["gate_sum"]]),
        "gated_frac": per(m[..., _I["gated"]]),
        "clip_frac": per(m[..., _I["clipped"]]),
    }
