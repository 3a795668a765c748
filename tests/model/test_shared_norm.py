"""shared_norm's blocked training form against the quadratic one, in float64, values and
gradients: packed documents (resets), left padding, sinks, GQA, short documents, a document
longer than the window, and rows that start in the middle of one."""

from __future__ import annotations

import pytest
import torch

from megadistill.model import shared_norm as sn
from megadistill.model.swa import row_tokens

B, H, KV, T, D, F, W = 2, 4, 2, 70, 8, 6, 8

# Document starts per row (row 1 may be left-padded first); 0 = a row that starts mid-document.
LAYOUTS = {
    "one document": ([0], [0]),
    "packed": ([0, 9, 30, 33, 34, 61], [0, 20]),
    "long and short": ([0, 45], [0, 3, 5, 7, 9, 11, 13, 15, 17, 40]),
    "mid-document start": ([17, 50], [0, 8, 60]),
}


def _inputs(starts, pad, seed, head_dim=D):
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    q, k, v = (torch.randn(B, n, T, head_dim, generator=g, dtype=dt) for n in (H, KV, KV))
    fq = torch.softmax(torch.randn(B, H, T, F, generator=g, dtype=dt), -1)
    fk = torch.softmax(torch.randn(B, H, T, F, generator=g, dtype=dt), -1)
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :pad] = False
    reset = torch.zeros(B, T, dtype=torch.bool)
    for row, s in enumerate(starts):
        for j in s:
            reset[row, min(j + (pad if row == 1 else 0), T - 1)] = True
    reset &= valid
    i_pre = (torch.randn(B, H, T, generator=g, dtype=dt) + 1).masked_fill(~valid[:, None], -1e4)
    f_pre = (torch.randn(B, H, T, generator=g, dtype=dt) + 3).masked_fill(~valid[:, None], 1e4)
    return q, k, v, fq, fk, i_pre, f_pre, reset, valid


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(("num_sinks", "pad"), [(0, 0), (2, 0), (2, 5), (3, 11)])
def test_blocked_equals_quadratic_in_float64_values_and_gradients(layout, num_sinks, pad):
    starts = LAYOUTS[layout]
    tensors = _inputs(starts, pad, seed=pad + 7 * num_sinks + len(layout))
    q, k, v, fq, fk, i_pre, f_pre, reset, valid = tensors
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, fq, fk, i_pre, f_pre)]
    ref = sn.shared_norm_parallel(*leaves, reset, valid, W, num_sinks, 0.3)
    tok = row_tokens(reset, valid)
    leaves2 = [x.clone().requires_grad_(True) for x in (q, k, v, fq, fk, i_pre, f_pre)]
    blk = sn.shared_norm_blocked(*leaves2, tok, W, num_sinks, 0.3)
    torch.testing.assert_close(blk, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ref) * valid[:, None, :, None]
    grads = torch.autograd.grad(ref, leaves, g)
    grads2 = torch.autograd.grad(blk, leaves2, g)
    for name, a, b in zip("q k v fq fk i_pre f_pre".split(), grads2, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=f"d/d{name}")


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize(
    ("num_sinks", "pad", "threads", "head_dim"),
    [(0, 0, 1, D), (2, 5, 3, 64), (3, 11, 1, 128)],
    ids=["d8", "d64_compiled_in", "d128_compiled_in"],
)
def test_the_compiled_scan_equals_quadratic_in_float64(layout, num_sinks, pad, threads, head_dim):
    """The prefill's and evaluation's compiled form (``cpu_step.shared_norm_scan``, one pass
    over the tokens with the state in cache) is the quadratic form's function, the (row, head)
    pairs split over ``threads``; keys' feature maps per K/V head, as the layer gives them; head
    dims 64 and 128 take the loops compiled for them."""
    from megadistill.model import cpu_step

    q, k, v, fq, fk, i_pre, f_pre, reset, valid = _inputs(
        LAYOUTS[layout], pad, seed=pad + 3, head_dim=head_dim
    )
    fk = fk[:, :: H // KV]  # one feature map per K/V head
    ref = sn.shared_norm_parallel(
        q, k, v, fq, fk.repeat_interleave(H // KV, 1), i_pre, f_pre, reset, valid, W,
        num_sinks, 0.3,
    )  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = cpu_step.shared_norm_scan(
                q, k, v, fq, fk, i_pre, f_pre, row_tokens(reset, valid), W, num_sinks, 0.3
            )
    finally:
        torch.set_num_threads(before)
    assert got is not None, "the compiled scan does not build on this machine"
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad(), pytest.raises(ValueError, match="shared_norm_scan got a tensor of"):
        cpu_step.shared_norm_scan(q, k, v, fq, fk[:, :, :-1], i_pre, f_pre,
                                  row_tokens(reset, valid), W, num_sinks, 0.3)  # fmt: skip


def test_a_document_start_inside_the_row_changes_the_blocked_output():
    """The reset matters: without it the later document would read the earlier one's keys."""
    q, k, v, fq, fk, i_pre, f_pre, reset, valid = _inputs(LAYOUTS["packed"], 0, seed=1)
    args = (q, k, v, fq, fk, i_pre, f_pre)
    packed = sn.shared_norm_blocked(*args, row_tokens(reset, valid), W, 2, 0.3)
    one = sn.shared_norm_blocked(*args, row_tokens(reset & False, valid), W, 2, 0.3)
    assert not torch.allclose(packed[0, :, 61:], one[0, :, 61:])
    torch.testing.assert_close(packed[0, :, :9], one[0, :, :9])


@pytest.mark.parametrize(
    ("mix", "switch"), [("shared_norm", "RECOMPUTE_SHARED_NORM"), ("gate", "RECOMPUTE_BRANCHES")]
)
def test_training_recomputes_the_kernels_same_gradients_less_saved(monkeypatch, mix, switch):
    """A student's training forward keeps only its attention kernels' inputs (shared_norm's
    blocked form; the gated mix's chunkwise mLSTM and blocked SWA) and recomputes them in
    backward (``attention.<switch>``): the same loss and gradients, and less saved for backward
    than when the kernels' tensors are kept."""
    import megadistill.model.attention as attention
    from megadistill.teachers import convert
    from megadistill.teachers.tiny import tiny_teacher

    # gate_init half: the gated mix's mLSTM branch gets a gradient from the first step
    student, _ = convert(
        tiny_teacher("llama"), window=8, num_sinks=2, mix=mix, gate_init="half", seed=0
    )
    student.train()
    ids = torch.randint(3, 200, (2, 64), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(40), torch.arange(24)])[None].expand(2, -1)  # two documents

    def run(recompute: bool):
        monkeypatch.setattr(attention, switch, recompute)
        student.zero_grad()
        storages: dict[int, int] = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = student(input_ids=ids, position_ids=pos, labels=ids).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        return loss.detach(), grads, sum(storages.values())

    loss_kept, grads_kept, saved_kept = run(False)
    loss_rec, grads_rec, saved_rec = run(True)
    assert loss_rec == loss_kept
    assert grads_rec.keys() == grads_kept.keys() and any("q_feature" in n for n in grads_rec)
    for name, g in grads_kept.items():
        torch.testing.assert_close(grads_rec[name], g, rtol=0, atol=0, msg=name)
    assert saved_rec < 0.8 * saved_kept, (saved_rec, saved_kept)


def test_the_blocked_backward_touches_each_whole_tensor_a_fixed_number_of_times():
    # The blocked form slices and gathers its inputs per block; autograd must then sum each
    # input's gradient once (a split's or a gather's backward), not fill and add a zero tensor of
    # the input's whole size per block and use (what made it O(T^2 / W): two thirds of a layer's
    # stage I step at 2K tokens). Whole-size writes in backward, counted at 5 and at 10 blocks.
    from torch.utils._python_dispatch import TorchDispatchMode

    class WholeSizeWrites(TorchDispatchMode):
        def __init__(self, shapes):
            super().__init__()
            self.shapes, self.count = shapes, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes:
                self.count += 1
            return out

    counts = []
    for t in (5 * W, 10 * W):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, n, t, D, generator=g, dtype=torch.float64) for n in (H, KV, KV))
        fq, fk = (
            torch.softmax(torch.randn(1, H, t, F, generator=g, dtype=q.dtype), -1) for _ in "qk"
        )
        i_pre, f_pre = torch.randn(1, H, t, dtype=q.dtype), torch.randn(1, H, t, dtype=q.dtype) + 3
        leaves = [x.requires_grad_(True) for x in (q, k, v, fq, fk, i_pre, f_pre)]
        tok = row_tokens(torch.zeros(1, t, dtype=torch.bool), torch.ones(1, t, dtype=torch.bool))
        out = sn.shared_norm_blocked(*leaves, tok, W, 2, 0.3)
        with WholeSizeWrites({(1, H, t, D), (1, H, t, F), (1, H, t)}) as seen:
            out.sum().backward()
        counts.append(seen.count)
    assert counts[0] == counts[1], counts
