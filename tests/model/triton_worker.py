"""The cases of tests/model/test_triton_kernels.py, run in one fresh process under Triton's
interpreter: ``TRITON_INTERPRET=1 python -m tests.model.triton_worker OUT.json``.

The variable must be set before triton is imported, and in a pytest process other tests import
triton first (mlstm_kernels imports its Triton kernels with its native ones), so the cases run
here and the tests read the errors they measured from OUT.json and hold the tolerances. The
interpreter is also made to refuse what a GPU compiler refuses (``interpret_like_a_gpu``), so
the shapes below are ones a GPU accepts.

Every Triton kernel the product can select is mlstm_kernels' ``chunkwise--triton_limit_chunk``
(forward: recurrent_fw_C + parallel_fw_H; backward: recurrent_bw_dC + parallel_bw_dQKV), called by
``mlstm_forward(backend="triton")``; each case counts the kernel's calls, so a silent fallback to
another backend cannot pass for the kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

import megadistill.model.mlstm as mlstm
from megadistill.model.backends import triton_backend_status
from megadistill.selftest import interpret_like_a_gpu, rel_err

B, H, T, FD, D = 2, 2, 40, 16, 16
CALLS = {"n": 0}


@contextlib.contextmanager
def kernel_wrapped(wrap: Callable | None = None) -> Iterator[None]:
    """Count the Triton kernel's calls (and let ``wrap(fn, *args, **kw)`` stand in for it)."""
    real = mlstm._kernel_fn

    def fake(backend: str):
        fn = real(backend)
        assert backend == "triton", backend

        def call(*args, **kw):
            CALLS["n"] += 1
            return wrap(fn, *args, **kw) if wrap else fn(*args, **kw)

        return call

    mlstm._kernel_fn = fake
    try:
        yield
    finally:
        mlstm._kernel_fn = real


def product_inputs(seed: int = 1, starts: bool = True):
    """Inputs as a hybrid layer feeds the mLSTM: q/k Hedgehog features (softmax rows), forget
    pre-activations around the per-head biases (fgate_bias [3, 6] spread over heads), and the
    padding gates ``_gates`` writes (PAD_I, PAD_F) on row 1's first 3 tokens (left padding) and
    last 5 (right padding); a document starts at row 0's token 17 (packed) and, with ``starts``,
    at each row's first real token (else the rows continue a carried state).

    Input pre-activations: N(0, 1) on row 0, N(2, 1) on row 1. Both regimes of the normaliser
    ``max(|n.q'|, exp(-m))`` are then met (row 0 the second, row 1 mostly the first): at T = 40
    the offset does what hundreds of keys in the state do at a real context length."""
    g = torch.Generator().manual_seed(seed)
    b, t = B, T
    q = torch.softmax(torch.randn(b, H, t, FD, generator=g, dtype=torch.float64) * 2, -1)
    k = torch.softmax(torch.randn(b, H, t, FD, generator=g, dtype=torch.float64) * 2, -1)
    v = torch.randn(b, H, t, D, generator=g, dtype=torch.float64)
    offset = torch.tensor([0.0, 2.0], dtype=torch.float64)[:, None, None]
    i_pre = torch.randn(b, H, t, generator=g, dtype=torch.float64) + offset
    bias = torch.linspace(3.0, 6.0, H, dtype=torch.float64)[None, :, None]
    f_pre = bias + torch.randn(b, H, t, generator=g, dtype=torch.float64)
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[0, 17] = True
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :3] = valid[1, -5:] = False
    if starts:
        reset[0, 0] = reset[1, 3] = True
    pad = ~valid[:, None, :]
    i_pre = i_pre.masked_fill(pad, mlstm.PAD_I)
    f_pre = f_pre.masked_fill(pad, mlstm.PAD_F)
    return [q, k, v, i_pre, f_pre], reset, valid


