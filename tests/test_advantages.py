import math

import pytest
import torch

from lit_sapo.advantages import ADVANTAGE_METHODS, group_advantages


def _close(x, expected, atol=1e-6):
    torch.testing.assert_close(x, torch.tensor(expected, dtype=x.dtype), atol=atol, rtol=0)


def test_methods_table():
    assert ADVANTAGE_METHODS == ("grpo", "dr_grpo", "rloo")


def test_grpo_hand_computed():
    # Group [1, 0, 0, 1]: mean 0.5, unbiased var = (4 * 0.25) / 3 = 1/3, std = 1/sqrt(3).
    adv, mask = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0]]), "grpo", eps=0.0)
    a = 0.5 * math.sqrt(3)  # 0.8660...
    _close(adv, [[a, -a, -a, a]])
    assert mask.tolist() == [False]
    # Group [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1]; the default eps shifts it by ~1e-6 only.
    adv, _ = group_advantages(torch.tensor([[1.0, 2.0, 3.0]]))
    _close(adv, [[-1.0, 0.0, 1.0]], atol=2e-6)


def test_dr_grpo_hand_computed():
    adv, mask = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 6.0, 3.0]]), "dr_grpo")
    _close(adv, [[0.5, -0.5, -0.5, 0.5], [-2.0, -1.0, 3.0, 0.0]])
    assert mask.tolist() == [False, False]


def test_rloo_hand_computed():
    # Each reward minus the mean of the other three.
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 2.0, 6.0, 3.0]]), "rloo")
    _close(adv, [[2 / 3, -2 / 3, -2 / 3, 2 / 3], [1 - 11 / 3, 2 - 10 / 3, 6 - 2.0, 3 - 3.0]])
    # RLOO = G / (G - 1) * (r - mean)
    adv3, _ = group_advantages(torch.tensor([[1.0, 2.0, 3.0]]), "rloo")
    _close(adv3, [[-1.5, 0.0, 1.5]])


@pytest.mark.parametrize("method", ADVANTAGE_METHODS)
def test_equal_groups_are_exactly_zero_and_flagged(method):
    # 0.1 is not exact in binary: r - mean could leave a residue that the std (~0) would blow up.
    rewards = torch.tensor([[0.1, 0.1, 0.1], [0.0, 1.0, 1.0], [3.0, 3.0, 3.0]])
    adv, mask = group_advantages(rewards, method, eps=1e-12)
    assert mask.tolist() == [True, False, True]
    assert mask.dtype == torch.bool
    assert torch.equal(adv[0], torch.zeros(3)) and torch.equal(adv[2], torch.zeros(3))
    assert adv[1].abs().sum() > 0
    assert mask.float().mean().item() == pytest.approx(2 / 3)


def test_integer_rewards_and_g2():
    adv, mask = group_advantages(torch.tensor([[1, 0], [5, 5]]), "grpo", eps=0.0)
    # G = 2: unbiased std of [1, 0] is sqrt(0.5) -> +-0.5 / 0.7071 = +-0.7071
    assert adv.dtype == torch.float32
    _close(adv, [[math.sqrt(0.5), -math.sqrt(0.5)], [0.0, 0.0]])
    assert mask.tolist() == [False, True]


def test_float64_kept():
    adv, _ = group_advantages(torch.tensor([[1.0, 0.0]], dtype=torch.float64), "dr_grpo")
    assert adv.dtype == torch.float64 and adv.tolist() == [[0.5, -0.5]]


def test_errors():
    with pytest.raises(ValueError, match="num_generations"):
        group_advantages(torch.tensor([[1.0], [0.0]]))
    with pytest.raises(ValueError, match=r"advantage.*grpo, dr_grpo, rloo"):
        group_advantages(torch.tensor([[1.0, 0.0]]), "ppo")
    with pytest.raises(ValueError, match="n_prompts"):
        group_advantages(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[1.0, float("nan")]]))
