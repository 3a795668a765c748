"""mLSTM backends: all equal the step-by-step reference, values and float64 gradients."""

import pytest
import torch

from megadistill.model.mlstm import (
    PAD_F,
    PAD_I,
    joint_state,
    mlstm_chunkwise,
    mlstm_forward,
    mlstm_recurrent,
    mlstm_step,
    mlstm_step_joint_,
)

B, H, T, FD, D = 2, 2, 23, 4, 3


def _inputs(dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    shapes = [(B, H, T, FD), (B, H, T, FD), (B, H, T, D), (B, H, T), (B, H, T)]
    scale = [1, 1, 1, 3, 3]
    xs = [torch.randn(s, generator=g, dtype=dtype) * c for s, c in zip(shapes, scale)]
    for x in xs:
        x.requires_grad_(requires_grad)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[0, 7] = True
    reset[1, 15] = reset[1, 16] = True
    return xs, reset


@pytest.mark.parametrize("backend", ["chunkwise", "native"])
def test_backend_matches_recurrent_values_and_grads(backend):
    xs, reset = _inputs(requires_grad=True)
    h_ref, st_ref = mlstm_recurrent(*xs, reset=reset)
    grads_ref = torch.autograd.grad(h_ref.pow(2).sum() + st_ref[0].sum(), xs)
    h, st = mlstm_forward(*xs, reset=reset, backend=backend, chunk_size=8)
    grads = torch.autograd.grad(h.pow(2).sum() + st[0].sum(), xs)
    torch.testing.assert_close(h, h_ref)
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a, b)
    for name, a, b in zip("qkvif", grads, grads_ref):
        torch.testing.assert_close(a, b, msg=f"gradient of {name}")


def test_chunkwise_without_autograd_matches_recurrent():
    # Without autograd the chunkwise form reuses its buffers in place (inference): same values.
    xs, reset = _inputs()
    h_ref, st_ref = mlstm_recurrent(*xs, reset=reset)
    with torch.no_grad():
        h, st = mlstm_chunkwise(*xs, reset=reset, chunk_size=8)
    torch.testing.assert_close(h, h_ref)
    for a, b in zip(st, st_ref):
        torch.testing.assert_close(a, b)


def test_chunkwise_gradcheck():
    xs, reset = _inputs(requires_grad=True)
    small = [x[:1, :1, :9].detach().clone().requires_grad_(True) for x in xs]
    rs = reset[:1, :9].clone()
    rs[0, 4] = True

    def fn(*args):
        return mlstm_chunkwise(*args, reset=rs, chunk_size=4)[0]

    assert torch.autograd.gradcheck(fn, small, eps=1e-6, atol=1e-6)


def test_initial_state_continues_exactly():
    xs, _ = _inputs()
    h_full, st_full = mlstm_chunkwise(*xs, chunk_size=8)
    cut = 10
    first = [x[:, :, :cut] for x in xs]
    rest = [x[:, :, cut:] for x in xs]
    h1, st = mlstm_chunkwise(*first, chunk_size=8)
    h2, st2 = mlstm_chunkwise(*rest, state=st, chunk_size=8)
    torch.testing.assert_close(torch.cat([h1, h2], 2), h_full)
    torch.testing.assert_close(st2[0], st_full[0])


def test_padding_gates_leave_state_unchanged():
    xs, _ = _inputs()
    q, k, v, i, f = xs
    _, st = mlstm_chunkwise(q, k, v, i, f, chunk_size=8)
    pad = 5
    qp, kp, vp = (torch.cat([x, torch.randn_like(x[:, :, :pad])], 2) for x in (q, k, v))
    ip = torch.cat([i, torch.full_like(i[..., :pad], PAD_I)], -1)
    fp = torch.cat([f, torch.full_like(f[..., :pad], PAD_F)], -1)
    _, st_p = mlstm_chunkwise(qp, kp, vp, ip, fp, chunk_size=8)
    for a, b in zip(st, st_p):
        torch.testing.assert_close(a, b)


def test_joint_step_in_place_equals_the_step():
    # The decoding step on [C | n] (GQA: 4 query heads on 2 K/V heads), a padding step among
    # them: the same outputs and state as the reference step with K/V repeated per query head.
    g = torch.Generator().manual_seed(2)
    nh, nkv = 4, 2
    shapes = [(B, nh, FD, D), (B, nh, FD), (B, nh)]
    ref = tuple(torch.zeros(s, dtype=torch.float64) for s in shapes)
    (c, n, m), cn = joint_state(ref)
    for t in range(12):
        q = torch.rand(B, nh, 1, FD, generator=g, dtype=torch.float64)
        k = torch.rand(B, nkv, 1, FD, generator=g, dtype=torch.float64)
        v = torch.randn(B, nkv, 1, D, generator=g, dtype=torch.float64)
        i, f = (torch.randn(B, nh, generator=g, dtype=torch.float64) * 3 for _ in range(2))
        if t == 5:
            i[1], f[1] = PAD_I, PAD_F
        h_ref, ref = mlstm_step(
            q[:, :, 0], k[:, :, 0].repeat_interleave(2, 1), v[:, :, 0].repeat_interleave(2, 1),
            i, f, ref,
        )  # fmt: skip
        gates = torch.stack([i, f, torch.zeros_like(i)], 1)
        h = mlstm_step_joint_(q, k, v, gates, cn, m)
        torch.testing.assert_close(h[:, :, 0], h_ref)
        for a, b in zip((c, n, m), ref):
            torch.testing.assert_close(a, b)


def test_unknown_backend_lists_choices():
    xs, _ = _inputs()
    with pytest.raises(ValueError, match="chunkwise"):
        mlstm_forward(*xs, backend="cuda-magic")


@pytest.mark.gpu
def test_triton_matches_chunkwise_on_gpu():
    xs, reset = _inputs(dtype=torch.float32)
    xs = [x.cuda().requires_grad_(True) for x in xs]
    h_ref, _ = mlstm_forward(*xs, reset=reset.cuda(), backend="chunkwise", chunk_size=16)
    g_ref = torch.autograd.grad(h_ref.sum(), xs)
    h, _ = mlstm_forward(*xs, reset=reset.cuda(), backend="triton", chunk_size=16)
    g = torch.autograd.grad(h.sum(), xs)
    torch.testing.assert_close(h, h_ref, atol=1e-3, rtol=1e-3)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)
