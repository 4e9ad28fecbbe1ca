"""Padding-free scoring: the packed layout by hand, and packed = padded values and gradients on a real model."""

import pytest
import torch

from lit_sapo.models import LoraSettings, ModelSpec, load_policy
from lit_sapo.packing import pack_groups, scored_lengths
from lit_sapo.scoring import completion_logprobs, install_scoring_head

PAD = 0


def test_layout_by_hand():
    # group 7: prompt [11, 12, 13], completions [21, 22] and [31, 32, 33]; group 8: prompt [41, 42] (left-padded),
    # completions [51] and a fully masked one
    prompt_ids = torch.tensor([[11, 12, 13], [11, 12, 13], [PAD, 41, 42], [PAD, 41, 42]])
    prompt_mask = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 1, 1], [0, 1, 1]])
    completion_ids = torch.tensor([[21, 22, PAD], [31, 32, 33], [51, PAD, PAD], [61, 62, PAD]])
    completion_mask = torch.tensor([[1.0, 1, 0], [1, 1, 1], [1, 0, 0], [0, 0, 0]])
    lengths = scored_lengths(completion_mask)
    assert lengths.tolist() == [2, 3, 1, 0]
    layout = pack_groups(prompt_ids, prompt_mask, completion_ids, torch.tensor([7, 7, 8, 8]), lengths,
                         row_tokens=100, pad_token_id=PAD)
    # one row: [11 12 | 13 21 | 13 31 32] [41 | 42]
    assert layout.input_ids.tolist() == [[11, 12, 13, 21, 13, 31, 32, 41, 42]]
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4, 0, 1]]
    assert layout.keep.tolist() == [[False, False, True, True, True, True, True, False, True]]
    assert layout.targets.tolist() == [21, 22, 31, 32, 33, 51]
    assert layout.gather[:3].tolist() == [[0, 1, 0], [2, 3, 4], [5, 0, 0]]
    assert layout.scored.tolist() == [[True, True, False], [True, True, True], [True, False, False],
                                      [False, False, False]]
    allowed = layout.allowed[0, 0]
    # the second completion's first token (col 4) sees the prompt and itself, not the first completion
    assert allowed[4].tolist() == [True, True, False, False, True, False, False, False, False]
    # group 8 sees nothing of group 7
    assert allowed[8].tolist() == [False] * 7 + [True, True]
    # a row budget smaller than both groups: one row each, the shorter right-padded; a pad sees only itself
    split = pack_groups(prompt_ids, prompt_mask, completion_ids, torch.tensor([7, 7, 8, 8]), lengths,
                        row_tokens=4, pad_token_id=PAD)
    assert split.input_ids.tolist() == [[11, 12, 13, 21, 13, 31, 32], [41, 42, PAD, PAD, PAD, PAD, PAD]]
    assert split.allowed[1, 0, 3].tolist() == [False, False, False, True, False, False, False]
    assert split.targets.tolist() == [21, 22, 31, 32, 33, 51]


