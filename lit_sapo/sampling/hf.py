"""HFSampler: transformers `generate` on the live policy (KV cache, left padding, batched).

The sampling settings are built afresh on every call and only from the sampler's own arguments: `generate` fills
every field a `GenerationConfig` leaves unset from `model.generation_config` (transformers 5: repetition_penalty,
bad_words_ids, min_p, suppress_tokens, top_k = 50, ...), so the model's own config is swapped for a blank one for
the length of the call, and temperature / top-k / top-p run as our own logits processors.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lit_sapo.sampling.base import Generation, check_sampling_args, stop_token_ids


class ChosenTokenLogprobs:
    """Last logits processor: log-prob of each sampled token under the processed distribution, one step at a time.

    Call k keeps step k's log-softmax ([rows, V]) and gathers, from step k - 1's, the token `generate` appended
    since; `finish` gathers the last token. Memory: one [rows, V] step instead of `output_scores`' steps x rows x V.
    """

    def __init__(self) -> None:
        self.previous: Tensor | None = None
        self.columns: list[Tensor] = []

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        self._gather(input_ids[:, -1])
        self.previous = scores.float().log_softmax(-1)
        return scores

    def _gather(self, tokens: Tensor) -> None:
        if self.previous is not None:
            self.columns.append(self.previous.gather(1, tokens[:, None]).squeeze(1))
            self.previous = None

    def finish(self, new_tokens: Tensor) -> Tensor:
        """[rows, steps] log-probs of `new_tokens` (the generated columns of `sequences`)."""
        if new_tokens.shape[1] > 0:
            self._gather(new_tokens[:, -1])
        if len(self.columns) != new_tokens.shape[1]:
            raise RuntimeError(f"HFSampler: {len(self.columns)} decode steps recorded for "
                               f"{new_tokens.shape[1]} generated tokens")
        if not self.columns:
            return torch.zeros(new_tokens.shape, device=new_tokens.device)
        return torch.stack(self.columns, dim=1)


@contextmanager
def blank_generation_config(policy: nn.Module):
    """Every module that holds a `generation_config` (the model; peft's wrapper, which copies its own onto the
    model inside `generate`) holds a blank one until the block ends: nothing of the model's reaches `generate`."""
    from transformers import GenerationConfig

    holders = [(m, m.__dict__["generation_config"]) for m in policy.modules()
               if isinstance(m.__dict__.get("generation_config"), GenerationConfig)]
    try:
        for module, _ in holders:
            module.generation_config = GenerationConfig()
        yield
    finally:
        for module, original in holders:
            module.generation_config = original


