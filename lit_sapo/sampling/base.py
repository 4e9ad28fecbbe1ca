"""The Sampler protocol: what the rollout stream needs from a generator (HF generate, vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from torch import nn


@dataclass
class Generation:
    """Completions of one rollout, grouped: completion j of prompt i is row i * num_generations + j."""

    completion_ids: list[list[int]]
    """Token ids of each completion, ending with the stop token when it stopped."""
    logprobs: list[list[float]]
    """Sampler log-prob of each completion token under the distribution it sampled from (after temperature,
    top-k, top-p; the trainer scores with temperature only, so the two differ where top-k/top-p cut)."""
    finish_reasons: list[str]
    """'stop' (end-of-sequence or stop token) or 'length' (hit max_new_tokens)."""
    weight_version: int
    """Version of the weights that produced these completions (bumped by every sync_weights)."""


@runtime_checkable
class Sampler(Protocol):
    """Generates G completions per prompt with the current policy weights."""

    temperature: float
    max_new_tokens: int
    weight_version: int

    def setup(self, policy: nn.Module, tokenizer, model_source: str, *, max_prompt_length: int | None = None,
              max_batch_size: int | None = None) -> None:
        """Bind to the trainer's policy (HF: generate with it; vLLM: build an engine from `model_source`).

        `max_prompt_length` (tokens) and `max_batch_size` (sequences per generate call) bound what the caller
        will ask for; vLLM sizes its context length and memory from them (None = unknown)."""

    def generate(self, prompt_ids: list[list[int]], num_generations: int, *, seed: int,
                 temperature: float | None = None, max_new_tokens: int | None = None,
                 top_p: float | None = None) -> Generation:
        """Sample `num_generations` completions for every prompt; deterministic given the weights and `seed`.

        `temperature`, `max_new_tokens` and `top_p` override the sampler's own settings for this call (benchmark
        protocols); None keeps them."""

    def sync_weights(self, policy: nn.Module, version: int) -> None:
        """Make the sampler generate with the policy's current weights, tagged `version`."""

    def close(self) -> None:
        """Free the engine (no-op for HF)."""


def check_sampling_args(temperature: float, top_p: float, top_k: int, max_new_tokens: int) -> None:
    """The settings every sampler shares: one clear line per bad value, before any model is loaded."""
    if temperature < 0:
        raise ValueError(f"data.sampler.temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"data.sampler.top_p: must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"data.sampler.top_k: must be >= 0 (0 = off), got {top_k}")
    if max_new_tokens < 1:
        raise ValueError(f"data.sampler.max_new_tokens: must be >= 1, got {max_new_tokens}")


def stop_token_ids(tokenizer, policy: nn.Module | None = None) -> list[int]:
    """Ids that end a completion: the tokenizer's eos plus every id in the model's `generation_config.eos_token_id`
    (an int or a list: Qwen2.5 lists <|im_end|> and <|endoftext|>)."""
    ids: list[int] = []
    config = getattr(policy, "generation_config", None) if policy is not None else None
    for value in (tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        for token in [value] if isinstance(value, int) else list(value or []):
            if token not in ids:
                ids.append(int(token))
    return ids
