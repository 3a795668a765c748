"""`megadistill selftest` on CPU: the same correctness checks the GPU run does, with CPU backends
(and a check that the runner records failures instead of stopping)."""

import json

from megadistill import selftest


def test_cpu_selftest_passes_and_writes_json(tmp_path):
    out = tmp_path / "selftest.json"
    results = selftest.run_selftest(gpu=False, out=out, budget_s=120)
    print(selftest.format_table(results))
    assert [r.status for r in results] == ["pass"] * len(results), selftest.format_table(results)
    assert len(results) == 5
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