class HFSampler:
    """Samples with `model.generate` on the trainer's own policy: the weights are shared, so a sync is a version bump.

    Args:
        temperature: sampling temperature (0 = greedy). The trainer scores tokens with the same temperature.
        top_p: nucleus sampling mass (1.0 = off).
        top_k: keep the k most likely tokens (0 = off).
        max_new_tokens: completion length cap; a completion that hits it finishes with reason 'length'.
        batch_size: prompts per `generate` call (None = all prompts of the rollout at once).
        share_prefill: run each prompt through the model once and repeat its KV cache for the G completions
            (the same distribution as G separate prefills, for 1/G of the prefill compute).
    """

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
                 batch_size: int | None = None, share_prefill: bool = True) -> None:
        check_sampling_args(temperature, top_p, top_k, max_new_tokens)
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.share_prefill = share_prefill
        # False for a sampler over a full per-rank copy of the policy (asynchronous rollouts under FSDP2): its
        # forward passes gather nothing, so the ranks need not run the same number of them
        self.collective = True
        self.weight_version = 0
        self.policy: nn.Module | None = None
        self.tokenizer = None
        self.stop_ids: list[int] = []

    def setup(self, policy: nn.Module, tokenizer, model_source: str = "", *, max_prompt_length: int | None = None,
              max_batch_size: int | None = None) -> None:  # the bounds matter to vLLM only
        self.policy = policy
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(tokenizer, policy)

    def sync_weights(self, policy: nn.Module, version: int) -> None:
        self.policy = policy
        self.weight_version = version

    def close(self) -> None:
        self.policy = None

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int, *, seed: int,
                 temperature: float | None = None, max_new_tokens: int | None = None,
                 top_p: float | None = None) -> Generation:
        if self.policy is None:
            raise RuntimeError("HFSampler.generate before setup(): the rollout stream binds the policy first")
        temperature = self.temperature if temperature is None else temperature
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        top_p = self.top_p if top_p is None else top_p
        policy = self.policy
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        step = self.batch_size or max(len(prompt_ids), 1)
        out = Generation([], [], [], self.weight_version)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), \
                    blank_generation_config(policy):
                torch.manual_seed(seed)
                for start in range(0, len(prompt_ids), step):
                    chunk = prompt_ids[start:start + step]
                    self._generate_chunk(chunk, num_generations, temperature, max_new_tokens, device, out, top_p)
        finally:
            policy.train(was_training)
        return out

    def generation_settings(self, temperature: float, max_new_tokens: int, top_p: float | None = None):
        """(GenerationConfig, logits processors, log-prob recorder) of one call: this sampler's settings only.

        Sampling runs with temperature 1 / top-k 0 / top-p 1 in the config (so `generate` adds no warper of its
        own) and our temperature, top-k, top-p warpers in that order (transformers' order), then the recorder.
        """
        from transformers import GenerationConfig, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper
        from transformers import TopPLogitsWarper

        sampling = temperature > 0
        top_p = self.top_p if top_p is None else top_p
        # neutral values spelled out although the model's config is blanked meanwhile (see blank_generation_config)
        warper_settings = dict(temperature=1.0, top_k=0, top_p=1.0) if sampling else {}
        config = GenerationConfig(
            do_sample=sampling, **warper_settings, max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id, eos_token_id=list(self.stop_ids) or None,
            repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0, num_beams=1, num_return_sequences=1,
            use_cache=True, return_dict_in_generate=True, output_scores=False)
        processors = LogitsProcessorList()
        if sampling:
            if temperature != 1.0:
                processors.append(TemperatureLogitsWarper(temperature))
            if self.top_k:
                processors.append(TopKLogitsWarper(self.top_k))
            if top_p < 1.0:
                processors.append(TopPLogitsWarper(top_p))
        recorder = ChosenTokenLogprobs()
        processors.append(recorder)
        return config, processors, recorder

    def _prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, copies: int):
        """KV cache of the prompts (all but their last token), each repeated `copies` times."""
        from transformers import DynamicCache

        cache = DynamicCache(config=getattr(self.policy, "config", None))
        # the positions `generate` gives left-padded rows: pads count from 1, real tokens from 0
        position_ids = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 1)
        self.policy(input_ids=input_ids, attention_mask=attention, position_ids=position_ids, past_key_values=cache,
                    use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(copies)
        return cache

    def _generate_chunk(self, chunk, num_generations, temperature, max_new_tokens, device, out: Generation,
                        top_p: float | None = None) -> None:
        width = max(len(p) for p in chunk)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        config, processors, recorder = self.generation_settings(temperature, max_new_tokens, top_p)
        # every FSDP rank must run the same number of forward passes (they all-gather weights)
        synced_gpus = self.collective and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        kwargs = {}
        share = self.share_prefill and num_generations > 1 and width > 1
        if synced_gpus:  # the prefill is a forward pass: all ranks run it or none
            flag = torch.tensor(float(share), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            share = bool(flag.item())
        if share:
            # `generate` only runs the tokens the cache lacks: the last prompt token, then the completions
            kwargs["past_key_values"] = self._prefill(input_ids[:, :-1], attention[:, :-1], num_generations)
        # rows repeated here, not by `num_return_sequences` (which greedy decoding refuses)
        input_ids = input_ids.repeat_interleave(num_generations, dim=0)
        attention = attention.repeat_interleave(num_generations, dim=0)
        result = self.policy.generate(input_ids=input_ids, attention_mask=attention, generation_config=config,
                                      logits_processor=processors, synced_gpus=synced_gpus, **kwargs)
        new_tokens = result.sequences[:, width:]
        scores = recorder.finish(new_tokens)
        stop_ids = set(self.stop_ids)
        for row, row_scores in zip(new_tokens.tolist(), scores.tolist()):
            length = len(row)
            for i, token in enumerate(row):
                if token in stop_ids:
                    length = i + 1
                    break
            stopped = length < len(row) or (length > 0 and row[length - 1] in stop_ids)
            out.completion_ids.append(row[:length])
            out.logprobs.append(row_scores[:length])
            out.finish_reasons.append("stop" if stopped else "length")
