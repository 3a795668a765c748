"""The compiled CPU paths (``model/cpu_step``: the recurrent branch of a decoding step, the
prefill's mLSTM scan) against their eager ops.

The library is built for real with this machine's compiler (a test here fails, not skips, when
it cannot be: the product would then decode on the slow path without a word but the warning).
"""

import logging
import os
import stat

import pytest
import torch

from megadistill.model import cpu_step
from megadistill.model.cache import LayerCache
from megadistill.model.mlstm import (
    EPS,
    PAD_F,
    PAD_I,
    mlstm_forward,
    mlstm_recurrent,
    zero_state,
)
from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher
from tests.decoding import fed, set_on_attention, stepped_with_cache

CASES = {
    "learned": {},
    "learned_pm": {"feature_map": "hedgehog_pm"},
    "learned_half": {"gate_init": "half"},
    "mlstm": {"gate_mode": "mlstm"},
    "softmax_layer": {"softmax_layers": [1]},
    "learned_rope_none": {"rope_on": "none"},
    "shared_norm": {"mix": "shared_norm"},  # rope_on "none": feature maps before RoPE
    "shared_norm_pm": {"mix": "shared_norm", "feature_map": "hedgehog_pm"},
    "shared_norm_rope_input": {"mix": "shared_norm", "rope_on": "input"},
}


def _student(dtype=torch.float64, family="llama", **hybrid):
    """A tiny GQA student (4 query heads, 2 K/V heads) whose every new parameter is off its
    start: random gate scales, gates that open, features far from the identity."""
    teacher = tiny_teacher(family)
    hybrid = {"window": 8, "num_sinks": 2, "chunk_size": 4, **hybrid}
    student, _ = convert(teacher, seed=0, **hybrid)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in student.model.layers:
            attn = layer.self_attn
            for name, p in attn.named_parameters():
                if name.split(".")[0] in ("ogate", "ogate_scale", "q_feature", "k_feature"):
                    p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            if hasattr(attn, "igate"):
                attn.igate.bias.fill_(1.0)
    return student.to(dtype).eval()


def _kernels(cache) -> list:
    """The compiled calls bound for the cache's steps (the recurrent branch, or shared_norm's)."""
    weights = [w for w in cache.step_weights.values() if w is not None]
    return [k for w in weights for k in (w.kernel, w.shared) if k is not None]


@pytest.mark.parametrize("hybrid", CASES.values(), ids=CASES.keys())
def test_compiled_step_equals_the_eager_step(hybrid):
    # Two rows of packed documents (resets inside the decoded part), several windows long: the
    # logits and the state the compiled branch leaves equal the eager branch's to float64
    # rounding, and the compiled branch is what ran.
    assert cpu_step.library() is not None, "the compiled step does not build on this machine"
    student = _student(**hybrid)
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in ([17, 5, 26], [9, 39])])
    ids = torch.randint(0, 256, pos.shape, generator=torch.Generator().manual_seed(2))
    compiled, ccache = stepped_with_cache(student, ids, 3, position_ids=pos)
    set_on_attention(student, step_kernel=False)
    eager, ecache = stepped_with_cache(student, ids, 3, position_ids=pos)
    assert _kernels(ccache) and not _kernels(ecache)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    for a, b in zip(ccache.layers, ecache.layers, strict=True):
        for x, y in zip(a.tensors(), b.tensors(), strict=True):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("hybrid", [{}, CASES["shared_norm_pm"]], ids=["gated", "shared_norm"])
def test_compiled_step_in_float32_and_through_generate(hybrid):
    # float32 (the dtype users decode in): generate()'s greedy tokens are the eager step's and
    # the logits agree to float32 rounding.
    student = _student(torch.float32, **hybrid)
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    compiled, ccache = stepped_with_cache(student, ids, 4)
    set_on_attention(student, step_kernel=False)
    eager, _ = stepped_with_cache(student, ids, 4)
    assert _kernels(ccache)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = student.generate(ids, **kw)
        set_on_attention(student, step_kernel=True)
        got = student.generate(ids, **kw)
    assert torch.equal(got, want)


def test_without_a_compiler_decoding_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CXX", "no-such-compiler")
    with caplog.at_level(logging.WARNING, logger="megadistill.model.cpu_step"):
        assert cpu_step.library(tmp_path) is None
        assert cpu_step.library(tmp_path) is None  # decided once per process
    assert len(caplog.records) == 1
    assert "no-such-compiler" in caplog.text and "eager ops" in caplog.text
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(cpu_step, "library", lambda: None)
    student = _student()
    ids = torch.randint(0, 256, (1, 20))
    got, cache = stepped_with_cache(student, ids, 3)
    assert cache.step_weights and not _kernels(cache)
    with torch.no_grad():
        torch.testing.assert_close(got, student(ids).logits)


