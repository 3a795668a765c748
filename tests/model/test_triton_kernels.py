"""The Triton mLSTM kernel the product can select, run on CPU under Triton's interpreter, forward
and backward, against the float64 chunkwise form (``pytest -m triton``).

The cases run once, in a fresh process (tests/model/triton_worker.py: ``TRITON_INTERPRET=1`` must
be set before triton is imported, and in this process other tests import it first); these tests
read the errors it measured and hold the tolerances. fp32 kernel vs float64: the errors measured
are ~1e-7, so 1e-5 (outputs, states) and 1e-4 (gradients) leave room for another BLAS and still
catch a 1e-3 change of the kernel's output or gradient (``test_each_comparison_fails_...``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from megadistill.model.backends import triton_backend_status

pytestmark = pytest.mark.triton

ROOT = Path(__file__).resolve().parents[2]
FWD_TOL, GRAD_TOL = 1e-5, 1e-4
GRADS = [f"grad_{n}" for n in "qkvif"]
_RUN: dict[str, Any] = {}


def interpreted() -> dict[str, Any]:
    """The worker's results (run once per session); fails, never skips, without a usable triton."""
    if not _RUN:
        why = triton_backend_status("cuda")  # installed, and a version with block pointers
        if why is not None:
            _RUN["error"] = f"{why}: the triton-marked tests run mlstm_kernels' Triton kernels"
        else:
            with tempfile.TemporaryDirectory(prefix="md-triton-") as tmp:
                out = Path(tmp) / "results.json"
                proc = subprocess.run(
                    [sys.executable, "-m", "tests.model.triton_worker", str(out)],
                    cwd=ROOT, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                    text=True, timeout=600,
                )  # fmt: skip
                if proc.returncode:
                    _RUN["error"] = f"triton_worker failed:\n{proc.stderr[-4000:]}"
                else:
                    _RUN["results"] = json.loads(out.read_text())
    if "error" in _RUN:
        pytest.fail(_RUN["error"])
    return _RUN["results"]


def _within(errors: dict[str, float]) -> list[str]:
    """The comparisons above tolerance (``[]``: the kernel passes)."""
    bad = [k for k in ("fwd", "state_c", "state_n", "state_m") if not errors[k] <= FWD_TOL]
    return bad + [k for k in GRADS if not errors[k] <= GRAD_TOL]


@pytest.mark.parametrize("case", ["chunk16", "chunk32", "from_state"])
def test_triton_kernel_matches_float64_chunkwise(case):
    """Outputs on real tokens, final states and all five input gradients of the product's call
    (``mlstm_forward(backend='triton')``: documents run one by one, the tail padded to the chunk
    with no-op gates), with packed documents, left and right padding, chunks 16 and 32, and a
    carried state; the kernel really ran (calls counted)."""
    errors = interpreted()["kernel"][case]
    assert errors["kernel_calls"] > 0
    assert _within(errors) == [], errors


def test_kernel_backward_leaves_out_the_normaliser_gradient_that_megadistill_adds():
    """mlstm_kernels' own backward holds the denominator constant: exact when the upstream
    gradient is orthogonal to h (a per-head norm follows, as in xLSTM), off by O(1) otherwise,
    as in this student (no such norm). ``mlstm._with_exact_grad`` adds what is missing (the test
    above). Should a new mlstm_kernels fix its backward, this fails: drop the added terms then."""
    raw = interpreted()["raw_kernel"]
    assert _within(raw["normalised"]) == [], raw["normalised"]
    assert {"grad_q", "grad_k", "grad_i", "grad_f"} <= set(_within(raw["plain"]))
    assert min(raw["plain"][k] for k in ("grad_q", "grad_k", "grad_i", "grad_f")) > 0.1


def test_each_comparison_fails_when_the_kernel_is_perturbed():
    """The comparison above, with the kernel's output scaled by 1 + 1e-3, a gate shifted by 0.05
    inside the kernel call, or its gradients scaled by 1 + 1e-3: each is caught."""
    perturbed = interpreted()["perturbed"]
    assert set(perturbed) == {"output x (1 + 1e-3)", "forget gate + 0.05", "input gate + 0.05",
                              "gradient x (1 + 1e-3)"}  # fmt: skip
    for name, errors in perturbed.items():
        assert errors["kernel_calls"] > 0
        caught = _within(errors)
        assert caught, f"{name} went unnoticed: {errors}"
        if name.startswith("gradient"):  # same values: only the gradients move
            assert caught == GRADS


def test_student_with_triton_matches_float64():
    """The tiny student (GQA, packed documents, the model's own gates and features, chunk 16)
    with the Triton mLSTM vs float64 chunkwise: logits and every parameter's gradient."""
    m = interpreted()["student"]
    assert m["kernel_calls"] > 0
    assert m["logits_rel_err"] < FWD_TOL and m["grad_max_rel_err"] < GRAD_TOL, m


def test_bf16_student_gives_the_kernel_fp32_and_keeps_fp32_states():
    """In a bf16 student (DeepSpeed's bf16 engine) the kernel is given fp32 q/k/v/gates and
    initial states (mlstm_forward computes in fp32) and returns fp32; the cache keeps fp32
    states; the model's output is bf16."""
    m = interpreted()["bf16_dtypes"]
    names = {name for name, _ in m["kernel_inputs"]}
    assert names == {"q", "k", "v", "i", "f", "c0", "n0", "m0", "h"}
    assert {dt for _, dt in m["kernel_inputs"]} == {"torch.float32"}
    assert m["cache_state_dtypes"] == ["torch.float32"]
    assert m["logits_dtype"] == "torch.bfloat16" and m["loss_finite"]


def test_interpreter_refuses_what_a_gpu_refuses():
    """The worker's interpreter refuses a ``tl.dot`` reduced over fewer than 16 (a chunk of 8, a
    feature size of 8) as a GPU's compiler does, so the cases above ran at shapes a GPU accepts;
    the config refuses those settings up front (tests/model/test_backends.py)."""
    limits = interpreted()["gpu_limits"]
    assert set(limits) == {"chunk 8", "feature dim 8"}
    for name, outcome in limits.items():
        assert outcome.startswith("refused") and "K >= 16" in outcome, (name, outcome)
