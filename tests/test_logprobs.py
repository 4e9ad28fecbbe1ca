import math

import pytest
import torch

from lit_sapo.logprobs import naive_token_logprobs, output_projection, token_logprobs

ATOL = 1e-5


def _inputs(b=3, t=5, h=8, v=37, *, bias=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(v, h, generator=g).requires_grad_()
    bias_t = torch.randn(v, generator=g).requires_grad_() if bias else None
    targets = torch.randint(0, v, (b, t), generator=g)
    return hidden, weight, bias_t, targets


def _grads(fn, hidden, weight, bias, targets, g_logp, g_ent, **kw):
    """Values and grads of sum(g_logp * logp) + sum(g_ent * entropy) w.r.t. every leaf."""
    for x in (hidden, weight, bias):
        if x is not None:
            x.grad = None
    logp, ent = fn(hidden, weight, targets, bias=bias, **kw)
    loss = 0.0
    if g_logp is not None:
        loss = loss + (g_logp * logp).sum()
    if g_ent is not None:
        loss = loss + (g_ent * ent).sum()
    loss.backward()
    grads = [x.grad.clone() if x is not None else None for x in (hidden, weight, bias)]
    return logp.detach(), (ent.detach() if ent is not None else None), grads


def _assert_same(a, b, atol=ATOL):
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        elif isinstance(x, list):
            _assert_same(x, y, atol)
        else:
            torch.testing.assert_close(x.float(), y.float(), atol=atol, rtol=0)


def test_hand_computed_values():
    # One token, H=1, weight = [[0],[1],[2]] -> logits [0, x, 2x]; x = ln 2 gives probs [1, 2, 4] / 7.
    hidden = torch.tensor([[[math.log(2.0)]]])
    weight = torch.tensor([[0.0], [1.0], [2.0]])
    logp, ent = token_logprobs(hidden, weight, torch.tensor([[2]]), with_entropy=True)
    p = torch.tensor([1.0, 2.0, 4.0]) / 7
    assert logp.item() == pytest.approx(math.log(4 / 7), abs=1e-6)
    assert ent.item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-6)
    # Temperature 2 halves the logits: probs [1, sqrt2, 2] / (3 + sqrt2).
    logp_t, _ = token_logprobs(hidden, weight, torch.tensor([[0]]), temperature=2.0)
    assert logp_t.item() == pytest.approx(-math.log(3 + math.sqrt(2)), abs=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 7, 15, 1024])
@pytest.mark.parametrize("bias", [False, True])
def test_logp_and_grads_match_naive(chunk_size, bias):
    # B*T = 15: chunk sizes 4 and 7 leave a ragged last chunk.
    hidden, weight, b, targets = _inputs(bias=bias)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    kw = dict(temperature=0.7, chunk_size=chunk_size)
    ref = _grads(naive_token_logprobs, hidden, weight, b, targets, g, None, **kw)
    got = _grads(token_logprobs, hidden, weight, b, targets, g, None, **kw)
    assert got[1] is None
    _assert_same(got, ref)
    assert got[2][0].abs().sum() > 0 and got[2][1].abs().sum() > 0


@pytest.mark.parametrize("which", ["logp", "entropy", "both"])
def test_entropy_grad_matches_naive(which):
    hidden, weight, b, targets = _inputs(bias=True)
    gen = torch.Generator().manual_seed(2)
    g_logp = torch.randn(3, 5, generator=gen) if which != "entropy" else None
    g_ent = torch.randn(3, 5, generator=gen) if which != "logp" else None
    kw = dict(temperature=1.3, chunk_size=4, with_entropy=True, entropy_grad=True)
    ref = _grads(naive_token_logprobs, hidden, weight, b, targets, g_logp, g_ent, **kw)
    got = _grads(token_logprobs, hidden, weight, b, targets, g_logp, g_ent, **kw)
    _assert_same(got, ref)


def test_entropy_without_grad_is_detached_and_correct():
    hidden, weight, _, targets = _inputs()
    logp, ent = token_logprobs(hidden, weight, targets, chunk_size=6, with_entropy=True)
    ref_logp, ref_ent = naive_token_logprobs(hidden, weight, targets, with_entropy=True)
    assert logp.requires_grad and not ent.requires_grad
    torch.testing.assert_close(ent, ref_ent, atol=ATOL, rtol=0)
    torch.testing.assert_close(logp, ref_logp, atol=ATOL, rtol=0)
    # Entropy of a V-way distribution lies in [0, log V].
    assert (ent >= 0).all() and (ent <= math.log(37) + 1e-6).all()
    assert token_logprobs(hidden, weight, targets)[1] is None


def test_tied_weights_accumulate_both_uses():
    torch.manual_seed(3)
    emb = torch.nn.Embedding(11, 6)
    ids = torch.randint(0, 11, (2, 4))
    targets = torch.randint(0, 11, (2, 4))
    grads = []
    for fn in (naive_token_logprobs, token_logprobs):
        emb.weight.grad = None
        hidden = torch.tanh(emb(ids))  # the embedding feeds the hidden states and is the head too
        logp, _ = fn(hidden, emb.weight, targets, chunk_size=3)
        logp.sum().backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=ATOL, rtol=0)
    # The gradient contains the embedding-side contribution: it differs from the head-only gradient.
    hidden = torch.tanh(emb(ids)).detach()
    w = emb.weight.detach().clone().requires_grad_()
    token_logprobs(hidden, w, targets)[0].sum().backward()
    assert (grads[1] - w.grad).abs().max() > 1e-3


