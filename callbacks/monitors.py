"""Stability monitors of the paper's questions: token entropy, importance-ratio variance, EUR, gated fraction.

Both read the `UpdateRecord`s of each rollout step (`outputs["updates"]` of `on_train_batch_end`, the same as
`pl_module.last_output.updates`) and log once per rollout step. Every number is token-weighted and exact across
ranks: ranks all-reduce sums, gather raw token values, or gather and Chan-merge float64 moments
(lit_sapo.stats, the same code as the module's train/* ratio statistics); never means of means.
The aggregation functions are public and take `sync=False` for a purely local computation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lit_sapo.callbacks._dist import all_reduce, gather_cat
from lit_sapo.stats import empty, merge, merge_all, ratio_moments, summarize

NAN = float("nan")
GROUPS = ("", "_pos", "_neg")  # all valid tokens, advantage > 0, advantage < 0 (A = 0 is in neither sign group)


def updates_of(outputs, pl_module) -> list:
    """The UpdateRecords of the rollout step just done."""
    if isinstance(outputs, Mapping) and "updates" in outputs:
        return list(outputs["updates"])
    last = getattr(pl_module, "last_output", None)
    return list(last.updates) if last is not None else []


def quantile_name(q: float) -> str:
    return f"p{q * 100:g}"  # 0.1 -> p10, 0.995 -> p99.5


def quantiles(values: torch.Tensor, qs: Sequence[float]) -> list[float]:
    """Linear-interpolation quantiles (numpy's default, = torch.quantile, without its size limit); nan if empty."""
    if values.numel() == 0:
        return [NAN] * len(qs)
    s = values.double().sort().values
    out = []
    for q in qs:
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


# ------------------------------------------------------------------------------------------------------- entropy


def entropy_tokens(updates) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy, sign of advantage) of every valid completion token of epoch 0, flattened (this rank).

    Only epoch 0: its minibatches partition the rollout, so each token counts once. Each minibatch's entropy is
    that of the policy at its own update (after the previous minibatches' optimizer steps).
    """
    values, signs = [], []
    for u in updates:
        if u.epoch != 0 or u.entropy is None:
            continue
        m = u.terms.mask.bool()
        values.append(u.entropy[m].double())
        signs.append(torch.sign(u.terms.advantages[m]).double())
    if not values:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64)
    return torch.cat(values), torch.cat(signs)


def entropy_stats(values: torch.Tensor, signs: torch.Tensor, qs: Sequence[float] = (0.1, 0.5, 0.9), *,
                  sync: bool = True, device=None) -> dict[str, float]:
    """entropy/mean, entropy/p<q> and their _pos/_neg versions over every rank's tokens (nan where none)."""
    masks = [torch.ones_like(signs, dtype=torch.bool), signs > 0, signs < 0]
    sums = torch.stack([torch.stack([values[m].sum(), m.sum().double()]) for m in masks])  # [3, (sum, count)]
    if sync:
        sums = all_reduce(sums, device=device)
    out = {f"entropy/mean{g}": float(s / n) if n > 0 else NAN for g, (s, n) in zip(GROUPS, sums)}
    if qs:
        both = torch.stack([values, signs], 1).reshape(-1)
        both = (gather_cat(both, device=device) if sync else both).reshape(-1, 2)
        values, signs = both[:, 0], both[:, 1]
        for g, m in zip(GROUPS, [torch.ones_like(signs, dtype=torch.bool), signs > 0, signs < 0]):
            for q, v in zip(qs, quantiles(values[m], qs)):
                out[f"entropy/{quantile_name(q)}{g}"] = v
    return out


class EntropyMonitor(Callback):
    """Token entropy of the policy over completion tokens, once per rollout step.

    Logs `entropy/mean` and `entropy/p<q>` for each quantile (p10, p50, p90 by default), and the same with the
    suffix `_pos` / `_neg` for tokens of completions with positive / negative advantage. Token-weighted over the
    whole rollout and every rank (quantiles of the gathered token values, linear interpolation).

    Source: the UpdateRecords' entropy of the FIRST epoch only, so each token counts once; each minibatch's
    entropy is measured by the policy doing that update. Needs `model.compute_entropy: true` (the default).
    """

    def __init__(self, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> None:
        if any(not 0 <= q <= 1 for q in quantiles):
            raise ValueError(f"EntropyMonitor.quantiles: each must be in [0, 1], got {list(quantiles)}")
        self.quantiles = tuple(float(q) for q in quantiles)
        self._warned = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        updates = updates_of(outputs, pl_module)
        # compute_entropy is one setting for all ranks, so every rank skips or enters the collectives together
        if not any(u.entropy is not None for u in updates):
            if not self._warned:
                rank_zero_warn("EntropyMonitor: no entropy in the update records; set model.compute_entropy: true")
                self._warned = True
            return
        values, signs = entropy_tokens(updates)
        metrics = entropy_stats(values, signs, self.quantiles, device=pl_module.device)
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)


# ------------------------------------------------------------------------------------------------ importance ratio

STATS = ("mean", "var", "log_var", "eur", "gated_frac", "min", "max")


def update_moments(updates, *, sync: bool = True, device=None) -> torch.Tensor:
    """lit_sapo.stats moments [K, 3, F] per inner update k and group (A != 0, A > 0, A < 0), merged over ranks.

    k = epoch * num_minibatches + minibatch: the k-th optimizer step of the rollout, the same on every rank.
    Exact across ranks: each rank's float64 (count, mean, M2, ...) are gathered and Chan-merged.
    """
    keys = [(u.epoch, u.minibatch) for u in updates]
    shape = torch.tensor([max((e for e, _ in keys), default=-1) + 1, max((m for _, m in keys), default=-1) + 1],
                         dtype=torch.float64)
    if sync:
        shape = all_reduce(shape, "max", device=device)
    num_mb = int(shape[1])
    moments = empty(int(shape[0]) * num_mb, 3)
    for u in updates:
        k, t = u.epoch * num_mb + u.minibatch, u.terms
        part = ratio_moments(t.log_ratio, t.advantages, t.mask, t.gate_grad, t.gate_value).cpu()
        moments[k] = merge(moments[k], part)
    if sync:
        moments = merge_all(gather_cat(moments.flatten(), device=device).view(-1, *moments.shape))
    return moments


def _stats(m: torch.Tensor) -> dict[str, float]:
    return {name: float(v) for name, v in summarize(m).items() if name in STATS}


def ratio_metrics(moments: torch.Tensor, per_update: bool = True) -> dict[str, float]:
    """Log names and values: rollout aggregates `ratio/<stat>[_pos|_neg]` over the tokens of all inner updates,
    and per update `ratio/update_<k>/<stat>` (all tokens with A != 0)."""
    out = {}
    total = merge_all(moments)
    for g, suffix in enumerate(GROUPS):
        for name, v in _stats(total[g]).items():
            out[f"ratio/{name}{suffix}"] = v
    if per_update:
        for k in range(moments.shape[0]):
            if moments[k, 0, 0] == 0:
                continue  # an (epoch, minibatch) that no rank ran, or one without a token of A != 0
            for name, v in _stats(moments[k, 0]).items():
                out[f"ratio/update_{k}/{name}"] = v
    return out


class ImportanceRatioMonitor(Callback):
    """Importance-ratio statistics of each rollout step's inner updates (r = pi_new / pi_old per token).

    Statistics over the valid completion tokens that carry a policy gradient (A != 0), token-weighted, from
    float64 centred moments Chan-merged over micro-batches, updates and ranks (lit_sapo.stats): `mean`, `var`
    (population variance of r, the paper's importance-ratio variance), `log_var` (variance of log r), `eur` (token
    mean of the gate's derivative f'(r)), `gated_frac` (fraction with f'(r) < 0.5), `min`, `max`; nan where a
    group has no token.

    Layout, per rollout step:
      - `ratio/<stat>`, `ratio/<stat>_pos`, `ratio/<stat>_neg`: pooled over the tokens of ALL inner updates of the
        rollout (every token once per update it entered), all / positive / negative advantage.
      - `ratio/update_<k>/<stat>` (all tokens, no sign split): the k-th inner update, k = epoch x num_minibatches
        + minibatch, in optimizer-step order. Update 0 is on-policy (r = 1). Off with `per_update=False`.
    Histograms of r and f'(r) (`ratio/hist_r`, `ratio/hist_gate_grad`, step = rollout index) go to loggers whose
    experiment has `add_histogram` (TensorBoard); they show rank 0's tokens only, a 1/world sample.
    """

    def __init__(self, histograms: bool = True, bins: int = 50, per_update: bool = True) -> None:
        if bins < 1:
            raise ValueError(f"ImportanceRatioMonitor.bins: must be >= 1, got {bins}")
        self.histograms = histograms
        self.bins = bins
        self.per_update = per_update

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        updates = updates_of(outputs, pl_module)
        moments = update_moments(updates, device=pl_module.device)
        pl_module.log_dict(ratio_metrics(moments, self.per_update), on_step=True, on_epoch=False, batch_size=1)
        if self.histograms and trainer.is_global_zero:
            self._histograms(trainer, updates, batch.rollout_index)

    def _histograms(self, trainer, updates, step: int) -> None:
        writers = [lg.experiment for lg in trainer.loggers if hasattr(lg.experiment, "add_histogram")]
        if not writers or not updates:
            return
        active = [u.terms.mask.bool() & (u.terms.advantages != 0) for u in updates]  # as the statistics
        r = torch.cat([u.terms.ratio[m].float().cpu() for u, m in zip(updates, active)])
        df = torch.cat([u.terms.gate_grad[m].float().cpu() for u, m in zip(updates, active)])
        if r.numel() == 0:
            return
        for w in writers:
            w.add_histogram("ratio/hist_r", r, step, bins=self.bins)
            w.add_histogram("ratio/hist_gate_grad", df, step, bins=self.bins)
