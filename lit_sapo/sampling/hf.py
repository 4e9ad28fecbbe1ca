"""HFSampler: transformers `generate` on the live policy (KV cache, left padding, batched)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lit_sapo.sampling.base import Generation, check_sampling_args


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

    rank_local = False
    """True when the policy is a full copy on this rank (lit_sapo.async_rollout): generate runs no collectives."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 256,
                 batch_size: int | None = None, share_prefill: bool = True) -> None:
        check_sampling_args(temperature, top_p, top_k, max_new_tokens)
        self.temperature = temperature
        self.top_p = top_p
        self.top_k = top_k
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.share_prefill = share_prefill
        self.weight_version = 0
        self.policy: nn.Module | None = None
        self.tokenizer = None

    def setup(self, policy: nn.Module, tokenizer, model_source: str = "") -> None:
        self.policy = policy
        self.tokenizer = tokenizer

    def sync_weights(self, policy: nn.Module, version: int) -> None:
        self.policy = policy
        self.weight_version = version

    def close(self) -> None:
        self.policy = None

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], num_generations: int, *, seed: int,
                 temperature: float | None = None, max_new_tokens: int | None = None) -> Generation:
        if self.policy is None:
            raise RuntimeError("HFSampler.generate before setup(): the rollout stream binds the policy first")
        temperature = self.temperature if temperature is None else temperature
        max_new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        policy = self.policy
        was_training = policy.training
        policy.eval()
        device = next(policy.parameters()).device
        step = self.batch_size or max(len(prompt_ids), 1)
        out = Generation([], [], [], self.weight_version)
        try:
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(seed)
                for start in range(0, len(prompt_ids), step):
                    chunk = prompt_ids[start:start + step]
                    self._generate_chunk(chunk, num_generations, temperature, max_new_tokens, device, out)
        finally:
            policy.train(was_training)
        return out

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

    def _generate_chunk(self, chunk, num_generations, temperature, max_new_tokens, device, out: Generation) -> None:
        tok = self.tokenizer
        width = max(len(p) for p in chunk)
        pad = tok.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        sampling = temperature > 0
        kwargs = dict(do_sample=sampling, max_new_tokens=max_new_tokens,
                      pad_token_id=pad, eos_token_id=tok.eos_token_id, output_scores=True,
                      return_dict_in_generate=True, use_cache=True,
                      # every FSDP rank must run the same number of forward passes (they all-gather weights)
                      synced_gpus=not self.rank_local and dist.is_available() and dist.is_initialized()
                      and dist.get_world_size() > 1)
        share = self.share_prefill and num_generations > 1 and width > 1
        if kwargs["synced_gpus"]:  # the prefill is a forward pass: all ranks run it or none
            flag = torch.tensor(float(share), device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            share = bool(flag.item())
        if share:
            # `generate` only runs the tokens the cache lacks: the last prompt token, then the completions
            kwargs["past_key_values"] = self._prefill(input_ids[:, :-1], attention[:, :-1], num_generations)
        # rows repeated here, not by `num_return_sequences` (which greedy decoding refuses)
        input_ids = input_ids.repeat_interleave(num_generations, dim=0)
        attention = attention.repeat_interleave(num_generations, dim=0)
        if sampling:
            kwargs.update(temperature=temperature, top_p=self.top_p, top_k=self.top_k or None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        result = self.policy.generate(input_ids=input_ids, attention_mask=attention, **kwargs)
        new_tokens = result.sequences[:, width:]
        # log-softmax of the processed scores (temperature, top-k/p) at each chosen token, one step at a time
        # (no stacked [steps, rows, vocab] copy)
        scores = torch.stack([step.gather(1, new_tokens[:, i:i + 1]).squeeze(1) - step.logsumexp(-1)
                              for i, step in enumerate(result.scores)], dim=1)
        stop_ids = {tok.eos_token_id} if isinstance(tok.eos_token_id, int) else set(tok.eos_token_id or [])
        for row, row_scores in zip(new_tokens.tolist(), scores.float().tolist()):
            length = len(row)
            for i, token in enumerate(row):
                if token in stop_ids:
                    length = i + 1
                    break
            stopped = length < len(row) or (length > 0 and row[length - 1] in stop_ids)
            out.completion_ids.append(row[:length])
            out.logprobs.append(row_scores[:length])
            out.finish_reasons.append("stop" if stopped else "length")
