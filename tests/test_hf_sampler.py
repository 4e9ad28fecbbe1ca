"""HFSampler: a shared prompt prefill samples from the same distribution as G separate prefills; the sampled
distribution is the one the trainer scores, whatever the model's generation_config says."""

import pytest
import torch

from lit_sapo.models import LoraSettings, ModelSpec, load_policy, load_tokenizer
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


def _trainer_logprobs(policy, tokenizer, rows, completions, temperature=1.0):
    pad = tokenizer.pad_token_id
    width, c_width = max(map(len, rows)), max(map(len, completions))
    prompt_ids = torch.tensor([[pad] * (width - len(p)) + p for p in rows])
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
    completion_ids = torch.tensor([c + [pad] * (c_width - len(c)) for c in completions])
    mask = torch.tensor([[1.0] * len(c) + [0.0] * (c_width - len(c)) for c in completions])
    with torch.no_grad():
        logp, _ = completion_logprobs(policy, install_scoring_head(policy), prompt_ids, prompt_mask, completion_ids,
                                      mask, temperature=temperature)
    return [row[:len(c)] for row, c in zip(logp, completions)]


def _spy_processors(policy):
    """The logits processors `generate` builds, recorded on each call (the real method runs)."""
    built, real = [], policy._get_logits_processor

    def spy(*args, **kwargs):
        processors = real(*args, **kwargs)
        built.append([type(p).__name__ for p in processors])
        return processors

    policy._get_logits_processor = spy
    return built


SECOND_EOS = 7


def _policy_with_a_biased_generation_config(lora: bool = False, peaked: bool = True):
    """tiny-random-llama whose generation_config asks for a penalty, top-k, n-gram bans, a minimum length and a
    second eos id: the sampler must take none of it but the stop ids."""
    spec = ModelSpec(name="tiny-random-llama", lora=LoraSettings(r=4) if lora else None)
    policy, tokenizer = load_policy(spec), load_tokenizer(spec)
    with torch.no_grad():  # peaked logits: random init is near-uniform, where a penalty barely shows (3e-5)
        policy.get_output_embeddings().weight.mul_(20 if peaked else 1)
    config = policy.generation_config
    config.update(do_sample=True, repetition_penalty=1.3, top_k=5, top_p=0.8, no_repeat_ngram_size=2, min_new_tokens=6,
                  suppress_tokens=[11], eos_token_id=[tokenizer.eos_token_id, SECOND_EOS])
    return policy, tokenizer


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_models_generation_config_does_not_change_the_sampled_distribution(temperature, lora):
    policy, tokenizer = _policy_with_a_biased_generation_config(lora)
    sampler = HFSampler(max_new_tokens=12)
    sampler.setup(policy, tokenizer)
    assert sampler.stop_ids == [tokenizer.eos_token_id, SECOND_EOS]
    built = _spy_processors(policy.get_base_model() if lora else policy)
    gen = sampler.generate(PROMPTS, 4, seed=3, temperature=temperature)
    warpers = ["TemperatureLogitsWarper"] if temperature != 1.0 else []
    assert built == [warpers + ["ChosenTokenLogprobs"]]  # no penalty, no top-k/p, no ban, no min-length
    rows = [p for p in PROMPTS for _ in range(4)]
    trainer = _trainer_logprobs(policy, tokenizer, rows, gen.completion_ids, temperature)
    for sampled, scored in zip(gen.logprobs, trainer):
        torch.testing.assert_close(torch.tensor(sampled), scored, atol=1e-5, rtol=1e-5)
    assert policy.generation_config.repetition_penalty == 1.3  # the model's own config is given back


def test_every_eos_id_of_the_model_stops_a_completion():
    policy, tokenizer = _policy_with_a_biased_generation_config(peaked=False)  # varied tokens to stop at
    sampler = HFSampler(max_new_tokens=12)
    sampler.setup(policy, tokenizer)
    sampler.stop_ids = [tokenizer.eos_token_id]
    first = sampler.generate(PROMPTS, 2, seed=5).completion_ids[0]
    assert SECOND_EOS not in first
    cut = next(i for i in range(1, len(first)) if first[i] not in first[:i])
    sampler.stop_ids = [tokenizer.eos_token_id, first[cut]]  # the same draws stop at that token now
    again = sampler.generate(PROMPTS, 2, seed=5)
    assert again.completion_ids[0] == first[:cut + 1] and again.finish_reasons[0] == "stop"
    sampler.setup(policy, tokenizer)
    assert sampler.stop_ids == [tokenizer.eos_token_id, SECOND_EOS]


def test_top_k_and_top_p_logprobs_are_those_of_the_processed_distribution():
    policy, tokenizer = _setup(True)[:2]
    sampler = HFSampler(max_new_tokens=6, top_k=20, top_p=0.9, temperature=0.8)
    sampler.setup(policy, tokenizer)
    gen = sampler.generate(PROMPTS[:1], 3, seed=1)
    rows = PROMPTS[:1] * 3
    trainer = _trainer_logprobs(policy, tokenizer, rows, gen.completion_ids, 0.8)
    for sampled, scored in zip(gen.logprobs, trainer):
        # renormalised over the kept tokens: at least as likely as under the full tempered distribution
        assert all(s >= t - 1e-6 for s, t in zip(sampled, scored.tolist()))
        assert any(s > t + 1e-4 for s, t in zip(sampled, scored.tolist()))


def test_a_per_call_top_p_samples_as_a_sampler_built_with_it():
    # benchmark protocols (R1: top-p 0.95) override the training sampler's top-p for one call only
    policy, tokenizer = _setup(True)[:2]
    trained = HFSampler(max_new_tokens=8, top_p=1.0, temperature=1.5)
    built = HFSampler(max_new_tokens=8, top_p=0.5, temperature=1.5)
    for s in (trained, built):
        s.setup(policy, tokenizer)
    a = trained.generate(PROMPTS, 4, seed=3, top_p=0.5)
    b = built.generate(PROMPTS, 4, seed=3)
    c = trained.generate(PROMPTS, 4, seed=3)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    assert a.logprobs != c.logprobs  # the override took effect, and only for that call
    assert trained.top_p == 1.0
