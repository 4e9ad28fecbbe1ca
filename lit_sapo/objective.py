"""The gated policy loss: ratios (token or sequence level), gate, KL to a reference, aggregation, stats.

Pure math on [B, T] tensors: no Lightning import. The loss is −J with J = agg(f_tau(r)·A), tau = tau_pos where
A > 0 else tau_neg. The settings of one loss are a `LossSettings`, validated once when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lit_sapo.gates import Gate, get_gate
from lit_sapo.stats import ratio_moments, summarize

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


def _valid(values: Tensor, mask: Tensor) -> Tensor:
    # where, not values * mask: nan * 0 is nan.
    return torch.where(mask.bool(), values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` over positions where `mask` is true; 0 (not nan) where there are none."""
    mask = mask.bool()
    total = _valid(values, mask).sum() if dim is None else _valid(values, mask).sum(dim)
    count = mask.sum() if dim is None else mask.sum(dim)
    return total / count.clamp(min=1).to(total.dtype)


def _check_aggregation(aggregation: str, norm_length: float | None) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation: unknown value {aggregation!r}; valid: {', '.join(AGGREGATIONS)}")
    if aggregation == "seq-mean-token-sum-norm" and (norm_length is None or norm_length <= 0):
        raise ValueError(f"norm_length: seq-mean-token-sum-norm needs a constant norm_length > 0, got {norm_length}")


def aggregate(values: Tensor, mask: Tensor, aggregation: str, norm_length: float | None = None) -> Tensor:
    """Reduce per-token values [B, T] to a scalar.

    token-mean: sum over all valid tokens / their count. seq-mean-*: mean over sequences that have at least one
    valid token (empty ones are skipped, not nan) of the sequence's token mean, token sum, or token sum divided
    by the constant `norm_length` (Dr.GRPO).
    """
    _check_aggregation(aggregation, norm_length)
    mask = mask.bool()
    if aggregation == "token-mean":
        return masked_mean(values, mask)
    token_sums = _valid(values, mask).sum(-1)
    counts = mask.sum(-1).to(token_sums.dtype)
    if aggregation == "seq-mean-token-mean":
        per_seq = token_sums / counts.clamp(min=1)
    elif aggregation == "seq-mean-token-sum":
        per_seq = token_sums
    else:
        per_seq = token_sums / norm_length
    return masked_mean(per_seq, counts > 0)


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3", max_log_ratio: float = 20.0) -> Tensor:
    """Per-token estimate of KL(pi || ref) from samples of pi (Schulman's k1/k2/k3), with d = log ref - log pi.

    k1 = -d: unbiased, but as a loss term its gradient has zero expectation under pi (E_pi[grad log pi] = 0),
    so it does not pull pi towards ref; only its noise reaches the update. k2 = d^2/2 (biased; its gradient is
    that of KL in expectation to first order). k3 = expm1(d) - d: unbiased, never negative, low variance.
    """
    log_diff = (ref_logp - logp).clamp(-max_log_ratio, max_log_ratio)
    if estimator == "k1":
        return -log_diff
    if estimator == "k2":
        return 0.5 * log_diff * log_diff
    if estimator == "k3":
        return torch.expm1(log_diff) - log_diff
    raise ValueError(f"kl_estimator: unknown value {estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")


@dataclass
class GateTerms:
    """Per-token detached tensors [B, T] of one loss evaluation, for callbacks (histograms, EUR by position).

    Only positions where `mask` is true are meaningful (padding holds advantage 0 and tau_neg).
    """

    log_ratio: Tensor
    ratio: Tensor
    gate_value: Tensor
    gate_grad: Tensor
    tau: Tensor
    advantages: Tensor
    mask: Tensor


