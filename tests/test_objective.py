import math

import pytest
import torch

from lit_sapo.gates import GATE_NAMES, ClipGate
from lit_sapo.objective import GateTerms, LossSettings, aggregate, kl_estimate, masked_mean, policy_loss

F64 = torch.float64


def random_batch(seed=0, batch=5, length=7, spread=0.5):
    """float64 logp/old_logp with a ragged mask (every row keeps >= 1 token) and advantages of both signs."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=g, dtype=F64) * 3
    logp = (old + spread * torch.randn(batch, length, generator=g, dtype=F64)).requires_grad_(True)
    lengths = torch.tensor([7, 3, 5, 1, 6][:batch])
    mask = torch.arange(length)[None, :] < lengths[:, None]
    adv = torch.tensor([1.3, -0.7, 0.4, -1.1, 0.9][:batch], dtype=F64)
    return logp, old, adv, mask


def seq_mean_token_mean(per_token, mask):
    m = mask.to(per_token.dtype)
    return ((per_token * m).sum(-1) / m.sum(-1)).mean()


def grad_of(loss, x):
    (g,) = torch.autograd.grad(loss, x)
    return g


# ------------------------------------------------------------------ agreement with reference losses


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (10.0, 12.0)])
def test_sigmoid_gate_matches_trl_and_verl_sapo(tau_pos, tau_neg):
    logp, old, adv, mask = random_batch()
    # Independent re-implementation of TRL's loss_type="sapo" / verl's compute_policy_loss_sapo.
    ratio = torch.exp(logp - old)
    tau = torch.where(adv > 0, torch.tensor(tau_pos, dtype=F64), torch.tensor(tau_neg, dtype=F64))[:, None]
    reference = seq_mean_token_mean(-(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * adv[:, None], mask)
    # Our gate adds 1 − 2/tau (so that f(1) = 1): a constant that shifts the loss, never the gradient.
    constant = seq_mean_token_mean(-(1 - 2 / tau) * adv[:, None] * torch.ones_like(ratio), mask)

    loss, _ = policy_loss(logp, old, adv, mask, LossSettings(gate="sigmoid", tau_pos=tau_pos, tau_neg=tau_neg))
    assert loss.item() == pytest.approx((reference + constant).item(), abs=1e-10)
    expected_grad = grad_of(reference, logp)
    assert expected_grad.abs().max() > 1e-3  # the comparison is not trivially 0 == 0
    torch.testing.assert_close(grad_of(loss, logp), expected_grad, rtol=0, atol=1e-6)


def test_clip_gate_matches_ppo_clipped_objective_with_asymmetric_eps():
    logp, old, adv, mask = random_batch(seed=1, spread=0.4)
    eps_low, eps_high = 0.2, 0.28
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    reference = seq_mean_token_mean(-torch.min(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a), mask)

    loss, stats = policy_loss(logp, old, adv, mask, LossSettings(gate="clip", eps_low=eps_low, eps_high=eps_high))
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    torch.testing.assert_close(grad_of(loss, logp), grad_of(reference, logp), rtol=0, atol=1e-12)
    assert 0.0 < stats["clip_frac"].item() < 1.0  # the example does exercise clipping


def test_none_gate_is_importance_weighted_policy_gradient():
    logp, old, adv, mask = random_batch(seed=2)
    reference = seq_mean_token_mean(-torch.exp(logp - old) * adv[:, None], mask)
    loss, _ = policy_loss(logp, old, adv, mask, LossSettings(gate="none"))
    assert loss.item() == pytest.approx(reference.item(), abs=1e-12)
    torch.testing.assert_close(grad_of(loss, logp), grad_of(reference, logp))


def test_gate_object_is_used_as_given():
    logp, old, adv, mask = random_batch(seed=3, spread=0.4)
    by_object, _ = policy_loss(logp, old, adv, mask, LossSettings(gate=ClipGate(0.1, 0.3), eps_low=0.5, eps_high=0.5))
    by_name, _ = policy_loss(logp, old, adv, mask, LossSettings(gate="clip", eps_low=0.1, eps_high=0.3))
    wider, _ = policy_loss(logp, old, adv, mask, LossSettings(gate="clip", eps_low=0.5, eps_high=0.5))
    assert by_object.item() == by_name.item() != wider.item()


@pytest.mark.parametrize("tau_pos,tau_neg", [(1.0, 1.05), (10.0, 12.0)])
def test_on_policy_every_gate_is_plain_policy_gradient(tau_pos, tau_neg):
    logp, _, adv, mask = random_batch(seed=4)
    old = logp.detach().clone()
    plain = grad_of(seq_mean_token_mean(-logp * adv[:, None], mask), logp)
    for name in GATE_NAMES:
        loss, stats = policy_loss(logp, old, adv, mask, LossSettings(gate=name, tau_pos=tau_pos, tau_neg=tau_neg))
        torch.testing.assert_close(grad_of(loss, logp), plain, rtol=0, atol=1e-12, msg=name)
        assert stats["eur"].item() == pytest.approx(1.0)
        assert stats["ratio_var"].item() == 0.0


def test_zero_advantage_tokens_get_zero_gradient():
    logp, old, adv, mask = random_batch(seed=5)
    adv = adv.clone()
    adv[2] = 0.0
    for name in GATE_NAMES:
        loss, _ = policy_loss(logp, old, adv, mask, LossSettings(gate=name))
        g = grad_of(loss, logp)
        assert torch.equal(g[2], torch.zeros_like(g[2])), name
        assert g[0].abs().sum() > 0, name


# ------------------------------------------------------------------ numerical safety


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("name", GATE_NAMES)
def test_extreme_ratios_and_masked_inf_nan_stay_finite(name, level):
    old = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("inf"), float("nan")]], dtype=F64)
    logp_values = torch.tensor([[1e3, -1e3, 0.5, -0.2], [-1e3, 1e3, float("nan"), float("-inf")]], dtype=F64)
    logp = logp_values.requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=F64)  # 0/1 float mask
    ref = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, float("nan"), float("inf")]], dtype=F64)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, float("nan"), 1.0]], dtype=F64)
    loss, stats, terms = policy_loss(logp, old, adv, mask, LossSettings(gate=name, level=level, kl_coef=0.1),
                                     ref_logp=ref, return_terms=True)
    g = grad_of(loss, logp)
    assert torch.isfinite(loss), name
    assert torch.isfinite(g).all(), name
    assert torch.equal(g[1, 2:], torch.zeros(2, dtype=F64))  # masked positions get exactly zero
    assert all(torch.isfinite(v) for v in stats.values()), stats
    assert terms.log_ratio.abs().max().item() <= 20.0  # the default clamp


def test_naive_masking_would_leak_nan_into_grads():
    # Guards the reason the objective uses torch.where: multiplying by the mask does not stop nan.
    logp = torch.tensor([[0.0, float("nan")]], requires_grad=True)
    naive = (torch.exp(logp) * torch.tensor([[1.0, 0.0]])).sum()
    assert torch.isnan(naive)
    loss, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([1.0]), torch.tensor([[True, False]]))
    assert torch.isfinite(loss) and torch.isfinite(grad_of(loss, logp)).all()


def test_all_masked_batch_gives_zero_loss_and_zero_grads():
    logp = torch.full((2, 3), float("nan"), dtype=F64, requires_grad=True)
    mask = torch.zeros(2, 3, dtype=torch.bool)
    loss, stats = policy_loss(logp, torch.zeros(2, 3, dtype=F64), torch.tensor([1.0, -1.0], dtype=F64), mask)
    assert loss.item() == 0.0
    assert torch.equal(grad_of(loss, logp), torch.zeros(2, 3, dtype=F64))
    assert stats["tokens"].item() == 0 and stats["eur"].item() == 0.0


def test_low_precision_inputs_compute_in_float32():
    logp, old, adv, mask = random_batch(seed=6)
    loss, stats = policy_loss(logp.detach().bfloat16(), old.bfloat16(), adv.bfloat16(), mask)
    assert loss.dtype == torch.float32 and stats["eur"].dtype == torch.float32


# ------------------------------------------------------------------ aggregation, levels, KL, weights


def test_aggregation_modes_by_hand():
    nan = float("nan")
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, nan, nan], [9.0, 9.0, 9.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)  # row 3 is empty: skipped
    assert aggregate(values, mask, "token-mean").item() == pytest.approx(10 / 4)
    assert aggregate(values, mask, "seq-mean-token-mean").item() == pytest.approx((2 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum").item() == pytest.approx((6 + 4) / 2)
    assert aggregate(values, mask, "seq-mean-token-sum-norm", norm_length=4).item() == pytest.approx(1.25)
    assert masked_mean(values, mask).item() == pytest.approx(2.5)
    torch.testing.assert_close(masked_mean(values, mask, dim=-1), torch.tensor([2.0, 4.0, 0.0], dtype=F64))


def test_aggregation_errors_name_the_argument():
    values, mask = torch.ones(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"^norm_length:"):
        aggregate(values, mask, "seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match=r"^aggregation: .*'seq-sum'"):
        aggregate(values, mask, "seq-sum")


def test_policy_loss_aggregation_weights_sequences_and_tokens_differently():
    # none gate, on-policy: per-token loss is −A. Row 1: 3 tokens of A=1; row 2: 1 token of A=−2.
    logp = torch.zeros(2, 3, dtype=F64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -2.0], dtype=F64)
    expected = {
        "token-mean": (-3 + 2) / 4,
        "seq-mean-token-mean": (-1 + 2) / 2,
        "seq-mean-token-sum": (-3 + 2) / 2,
        "seq-mean-token-sum-norm": (-3 / 3 + 2 / 3) / 2,
    }
    for aggregation, value in expected.items():
        loss, _ = policy_loss(logp, logp, adv, mask, LossSettings(gate="none", aggregation=aggregation, norm_length=3))
        assert loss.item() == pytest.approx(value), aggregation


def test_sequence_level_ratio_by_hand():
    logp = torch.tensor([[0.2, 0.4, 7.0]], dtype=F64, requires_grad=True)
    old = torch.zeros(1, 3, dtype=F64)
    mask = torch.tensor([[True, True, False]])
    adv = torch.tensor([2.0], dtype=F64)
    loss, stats, terms = policy_loss(logp, old, adv, mask, LossSettings(gate="none", level="sequence"),
                                     return_terms=True)
    s = math.exp(0.3)  # geometric mean of the token ratios e^0.2, e^0.4
    assert loss.item() == pytest.approx(-2 * s)
    # d/dlogp_t of −A·exp(mean_t log r) = −A·s/|valid tokens|
    torch.testing.assert_close(grad_of(loss, logp), torch.tensor([[-s, -s, 0.0]], dtype=F64))
    torch.testing.assert_close(terms.ratio[0, :2], torch.tensor([s, s], dtype=F64))
    assert stats["ratio_var"].item() == pytest.approx(0.0, abs=1e-15)

    loss, _ = policy_loss(logp, old, adv, mask, LossSettings(gate="sigmoid", level="sequence", tau_pos=10.0))
    sapo = 4 / 10 / (1 + math.exp(-10 * (s - 1))) + 1 - 2 / 10
    assert loss.item() == pytest.approx(-2 * sapo)


def test_kl_estimators_by_hand():
    logp = torch.tensor([[-1.0, -2.0]], dtype=F64)
    ref = torch.tensor([[-1.5, -1.0]], dtype=F64)  # ref − logp = [−0.5, 1]
    expected = {
        "k1": [0.5, -1.0],
        "k2": [0.125, 0.5],
        "k3": [math.exp(-0.5) + 0.5 - 1, math.e - 1 - 1],
    }
    for estimator, values in expected.items():
        torch.testing.assert_close(kl_estimate(logp, ref, estimator), torch.tensor([values], dtype=F64))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_enters_loss_and_gradient(estimator):
    logp = torch.tensor([[-1.0, -2.0, 5.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, float("nan")]], dtype=F64)
    mask = torch.tensor([[True, True, False]])
    adv = torch.zeros(1, dtype=F64)  # no policy-gradient term: the loss is the KL term alone
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, LossSettings(kl_coef=0.1, kl_estimator=estimator),
                              ref_logp=ref)
    kl = kl_estimate(logp.detach()[:, :2], ref[:, :2], estimator).mean()
    assert stats["kl"].item() == pytest.approx(kl.item())
    assert loss.item() == pytest.approx(0.1 * kl.item())
    assert stats["pg_loss"].item() == 0.0
    d = torch.tensor([-0.5, 1.0], dtype=F64)  # ref − logp
    dkl = {"k1": torch.ones(2, dtype=F64), "k2": -d, "k3": 1 - torch.exp(d)}[estimator]
    torch.testing.assert_close(grad_of(loss, logp)[0], torch.cat([0.1 * dkl / 2, torch.zeros(1, dtype=F64)]))


def test_is_weights_scale_loss_and_are_detached():
    logp, old, adv, mask = random_batch(seed=7)
    base, _ = policy_loss(logp, old, adv, mask)
    base_grad = grad_of(base, logp)
    weights = torch.full((5,), 2.0, dtype=F64, requires_grad=True)
    doubled, _ = policy_loss(logp, old, adv, mask, is_weights=weights)
    assert doubled.item() == pytest.approx(2 * base.item())
    torch.testing.assert_close(grad_of(doubled, logp), 2 * base_grad)
    # Per-token weights: on-policy none gate, the loss is −agg(w·A).
    w = torch.tensor([[0.5, 1.5, 9.0]], dtype=F64)
    mask1 = torch.tensor([[True, True, False]])
    loss, _ = policy_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([2.0]), mask1, is_weights=w)
    assert loss.item() == pytest.approx(-2.0)
    weighted, _ = policy_loss(logp, old, adv, mask, is_weights=weights)
    weighted.backward()
    assert weights.grad is None


# ------------------------------------------------------------------ stats and terms


def test_stats_by_hand_for_clip_gate():
    # Row 1 (A = +1): r = [1, 1.5, 0.5, 1.1]; row 2 (A = −1): r = [0.5, 1.5], then padding.
    r = torch.tensor([[1.0, 1.5, 0.5, 1.1], [0.5, 1.5, 1.0, 1.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    old = torch.zeros_like(r)
    loss, stats = policy_loss(r.log(), old, torch.tensor([1.0, -1.0], dtype=F64), mask, LossSettings(gate="clip"))
    # f' (eps 0.2): A>0 → [1, 0, 1, 1]; A<0 → [0 (0.5 < 0.8), 1]
    assert stats["eur"].item() == pytest.approx(4 / 6)
    assert stats["eur_pos"].item() == pytest.approx(3 / 4)
    assert stats["eur_neg"].item() == pytest.approx(1 / 2)
    assert (stats["tokens"].item(), stats["tokens_pos"].item(), stats["tokens_neg"].item()) == (6, 4, 2)
    assert stats["clip_frac"].item() == pytest.approx(2 / 6)
    assert stats["gated_frac"].item() == pytest.approx(2 / 6)
    ratios = [1.0, 1.5, 0.5, 1.1, 0.5, 1.5]
    mean = sum(ratios) / 6
    assert stats["ratio_mean"].item() == pytest.approx(mean)
    assert stats["ratio_var"].item() == pytest.approx(sum((x - mean) ** 2 for x in ratios) / 6)
    logs = [math.log(x) for x in ratios]
    log_mean = sum(logs) / 6
    assert stats["log_ratio_var"].item() == pytest.approx(sum((x - log_mean) ** 2 for x in logs) / 6)
    assert (stats["ratio_min"].item(), stats["ratio_max"].item()) == pytest.approx((0.5, 1.5))
    # f: A>0 → [1, 1.2, 0.5, 1.1]; A<0 → [0.8, 1.5]
    assert stats["gate_mean"].item() == pytest.approx((1 + 1.2 + 0.5 + 1.1 + 0.8 + 1.5) / 6)
    assert stats["kl"].item() == 0.0
    assert stats["loss"].item() == stats["pg_loss"].item() == pytest.approx(loss.item())
    assert stats["eur"].item() == pytest.approx(1 - stats["clip_frac"].item())  # DESIGN: EUR = 1 − clip frac


def test_stats_by_hand_for_sigmoid_gate():
    r = torch.tensor([[1.0, 2.0, 3.0]], dtype=F64)
    _, stats = policy_loss(r.log(), torch.zeros_like(r), torch.tensor([1.0]), torch.ones(1, 3),
                           LossSettings(tau_pos=1.0))

    def slope(x):
        s = 1 / (1 + math.exp(-(x - 1)))
        return 4 * s * (1 - s)

    assert stats["eur"].item() == pytest.approx((slope(1) + slope(2) + slope(3)) / 3)
    assert stats["gated_frac"].item() == pytest.approx(1 / 3)  # only r = 3 has f' = 0.42 < 0.5
    assert stats["clip_frac"].item() == 0.0
    assert stats["tokens_neg"].item() == 0 and stats["eur_neg"].item() == 0.0  # no nan without such tokens
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())


def test_terms_hold_per_token_detached_tensors():
    logp, old, adv, mask = random_batch(seed=8)
    _, stats, terms = policy_loss(logp, old, adv, mask, LossSettings(tau_pos=10.0, tau_neg=12.0), return_terms=True)
    assert isinstance(terms, GateTerms)
    for name in ("log_ratio", "ratio", "gate_value", "gate_grad", "tau", "advantages", "mask"):
        value = getattr(terms, name)
        assert value.shape == logp.shape and not value.requires_grad, name
    expected_tau = torch.where(adv > 0, 10.0, 12.0).to(F64)[:, None].expand_as(logp)
    torch.testing.assert_close(terms.tau[mask], expected_tau[mask])  # padding holds no meaningful tau
    torch.testing.assert_close(terms.advantages[mask], adv[:, None].expand_as(logp)[mask])
    assert terms.gate_grad[terms.mask].mean().item() == pytest.approx(stats["eur"].item())
    torch.testing.assert_close(terms.ratio, terms.log_ratio.exp())


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"level": "word"}, "level"),
        ({"aggregation": "mean"}, "aggregation"),
        ({"kl_estimator": "k4"}, "kl_estimator"),
        ({"tau_pos": 0.0}, "tau_pos"),
        ({"tau_neg": -1.0}, "tau_neg"),
        ({"aggregation": "seq-mean-token-sum-norm"}, "norm_length"),
        ({"kl_coef": 0.1}, "kl_coef"),
        ({"gate": "sigmod"}, "gate"),
        ({"max_log_ratio": 0.0}, "max_log_ratio"),
    ],
)
def test_bad_options_raise_one_line_errors_naming_the_argument(kwargs, argument):
    logp, old, adv, mask = random_batch()
    with pytest.raises(ValueError) as err:
        policy_loss(logp, old, adv, mask, LossSettings(**kwargs))
    assert str(err.value).startswith(argument) and "\n" not in str(err.value)


def test_bad_shapes_raise():
    logp, old, adv, mask = random_batch()
    with pytest.raises(ValueError, match="^advantages"):
        policy_loss(logp, old, adv[:3], mask)
    with pytest.raises(ValueError, match="^logp/old_logp/mask"):
        policy_loss(logp, old[:, :3], adv, mask)