def test_bf16_hidden():
    hidden, weight, b, targets = _inputs(bias=True, dtype=torch.bfloat16)
    g = torch.randn(3, 5, generator=torch.Generator().manual_seed(4))
    kw = dict(chunk_size=4, with_entropy=True)
    ref = _grads(naive_token_logprobs, hidden, weight, b, targets, g, None, **kw)
    got = _grads(token_logprobs, hidden, weight, b, targets, g, None, **kw)
    assert got[0].dtype == torch.float32 and got[2][0].dtype == torch.bfloat16
    _assert_same(got[:2], ref[:2])
    _assert_same(got[2][1:], ref[2][1:])
    _assert_same(got[2][:1], ref[2][:1], atol=1e-2)  # the hidden grad is rounded to bf16 in both


def test_frozen_parts_and_no_grad():
    hidden, weight, _, targets = _inputs()
    w = weight.detach()
    logp, _ = token_logprobs(hidden, w, targets, chunk_size=4)
    logp.sum().backward()
    assert hidden.grad is not None and w.grad is None
    with torch.no_grad():
        logp, ent = token_logprobs(hidden, weight, targets, with_entropy=True, entropy_grad=True)
    assert not logp.requires_grad and not ent.requires_grad


def test_bad_arguments():
    hidden, weight, _, targets = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        token_logprobs(hidden, weight, targets[:, :2])


class _Head(torch.nn.Module):
    def __init__(self, head):
        super().__init__()
        self.head = head

    def get_output_embeddings(self):
        return self.head


def test_output_projection():
    lin = torch.nn.Linear(4, 9, bias=True)
    w, b = output_projection(_Head(lin))
    assert w is lin.weight and b is lin.bias
    w, b = output_projection(_Head(torch.nn.Linear(4, 9, bias=False)))
    assert w.shape == (9, 4) and b is None
    with pytest.raises(ValueError, match="output projection"):
        output_projection(_Head(None))


def test_output_projection_hf_tied():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(cfg)
    w, b = output_projection(model)
    assert w is model.get_input_embeddings().weight and b is None
    ids = torch.randint(0, 32, (2, 6))
    out = model(ids, output_hidden_states=True)
    logp, _ = token_logprobs(out.hidden_states[-1], w, ids, chunk_size=5)
    torch.testing.assert_close(logp, torch.log_softmax(out.logits.float(), -1).gather(-1, ids[..., None])[..., 0],
                               atol=ATOL, rtol=0)


def test_saves_no_full_logits_for_backward():
    # B*T*V = 15 * 37 = 555 elements; everything the chunked path keeps for backward must be smaller.
    hidden, weight, b, targets = _inputs(bias=True)
    for fn, expect_full in ((naive_token_logprobs, True), (token_logprobs, False)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            fn(hidden, weight, targets, bias=b, chunk_size=4, with_entropy=True, entropy_grad=True)
        assert (max(saved) >= 15 * 37) is expect_full


def test_bf16_weight_runs_a_bf16_matmul_within_bf16_tolerance_of_fp32():
    # the bf16 head (weight and hidden in bf16, as under FSDP2 mixed precision): bf16 matmul, fp32 log-softmax
    g = torch.Generator().manual_seed(7)
    h, v = 64, 300
    hidden32 = torch.randn(2, 9, h, generator=g)
    weight32 = torch.randn(v, h, generator=g) * h**-0.5 * 3  # logits of std ~3, as a trained head
    targets = torch.randint(0, v, (2, 9), generator=g)
    adv = torch.randn(2, 9, generator=g)
    hidden16 = hidden32.bfloat16().requires_grad_()
    weight16 = weight32.bfloat16().requires_grad_()
    ref_h = hidden16.detach().float().requires_grad_()  # the same (bf16-representable) values, in fp32
    ref_w = weight16.detach().float().requires_grad_()
    logp, ent = token_logprobs(hidden16, weight16, targets, chunk_size=5, with_entropy=True)
    ref_logp, ref_ent = naive_token_logprobs(ref_h, ref_w, targets, with_entropy=True)
    (logp * adv).sum().backward()
    (ref_logp * adv).sum().backward()
    assert logp.dtype == ent.dtype == torch.float32
    assert weight16.grad.dtype == hidden16.grad.dtype == torch.bfloat16
    # one bf16 rounding of logits of size ~3 (2^-8 relative): ~1e-2 absolute, never the fp32 1e-5
    assert (logp - ref_logp).abs().max() < 5e-2
    assert (ent - ref_ent).abs().max() < 5e-2
    assert (logp - ref_logp).abs().max() > 0  # it really ran in bf16
    for got, ref in ((hidden16.grad, ref_h.grad), (weight16.grad, ref_w.grad)):
        assert ((got.float() - ref).norm() / ref.norm()) < 2e-2
