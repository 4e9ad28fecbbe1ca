"""lit_sapo.stats: exact pooled ratio variance and A != 0 token selection."""

import numpy as np
import pytest
import torch

from lit_sapo import stats


@pytest.mark.parametrize("std", [1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0])
def test_merged_chunks_match_exact_float64_variance(std):
    g = torch.Generator().manual_seed(0)
    chunks = [(torch.randn(2, n, generator=g, dtype=torch.float64) * std).float() for n in (7, 13, 29, 5)]
    parts = []
    for lr in chunks:
        adv = torch.ones_like(lr)
        parts.append(stats.ratio_moments(lr, adv, torch.ones_like(lr, dtype=torch.bool)))
    pooled = stats.summarize(stats.merge_all(torch.stack(parts)))
    r = np.exp(np.concatenate([c.double().numpy().ravel() for c in chunks]))
    exact = r.var()  # population variance, ddof 0
    assert abs(pooled["var"][0].item() - exact) / exact < 1e-6
    assert pooled["tokens"][0].item() == r.size


def test_eur_and_gated_frac_ignore_zero_advantage_tokens():
    lr = torch.tensor([[0.0, 0.5, -0.5, 1.0]])
    adv = torch.tensor([[1.0, 0.0, -1.0, 0.0]])
    df = torch.tensor([[1.0, 0.1, 0.2, 0.3]])
    s = stats.summarize(stats.ratio_moments(lr, adv, torch.ones_like(lr, dtype=torch.bool), gate_grad=df))
    assert s["tokens"][0].item() == 2
    assert s["eur"][0].item() == pytest.approx(0.6)  # all-token mean would be 0.4
    assert s["gated_frac"][0].item() == pytest.approx(0.5)  # all-token fraction would be 0.75
