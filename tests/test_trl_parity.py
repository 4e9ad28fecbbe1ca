"""Exact against TRL itself: TRL's own GRPOTrainer computes the loss of a fixed batch (loss_type "sapo" for the
sigmoid gate, "grpo" for the clip gate) and lit_sapo's scoring + policy_loss must give the same gradients on
every weight, and the same loss up to the sigmoid gate's constant (1 - 2 / tau, which we add so that f(1) = 1)."""

import copy

import pytest
import torch

from lit_sapo.models import ModelSpec, load_policy, load_tokenizer
from lit_sapo.objective import LossSettings, policy_loss
from lit_sapo.scoring import completion_logprobs, install_scoring_head

trl = pytest.importorskip("trl", reason="TRL is not installed (it is in the test extra)")

SPEC = ModelSpec(name="tiny-random-llama")
B, P, C = 4, 5, 6


def _trl_trainer(model, tokenizer, tmp_path, **loss_args):
    from datasets import Dataset

    config = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, use_vllm=False, beta=0.0, num_generations=2,
                            per_device_train_batch_size=B, max_completion_length=C, report_to="none",
                            save_strategy="no", temperature=1.0, seed=0, bf16=False,  # fp32 on both sides
                            **loss_args)
    data = Dataset.from_list([{"prompt": "What is 2+2?"}] * B)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                              args=config, train_dataset=data, processing_class=tokenizer)
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training_step; we call the loss directly
    return trainer


def _fixed_batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    prompt_ids = torch.randint(3, vocab, (B, P), generator=g)
    completion_ids = torch.randint(3, vocab, (B, C), generator=g)
    # unpadded prompts (TRL derives positions from the cache, we from the mask: equal without left padding);
    # ragged completions, advantages of both signs
    completion_mask = (torch.arange(C)[None] < torch.tensor([6, 3, 5, 2])[:, None]).long()
    advantages = torch.tensor([1.2, -0.8, 0.5, -1.5])
    return prompt_ids, torch.ones(B, P, dtype=torch.long), completion_ids, completion_mask, advantages


@pytest.mark.parametrize("gate, loss_args, settings", [
    ("sigmoid", dict(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05), dict(tau_pos=1.0, tau_neg=1.05)),
    ("sigmoid", dict(loss_type="sapo", sapo_temperature_pos=10.0, sapo_temperature_neg=12.0), dict(tau_pos=10.0, tau_neg=12.0)),
    ("clip", dict(loss_type="grpo", epsilon=0.2, epsilon_high=0.28), dict(eps_low=0.2, eps_high=0.28)),
])
def test_trls_own_loss_and_lit_sapos_agree_on_a_fixed_batch(tmp_path, gate, loss_args, settings):
    tokenizer = load_tokenizer(SPEC)
    ours = load_policy(SPEC).train()
    theirs = copy.deepcopy(ours)
    install_scoring_head(ours)
    trainer = _trl_trainer(theirs, tokenizer, tmp_path, **loss_args)
    prompt_ids, prompt_mask, completion_ids, completion_mask, advantages = _fixed_batch(ours.config.vocab_size)
    with torch.no_grad():
        logp0, _ = completion_logprobs(ours, ours.get_output_embeddings(), prompt_ids, prompt_mask, completion_ids,
                                       completion_mask.float())
    # the old policy a little away from the current one: ratios spread over both sides of the clip range
    noise = 0.3 * torch.randn(B, C, generator=torch.Generator().manual_seed(1))
    old = (logp0 + noise) * completion_mask

    trainer.model.train()
    trl_loss = trainer._compute_loss(trainer.model, {
        "prompt_ids": prompt_ids, "prompt_mask": prompt_mask, "completion_ids": completion_ids,
        "completion_mask": completion_mask, "advantages": advantages, "old_per_token_logps": old})
    trl_loss.backward()

    logp, _ = completion_logprobs(ours, ours.get_output_embeddings(), prompt_ids, prompt_mask, completion_ids,
                                  completion_mask.float())
    loss, stats = policy_loss(logp, old, advantages, completion_mask.float(),
                              LossSettings(gate=gate, aggregation="seq-mean-token-mean", **settings))
    loss.backward()

    if gate == "sigmoid":  # our f = TRL's (4/tau) sigmoid(tau (r - 1)) + 1 - 2/tau: a constant shift of the loss
        tau = torch.where(advantages > 0, settings["tau_pos"], settings["tau_neg"])
        constant = (-(1 - 2 / tau) * advantages).mean()
    else:
        constant = torch.tensor(0.0)
    assert loss.item() == pytest.approx(trl_loss.item() + constant.item(), abs=1e-6)
    if gate == "clip":
        assert 0 < float(stats["clip_frac"]) < 1  # the batch exercises the clip
    theirs_grads = dict(theirs.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        q = theirs_grads.get(name)
        if q is None or p.grad is None:
            continue
        assert q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        compared += 1
    assert compared == len(theirs_grads)  # every weight (the tied head included) compared
    assert max(p.grad.abs().max().item() for p in ours.parameters() if p.grad is not None) > 1e-4
