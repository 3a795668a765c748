"""`megadistill selftest` on CPU: the same correctness checks the GPU run does, with CPU backends
(and a check that the runner records failures instead of stopping)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megadistill import selftest

ROOT = Path(__file__).resolve().parents[1]


def test_cpu_selftest_passes_and_writes_json(tmp_path):
    out = tmp_path / "selftest.json"
    results = selftest.run_selftest(gpu=False, out=out, budget_s=120)
    print(selftest.format_table(results))
    assert [r.status for r in results] == ["pass"] * len(results), selftest.format_table(results)
    assert len(results) == 6
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["results"]] == [r.name for r in results]
    for r in results:
        errs = [v for k, v in r.metrics.items() if k.endswith("rel_err")]
        assert errs and max(errs) < 1e-1


def test_runner_isolates_failures_and_unavailable_pieces():
    def wrong():
        m = {}
        selftest._expect(m, "fwd_rel_err", 0.5, 1e-3)
        return m

    def missing():
        raise selftest.CheckUnavailable("no triton")

    def broken():
        raise ZeroDivisionError("boom")

    got = []
    checks = [("wrong", wrong), ("missing", missing), ("broken", broken), ("fine", lambda: {})]
    selftest.run_checks(checks, deadline=float("inf"), sink=got.append)
    assert [r.status for r in got] == ["fail", "unavailable", "error", "pass"]
    assert "0.5" in got[0].message and "ZeroDivisionError" in got[2].message
    assert not selftest.ok(got) and selftest.ok(got[1:2] + got[3:])
    late = []
    selftest.run_checks([("late", lambda: {})], deadline=0.0, sink=late.append)
    assert late[0].status == "timeout"


def test_peak_flops_by_gpu_name():
    assert selftest.peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert selftest.peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert selftest.peak_bf16_flops("NVIDIA H200") == 989e12
    assert selftest.peak_bf16_flops("Some GPU") is None


@pytest.mark.slow
def test_gpu_check_script_rehearsed_on_cpu(tmp_path):
    """``tools/gpu_check.sh OUT --rehearse``: the GPU run's script, CLI, child processes and every
    check that is not CUDA-only, on CPU at small shapes: the Triton kernels under Triton's
    interpreter, the compiled FlexAttention forward (its backward, which has no CPU implementation,
    is left to the GPU), the 1-rank ZeRO-3 engine and head loss, inference timing. Figures land in
    one JSON file. On a GPU the same script runs ``--gpu`` under a 10-minute bound (60 s version
    lines + 470 s selftest)."""
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), str(out), "--rehearse"],
        env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["dry_run"] and data["triton_backend"] == "usable", {
        k: v for k, v in data.items() if k != "results"
    }
    by_name = {r["name"]: r for r in data["results"]}
    expected = [n for g in ("correctness", "train", "inference")
                for n, _ in selftest.group_checks(g, gpu=False, dry_run=True)]  # fmt: skip
    assert list(by_name) == expected
    bad = {
        n: (r["status"], r["message"][:300]) for n, r in by_name.items() if r["status"] != "pass"
    }
    assert not bad, bad
    triton = by_name["mlstm triton (cpu fp32) vs fp64"]["metrics"]
    assert triton["fwd_rel_err"] < 1e-5 and triton["grad_max_rel_err"] < 1e-4  # interpreted: fp32
    assert by_name["swa flex (cpu fp32) vs fp64"]["metrics"]["grads"] == selftest.GRADS_GPU_ONLY
    train = by_name["stage II tokens/s + MFU (1 rank, ZeRO-3 bf16)"]["metrics"]
    assert train["tokens_per_s"] > 0 and train["loss"] > 0
    rows = by_name["teacher vs student prefill/decode"]["metrics"]["rows"]
    assert [r["context"] for r in rows] == [512, 1024]
    assert all(r["student_decode_tok_s"] > 0 and r["teacher_decode_tok_s"] > 0 for r in rows)