@dataclass
class LossSettings:
    """The settings of the gated policy loss, validated here and nowhere else (errors name the field).

    `gate` is a name (see lit_sapo.gates.GATE_NAMES), a dotted class path, or a Gate object (used as given).
    """

    gate: str | Gate = "sigmoid"
    """sigmoid (SAPO), erf, arctan, softsign, clip (GRPO/DAPO), none, or a class path."""
    tau_pos: float = 1.0
    """Gate temperature for tokens with positive advantage."""
    tau_neg: float = 1.05
    """Gate temperature for tokens with non-positive advantage."""
    eps_low: float = 0.2
    """Lower clip range of the clip gate."""
    eps_high: float = 0.2
    """Upper clip range of the clip gate (> eps_low: DAPO clip-higher)."""
    level: str = "token"
    """token, or sequence (GSPO: one ratio per sequence, the geometric mean of its token ratios)."""
    aggregation: str = "seq-mean-token-mean"
    """token-mean, seq-mean-token-mean, seq-mean-token-sum, seq-mean-token-sum-norm (Dr.GRPO)."""
    norm_length: float | None = None
    """The constant divisor of seq-mean-token-sum-norm."""
    max_log_ratio: float = 20.0
    """Clamp of log r before exp."""
    kl_coef: float = 0.0
    """Weight of the KL penalty to a reference (0 = none)."""
    kl_estimator: str = "k3"
    """k1, k2 or k3 (see kl_estimate; k1 has zero expected gradient as a loss term)."""
    gate_fn: Gate = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"level: unknown value {self.level!r}; valid: {', '.join(LEVELS)}")
        _check_aggregation(self.aggregation, self.norm_length)
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator: unknown value {self.kl_estimator!r}; valid: {', '.join(KL_ESTIMATORS)}")
        for name in ("tau_pos", "tau_neg"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: gate temperature must be > 0, got {getattr(self, name)}")
        if not self.max_log_ratio > 0:
            raise ValueError(f"max_log_ratio: must be > 0, got {self.max_log_ratio}")
        if not self.kl_coef >= 0:
            raise ValueError(f"kl_coef: must be >= 0, got {self.kl_coef}")
        self.gate_fn = get_gate(self.gate, eps_low=self.eps_low, eps_high=self.eps_high)


def _check_inputs(logp, old_logp, advantages, mask, ref_logp, is_weights, kl_coef) -> None:
    if kl_coef != 0 and ref_logp is None:
        raise ValueError(f"kl_coef: {kl_coef} needs ref_logp (reference log-probs), got None")
    if logp.dim() != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp/old_logp/mask: need equal [B, T] shapes, got {tuple(logp.shape)}, "
            f"{tuple(old_logp.shape)}, {tuple(mask.shape)}"
        )
    batch = logp.shape[:1]
    for name, t in (("advantages", advantages), ("is_weights", is_weights), ("ref_logp", ref_logp)):
        allowed = (logp.shape,) if name == "ref_logp" else (batch, logp.shape)
        if t is not None and t.shape not in allowed:
            raise ValueError(f"{name}: need shape [B] or [B, T] ({tuple(logp.shape)}), got {tuple(t.shape)}")


