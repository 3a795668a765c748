"""`megadistill pipeline run RECIPE --local`: the same DAG on one machine, without SLURM."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from megadistill.cli import main as cli_main
from megadistill.config import to_dict
from megadistill.pipeline import recipe_from_dict
from megadistill.pipeline.dag import PipelineError
from megadistill.pipeline.local import run_local
from megadistill.pipeline.process import describe, group_pids, kill_group
from tests.pipeline.conftest import dag_recipe, preempt_recipe, shell_recipe


def test_local_run_executes_the_dag_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)  # no cluster involved
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(to_dict(dag_recipe("local", ["math", "code"]))))
    run_dir = tmp_path / "run"
    assert (
        cli_main(["pipeline", "run", str(recipe_path), "--local", "--run-dir", str(run_dir)]) == 0
    )

    out = {p.stem: json.loads(p.read_text()) for p in (run_dir / "out").glob("*.json")}
    assert (out["math"]["value"], out["code"]["value"]) == (3.0, 6.0)
    assert out["math"]["world_size"] == out["final"]["world_size"] == 2  # 2 local ranks each
    assert out["math"]["job"] is None  # not a SLURM job
    assert out["merged"]["value"] == 4.5 and out["eval"]["value"] == 9.0
    assert out["math"]["start"] >= out["student"]["end"]
    assert out["code"]["start"] >= out["math"]["end"]  # experts one after the other locally
    assert out["merged"]["start"] >= out["code"]["end"]
    assert out["final"]["start"] >= out["merged"]["end"] >= out["merged"]["start"]
    assert out["eval"]["start"] >= out["final"]["end"]


def test_local_failure_stops_the_run(tmp_path):
    recipe = dag_recipe("local-fail", ["bad", "never"], fail="bad")
    with pytest.raises(PipelineError, match=r"expert\[0\] exited with 3 .*local_0.out"):
        run_local(recipe, tmp_path / "run")
    assert "failing on purpose" in (tmp_path / "run/logs/expert/local_0.out").read_text()
    assert not (tmp_path / "run" / "out" / "never.json").exists()  # later tasks never ran
    assert not (tmp_path / "run" / "out" / "merged.json").exists()


def test_rerunning_the_same_recipe_resumes_and_a_different_one_is_refused(tmp_path):
    run = tmp_path / "run"
    recipe = dag_recipe("resume", ["math", "bad"], fail="bad")
    with pytest.raises(PipelineError, match=r"expert\[1\] exited with 3"):
        run_local(recipe, run)
    before = {n: (run / "out" / f"{n}.json").read_text() for n in ("student", "math")}

    (run / "out" / "bad.fixed").touch()  # the user fixes the cause and runs the same command
    results = run_local(recipe, run)
    assert [(r.step, r.index) for r in results] == [("expert", 1), ("merge", 0), ("final", 0),
                                                    ("eval", 0)]  # fmt: skip
    # Finished tasks did not run again (their outputs hold the first run's timestamps).
    assert {n: (run / "out" / f"{n}.json").read_text() for n in before} == before
    assert json.loads((run / "out" / "eval.json").read_text())["value"] == 9.0
    assert run_local(recipe, run) == []  # everything finished: nothing runs

    plan = (run / "plan.json").read_text()
    with pytest.raises(
        PipelineError, match=r"different recipe \(plan.json, recipe.yaml.*new --run-dir"
    ):
        run_local(dag_recipe("resume", ["math", "bad"], fail="bad", seed=1), run)
    assert (run / "plan.json").read_text() == plan  # nothing was changed


# ----------------------------------------------------------------------------- process control
WAIT_S = 300.0
"""Only stops a test that would hang forever; the waits below end as soon as their event occurs."""


def _wait_for(path: Path, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert proc is None or proc.poll() is None, f"runner exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"{path} did not appear in {WAIT_S:.0f} s"
        time.sleep(0.1)


def _runner(recipe, tmp_path: Path) -> tuple[list[str], subprocess.Popen, Path]:
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(to_dict(recipe)))
    run = tmp_path / "run"
    argv = ["pipeline", "run", str(recipe_path), "--local", "--run-dir", str(run)]
    err = open(tmp_path / "runner.err", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "megadistill.cli", *argv], stderr=err,
                            start_new_session=True)  # fmt: skip
    err.close()
    return argv, proc, run


def _job_pid(run: Path, key: str = "expert[0]") -> int:
    return json.loads((run / "local.json").read_text())["tasks"][key]["pid"]


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for init to reap it does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _assert_nothing_left(*groups: int) -> None:
    for pgid in groups:
        left = group_pids(pgid)
        assert not left, f"left behind in group {pgid}: {describe(left)}"


def test_sigterm_checkpoints_a_second_run_is_refused_and_the_run_resumes(tmp_path, capsys):
    argv, runner, run = _runner(preempt_recipe("local-term"), tmp_path)
    out = run / "out"
    try:
        _wait_for(out / "running", runner)  # the expert's ranks train (first attempt holds)
        job = _job_pid(run)
        # a second run on the same folder is refused, naming the first one's PID
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert f"in use by another pipeline process (pid {runner.pid})" in err
        assert len(err.splitlines()) == 1, err
        assert cli_main(["pipeline", "status", str(run)]) == 0
        table = capsys.readouterr().out
        assert re.search(r"expert\[long\]\s+\d+\s+RUNNING", table), table
        assert re.search(r"merge\s+-\s+PENDING\s+waiting for expert\[long\]", table), table

        runner.send_signal(signal.SIGTERM)
        assert runner.wait(timeout=WAIT_S) == 143
    finally:
        if runner.poll() is None:
            kill_group(runner.pid)
            runner.wait()
    err = (tmp_path / "runner.err").read_text().strip().splitlines()
    assert err[-1].startswith("megadistill pipeline: stopped by SIGTERM: expert[0] ended with 143")
    _assert_nothing_left(runner.pid, job)  # the runner's group and the job's group are empty
    checkpoint = json.loads((out / "ckpt.json").read_text())["step"]  # the ranks checkpointed
    assert cli_main(["pipeline", "status", str(run)]) == 0
    assert re.search(
        r"expert\[long\]\s+\d+\s+CANCELLED\s+stopped by SIGTERM", capsys.readouterr().out
    )

    results = run_local(preempt_recipe("local-term"), run)  # the same command again resumes
    assert [(r.step, r.returncode) for r in results] == [("expert", 0), ("merge", 0),
                                                         ("final", 0), ("eval", 0)]  # fmt: skip
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    assert [a["start_step"] for a in attempts] == [0, checkpoint]
    assert json.loads((out / "done.json").read_text())["step"] == 30
    assert sorted((out / "stage1.log").read_text().split()) == ["0", "1"]  # not redone
    assert cli_main(["pipeline", "status", str(run), "--wait", "5"]) == 0
    assert capsys.readouterr().out.count("COMPLETED") == 5


def _hms(seconds: int) -> str:
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def test_time_limit_signals_then_terminates_then_kills_the_whole_job(tmp_path, capsys):
    # The time limit is derived from a measured start-up of the same 2-rank job on this machine
    # now: the ranks must be up (handlers installed) when the SIGUSR1 comes. Should they still be
    # starting (a load spike), they die of it, the job counts as preempted and runs again with a
    # fresh time limit, as under SLURM; the last attempt is the one checked.
    results = run_local(shell_recipe("local-up", "true"), tmp_path / "measure")
    started = next(r for r in results if r.step == "expert")
    before = max(5, math.ceil(6 * (started.finished - started.started)))
    limit = _hms(2 * before)
    # ranks that ignore both signals and leave a child: only SIGKILL to the group ends them
    got = "{run_dir}/got.$RANK"
    script = (f"trap 'echo USR1 >> {got}' USR1; trap 'echo TERM >> {got}' TERM; "
              "sleep 600 & echo $! > {run_dir}/child.$RANK; while :; do sleep 0.1; done")  # fmt: skip
    recipe = shell_recipe("local-limit", script, time=limit, signal_before_s=before)
    run = tmp_path / "run"
    with pytest.raises(PipelineError, match=rf"expert\[0\] ran past its time limit {limit} "
                                            rf"\(SIGUSR1 {before} s before, then SIGTERM"):  # fmt: skip
        run_local(recipe, run, kill_wait_s=2)
    for rank in (0, 1):
        assert (run / f"got.{rank}").read_text().split() == ["USR1", "TERM"]
        child = int((run / f"child.{rank}").read_text())
        assert not _alive(child)
    _assert_nothing_left(_job_pid(run))
    assert cli_main(["pipeline", "status", str(run)]) == 0
    assert re.search(r"expert\[sh\]\s+\d+\s+TIMEOUT", capsys.readouterr().out)


def test_sigint_stops_the_job_with_sigterm_and_exits_130(tmp_path):
    script = "trap 'exit 143' TERM; touch {run_dir}/up.$RANK; while :; do sleep 0.1; done"
    _, runner, run = _runner(shell_recipe("local-int", script), tmp_path)
    try:
        _wait_for(run / "up.1", runner)
        _wait_for(run / "up.0", runner)
        runner.send_signal(signal.SIGINT)
        assert runner.wait(timeout=WAIT_S) == 130
    finally:
        if runner.poll() is None:
            kill_group(runner.pid)
            runner.wait()
    assert "stopped by SIGINT" in (tmp_path / "runner.err").read_text()
    _assert_nothing_left(runner.pid, _job_pid(run))


def test_a_runner_killed_with_sigkill_leaves_no_rank_running(tmp_path):
    script = ("trap 'echo TERM >> {run_dir}/got.$RANK; exit 143' TERM; touch {run_dir}/up.$RANK; "
              "while :; do sleep 0.1; done")  # fmt: skip
    _, runner, run = _runner(shell_recipe("local-kill", script), tmp_path)
    try:
        _wait_for(run / "up.1", runner)
        _wait_for(run / "up.0", runner)
        job = _job_pid(run)
        runner.kill()
        runner.wait()
        deadline = time.monotonic() + WAIT_S
        while group_pids(job) and time.monotonic() < deadline:
            time.sleep(0.1)
        _assert_nothing_left(job)
    finally:
        kill_group(runner.pid)
    for rank in (0, 1):  # they were told to stop (SIGTERM), not killed
        assert (run / f"got.{rank}").read_text().split() == ["TERM"]


def test_prepare_step_builds_every_stage_cache_before_the_experts(tmp_path, monkeypatch):
    """The real `prepare-data` runs as the DAG's prepare array (one task per expert, one for the
    final stage); the expert and final jobs then find their caches built."""
    from megadistill.assets import byte_tokenizer
    from tests.pipeline.conftest import JOBS, TEXT

    monkeypatch.delenv("SLURM_CONF", raising=False)
    tok = tmp_path / "tok"
    byte_tokenizer(tok)
    text = Path(TEXT).read_text()
    for i, part in enumerate(("a", "b", "c")):
        (tmp_path / f"{part}.txt").write_text(text[i * 8000 : (i + 1) * 8000])
    cache = str(tmp_path / "cache")
    noop = [["/bin/true"]]
    hit = [*JOBS, "cache-hit", "{run_dir}/out", "{expert}", "{run_dir}/student"]
    configs = "{run_dir}/configs/expert_{expert}"
    recipe = recipe_from_dict({
        "name": "prep", "teacher": str(tok),
        "experts": [{"name": n, "data": {"sources": [{"path": str(tmp_path / f"{n}.txt")}]}}
                    for n in ("a", "b")],
        "align": {"data": {"seq_len": 32, "cache_dir": cache, "num_proc": 1}},
        "distill": {"data": {"seq_len": 64, "num_tokens": 2000, "cache_dir": cache,
                             "num_proc": 1}},
        "final": {"data": {"sources": [{"path": str(tmp_path / "c.txt")}], "seq_len": 32,
                           "cache_dir": cache}},
        "commands": {
            "convert": [["cp", "-r", str(tok), "{run_dir}/student"]],
            "expert": [[*hit, f"{configs}.align.yaml", f"{configs}.distill.yaml"]],
            "merge": noop,
            "final": [[*hit[:5], "final", "{run_dir}/student", "{run_dir}/configs/final.yaml"]],
            "eval": noop,
        },
    })  # fmt: skip
    run = tmp_path / "run"
    results = run_local(recipe, run)
    assert [(r.step, r.index) for r in results][:5] == [
        ("convert", 0), ("prepare", 0), ("prepare", 1), ("prepare", 2), ("expert", 0),
    ]  # fmt: skip
    for name, stages in (("a", 2), ("b", 2), ("final", 1)):
        record = json.loads((run / "out" / f"{name}.json").read_text())
        built = list(record["built"].values())
        assert len(built) == stages and all(t is not None for t in built), record
        assert max(built) <= record["start"]  # built by the prepare step, before this job
    assert len(list(Path(cache).glob("*/checksums.json"))) == 5
    log = (run / "logs" / "prepare" / "local_2.out").read_text()
    summary = json.loads(log[log.index("{") : log.rindex("}") + 1])
    assert summary["num_proc"] == len(os.sched_getaffinity(0))  # one tokenizer per CPU


def test_a_swa_only_student_skips_stage_i_and_stage_ii_trains_only_the_teachers_parameters(
    tmp_path,
):
    """The trained floor: ``hybrid.gate_mode: swa`` with ``align: null`` runs each expert's stage
    II from the converted student under real ZeRO-3 ranks; the parameters the SWA-only student
    never uses are frozen (unchanged), the teacher's own are trained."""
    from safetensors.torch import load_file

    from tests.pipeline.conftest import real_tiny_recipe

    data = to_dict(real_tiny_recipe(tmp_path / "assets"))
    data["hybrid"]["gate_mode"] = "swa"
    data["experts"] = data["experts"][:1]
    with pytest.raises(Exception, match="set 'align: null'"):
        recipe_from_dict(data)
    data["align"] = None
    run = tmp_path / "run"
    results = run_local(recipe_from_dict(data), run)
    assert [r.step for r in results] == ["convert", "prepare", "prepare", "expert", "merge",
                                         "final", "eval"]  # fmt: skip
    assert not (run / "experts" / "a" / "align").exists()
    log = (run / "logs" / "expert" / "local_0.out").read_text()
    assert " align " not in log and "distill" in log

    def weights(folder: Path) -> dict:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    fresh, final = weights(run / "student"), weights(run / "final" / "final")
    assert json.loads((run / "final" / "final" / "config.json").read_text())["gate_mode"] == "swa"
    new = [k for k in fresh if any(f".{m}." in k for m in ("igate", "fgate", "q_feature"))]
    assert new and all(fresh[k].equal(final[k]) for k in new)
    assert not fresh["model.layers.0.self_attn.q_proj.weight"].equal(
        final["model.layers.0.self_attn.q_proj.weight"]
    )