def _upstream(shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def compare(chunk: int = 16, loss: str = "plain", state=None) -> dict[str, float]:
    """``mlstm_forward(backend='triton')`` in fp32 vs the float64 ``chunkwise`` form: outputs on
    real tokens, final states, and the input gradients of ``sum(w * h)`` (``loss='normalised'``:
    of ``sum(w * h / |h|)``, per token and head, which no normaliser gradient reaches)."""
    xs, reset, valid = product_inputs(starts=state is None)
    keep = valid[:, None, :, None].double()
    w = _upstream((B, H, T, D)) * keep

    def run(backend, dtype, st):
        x = [a.to(dtype).requires_grad_(True) for a in xs]
        h, last = mlstm.mlstm_forward(*x, reset, st, backend=backend, chunk_size=chunk)
        hd = h.double()
        if loss == "normalised":
            hd = torch.nn.functional.normalize(hd, dim=-1)
        return h, last, torch.autograd.grad((hd * w).sum(), x)

    ref_state = None if state is None else tuple(s.double() for s in state)
    kern_state = None if state is None else tuple(s.float() for s in state)
    h_ref, st_ref, g_ref = run("chunkwise", torch.float64, ref_state)
    before = CALLS["n"]
    h, st, grads = run("triton", torch.float32, kern_state)
    out = {"kernel_calls": CALLS["n"] - before, "fwd": rel_err(h * keep, h_ref * keep)}
    out.update({f"state_{n}": rel_err(a, r) for n, a, r in zip("cnm", st, st_ref)})
    out.update({f"grad_{n}": rel_err(a, r) for n, a, r in zip("qkvif", grads, g_ref)})
    return out


def case_kernel() -> dict[str, Any]:
    """Chunk sizes 16 and 32 (T = 40: the tail is padded to the chunk with no-op gates), and a
    continuation from a carried state (a prefill's, as a cache hands it on)."""
    with kernel_wrapped():
        res: dict[str, Any] = {f"chunk{c}": compare(chunk=c) for c in (16, 32)}
        xs, reset, _ = product_inputs(seed=2)
        _, state = mlstm.mlstm_chunkwise(*xs, reset=reset, chunk_size=16)  # float64
        res["from_state"] = compare(chunk=16, state=state)
    return res


def case_raw_kernel() -> dict[str, Any]:
    """The kernel's own backward, without megadistill's added terms: it holds the normaliser
    constant, so it is exact only for an upstream gradient orthogonal to h (per token and head)."""
    real = mlstm._with_exact_grad
    mlstm._with_exact_grad = lambda fn, q, k, i, f, state, h, chunk, eps: h
    try:
        with kernel_wrapped():
            return {loss: compare(loss=loss) for loss in ("plain", "normalised")}
    finally:
        mlstm._with_exact_grad = real


def _scaled_backward(h: torch.Tensor, factor: float) -> torch.Tensor:
    return h + (factor - 1.0) * (h - h.detach())  # same value, gradient times factor


PERTURBATIONS: dict[str, Callable] = {
    "output x (1 + 1e-3)": lambda fn, *a, **kw: _map_h(fn(*a, **kw), lambda h: h * (1 + 1e-3)),
    "forget gate + 0.05": lambda fn, q, k, v, i, f, **kw: fn(q, k, v, i, f + 0.05, **kw),
    "input gate + 0.05": lambda fn, q, k, v, i, f, **kw: fn(q, k, v, i + 0.05, f, **kw),
    "gradient x (1 + 1e-3)": lambda fn, *a, **kw: _map_h(
        fn(*a, **kw), lambda h: _scaled_backward(h, 1 + 1e-3)
    ),
}


def _map_h(out, f):
    return (f(out[0]), out[1]) if isinstance(out, tuple) else f(out)


def case_perturbed() -> dict[str, Any]:
    """The comparison of ``compare`` with a perturbed kernel: each must fail the tolerances."""
    res = {}
    for name, wrap in PERTURBATIONS.items():
        with kernel_wrapped(wrap):
            res[name] = compare()
    return res


def case_student() -> dict[str, Any]:
    """The tiny student (Llama, GQA 4/2 heads, window 32, sinks 4, chunk 16, two packed documents
    per row, train mode) with the Triton mLSTM vs float64 chunkwise: logits and every parameter's
    gradient; the gates, features and resets are the model's own."""
    from megadistill.selftest import check_student

    with kernel_wrapped():
        before = CALLS["n"]
        metrics = check_student("triton", "reference", "cpu", tol=float("inf"))
        metrics["kernel_calls"] = CALLS["n"] - before
    return metrics


def case_bf16_dtypes() -> dict[str, Any]:
    """A bf16 student (as DeepSpeed's bf16 engine holds it) with the Triton mLSTM, forward +
    backward, then a prefill into a cache: the dtypes the kernel is given and the state kept."""
    from megadistill.selftest import _tiny_student

    seen: set[tuple[str, str]] = set()

    def record(fn, q, k, v, i, f, c_initial, n_initial, m_initial, **kw):
        for name, x in (("q", q), ("k", k), ("v", v), ("i", i), ("f", f), ("c0", c_initial),
                        ("n0", n_initial), ("m0", m_initial)):  # fmt: skip
            seen.add((name, str(x.dtype)))
        out = fn(q, k, v, i, f, c_initial=c_initial, n_initial=n_initial, m_initial=m_initial, **kw)
        seen.add(("h", str(_first(out).dtype)))
        return out

    student = _tiny_student().train().to(torch.bfloat16)
    student.config.mlstm_backend = "triton"
    ids = torch.randint(3, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with kernel_wrapped(record):
        out = student(input_ids=ids, labels=ids)
        out.loss.backward()
        cache = student.new_cache()
        with torch.no_grad():
            student.eval()(input_ids=ids, cache=cache)
    states = {str(s.dtype) for lc in cache.layers for s in lc.mlstm}
    return {
        "kernel_inputs": sorted(seen),
        "cache_state_dtypes": sorted(states),
        "logits_dtype": str(out.logits.dtype),
        "loss_finite": bool(torch.isfinite(out.loss)),
    }


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def case_gpu_limits() -> dict[str, Any]:
    """What a GPU's tl.dot refuses (a chunk or a head below 16) is refused here too, so the
    cases above ran at shapes a GPU accepts (and the config checks for them are needed)."""
    res = {}
    for name, (chunk, fd) in {"chunk 8": (8, 16), "feature dim 8": (16, 8)}.items():
        g = torch.Generator().manual_seed(0)
        q, k = (torch.softmax(torch.randn(1, 1, 16, fd, generator=g), -1) for _ in range(2))
        v = torch.randn(1, 1, 16, 16, generator=g)
        gates = [torch.randn(1, 1, 16, generator=g) for _ in range(2)]
        try:
            with kernel_wrapped():
                mlstm.mlstm_forward(q, k, v, *gates, backend="triton", chunk_size=chunk)
            res[name] = "ran"
        except Exception as exc:  # noqa: BLE001 - the interpreter wraps the compiler's assertion
            res[name] = f"refused: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return res


CASES = {
    "kernel": case_kernel,
    "raw_kernel": case_raw_kernel,
    "perturbed": case_perturbed,
    "student": case_student,
    "bf16_dtypes": case_bf16_dtypes,
    "gpu_limits": case_gpu_limits,
}


def main(out_path: str) -> None:
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    why = triton_backend_status("cpu")
    assert why is None, why
    torch.set_num_threads(1)
    interpret_like_a_gpu()
    results = {name: case() for name, case in CASES.items()}
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
