"""Validation shards: every held-out prompt is scored exactly once across ranks, and ranks stay in step."""

from types import SimpleNamespace

import pytest

from lit_sapo.rollout import validation_batches


@pytest.mark.parametrize("n, world, batch_size", [(30, 16, 4), (5, 2, 2), (4, 4, 3), (3, 4, 2), (7, 1, 3)])
def test_every_prompt_is_counted_once_and_every_rank_runs_the_same_calls(n, world, batch_size):
    examples = [SimpleNamespace(id=i) for i in range(n)]
    shards = [validation_batches(examples, rank, world, batch_size) for rank in range(world)]
    counted = [ex.id for batches in shards for b in batches for ex, c in zip(b.examples, b.counted) if c]
    assert sorted(counted) == list(range(n))  # AIME's 30 on 16 ranks: none dropped (14 were)
    shapes = {tuple(len(b.examples) for b in batches) for batches in shards}
    assert len(shapes) == 1  # same number and sizes of generate calls on every rank