def _per_token(t: Tensor, like: Tensor) -> Tensor:
    return (t.unsqueeze(-1) if t.dim() == 1 else t).expand_as(like)


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    settings: LossSettings | None = None,
    *,
    ref_logp: Tensor | None = None,
    is_weights: Tensor | None = None,
    return_terms: bool = False,
):
    """Gated policy loss. Returns (loss, stats) or (loss, stats, terms) with return_terms.

    logp, old_logp, mask: [B, T] (mask bool or 0/1); advantages: [B] or [B, T]; is_weights (detached, e.g. a
    sampler/trainer mismatch correction): [B] or [B, T]. Masked positions may hold inf/nan: they are replaced
    before any arithmetic, so they reach neither the loss nor the gradients.
    """
    s = settings if settings is not None else LossSettings()
    _check_inputs(logp, old_logp, advantages, mask, ref_logp, is_weights, s.kl_coef)
    gate, tau_pos, tau_neg, max_log_ratio = s.gate_fn, s.tau_pos, s.tau_neg, s.max_log_ratio
    aggregation, norm_length, kl_coef = s.aggregation, s.norm_length, s.kl_coef
    mask = mask.bool()
    # bf16 ratios are too coarse near r = 1; compute in at least float32.
    dtype = torch.promote_types(logp.dtype, torch.float32)
    logp = logp.to(dtype)

    # Sanitize first: the subtraction's backward never reads the values, so no nan reaches grad(logp).
    log_ratio = _valid(logp - old_logp.to(dtype), mask).clamp(-max_log_ratio, max_log_ratio)
    if s.level == "sequence":
        # GSPO: one ratio per sequence, the geometric mean of its token ratios.
        log_ratio = _per_token(masked_mean(log_ratio, mask, dim=-1), log_ratio)
    ratio = torch.exp(log_ratio)

    adv = _valid(_per_token(advantages.to(dtype), ratio), mask).detach()
    positive = adv > 0
    tau = torch.full_like(ratio, tau_neg).masked_fill(positive, tau_pos).detach()
    gate_value = gate.f(ratio, tau, positive)
    objective = gate_value * adv
    if is_weights is not None:
        objective = objective * _valid(_per_token(is_weights.to(dtype), ratio), mask).detach()
    pg_loss = aggregate(-objective, mask, aggregation, norm_length)

    kl = torch.zeros_like(ratio)
    if ref_logp is not None:
        ref = _valid(ref_logp.to(dtype), mask)
        kl = _valid(kl_estimate(_valid(logp, mask), ref, s.kl_estimator, max_log_ratio), mask)
    loss = pg_loss
    if kl_coef != 0:
        loss = aggregate(-objective + kl_coef * kl, mask, aggregation, norm_length)

    with torch.no_grad():
        gate_grad = gate.df(ratio, tau, positive)
        stats = _stats(log_ratio, ratio, gate_value, gate_grad, adv, mask, kl)
        stats["pg_loss"] = pg_loss.detach()
        stats["loss"] = loss.detach()
    if not return_terms:
        return loss, stats
    terms = GateTerms(
        log_ratio=log_ratio.detach(),
        ratio=ratio.detach(),
        gate_value=gate_value.detach(),
        gate_grad=gate_grad,
        tau=tau,
        advantages=adv,
        mask=mask,
    )
    return loss, stats, terms


def _stats(log_ratio, ratio, gate_value, gate_grad, adv, mask, kl) -> dict[str, Tensor]:
    """Statistics of one evaluation; every one is 0 (never nan) when there are no such tokens.

    tokens / kl: all valid tokens. Ratio statistics, EUR, gate_mean, gated_frac, clip_frac: the tokens with a
    policy-gradient term (mask & A != 0), from lit_sapo.stats (float64, population variances).
    """
    f = ratio.dtype
    moments = ratio_moments(log_ratio, adv, mask, gate_grad, gate_value)
    g = {k: torch.nan_to_num(v, nan=0.0) for k, v in summarize(moments).items()}  # [3] each: all, pos, neg
    return {
        "eur": g["eur"][0].to(f),
        "eur_pos": g["eur"][1].to(f),
        "eur_neg": g["eur"][2].to(f),
        "tokens": mask.sum().to(f),
        "tokens_pos": g["tokens"][1].to(f),
        "tokens_neg": g["tokens"][2].to(f),
        "ratio_mean": g["mean"][0].to(f),
        "ratio_var": g["var"][0].to(f),
        "ratio_min": g["min"][0].to(f),
        "ratio_max": g["max"][0].to(f),
        "log_ratio_var": g["log_var"][0].to(f),
        "gate_mean": g["gate_mean"][0].to(f),
        "gated_frac": g["gated_frac"][0].to(f),
        "clip_frac": g["clip_frac"][0].to(f),
        "kl": masked_mean(kl, mask),
    }
