"""The chunked stage II loss equals the plain full-logits computation, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megadistill.stages.losses import (
    IGNORE_INDEX,
    distill_loss,
    distill_loss_reference,
    teacher_topk,
    topk_logprobs,
)


def _head(weight, bias=None):
    """The lm_head as the function of a hidden chunk that distill_loss calls."""
    return lambda h: F.linear(h, weight, bias)


def _problem(dtype: torch.dtype, seed: int = 0, B: int = 3, L: int = 11, H: int = 16, V: int = 97):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L, H, generator=gen, dtype=dtype).requires_grad_()
    weight = (0.3 * torch.randn(V, H, generator=gen, dtype=dtype)).requires_grad_()
    bias = (0.1 * torch.randn(V, generator=gen, dtype=dtype)).requires_grad_()
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, 4] = labels[1, -3:] = labels[2, 0] = IGNORE_INDEX
    t_hidden = torch.randn(B, L, H, generator=gen, dtype=dtype)
    return hidden, weight, bias, labels, t_hidden


@pytest.mark.parametrize(
    ("dtype", "tol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["fp64", "fp32"]
)
def test_chunked_equals_unchunked_values_and_grads(dtype, tol):
    hidden, weight, bias, labels, t_hidden = _problem(dtype)
    t_lp, t_ids = teacher_topk(t_hidden, weight.detach(), 13, chunk_size=5)
    for gamma, beta, chunk in ((0.9, 0.1, 4), (0.3, 2.0, 7), (1.0, 0.0, 1000)):
        got = distill_loss(
            hidden, _head(weight, bias), labels, t_lp, t_ids, gamma=gamma, beta=beta,
            chunk_size=chunk,
        )  # fmt: skip
        logits = F.linear(hidden, weight, bias)
        ref = distill_loss_reference(logits, labels, t_lp, t_ids, gamma=gamma, beta=beta)
        g_got = torch.autograd.grad(3.0 * got.loss, (hidden, weight, bias))
        g_ref = torch.autograd.grad(3.0 * ref.loss, (hidden, weight, bias))
        torch.testing.assert_close(got.loss, ref.loss, rtol=tol, atol=tol)
        for a, b in zip(g_got, g_ref):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
        torch.testing.assert_close(got.ce, ref.ce, rtol=tol, atol=tol)
        torch.testing.assert_close(got.kl, ref.kl, rtol=tol, atol=tol)
        assert int(got.num_tokens) == 3 * 11 - 5
    # the CE part is the usual masked cross-entropy
    flat = F.cross_entropy(logits.reshape(-1, 97), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(got.ce, flat.detach(), rtol=tol, atol=tol)


def test_kl_is_zero_when_student_matches_teacher_and_grad_flows_through_kl_only():
    hidden, weight, _, labels, _ = _problem(torch.float64, seed=1)
    t_lp, t_ids = teacher_topk(hidden.detach(), weight.detach(), 9)
    out = distill_loss(
        hidden, _head(weight), labels, t_lp, t_ids, gamma=0.0, beta=1.0, chunk_size=5
    )
    assert abs(out.kl.item()) < 1e-12 and abs(out.loss.item()) < 1e-12
    grads = torch.autograd.grad(out.loss, (hidden, weight))
    assert all(g.abs().max() < 1e-12 for g in grads)
    # a different teacher gives a positive KL with a non-zero gradient
    t_lp2, t_ids2 = teacher_topk(hidden.detach().flip(0), weight.detach(), 9)
    out2 = distill_loss(hidden, _head(weight), labels, t_lp2, t_ids2, gamma=0.0, beta=1.0)
    assert out2.kl > 0.01 and torch.autograd.grad(out2.loss, hidden)[0].abs().max() > 1e-6


def test_all_ignored_normalizer_and_bf16():
    hidden, weight, bias, labels, t_hidden = _problem(torch.float32, seed=2)
    t_lp, t_ids = teacher_topk(t_hidden, weight.detach(), 5)
    none = torch.full_like(labels, IGNORE_INDEX)
    out = distill_loss(hidden, _head(weight), none, t_lp, t_ids)
    assert out.loss.item() == 0.0 and int(out.num_tokens) == 0
    assert torch.autograd.grad(out.loss, hidden)[0].abs().max() == 0
    # a global normaliser (e.g. valid tokens across ranks) divides the summed loss
    local = distill_loss(hidden, _head(weight), labels, t_lp, t_ids)
    scaled = distill_loss(hidden, _head(weight), labels, t_lp, t_ids, normalizer=100.0)
    torch.testing.assert_close(scaled.loss * 100.0, local.loss * local.num_tokens.float())
    # bf16 inputs: fp32 maths, gradients in bf16 close to the fp32 ones
    hb, wb = (
        hidden.detach().bfloat16().requires_grad_(),
        weight.detach().bfloat16().requires_grad_(),
    )
    outb = distill_loss(hb, _head(wb), labels, t_lp, t_ids, chunk_size=8)
    gb = torch.autograd.grad(outb.loss, hb)[0]
    g32 = torch.autograd.grad(local.loss, hidden)[0]
    assert gb.dtype == torch.bfloat16
    torch.testing.assert_close(gb.float(), g32, rtol=0.05, atol=2e-3)


def test_teacher_topk_matches_full_logits():
    _, weight, bias, _, t_hidden = _problem(torch.float32, seed=3)
    lp, ids = teacher_topk(t_hidden, weight, 7, bias=bias, chunk_size=4)
    full = torch.log_softmax(F.linear(t_hidden, weight, bias), -1)
    ref_lp, ref_ids = full.topk(7, dim=-1)
    torch.testing.assert_close(lp, ref_lp)
    assert torch.equal(ids, ref_ids)
    lp2, ids2 = topk_logprobs(F.linear(t_hidden, weight, bias), 7, chunk_size=3)
    torch.testing.assert_close(lp2, ref_lp)
    assert torch.equal(ids2, ref_ids)
    assert (lp <= 0).all() and torch.all(lp[..., :-1] >= lp[..., 1:])
    with pytest.raises(ValueError, match="top-k k=98 must be in"):
        teacher_topk(t_hidden, weight, 98)
