"""Gate functions f(r) of the importance ratio and the paper's admissibility check.

The per-token objective is f(r)·A; its gradient weight on r·∇logp·A is f'(r). Every gate here has f(1) = 1
and f'(1) = 1, so on-policy every gate is the plain policy gradient. Pure math: no Lightning import.
"""

from __future__ import annotations

import importlib
import inspect
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

TauLike = float | Tensor


class Gate:
    """A gate: closed-form `f` and its derivative `df` (which must equal autograd of `f`).

    `tau` is a float or a tensor broadcastable to `r`; `positive` (advantage > 0, bool tensor broadcastable to
    `r`) matters only to sign-aware gates such as the hard clip; smooth gates ignore it.
    """

    name: str = "gate"
    # f -> 1 ± saturation/tau far from r = 1; None for gates that do not saturate that way.
    saturation: float | None = None

    def f(self, r: Tensor, tau: TauLike, positive: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def df(self, r: Tensor, tau: TauLike, positive: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SigmoidGate(Gate):
    """SAPO: (4/tau)·σ(tau(r−1)) + 1 − 2/tau; the constant makes f(1) = 1 and changes no gradient."""

    name = "sigmoid"
    saturation = 2.0

    def f(self, r, tau, positive=None):
        return (4.0 / tau) * torch.sigmoid(tau * (r - 1.0)) + 1.0 - 2.0 / tau

    def df(self, r, tau, positive=None):
        s = torch.sigmoid(tau * (r - 1.0))
        return 4.0 * s * (1.0 - s)


class ErfGate(Gate):
    """Gaussian-tailed gate: f' = exp(−tau²(r−1)²/2)."""

    name = "erf"
    saturation = math.sqrt(math.pi / 2.0)

    def f(self, r, tau, positive=None):
        half_band = math.sqrt(math.pi / 2.0) / tau
        return half_band * (1.0 + torch.erf(tau * (r - 1.0) / math.sqrt(2.0))) + 1.0 - half_band

    def df(self, r, tau, positive=None):
        u = tau * (r - 1.0)
        return torch.exp(-0.5 * u * u)


class ArctanGate(Gate):
    """Heavy-tailed gate: f' = 1/(1 + tau²(r−1)²) ~ u⁻²."""

    name = "arctan"
    saturation = math.pi / 2.0

    def f(self, r, tau, positive=None):
        return 1.0 + torch.atan(tau * (r - 1.0)) / tau

    def df(self, r, tau, positive=None):
        u = tau * (r - 1.0)
        return 1.0 / (1.0 + u * u)


class SoftsignGate(Gate):
    """Algebraic gate: f' = (1 + tau²(r−1)²)^(−3/2) ~ u⁻³."""

    name = "softsign"
    saturation = 1.0

    def f(self, r, tau, positive=None):
        # hypot instead of sqrt(1 + u²): u² overflows float32 long before hypot does.
        u = tau * (r - 1.0)
        return 1.0 + (r - 1.0) / torch.hypot(torch.ones_like(u), u)

    def df(self, r, tau, positive=None):
        u = tau * (r - 1.0)
        return torch.hypot(torch.ones_like(u), u).pow(-3)


class ClipGate(Gate):
    """Hard PPO/GRPO clip, sign-aware: min(r·A, clip(r, 1−eps_low, 1+eps_high)·A)/A.

    A > 0: min(r, 1+eps_high); A <= 0: max(r, 1−eps_low). With `positive=None` (no sign known, e.g. plots or
    the admissibility check) both sides are clipped: clip(r, 1−eps_low, 1+eps_high). DAPO clip-higher is
    eps_high > eps_low. `tau` is ignored.
    """

    name = "clip"

    def __init__(self, eps_low: float = 0.2, eps_high: float = 0.2):
        if eps_low < 0 or eps_high < 0:
            raise ValueError(f"eps_low/eps_high must be >= 0, got {eps_low}/{eps_high}")
        self.eps_low = eps_low
        self.eps_high = eps_high

    def f(self, r, tau=None, positive=None):
        low, high = 1.0 - self.eps_low, 1.0 + self.eps_high
        if positive is None:
            return torch.clamp(r, low, high)
        return torch.where(positive, torch.clamp(r, max=high), torch.clamp(r, min=low))

    def df(self, r, tau=None, positive=None):
        # Bounds are inclusive, as in torch.clamp's backward, so df matches autograd at the kink too.
        low, high = 1.0 - self.eps_low, 1.0 + self.eps_high
        if positive is None:
            inside = (r >= low) & (r <= high)
        else:
            inside = torch.where(positive, r <= high, r >= low)
        return inside.to(r.dtype)

    def __repr__(self) -> str:
        return f"ClipGate(eps_low={self.eps_low}, eps_high={self.eps_high})"


class NoGate(Gate):
    """f(r) = r: unclipped importance-weighted policy gradient."""

    name = "none"

    def f(self, r, tau=None, positive=None):
        return r

    def df(self, r, tau=None, positive=None):
        return torch.ones_like(r)


_GATES: dict[str, type[Gate]] = {
    g.name: g for g in (SigmoidGate, ErfGate, ArctanGate, SoftsignGate, ClipGate, NoGate)
}
GATE_NAMES: tuple[str, ...] = tuple(_GATES)


def _accepted_kwargs(cls: type, kwargs: dict) -> dict:
    """The kwargs that cls.__init__ accepts (all of them if it takes **kwargs)."""
    if cls.__init__ is object.__init__:
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(kwargs)
    names = {p.name for p in params}
    return {k: v for k, v in kwargs.items() if k in names}


def _unknown(name: object, why: str = "") -> ValueError:
    valid = ", ".join(GATE_NAMES)
    return ValueError(
        f"gate: unknown value {name!r}{why}; valid: {valid}, or a dotted path package.module.ClassName"
    )


def get_gate(name: str | Gate, **kwargs) -> Gate:
    """A gate by name (see GATE_NAMES) or by dotted class path; kwargs go only to gates whose __init__ takes them.

    A Gate instance is returned unchanged, so callers may pass either.
    """
    if isinstance(name, Gate):
        return name
    if not isinstance(name, str):
        raise _unknown(name)
    if name in _GATES:
        cls = _GATES[name]
    elif "." in name:
        module_name, _, class_name = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError) as err:
            raise _unknown(name, f" ({type(err).__name__}: {err})") from None
        if not isinstance(cls, type):
            raise _unknown(name, " (not a class)")
    else:
        raise _unknown(name)
    gate = cls(**_accepted_kwargs(cls, kwargs))
    if not (callable(getattr(gate, "f", None)) and callable(getattr(gate, "df", None))):
        raise _unknown(name, " (the class has no f/df methods)")
    return gate


# ---------------------------------------------------------------- admissibility


@dataclass
class PropertyCheck:
    """One admissibility property: whether it holds, its worst violation, and where (the r)."""

    name: str
    ok: bool
    worst: float
    at_r: float
    message: str


@dataclass
class AdmissibilityReport:
    gate: str
    tau: float
    checks: list[PropertyCheck] = field(default_factory=list)

    @property
    def admissible(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> list[str]:
        return [c.name for c in self.checks if not c.ok]

    def __getitem__(self, name: str) -> PropertyCheck:
        for check in self.checks:
            if check.name == name:
                return check
        raise KeyError(name)

    def __str__(self) -> str:
        lines = [f"gate={self.gate} tau={self.tau:g}: {'admissible' if self.admissible else 'NOT admissible'}"]
        lines.append(f"  {'property':<14}{'ok':<6}{'worst':>12}{'at r':>14}  message")
        for c in self.checks:
            ok = "yes" if c.ok else "NO"
            lines.append(f"  {c.name:<14}{ok:<6}{c.worst:>12.3g}{c.at_r:>14.6g}  {c.message}")
        return "\n".join(lines)


# Names of the four properties, in the paper's order.
PROPERTIES = ("C1", "max_at_1", "monotone", "tail")


def _grids() -> tuple[Tensor, Tensor]:
    # i/400 hits r = 1 exactly (a linspace might miss it by one ulp). Bisection localises jumps between grid
    # points, so the grid stays under torch's 32768-element parallel grain: threads only slow a shared CPU.
    dense = torch.arange(0, 20_001, dtype=torch.float64) / 400.0
    tail = torch.logspace(math.log10(50.0), 6.0, 2_000, dtype=torch.float64)
    return dense, tail


def _jump_sizes(df, lo: Tensor, hi: Tensor, halvings: int = 40) -> tuple[Tensor, Tensor]:
    """Bisect every interval towards its larger change of df: a continuous df shrinks to ~0, a jump stays."""
    d_lo, d_hi = df(lo), df(hi)
    for _ in range(halvings):
        mid = 0.5 * (lo + hi)
        d_mid = df(mid)
        left = (d_mid - d_lo).abs() >= (d_hi - d_mid).abs()
        lo, hi = torch.where(left, lo, mid), torch.where(left, mid, hi)
        d_lo, d_hi = torch.where(left, d_lo, d_mid), torch.where(left, d_mid, d_hi)
    return (d_hi - d_lo).abs(), lo


def _check_c1(f, df, r: Tensor) -> PropertyCheck:
    jumps, where = _jump_sizes(df, r[:-1].clone(), r[1:].clone())
    i = int(jumps.argmax())
    jump, jump_r = float(jumps[i]), float(where[i])
    # df must also be the derivative of f (a central difference; catches a wrong df or a jump in f).
    h = 1e-5
    x = r[r >= 2 * h]
    numeric = (f(x + h) - f(x - h)) / (2 * h)
    errors = (numeric - df(x)).abs()
    j = int(errors.argmax())
    err, err_r = float(errors[j]), float(x[j])
    if jump > 1e-6:
        return PropertyCheck("C1", False, jump, jump_r, f"f' jumps by {jump:.3g} near r={jump_r:.6g}")
    if err > 1e-4:
        return PropertyCheck("C1", False, err, err_r, f"df differs from f's numerical derivative by {err:.3g}")
    return PropertyCheck("C1", True, max(jump, err), err_r if err >= jump else jump_r, "f' continuous, df = f'")


def _check_max_at_1(df, r: Tensor) -> PropertyCheck:
    one = torch.ones(1, dtype=torch.float64)
    peak_error = float((df(one) - 1.0).abs())
    if peak_error > 1e-9:
        return PropertyCheck("max_at_1", False, peak_error, 1.0, f"f'(1) = {float(df(one)):.6g}, not 1")
    # The maximum must be attained only at r = 1: the gate must down-weight every off-policy token.
    # worst = the largest f' away from r = 1 (must stay below 1).
    away = r[r != 1.0]
    d = df(away)
    i = int(d.argmax())
    worst, at = float(d[i]), float(away[i])
    if worst >= 1.0:
        return PropertyCheck("max_at_1", False, worst, at, f"f'({at:.6g}) = {worst:.6g} >= f'(1): max not only at r=1")
    return PropertyCheck("max_at_1", True, worst, at, "f'(1) = 1 is the unique maximum")


def _check_monotone(df, r: Tensor) -> PropertyCheck:
    d = df(r)
    steps = d[1:] - d[:-1]
    right = r[1:] > 1.0
    # Violation: f' rising to the right of 1, or falling to the left of 1 (walking right on the grid).
    violation = torch.where(right, steps, -steps)
    i = int(violation.argmax())
    worst, at = float(violation[i]), float(r[i])
    if worst > 1e-12:
        side = "rises for r > 1" if bool(right[i]) else "falls for r < 1"
        return PropertyCheck("monotone", False, worst, at, f"f' {side} by {worst:.3g} near r={at:.6g}")
    return PropertyCheck("monotone", True, 0.0, at, "f' decreases away from r = 1")


def _check_tail(df, tail: Tensor) -> PropertyCheck:
    weight = tail * df(tail)
    far, far_r = float(weight[-1]), float(tail[-1])
    rises = weight[1:] - weight[:-1]
    i = int(rises.argmax())
    if far > 1e-3:
        return PropertyCheck("tail", False, far, far_r, f"r·f'(r) = {far:.3g} at r={far_r:.3g}, not -> 0")
    if float(rises[i]) > 1e-12:
        at = float(tail[i])
        return PropertyCheck("tail", False, float(rises[i]), at, f"r·f'(r) still rises near r={at:.3g}")
    return PropertyCheck("tail", True, far, far_r, f"r·f'(r) = {far:.3g} at r={far_r:.3g} and decreasing")


def check_admissible(gate: Gate | str, tau: float) -> AdmissibilityReport:
    """Check the paper's four properties on r >= 0 numerically (float64, dense grid on [0, 50] + far tail).

    (i) C1: f' continuous and df is f's derivative; (ii) max_at_1: f' has its global maximum 1 only at r = 1;
    (iii) monotone: f' non-increasing for r > 1, non-decreasing for r < 1; (iv) tail: r·f'(r) -> 0.
    Sign-aware gates are checked with positive=None (ClipGate: both sides clipped).
    """
    gate = get_gate(gate)

    def f(r):
        return gate.f(r, tau)

    def df(r):
        return gate.df(r, tau)

    dense, tail = _grids()
    everywhere = torch.cat([dense, tail[1:]])
    checks = [
        _check_c1(f, df, everywhere),
        _check_max_at_1(df, everywhere),
        _check_monotone(df, everywhere),
        _check_tail(df, tail),
    ]
    return AdmissibilityReport(getattr(gate, "name", type(gate).__name__), float(tau), checks)
