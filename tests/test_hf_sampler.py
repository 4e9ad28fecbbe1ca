"""HFSampler: a shared prompt prefill samples from the same distribution as G separate prefills."""

import torch

from lit_sapo.models import ModelSpec, load_policy, load_tokenizer
from lit_sapo.sampling import HFSampler
from lit_sapo.scoring import completion_logprobs, install_scoring_head

SPEC = ModelSpec(name="tiny-random-llama")


def _setup(share_prefill: bool):
    policy, tokenizer = load_policy(SPEC), load_tokenizer(SPEC)
    sampler = HFSampler(max_new_tokens=12, share_prefill=share_prefill)
    sampler.setup(policy, tokenizer)
    return policy, tokenizer, sampler


PROMPTS = [[5, 17, 99, 3, 42, 8], [7, 64, 11], [250, 9, 31, 77]]  # ragged: left padding in the batch


def test_greedy_completions_are_the_same_with_and_without_a_shared_prefill():
    _, _, shared = _setup(True)
    _, _, separate = _setup(False)
    a = shared.generate(PROMPTS, 3, seed=0, temperature=0.0)
    b = separate.generate(PROMPTS, 3, seed=0, temperature=0.0)  # greedy with G > 1: rows repeated, not refused
    assert a.completion_ids == b.completion_ids and len(a.completion_ids) == 9
    assert a.completion_ids[0] == a.completion_ids[1] == a.completion_ids[2]  # greedy: G copies
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=1e-4, rtol=1e-4)


def test_sampled_logprobs_with_a_shared_prefill_match_the_trainer():
    policy, tokenizer, sampler = _setup(True)
    gen = sampler.generate(PROMPTS, 4, seed=3, temperature=1.0)
    assert len({tuple(c) for c in gen.completion_ids}) > 4  # sampled, not copies
    assert gen.finish_reasons.count("length") + gen.finish_reasons.count("stop") == 12
    pad = tokenizer.pad_token_id
    rows = [p for p in PROMPTS for _ in range(4)]
    width, c_width = max(map(len, rows)), max(map(len, gen.completion_ids))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    completion_ids = torch.tensor([c + [pad] * (c_width - len(c)) for c in gen.completion_ids])
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (c_width - len(c)) for c in gen.completion_ids])
    sampler_logp = torch.tensor([lp + [0.0] * (c_width - len(lp)) for lp in gen.logprobs])
    with torch.no_grad():
        trainer_logp, _ = completion_logprobs(policy, install_scoring_head(policy), prompt_ids, prompt_mask,
                                              completion_ids, mask)
    torch.testing.assert_close(sampler_logp * mask, trainer_logp * mask, atol=1e-4, rtol=1e-4)
