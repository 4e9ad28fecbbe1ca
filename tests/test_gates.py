import math

import pytest
import torch

from lit_sapo.gates import GATE_NAMES, PROPERTIES, ClipGate, Gate, NoGate, check_admissible, get_gate

SMOOTH = {"sigmoid": 2.0, "erf": math.sqrt(math.pi / 2), "arctan": math.pi / 2, "softsign": 1.0}
TAUS = (0.5, 1.0, 5.0, 10.0, 12.0)
PAPER_TAUS = (0.5, 1.0, 1.05, 5.0, 10.0, 12.0)


class TinyGate(Gate):
    """A user gate loaded by dotted path: f = 1 + slope·(r − 1) (not admissible, but a valid Gate)."""

    name = "tiny"

    def __init__(self, slope: float = 1.0):
        self.slope = slope

    def f(self, r, tau, positive=None):
        return 1.0 + self.slope * (r - 1.0)

    def df(self, r, tau, positive=None):
        return torch.full_like(r, self.slope)


def grid():
    return torch.linspace(0.0, 4.0, 801, dtype=torch.float64)


def test_gate_names_cover_the_design_table():
    assert set(GATE_NAMES) == {"sigmoid", "erf", "arctan", "softsign", "clip", "none"}
    for name in GATE_NAMES:
        assert get_gate(name).name == name


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("tau", PAPER_TAUS)
def test_smooth_gate_is_one_with_unit_slope_at_r_equal_1(name, tau):
    gate = get_gate(name)
    one = torch.ones(1, dtype=torch.float64)
    assert gate.f(one, tau).item() == pytest.approx(1.0, abs=1e-12)
    assert gate.df(one, tau).item() == pytest.approx(1.0, abs=1e-12)
    assert gate.saturation == pytest.approx(SMOOTH[name])


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("tau", (0.5, 1.0, 10.0))
def test_df_equals_autograd_of_f(name, tau):
    gate = get_gate(name)
    r = grid().requires_grad_(True)
    (autograd,) = torch.autograd.grad(gate.f(r, tau).sum(), r)
    torch.testing.assert_close(gate.df(r.detach(), tau), autograd, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", SMOOTH)
def test_df_equals_autograd_with_per_token_tau_tensor(name):
    gate = get_gate(name)
    r = grid().requires_grad_(True)
    tau = torch.where(torch.arange(r.numel()) % 2 == 0, 10.0, 12.0).to(torch.float64)
    (autograd,) = torch.autograd.grad(gate.f(r, tau).sum(), r)
    torch.testing.assert_close(gate.df(r.detach(), tau), autograd, rtol=1e-10, atol=1e-12)
    # Per-token tau must equal evaluating each tau separately.
    torch.testing.assert_close(gate.f(r.detach(), tau)[::2], gate.f(r.detach()[::2], 10.0))


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("tau", (1.0, 10.0, 12.0))
def test_saturation_band_upper_limit(name, tau):
    gate = get_gate(name)
    c = SMOOTH[name]
    # Far from r = 1 the gate flattens at 1 + c/tau; the slowest tail (softsign, ~1/u) needs a large r.
    big = torch.tensor([1e9], dtype=torch.float64)
    assert gate.f(big, tau).item() == pytest.approx(1.0 + c / tau, rel=1e-6)
    # ... and it stays strictly inside the band everywhere.
    values = gate.f(grid(), tau)
    assert float(values.max()) <= 1.0 + c / tau + 1e-12
    assert float(values.min()) >= 1.0 - c / tau - 1e-12


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("tau", (5.0, 10.0, 12.0))
def test_saturation_band_lower_limit_reached_at_r0_for_large_tau(name, tau):
    # For tau(r−1) -> −inf the gate tends to 1 − c/tau; at r = 0 that needs tau large (u = −tau).
    gate = get_gate(name)
    c = SMOOTH[name]
    below = torch.tensor([-1e9], dtype=torch.float64)  # the formula's limit, outside the r >= 0 domain
    assert gate.f(below, tau).item() == pytest.approx(1.0 - c / tau, rel=1e-6)
    zero = torch.zeros(1, dtype=torch.float64)
    assert gate.f(zero, tau).item() < 1.0 - c / tau + 0.2 / tau


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("tau", PAPER_TAUS)
def test_gate_positive_at_r0(name, tau):
    assert get_gate(name).f(torch.zeros(1, dtype=torch.float64), tau).item() > 0.0


def test_sigmoid_values_by_hand():
    gate = get_gate("sigmoid")
    r = torch.tensor([0.0, 2.0], dtype=torch.float64)
    sig = 1 / (1 + math.exp(-1.0))
    expected = [4 * (1 - sig) + 1 - 2, 4 * sig + 1 - 2]
    torch.testing.assert_close(gate.f(r, 1.0), torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(gate.df(r, 1.0), torch.full((2,), 4 * sig * (1 - sig), dtype=torch.float64))


def test_clip_gate_is_sign_aware_and_matches_autograd():
    gate = get_gate("clip", eps_low=0.1, eps_high=0.3)
    r = torch.tensor([0.5, 0.95, 1.2, 1.5, 0.5, 0.95, 1.2, 1.5], dtype=torch.float64, requires_grad=True)
    positive = torch.tensor([True] * 4 + [False] * 4)
    f = gate.f(r, 1.0, positive)
    torch.testing.assert_close(f.detach(), torch.tensor([0.5, 0.95, 1.2, 1.3, 0.9, 0.95, 1.2, 1.5]).double())
    (autograd,) = torch.autograd.grad(f.sum(), r)
    expected_df = torch.tensor([1, 1, 1, 0, 0, 1, 1, 1], dtype=torch.float64)
    torch.testing.assert_close(gate.df(r.detach(), 1.0, positive), expected_df)
    torch.testing.assert_close(autograd, expected_df)
    # Without a sign both sides clip.
    torch.testing.assert_close(gate.f(r.detach(), 1.0), torch.tensor([0.9, 0.95, 1.2, 1.3] * 2).double())


def test_none_gate_is_identity():
    r = grid()
    torch.testing.assert_close(NoGate().f(r, 3.0), r)
    torch.testing.assert_close(NoGate().df(r, 3.0), torch.ones_like(r))


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("tau", TAUS)
def test_smooth_gates_are_admissible(name, tau):
    report = check_admissible(name, tau)
    assert report.admissible, str(report)
    assert [c.name for c in report.checks] == list(PROPERTIES)
    assert report.failed == []


def test_clip_fails_continuity_at_the_clip_edge():
    report = check_admissible(ClipGate(eps_low=0.2, eps_high=0.28), 1.0)
    assert not report.admissible
    assert "C1" in report.failed and "max_at_1" in report.failed
    assert "tail" not in report.failed
    c1 = report["C1"]
    assert c1.worst == pytest.approx(1.0)  # f' jumps from 1 to 0
    assert min(abs(c1.at_r - 0.8), abs(c1.at_r - 1.28)) < 1e-6
    text = str(report)
    assert "NOT admissible" in text and "C1" in text and "jumps" in text


def test_none_fails_unique_max_and_tail():
    report = check_admissible("none", 10.0)
    assert set(report.failed) == {"max_at_1", "tail"}
    assert report["tail"].worst == pytest.approx(1e6)  # r·f'(r) = r at the far end
    assert report["max_at_1"].worst == pytest.approx(1.0)


def test_check_detects_a_df_that_is_not_f_prime():
    class WrongDf(Gate):
        name = "wrong"

        def f(self, r, tau, positive=None):
            return get_gate("arctan").f(r, tau)

        def df(self, r, tau, positive=None):
            return get_gate("softsign").df(r, tau)  # smooth and admissible-looking, but not f'

    report = check_admissible(WrongDf(), 1.0)
    assert report.failed == ["C1"]
    assert "numerical derivative" in report["C1"].message


def test_check_detects_a_non_monotone_derivative():
    class Bump(Gate):
        # f' = 1/(1+u²) + a bump at r = 6: smooth, f'(1) = 1, but f' rises again right of 1.
        name = "bump"

        def f(self, r, tau, positive=None):
            return get_gate("arctan").f(r, tau) + 0.1 * torch.erf(r - 6.0) * math.sqrt(math.pi) / 2

        def df(self, r, tau, positive=None):
            return get_gate("arctan").df(r, tau) + 0.1 * torch.exp(-((r - 6.0) ** 2))

    report = check_admissible(Bump(), 5.0)
    assert report.failed == ["monotone"]
    assert 1.0 < report["monotone"].at_r < 6.0


def test_get_gate_by_dotted_path_passes_only_accepted_kwargs():
    path = f"{TinyGate.__module__}.TinyGate"
    gate = get_gate(path, slope=0.5, eps_low=0.1, eps_high=0.3)
    assert isinstance(gate, TinyGate) and gate.slope == 0.5
    assert gate.f(torch.tensor([3.0]), 1.0).item() == pytest.approx(2.0)
    clip = get_gate("clip", eps_low=0.1, eps_high=0.3)
    assert (clip.eps_low, clip.eps_high) == (0.1, 0.3)
    assert isinstance(get_gate("sigmoid", eps_low=0.1, eps_high=0.3), Gate)
    assert get_gate(gate) is gate


@pytest.mark.parametrize("bad", ["sigmod", "lit_sapo.gates.NoSuchGate", "no_such_pkg.Gate", "math.pi"])
def test_unknown_gate_names_the_setting_and_the_choices(bad):
    with pytest.raises(ValueError) as err:
        get_gate(bad)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("gate:") and repr(bad) in message
    for name in GATE_NAMES:
        assert name in message


def test_clip_df_matches_autograd_exactly_on_the_clip_edges():
    gate = ClipGate(eps_low=0.5, eps_high=0.5)  # edges 0.5 and 1.5 are exact in binary
    r = torch.tensor([0.5, 1.5, 0.5, 1.5], dtype=torch.float64, requires_grad=True)
    positive = torch.tensor([True, True, False, False])
    (autograd,) = torch.autograd.grad(gate.f(r, 1.0, positive).sum(), r)
    torch.testing.assert_close(gate.df(r.detach(), 1.0, positive), autograd)
    torch.testing.assert_close(autograd, torch.ones(4, dtype=torch.float64))