def _ragged_batch(vocab: int, g: torch.Generator):
    n, p, c = 6, 7, 9
    prompt_ids = torch.randint(1, vocab, (3, p), generator=g).repeat_interleave(2, 0)
    prompt_mask = torch.ones(n, p, dtype=torch.long)
    prompt_mask[2:4, :3] = 0  # left padding
    prompt_mask[4:, :6] = 0  # a one-token prompt
    prompt_ids[prompt_mask == 0] = PAD
    completion_ids = torch.randint(1, vocab, (n, c), generator=g)
    completion_mask = torch.ones(n, c)
    for row, length in enumerate([9, 4, 1, 6, 0, 3]):  # row 4 fully masked
        completion_mask[row, length:] = 0
    group_ids = torch.arange(n) // 2
    return prompt_ids, prompt_mask, completion_ids, completion_mask, group_ids


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("row_tokens", [1, 1024])
def test_packed_values_and_gradients_equal_the_padded_rows(attention, row_tokens):
    torch.manual_seed(0)
    policy = load_policy(ModelSpec(name="tiny-random-llama"))
    policy.set_attn_implementation(attention)
    head = install_scoring_head(policy)
    prompt_ids, prompt_mask, completion_ids, mask, group_ids = _ragged_batch(policy.config.vocab_size,
                                                                             torch.Generator().manual_seed(1))
    weights = torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) * mask
    results = []
    for packed in (False, True):
        policy.zero_grad(set_to_none=True)
        logp, entropy = completion_logprobs(policy, head, prompt_ids, prompt_mask, completion_ids, mask,
                                            temperature=0.7, with_entropy=True,
                                            group_ids=group_ids if packed else None, pack_row_tokens=row_tokens)
        (logp * weights).sum().backward()
        grads = torch.cat([q.grad.flatten() for q in policy.parameters()])
        results.append((logp * mask, entropy * mask, grads))
    (lp_a, ent_a, grad_a), (lp_b, ent_b, grad_b) = results
    assert lp_a.abs().sum() > 0 and grad_a.abs().sum() > 0
    torch.testing.assert_close(lp_b, lp_a, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent_b, ent_a, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grad_b, grad_a, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", [ModelSpec(name="tiny-random-llama", lora=LoraSettings(r=2, alpha=4)),
                                  ModelSpec(name="tiny-random-llama", gradient_checkpointing=True)],
                         ids=["lora", "gradient-checkpointing"])
def test_packing_with_lora_and_gradient_checkpointing(spec):
    policy = load_policy(spec).train()
    head = install_scoring_head(policy)
    prompt_ids, prompt_mask, completion_ids, mask, group_ids = _ragged_batch(policy.config.vocab_size,
                                                                             torch.Generator().manual_seed(1))
    results = []
    for groups in (None, group_ids):
        policy.zero_grad(set_to_none=True)
        logp, _ = completion_logprobs(policy, head, prompt_ids, prompt_mask, completion_ids, mask, group_ids=groups)
        (logp * mask).sum().backward()
        results.append((logp * mask, torch.cat([q.grad.flatten() for q in policy.parameters() if q.grad is not None])))
    assert results[0][1].abs().sum() > 0
    torch.testing.assert_close(results[1][0], results[0][0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(results[1][1], results[0][1], atol=2e-5, rtol=1e-4)


def test_a_fully_masked_micro_batch_still_runs_forward_and_backward():
    # FSDP2 ranks must all run the same collectives: an all-masked micro-batch scores a phantom token
    policy = load_policy(ModelSpec(name="tiny-random-llama"))
    head = install_scoring_head(policy)
    prompt_ids, prompt_mask, completion_ids, mask, group_ids = _ragged_batch(policy.config.vocab_size,
                                                                             torch.Generator().manual_seed(1))
    mask = torch.zeros_like(mask)
    logp, _ = completion_logprobs(policy, head, prompt_ids, prompt_mask, completion_ids, mask, group_ids=group_ids)
    assert logp.abs().sum() == 0
    logp.sum().backward()
    grads = [q.grad for q in policy.parameters()]
    assert all(g is not None for g in grads) and all(g.abs().sum() == 0 for g in grads)


@pytest.mark.parametrize("rows", [1, 8, 200])
def test_the_output_layer_outside_scoring_is_the_plain_linear_layer(rows):
    # few rows (decode) take the transposed product on CPU: same logits as F.linear up to fp32 rounding
    policy = load_policy(ModelSpec(name="tiny-random-llama"))
    head = install_scoring_head(policy)
    hidden = torch.randn(rows, 1, head.in_features, generator=torch.Generator().manual_seed(rows))
    logits = head(hidden)
    assert logits.shape == (rows, 1, head.out_features)
    torch.testing.assert_close(logits, torch.nn.functional.linear(hidden, head.weight), atol=1e-5, rtol=1e-5)