def test_a_corrupt_cached_library_is_built_again(tmp_path, monkeypatch):
    path = cpu_step.library_path(tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\x7fELF truncated by a crash")
    monkeypatch.setattr(cpu_step, "_loaded", {})
    assert cpu_step.library(tmp_path) is not None
    assert path.read_bytes()[:4] == b"\x7fELF" and path.stat().st_size > 1000
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary left


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750)])
def test_the_library_gets_the_mode_the_umask_gives(tmp_path, umask, mode):
    # A cache shared by a team: the library is readable where a plain open() would make it so.
    old = os.umask(umask)
    try:
        path = cpu_step.build(cpu_step.library_path(tmp_path))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_turned_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(cpu_step.ENV, "0")
    student = _student()
    _, cache = stepped_with_cache(student, torch.randint(0, 256, (1, 12)), 3)
    assert cache.step_weights and not _kernels(cache)


def test_a_bad_layout_is_refused_not_read():
    lib = cpu_step.library()
    assert lib is not None
    feats = torch.zeros(6, 16, 16, dtype=torch.float64)
    step = cpu_step.RecurrentStep(
        lib, num_heads=4, num_kv=2, head_dim=16, features=feats, both_signs=False, ogate=None,
        ogate_bias=None, ogate_scale=None, eps=1e-6,
    )  # fmt: skip
    y = torch.zeros(1, 4 * 16 + 4 * 16 + 3 * 4, dtype=torch.float64)
    qk = torch.zeros(1, 6, 1, 16, dtype=torch.float64)
    cn, m = torch.zeros(1, 4, 16, 17, dtype=torch.float64), torch.zeros(1, 4, dtype=torch.float64)
    out = torch.empty(1, 4, 1, 16, dtype=torch.float64)
    step(y, qk, None, cn, m, out)  # the right layout runs
    with pytest.raises(ValueError, match="contiguous"):
        step(y, qk, None, cn.transpose(2, 3).contiguous().transpose(2, 3), m, out)
    with pytest.raises(ValueError, match="float32"):
        step(y.float(), qk, None, cn, m, out)


def test_a_bad_shared_norm_layout_is_refused_not_read():
    lib = cpu_step.library()
    assert lib is not None
    f64 = {"dtype": torch.float64}
    step = cpu_step.SharedNormStep(
        lib, num_heads=4, num_kv=2, head_dim=16, features=torch.zeros(6, 16, 16, **f64),
        both_signs=False, scaling=0.25,
    )  # fmt: skip
    lc = LayerCache(
        mlstm=(torch.zeros(1, 4, 16, 16, **f64), torch.zeros(1, 4, 16, **f64),
               torch.zeros(1, 4, **f64)),
        k=torch.zeros(1, 2, 10, 16, **f64), v=torch.zeros(1, 2, 10, 16, **f64),
        gate_i=torch.zeros(1, 4, 10, **f64), decay=torch.zeros(1, 4, 10, **f64),
    )  # fmt: skip
    y = torch.zeros(1, 4 * 16 + 4 * 16 + 3 * 4, **f64)
    qk = torch.zeros(1, 6, 1, 16, **f64)
    leaves, mask = torch.zeros(1, dtype=torch.bool), torch.ones(1, 10, dtype=torch.bool)
    out = torch.empty(1, 4, 1, 16, **f64)
    step(y, qk, leaves, mask, lc, 5, out)  # the right layout runs
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="bad shared_norm step y"):
        step(y, qk, leaves, mask, lc, 10, out)  # a slot past the buffer
    with pytest.raises(ValueError, match=r"expected contiguous torch.float64 \(1, 4, 10\)"):
        step(y, qk, leaves, mask, LayerCache(**{**vars(lc), "decay": lc.decay[..., :8]}), 5, out)
    with pytest.raises(ValueError, match="contiguous booleans"):
        step(y, qk, leaves, mask.float(), lc, 5, out)
    # plain q/k (rope_on "none") need the cache's plain keys, of the buffer's shape
    with pytest.raises(ValueError, match="needs the cache's k_plain"):
        step(y, qk, leaves, mask, lc, 5, out, qk.clone())
    with pytest.raises(ValueError, match=r"\(1, 2, 10, 16\)"):
        step(y, qk, leaves, mask, LayerCache(**{**vars(lc), "k_plain": lc.k[:, :, :8]}), 5, out,
             qk.clone())  # fmt: skip
    step(y, qk, leaves, mask, LayerCache(**{**vars(lc), "k_plain": lc.k.clone()}), 5, out,
         qk.clone())  # fmt: skip


