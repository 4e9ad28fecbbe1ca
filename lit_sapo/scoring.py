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
from lit_sapo.packing import PACKABLE_ATTENTION, pack_groups, scored_lengths


_FEW_ROWS = 64  # at most this many rows count as decoding for the output layer


@dataclass
class _Request:
    targets: Tensor
    temperature: float
    chunk_size: int
    with_entropy: bool
    keep: Tensor | None = None  # [B, T] bool: score only these positions (their targets, flattened, in `targets`)


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
            return self._project(hidden)
        if request.keep is not None:
            hidden = hidden[request.keep][None]  # [1, T, H]: the packed rows' scored positions only
        targets = request.targets if request.keep is None else request.targets[None]
        logp, entropy = token_logprobs(hidden, self.weight, targets, bias=self.bias,
                                       temperature=request.temperature, chunk_size=request.chunk_size,
                                       with_entropy=request.with_entropy)
        if entropy is None:
            entropy = torch.zeros_like(logp)
        return torch.stack([logp, entropy], dim=-1)

    def _project(self, hidden: Tensor) -> Tensor:
        rows = hidden.numel() // hidden.shape[-1]
        if hidden.device.type == "cpu" and self.bias is None and rows <= _FEW_ROWS:
            # decode: MKL runs [rows, H] @ [H, V] for a few rows on one core; W @ h^T splits V across the cores
            # (SmolLM2's 49152 x 576 head, 8 rows: about 2x faster; tests/benchmarks/decode.py)
            flat = hidden.reshape(rows, hidden.shape[-1])
            return torch.mm(self.weight, flat.t()).t().reshape(*hidden.shape[:-1], self.out_features)
        return F.linear(hidden, self.weight, self.bias)


def install_scoring_head(policy: nn.Module) -> ScoringHead:
    head = policy.get_output_embeddings()
    if isinstance(head, ScoringHead):
        return head
    scoring_head = ScoringHead(head)
    policy.set_output_embeddings(scoring_head)
    return scoring_head


@contextmanager
def scoring(head: ScoringHead, targets: Tensor, temperature: float, chunk_size: int, with_entropy: bool,
            keep: Tensor | None = None):
    head.request = _Request(targets, temperature, chunk_size, with_entropy, keep)
    try:
        yield
    finally:
        head.request = None


def completion_logprobs(policy: nn.Module, head: ScoringHead, prompt_ids: Tensor, prompt_mask: Tensor,
                        completion_ids: Tensor, completion_mask: Tensor, *, temperature: float = 1.0,
                        chunk_size: int = 1024, with_entropy: bool = False, group_ids: Tensor | None = None,
                        pack_row_tokens: int = 1024) -> tuple[Tensor, Tensor]:
    """(logp [B, C], entropy [B, C]) of each completion token given its left-padded prompt.

    With `group_ids` (rows with equal ids share a prompt) and an sdpa / eager attention model, the rows are scored
    padding-free (see `lit_sapo.packing`): each prompt once, no pad tokens, tokens past the last one that
    `completion_mask` keeps are skipped (their values are 0). Otherwise each row is scored padded: the hidden state
    at prompt_len - 1 + k predicts completion token k, so the last C + 1 hidden states are scored (targets padded
    by one column) and the final one is dropped.
    """
    attn = getattr(getattr(policy, "config", None), "_attn_implementation", None)
    if group_ids is not None and attn in PACKABLE_ATTENTION:
        layout = pack_groups(prompt_ids, prompt_mask, completion_ids, group_ids, scored_lengths(completion_mask),
                             row_tokens=pack_row_tokens)
        dtype = next(policy.parameters()).dtype
        with scoring(head, layout.targets, temperature, chunk_size, with_entropy, keep=layout.keep):
            out = policy(input_ids=layout.input_ids, attention_mask=layout.attention_mask(attn, dtype),
                         position_ids=layout.position_ids, use_cache=False, logits_to_keep=0)
        values = layout.unpack(out.logits[0])  # fp32 already (token_logprobs)
        return values[..., 0], values[..., 1]
    attention = torch.cat([prompt_mask, completion_mask], dim=1).long()
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    targets = F.pad(completion_ids, (0, 1))
    input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
    with scoring(head, targets, temperature, chunk_size, with_entropy):
        out = policy(input_ids=input_ids, attention_mask=attention, position_ids=position_ids,
                     logits_to_keep=completion_ids.shape[1] + 1, use_cache=False)
    values = out.logits[:, :-1]
    return values[..., 0], values[..., 1]
