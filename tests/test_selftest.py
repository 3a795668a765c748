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


def test_gpu_groups_dry_run_on_cpu(tmp_path):
    """The --gpu groups' code (child processes, 1-rank ZeRO-3 engine, head loss, inference timing)
    run tiny on CPU, so the prepared GPU script is exercised before a GPU is at hand."""
    results = selftest.run_selftest(gpu=False, out=tmp_path / "s.json", budget_s=240, dry_run=True)
    by_name = {r.name: r for r in results}
    assert all(r.status == "pass" for r in results), selftest.format_table(results)
    train = by_name["stage II tokens/s + MFU (1 rank, ZeRO-3 bf16)"].metrics
    assert train["tokens_per_s"] > 0 and train["loss"] > 0
    rows = by_name["teacher vs student prefill/decode"].metrics["rows"]
    assert [r["context"] for r in rows] == [512, 1024]
    assert all(r["student_decode_tok_s"] > 0 and r["teacher_decode_tok_s"] > 0 for r in rows)
