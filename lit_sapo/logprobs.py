"""Per-token log-probs and entropy from final hidden states, without a full fp32 [B, T, V] logits tensor.

The RL loss needs log p(target) per token (and the policy entropy as a metric or bonus). With Qwen2.5's
vocabulary (151 936) a [8, 1024, V] fp32 logits tensor is 5 GB, and the naive autograd graph holds several
of them. Here rows (B*T flattened) are processed in chunks of `chunk_size`: the forward keeps only the
per-row logsumexp (and entropy), and the backward recomputes each chunk's logits. Peak extra memory is a
few [chunk_size, V] fp32 buffers, reused across chunks.

Pure math: no Lightning import.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["token_logprobs", "naive_token_logprobs", "output_projection"]


def _check_args(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk_size: int) -> None:
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[2]:
        raise ValueError(f"weight must be [V, {hidden.shape[2]}], got shape {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:2]:
        raise ValueError(f"targets must be {tuple(hidden.shape[:2])}, got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


_LOW_PRECISION = (torch.bfloat16, torch.float16)


def _mm_fp32(a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
    """a @ b as fp32. fp32 operands: a plain fp32 matmul. bf16/fp16 operands: a low-precision matmul (tensor cores
    on GPU) with fp32 accumulation, and fp32 output on CUDA (`out_dtype`); on CPU the product is rounded to the
    operands' dtype once, then widened (CPU has no fp32-output kernel for it)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    product = torch.mm(a, b)
    return out.copy_(product) if out is not None else product.float()


def _logits_into(out: Tensor, h: Tensor, w_t: Tensor, b: Tensor | None, scale: float) -> Tensor:
    """out <- (h @ w_t + b) * scale, written into a reused fp32 buffer (no fresh [chunk, V] allocation).
    `h` is cast to `w_t`'s dtype: fp32 weights give an fp32 matmul, bf16 weights a bf16 one with fp32 output."""
    h = h.to(w_t.dtype)
    if b is not None and w_t.dtype == torch.float32:
        return torch.addmm(b, h, w_t, beta=scale, alpha=scale, out=out)
    _mm_fp32(h, w_t, out=out)
    if b is not None:
        out.add_(b)
    return out.mul_(scale) if scale != 1.0 else out


