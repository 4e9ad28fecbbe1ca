"""Token log-probs of completions through the policy's own forward, without a full [B, T, V] logits tensor.

The policy's output layer is replaced by a `ScoringHead` holding the same weight (tied embeddings stay tied, the
state-dict keys are unchanged). Outside a `scoring(...)` block it is the plain linear layer (generation works as
before); inside, it turns the final hidden states into chunked log-probs and entropy. Doing this inside the
model's forward keeps FSDP2 correct: the root module's hooks gather the output weight and reduce its gradient.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_sapo.logprobs import token_logprobs


@dataclass
class _Request:
    targets: Tensor
    temperature: float
    chunk_size: int
    with_entropy: bool


class ScoringHead(nn.Module):
    def __init__(self, head: nn.Module) -> None:
        super().__init__()
        self.weight = head.weight
        self.bias = getattr(head, "bias", None)
        self.in_features = self.weight.shape[1]
        self.out_features = self.weight.shape[0]
        self.request: _Request | None = None

    def forward(self, hidden: Tensor) -> Tensor:
        request = self.request
        if request is None:
            return F.linear(hidden, self.weight, self.bias)
        logp, entropy = token_logprobs(hidden, self.weight, request.targets, bias=self.bias,
                                       temperature=request.temperature, chunk_size=request.chunk_size,
                                       with_entropy=request.with_entropy)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        return torch.stack([logp, entropy], dim=-1)


def install_scoring_head(policy: nn.Module) -> ScoringHead:
    head = policy.get_output_embeddings()
    if isinstance(head, ScoringHead):
        return head
    scoring_head = ScoringHead(head)
    policy.set_output_embeddings(scoring_head)
    return scoring_head


@contextmanager
def scoring(head: ScoringHead, targets: Tensor, temperature: float, chunk_size: int, with_entropy: bool):
    head.request = _Request(targets, temperature, chunk_size, with_entropy)
    try:
        yield
    finally:
        head.request = None


def completion_logprobs(policy: nn.Module, head: ScoringHead, prompt_ids: Tensor, prompt_mask: Tensor,
                        completion_ids: Tensor, completion_mask: Tensor, *, temperature: float = 1.0,
                        chunk_size: int = 1024, with_entropy: bool = False,
                        group_size: int = 1) -> tuple[Tensor, Tensor]:
    """(logp [B, C], entropy [B, C]) of each completion token given its left-padded prompt.

    Positions: the hidden state at prompt_len - 1 + k predicts completion token k, so the last C + 1 hidden
    states are scored (targets padded by one column) and the final one is dropped.

    `group_size` G > 1: rows come in runs of G completions of the same prompt. The prompt (all but its last token)
    then goes through the model once per group, with grad, and its KV cache is repeated G times for the
    completions: the same values and gradients as G separate prompts, for a fraction of the prompt's compute.
    """
    attention = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    targets = F.pad(completion_ids, (0, 1))
    keep = completion_ids.shape[1] + 1
    width = prompt_ids.shape[1]
    if group_size > 1 and width > 1:
        from transformers import DynamicCache

        cache = DynamicCache(config=getattr(policy, "config", None))
        policy(input_ids=prompt_ids[::group_size, :-1], attention_mask=attention[::group_size, :width - 1],
               position_ids=position_ids[::group_size, :width - 1], past_key_values=cache, use_cache=True,
               logits_to_keep=1)
        cache.batch_repeat_interleave(group_size)  # differentiable: gradients of the G copies add up
        input_ids = torch.cat([prompt_ids[:, -1:], completion_ids], dim=1)
        with scoring(head, targets, temperature, chunk_size, with_entropy):
            out = policy(input_ids=input_ids, attention_mask=attention, position_ids=position_ids[:, width - 1:],
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
    else:
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        with scoring(head, targets, temperature, chunk_size, with_entropy):
            out = policy(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                         logits_to_keep=keep, use_cache=False)
    values = out.logits[:, :-1].float()
    return values[..., 0], values[..., 1]


def shared_group_size(group_ids: Tensor, group_size: int) -> int:
    """`group_size` if the rows form whole consecutive groups (so prompts can be shared), else 1."""
    n = group_ids.numel()
    if group_size < 2 or n % group_size:
        return 1
    runs = group_ids.view(-1, group_size)
    return group_size if bool((runs == runs[:, :1]).all()) else 1
