"""SAPOModule pieces: the lr schedule, gradient accumulation, the mismatch correction."""

import json
import math
from pathlib import Path

import pytest
import torch

from lit_sapo import cli
from lit_sapo.correction import rollout_correction_weights
from lit_sapo.models import ModelSpec
from lit_sapo.module import OptimizerSettings, SAPOModule, StepOutput, lr_factor
from lit_sapo.rollout import RolloutBatch

ROOT = Path(__file__).resolve().parents[1]


def test_lr_schedule_warmup_then_linear_and_cosine():
    linear = OptimizerSettings(warmup_steps=2, schedule="linear")
    assert [lr_factor(s, linear, 10) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, linear, 10) == 1.0 and lr_factor(6, linear, 10) == 0.5 and lr_factor(10, linear, 10) == 0.0
    cosine = OptimizerSettings(schedule="cosine", min_lr_ratio=0.1)
    assert math.isclose(lr_factor(5, cosine, 10), 0.1 + 0.9 * 0.5)
    assert math.isclose(lr_factor(10, cosine, 10), 0.1)
    assert lr_factor(7, OptimizerSettings(), 10) == 1.0


def _fixed_batch(module: SAPOModule, n: int = 4, p: int = 5, c: int = 6) -> RolloutBatch:
    g = torch.Generator().manual_seed(0)
    vocab = module.policy.config.vocab_size
    mask = torch.ones(n, c)
    mask[1, 3:] = 0  # ragged completions: token-weighting matters
    mask[3, 1:] = 0
    prompt_mask = torch.ones(n, p, dtype=torch.long)
    prompt_mask[2:, :2] = 0
    return RolloutBatch(
        rollout_index=0, weight_version=0, temperature=1.0,
        # groups of 2 completions share a prompt (row i*2 + j), the second prompt is left-padded
        prompt_ids=torch.randint(0, vocab, (n // 2, p), generator=g).repeat_interleave(2, 0), prompt_mask=prompt_mask,
        completion_ids=torch.randint(0, vocab, (n, c), generator=g), completion_mask=mask,
        sampler_logprobs=torch.zeros(n, c), advantages=torch.tensor([1.0, -0.5, 0.25, -2.0]),
        rewards=torch.zeros(n), group_ids=torch.arange(n) // 2, prompts=[""] * n, completions=[""] * n,
        answers=[""] * n, reward_components={})


@pytest.mark.parametrize("aggregation", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_and_packed_rows_give_the_whole_minibatch_gradient(aggregation):
    grads = []
    # reference: whole minibatch, one padded row per completion; then micro-batches, packed rows, both
    for micro, share in ((None, False), (1, False), (3, False), (None, True), (2, True), (3, True), (1, True)):
        module = SAPOModule(model=ModelSpec(name="tiny-random-llama"), aggregation=aggregation, norm_length=8,
                            micro_batch_size=micro, compute_entropy=False, padding_free=share, pack_row_tokens=8)
        module.configure_model()
        module.manual_backward = lambda loss: loss.backward()  # no Trainer here
        batch = _fixed_batch(module)
        old = module._score_all(batch) + 0.05  # off-policy: r != 1, so the gate acts
        rows = torch.arange(batch.size)
        module._update(batch, rows, old, None, None, 0, 0, StepOutput(torch.zeros(()), batch, old))
        grads.append(torch.cat([q.grad.flatten() for q in module.policy.parameters() if q.grad is not None]))
    assert grads[0].abs().sum() > 0
    # padding-free rows sum the prompt's gradient in another order (RMSNorm and rotary run in fp32 even in a
    # float64 model), so they agree to fp32 rounding: ~5e-6 of gradients up to 1.3 (a wrong mask gives ~1e-2)
    for other in grads[1:]:
        torch.testing.assert_close(other, grads[0], atol=2e-5, rtol=1e-4)


def test_correction_weights_hand_values():
    trainer = torch.tensor([[0.0, -1.0, -2.0], [-1.0, -1.0, 0.0]])
    sampler = torch.tensor([[0.0, -2.0, -2.5], [-1.0, 0.0, float("nan")]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the nan is masked: it must not leak
    w, stats = rollout_correction_weights(trainer, sampler, mask, mode="token_tis", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 2.0, math.exp(0.5)], [1.0, math.exp(-1.0), 0.0]]))
    w, stats = rollout_correction_weights(trainer, sampler, mask, mode="token_mask", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    assert math.isclose(float(stats["masked_frac"]), 2 / 5, rel_tol=1e-6)
    w, _ = rollout_correction_weights(trainer, sampler, mask, mode="seq_tis", cap=2.0)
    torch.testing.assert_close(w[:, 0], torch.tensor([2.0, math.exp(-1.0)]))  # exp(1.5) capped at 2
    w, _ = rollout_correction_weights(trainer, sampler, mask, mode="seq_mask", cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))  # mean log w 0.5, -0.5
    log_w = torch.tensor([0.0, 1.0, 0.5, 0.0, -1.0], dtype=torch.float64)  # trainer - sampler on valid tokens
    assert math.isclose(float(stats["kl"]), float((log_w.expm1() - log_w).mean()), rel_tol=1e-9)
    with pytest.raises(ValueError, match="rollout_correction"):
        rollout_correction_weights(trainer, sampler, mask, mode="tis")


def test_fit_with_a_mismatch_correction_logs_it(tmp_path):
    result = cli.main(["fit", "--config", str(ROOT / "tests" / "data" / "tiny.yaml"),
                       "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path),
                       "--trainer.max_steps", "2", "--model.rollout_correction", "token_tis",
                       "--data.rewards", json.dumps({"tests.recorders.LengthReward": 1.0})])
    metrics = result.trainer.callback_metrics
    # HF sampling at temperature 1 without top-p: sampler and trainer log-probs agree up to float noise
    assert float(metrics["mismatch/kl"]) < 1e-4
    assert abs(float(metrics["mismatch/is_weight_mean"]) - 1.0) < 1e-3
    assert float(metrics["mismatch/masked_frac"]) == 0.0


@pytest.mark.parametrize("scale", [1.0, 0.1, 1e-3])
def test_mismatch_kl_estimates_the_exact_kl_of_two_categoricals(scale):
    """mismatch/kl on tokens drawn from the sampler p, scored by the trainer q, estimates KL(p || q)."""
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.tensor([1.0, 0.5, -0.3, -1.0, 0.2], dtype=torch.float64), 0)
    q = torch.softmax(torch.log(p) + scale * torch.tensor([0.3, -0.4, 0.8, 0.1, -0.6], dtype=torch.float64), 0)
    exact = float((p * (p.log() - q.log())).sum())
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=gen).view(400, 500)
    sampler, trainer = p.log()[tokens].float(), q.log()[tokens].float()
    _, stats = rollout_correction_weights(trainer, sampler, torch.ones_like(sampler), mode="token_tis", cap=1e9)
    # Monte-Carlo error of 2e5 samples: a few % of the value at every scale (the chi^2 - KL form is 2x off)
    assert float(stats["kl"]) == pytest.approx(exact, rel=0.05)
    assert float(stats["kl"]) > 0