class _ChunkedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, with_entropy, entropy_grad):
        b_, t_, h_ = hidden.shape
        rows = hidden.reshape(-1, h_)
        tgt = targets.reshape(-1, 1)
        n = rows.shape[0]
        scale = 1.0 / temperature
        # bf16/fp16 weights stay in their dtype (no [V, H] fp32 copy): the matmul is low precision with fp32 output
        w_t = (weight if weight.dtype in _LOW_PRECISION else weight.float()).t()
        b32 = bias.float() if bias is not None else None
        c = min(chunk_size, max(n, 1))
        buf = rows.new_empty((c, weight.shape[0]), dtype=torch.float32)
        buf2 = torch.empty_like(buf) if with_entropy else None
        lse = rows.new_empty(n, dtype=torch.float32)
        logp = rows.new_empty(n, dtype=torch.float32)
        ent = rows.new_empty(n if with_entropy else 0, dtype=torch.float32)
        for s in range(0, n, c):
            e_ = min(s + c, n)
            z = _logits_into(buf[: e_ - s], rows[s:e_], w_t, b32, scale)
            m = z.amax(dim=1)
            z.sub_(m[:, None])  # shifted logits: exp cannot overflow
            z_tgt = z.gather(1, tgt[s:e_]).squeeze(1)
            if with_entropy:
                ez = torch.exp(z, out=buf2[: e_ - s])
                sum_e = ez.sum(dim=1)
                # H = log S - sum(e * z) / S with e = exp(z - m), S = sum(e)
                ent[s:e_] = sum_e.log() - ez.mul_(z).sum(dim=1) / sum_e
            else:
                sum_e = z.exp_().sum(dim=1)
            log_s = sum_e.log()
            lse[s:e_] = m + log_s
            logp[s:e_] = z_tgt - log_s
        ctx.save_for_backward(hidden, weight, bias, targets, lse, ent if entropy_grad else None)
        ctx.scale, ctx.chunk_size, ctx.entropy_grad = scale, chunk_size, entropy_grad
        ctx.set_materialize_grads(False)
        logp, ent = logp.view(b_, t_), ent.view(b_, t_) if with_entropy else ent
        if not entropy_grad:
            ctx.mark_non_differentiable(ent)
        return logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_ent):
        hidden, weight, bias, targets, lse, ent = ctx.saved_tensors
        if not ctx.entropy_grad:
            grad_ent = None
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if (grad_logp is None and grad_ent is None) or not (need_h or need_w or need_b):
            return (None,) * 8
        h_ = hidden.shape[2]
        rows = hidden.reshape(-1, h_)
        tgt = targets.reshape(-1, 1)
        n, scale = rows.shape[0], ctx.scale
        w = weight if weight.dtype in _LOW_PRECISION else weight.float()
        b32 = bias.float() if bias is not None else None
        c = min(ctx.chunk_size, max(n, 1))
        # The 1/temperature factor of dz/dlogits is folded into the per-row upstream grads (cheaper than
        # scaling each [chunk, V] block).
        g1 = grad_logp.reshape(-1).float() * scale if grad_logp is not None else None
        g2 = grad_ent.reshape(-1).float() * scale if grad_ent is not None else None
        buf = rows.new_empty((c, weight.shape[0]), dtype=torch.float32)
        buf2 = torch.empty_like(buf) if g2 is not None else None
        grad_h = torch.empty_like(rows) if need_h else None
        low = w.dtype in _LOW_PRECISION
        single = n <= c
        # weight grad: fp32 accumulator over chunks; one chunk of a bf16 weight needs none (the matmul accumulates
        # in fp32 and its bf16 result is the grad): no [V, H] fp32 buffer, no copy at the end
        grad_w = None if not need_w or (low and single) else torch.zeros(weight.shape, dtype=torch.float32,
                                                                          device=rows.device)
        grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=rows.device) if need_b else None
        for s in range(0, n, c):
            e_ = min(s + c, n)
            h = rows[s:e_].to(w.dtype)
            z = _logits_into(buf[: e_ - s], h, w.t(), b32, scale)
            z.sub_(lse[s:e_, None])  # log p
            if g2 is not None:
                # dL/dz_j = g1 (1[j=y] - p_j) - g2 p_j (log p_j + H)
                p = torch.exp(z, out=buf2[: e_ - s])
                coef = z.add_(ent[s:e_, None]).mul_(g2[s:e_, None])
                if g1 is not None:
                    coef.add_(g1[s:e_, None])
                dz = p.mul_(coef).neg_()
            else:
                dz = z.exp_().mul_(-g1[s:e_, None])
            if g1 is not None:
                dz.scatter_add_(1, tgt[s:e_], g1[s:e_, None])
            if need_h:
                grad_h[s:e_] = _mm_fp32(dz.to(w.dtype), w)
            if need_w:
                if not low:
                    grad_w.addmm_(dz.t(), h)
                elif single:
                    grad_w = torch.mm(dz.t().to(w.dtype), h)
                else:
                    grad_w.add_(torch.mm(dz.t().to(w.dtype), h))  # a bf16 [V, H] temporary, summed in fp32
            if need_b:
                grad_b.add_(dz.sum(dim=0))
        return (
            grad_h.view_as(hidden) if need_h else None,
            grad_w.to(weight.dtype) if need_w else None,
            grad_b.to(bias.dtype) if need_b else None,
            None, None, None, None, None,
        )


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Log p(targets) and (optionally) entropy per token, computed in chunks of `chunk_size` rows.

    Logits are `(hidden @ weight.T + bias) / temperature` in fp32: an fp32 matmul for fp32 weights; for bf16/fp16
    weights a matmul in their dtype (hidden cast to it) with fp32 accumulation and output, as tensor cores run it
    (no fp32 copy of the [V, H] weight), then log-softmax in fp32. `hidden` is [B, T, H] of any float
    dtype, `weight` is [V, H] (may be the tied input embedding), `targets` [B, T] holds valid token ids
    (mask padding in the loss, not here). Returns (logp [B, T] fp32, entropy [B, T] fp32 or None).
    The entropy carries a gradient only when `entropy_grad=True`; otherwise it is detached.
    Double backward is not supported.
    """
    _check_args(hidden, weight, targets, temperature, chunk_size)
    logp, ent = _ChunkedLogProbs.apply(
        hidden, weight, bias, targets, float(temperature), int(chunk_size), bool(with_entropy),
        bool(with_entropy and entropy_grad),
    )
    return logp, (ent if with_entropy else None)


def naive_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    with_entropy: bool = False,
    entropy_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Reference: full fp32 logits + log_softmax (plain autograd). `chunk_size` is ignored."""
    _check_args(hidden, weight, targets, temperature, chunk_size)
    b32 = bias.float() if bias is not None else None
    logits = F.linear(hidden.float(), weight.float(), b32)
    if temperature != 1.0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    del logits  # log_softmax saves its output only: let the logits go
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = None
    if with_entropy:
        with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
            ent = -(logp_all.exp() * logp_all).sum(dim=-1)
    return logp, ent


def output_projection(model: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight [V, H], bias [V] or None) of a HF causal LM's output head (`get_output_embeddings()`).

    With tied embeddings the weight is the input embedding's Parameter; gradients flow into it from both uses.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        name = type(model).__name__
        raise ValueError(f"{name} has no output projection (get_output_embeddings() returned {head!r})")
    bias = getattr(head, "bias", None)
    return head.weight, bias if isinstance(bias, Tensor) else None