def _mlstm_inputs(b, h, t, f, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.softmax(torch.randn(b, h, t, f, generator=g, dtype=dtype), -1) for _ in "qk")
    v = torch.randn(b, h, t, d, generator=g, dtype=dtype)
    i_pre = torch.randn(b, h, t, generator=g, dtype=dtype) + 1.0
    f_pre = torch.randn(b, h, t, generator=g, dtype=dtype) + 3.0
    i_pre[1, :, 40:45], f_pre[1, :, 40:45] = PAD_I, PAD_F  # padding: exact no-op steps
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[0, 30] = reset[1, 0] = reset[1, 70] = True  # packed documents
    state = (
        torch.randn(b, h, f, d, generator=g, dtype=dtype),
        torch.rand(b, h, f, generator=g, dtype=dtype),
        torch.randn(b, h, generator=g, dtype=dtype),
    )
    return (q, k, v, i_pre, f_pre), reset, state


@pytest.mark.parametrize("d", [64, 128, 7], ids=["d64_compiled_in", "d128_compiled_in", "d7"])
@pytest.mark.parametrize("threads", [1, 4])
def test_the_compiled_scan_equals_the_recurrent_form(d, threads):
    # Packed documents, padding steps and an entering state, over 2 x 3 (row, head) pairs split
    # unevenly among 4 threads: values and the state left equal the step-by-step reference to
    # float64 rounding; the state's C and n are views of one [C | n] buffer, as decoding wants.
    xs, reset, state = _mlstm_inputs(2, 3, 97, 16, d, torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = cpu_step.mlstm_scan(*xs, reset, state, EPS)
            want = mlstm_recurrent(*xs, reset=reset, state=state)
    finally:
        torch.set_num_threads(before)
    assert got is not None
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(got[1], want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    c, n, _ = got[1]
    assert n.data_ptr() == c.data_ptr() + d * c.element_size()  # [C | n]: n after C's d columns
    assert state[2].abs().sum() > 0 and not torch.equal(state[2], got[1][2])  # input kept


def test_the_scan_in_float32():
    xs, reset, state = _mlstm_inputs(2, 3, 200, 32, 64, torch.float64, seed=1)
    with torch.no_grad():
        want, _ = mlstm_recurrent(*xs, reset=reset, state=state)
        got, _ = cpu_step.mlstm_scan(
            *(x.float() for x in xs), reset, [s.float() for s in state], EPS
        )
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_mlstm_forward_scans_without_autograd_only(monkeypatch):
    # The dispatch: chunkwise on CPU without autograd takes the scan; with autograd (gradients),
    # with compiled=False, or where the scan does not apply it runs the chunkwise form.
    calls = []
    scan = cpu_step.mlstm_scan
    monkeypatch.setattr(cpu_step, "mlstm_scan", lambda *a: calls.append(scan(*a)) or calls[-1])
    xs, reset, _ = _mlstm_inputs(2, 3, 90, 8, 8, torch.float32, seed=2)
    with torch.no_grad():
        h_scan, _ = mlstm_forward(*xs, reset=reset, chunk_size=16)
        assert len(calls) == 1 and calls[0] is not None
        h_chunk, _ = mlstm_forward(*xs, reset=reset, chunk_size=16, compiled=False)
        assert len(calls) == 1
    torch.testing.assert_close(h_scan, h_chunk, rtol=1e-5, atol=1e-5)
    xs = [x.requires_grad_(True) for x in xs]
    h, _ = mlstm_forward(*xs, reset=reset, chunk_size=16)
    assert len(calls) == 1 and h.requires_grad  # with autograd: the chunkwise form
    with torch.no_grad():  # where the scan does not apply (a half dtype) it says so
        halves = [x.detach().half() for x in xs]
        zeros = [s.half() for s in zero_state(xs[0], xs[2])]
        assert cpu_step.mlstm_scan(*halves, reset, zeros, EPS) is None
        with pytest.raises(ValueError, match=r"shape \(2, 60\) where \(2, 90\)"):
            cpu_step.mlstm_scan(
                *(x.detach() for x in xs), reset[:, :60], zero_state(xs[0], xs[2]), EPS
            )


def test_a_compiled_prefill_equals_the_eager_one():
    # The whole student: a long prefill, a chunk after the cache (the scan from a state), then
    # steps; against the same with the compiled paths off, to float64 rounding.
    student = _student()
    pos = torch.stack([torch.cat([torch.arange(n) for n in r]) for r in ([37, 5, 26], [49, 19])])
    ids = torch.randint(0, 256, pos.shape, generator=torch.Generator().manual_seed(4))
    compiled = fed(student, ids, [0, 40, 55, 56, 68], position_ids=pos)
    cpu_step.set_enabled(student, False)
    eager = fed(student, ids, [0, 40, 55, 56, 68], position_ids=pos)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
