"""The pipeline DAG on a real SLURM cluster on localhost (slurmctld + slurmd + munge)."""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from megadistill.cli import main as cli_main
from megadistill.pipeline import slurm
from megadistill.pipeline.recipe import STEP_NAMES
from tests.pipeline.conftest import dag_recipe, preempt_recipe, real_tiny_recipe, shell_recipe
from tests.slurm_cluster import REPO


@functools.cache
def _stall_s() -> float:
    """How long the scheduler tests wait without any job changing state before they fail: 10x a
    rank's start-up measured now (python + torch.distributed import, the bulk of a tiny job's
    time), plus a minute for scheduling. A loaded machine gets a longer limit; nothing in these
    tests depends on how fast the jobs run."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import torch.distributed, megadistill.pipeline.step"],
                   check=True, timeout=1800)  # fmt: skip
    return 60.0 + 10.0 * (time.monotonic() - start)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _wait(run_dir: Path, stall_s: float | None = None) -> list[slurm.TaskStatus]:
    """Wait until every job of the run ended; fail only when no job changed state (or requeue
    count) for ``stall_s`` seconds, with a report of where the time went."""
    stall_s = stall_s or _stall_s()
    start = last_change = time.monotonic()
    seen: dict[tuple[str, str], tuple[str, int]] = {}
    history: dict[tuple[str, str], list[str]] = {}
    while True:
        rows = slurm.status(run_dir)
        now = time.monotonic()
        for r in rows:
            key, state = (r.step, r.task), (r.state, r.restarts)
            if seen.get(key) != state:
                seen[key], last_change = state, now
                requeued = f" (requeued {r.restarts})" if r.restarts else ""
                history.setdefault(key, []).append(f"{r.state}{requeued} at {now - start:.0f} s")
        if rows and all(r.done for r in rows):
            return rows
        if now - last_change > stall_s:
            timeline = "\n".join(
                f"  {step}{'[' + task + ']' if task else ''}: {', '.join(events)}"
                for (step, task), events in history.items()
            )
            pytest.fail(
                f"no job of {run_dir} changed state for {now - last_change:.0f} s (limit "
                f"{stall_s:.0f} s, from the start-up time measured on this machine); where the "
                f"time went:\n{timeline}\n{_explain(rows, run_dir)}"
            )
        time.sleep(1.0)


def _with_time_limits(recipe):
    """Job time limits from the measured start-up too: a loaded machine must not time jobs out."""
    limit = max(300, math.ceil(10 * _stall_s()))
    for step in STEP_NAMES:
        resources = getattr(recipe.resources, step)
        resources.time = f"{limit // 3600:02d}:{limit // 60 % 60:02d}:{limit % 60:02d}"
    return recipe


def _explain(rows: list[slurm.TaskStatus], run_dir: Path) -> str:
    logs = "\n".join(f"--- {p} ---\n{p.read_text()[-1500:]}" for p in run_dir.rglob("*.out"))
    return slurm.format_status(rows) + "\n" + logs


# Ranks with no signal handler, as a Python rank is while it imports and loads the model: SIGUSR1
# kills them (exit 138). The first attempt waits for it; the requeued one finishes.
STARTUP_SCRIPT = (
    'if [ "${{SLURM_RESTART_COUNT:-0}}" -eq 0 ]; then touch {run_dir}/up.$RANK; exec sleep 600; fi; '
    "echo $RANK >> {run_dir}/second"
)


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory, request) -> dict[str, tuple[Path, dict]]:
    """Submit every scenario at once; they run side by side (the node's CPU count is virtual)."""
    recipes = {
        "dag": dag_recipe("dag", ["math", "code"]),
        "fail": dag_recipe("fail", ["good", "bad"], fail="bad"),
        "preempt": preempt_recipe(),
        "deepspeed": dag_recipe("ds", ["solo"]),
        "startup": shell_recipe("startup", STARTUP_SCRIPT),
    }
    recipes["deepspeed"].resources.expert.launcher = "deepspeed"
    for recipe in recipes.values():
        _with_time_limits(recipe)
    out = {}
    for name, recipe in recipes.items():
        run_dir = tmp_path_factory.mktemp(name) / "run"
        out[name] = (run_dir, slurm.submit(recipe, run_dir))
    out["sbatch"] = _sbatch_user_script(tmp_path_factory.mktemp("sbatch"))
    if any(item.name == "test_real_tiny_pipeline" for item in request.session.items):
        root = tmp_path_factory.mktemp("real")
        jobs = slurm.submit(real_tiny_recipe(root, align_steps=ALIGN_STEPS), root / "run")
        metrics = root / "run" / "experts" / "a" / "align" / "metrics.jsonl"
        task = f"{jobs['steps']['expert']['job_id']}_0"
        record = {**jobs}
        watcher = threading.Thread(target=_preempt_after_step, args=(metrics, 2, task, record))
        watcher.start()  # the other tests run meanwhile; the real run's test joins it
        out["real"] = (root / "run", {**record, "watcher": watcher, "record": record})
    return out


ALIGN_STEPS = 40


def _preempt_after_step(metrics: Path, step: int, task: str, record: dict) -> None:
    """Send the batch script of ``task`` SIGUSR1 once ``metrics`` logs ``step`` (a thread)."""
    deadline = time.monotonic() + 300 + _stall_s()
    while time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if any(f'"step": {step},' in line for line in lines):
            subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=30)
            record["signalled_at_step"] = len([ln for ln in lines if '"loss"' in ln])
            return
        time.sleep(0.1)


def _sbatch_user_script(tmp: Path) -> tuple[Path, dict]:
    """`sbatch slurm/distill_olmo7b.sh` with a no-op recipe: the DAG is submitted from a job."""
    noop = [["/bin/true"]]
    recipe = {"name": "user", "teacher": "tiny-llama", "experts": [{"name": "a"}, {"name": "b"}],
              "commands": {"convert": noop, "expert": noop, "merge": noop, "final": noop,
                           "eval": noop}}  # fmt: skip
    (tmp / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    run_dir = tmp / "run"
    env = {**os.environ, "RECIPE": str(tmp / "recipe.yaml"), "RUN_DIR": str(run_dir),
           "PYTHON": sys.executable, "MEGADISTILL_HOME": str(REPO)}  # fmt: skip
    job = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp / 'submit.out'}", str(REPO / "slurm" / "distill_olmo7b.sh")],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    return run_dir, {"submit_job": job, "log": tmp / "submit.out"}


def test_preempted_expert_requeues_and_resumes(runs):
    # first, so the signal reaches the job early; the other runs go on meanwhile
    run_dir, jobs = runs["preempt"]
    out = run_dir / "out"
    deadline = time.monotonic() + _stall_s()
    while not (out / "running").exists():
        assert time.monotonic() < deadline, _explain(slurm.status(run_dir), run_dir)
        time.sleep(0.2)
    task = f"{jobs['steps']['expert']['job_id']}_0"
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=30)

    rows = _wait(run_dir)
    assert [r.state for r in rows] == ["COMPLETED"] * 5, _explain(rows, run_dir)
    assert rows[1].restarts == 1 and "requeued 1 time(s)" in rows[1].why
    attempts = [json.loads(line) for line in (out / "attempts.jsonl").read_text().splitlines()]
    checkpoint = _load(out / "ckpt.json")["step"]
    assert 3 <= checkpoint < 30
    # the second run is SLURM's requeue of the same job and starts where the checkpoint left off
    assert attempts == [{"start_step": 0, "restart": 0}, {"start_step": checkpoint, "restart": 1}]
    assert _load(out / "done.json")["step"] == 30
    assert sorted((out / "stage1.log").read_text().split()) == ["0", "1"]  # once per rank
    log = next((run_dir / "logs" / "expert").glob("*_0.out")).read_text()
    assert "got SIGUSR1; forwarding" in log and "requeueing job" in log
    assert "requeue of" not in log and "not stopped" not in log


def test_dag_runs_in_dependency_order(runs, capsys):
    run_dir, jobs = runs["dag"]
    assert _load(run_dir / "jobs.json") == jobs
    rows = _wait(run_dir)
    assert [r.state for r in rows] == ["COMPLETED"] * 6, _explain(rows, run_dir)
    assert [(r.step, r.task) for r in rows] == [
        ("convert", ""), ("expert", "math"), ("expert", "code"), ("merge", ""), ("final", ""),
        ("eval", ""),
    ]  # fmt: skip

    out = run_dir / "out"
    math, code = _load(out / "math.json"), _load(out / "code.json")
    merged, final, ev = (
        _load(out / "merged.json"),
        _load(out / "final.json"),
        _load(out / "eval.json"),
    )
    # each expert was one 2-rank job: all-reduce of (rank+1)*(index+1) over ranks 0 and 1
    assert (math["value"], code["value"]) == (3.0, 6.0)
    assert math["world_size"] == code["world_size"] == final["world_size"] == 2
    assert math["job"] != code["job"] and math["port"] != code["port"]
    assert merged["value"] == 0.5 * 3.0 + 0.5 * 6.0  # uniform merge weights reached the merge
    assert final["value"] == 2 * merged["value"] and ev["value"] == final["value"]
    # afterok ordering: a step starts only after everything it depends on has ended
    student = _load(out / "student.json")
    assert min(math["start"], code["start"]) >= student["end"]
    assert merged["start"] >= max(math["end"], code["end"])
    assert final["start"] >= merged["end"] and ev["start"] >= final["end"]

    assert cli_main(["pipeline", "status", str(run_dir)]) == 0
    table = capsys.readouterr().out
    assert table.count("COMPLETED") == 6 and "expert[code]" in table


def test_failed_expert_stops_dependants_and_status_says_why(runs, capsys):
    run_dir, _ = runs["fail"]
    rows = _wait(run_dir)  # nothing stays pending forever
    by_step = {(r.step, r.task): r for r in rows}
    assert by_step["expert", "good"].state == "COMPLETED", _explain(rows, run_dir)
    bad = by_step["expert", "bad"]
    assert bad.state == "FAILED" and bad.exit_code == "3:0"
    assert "exit code 3:0" in bad.why and bad.log.endswith("_1.out")
    assert "failing on purpose" in Path(bad.log).read_text()
    for step in ("merge", "final", "eval"):
        row = by_step[step, ""]
        assert row.state == "CANCELLED" and row.reason == "DependencyNeverSatisfied", row
        assert "never ran" in row.why
    assert "expert[bad] FAILED" in by_step["merge", ""].why
    assert not (run_dir / "out" / "merged.json").exists()

    assert cli_main(["pipeline", "status", str(run_dir), "--wait", "10"]) == 1
    table = capsys.readouterr().out
    assert "DependencyNeverSatisfied" in table and "expert[bad] FAILED" in table


def test_resubmitting_an_ended_run_resumes_it(runs):
    """After the failure above: fix the cause, submit the same recipe again."""
    run_dir, first = runs["fail"]
    _wait(run_dir)
    good = (run_dir / "out" / "good.json").read_text()
    (run_dir / "out" / "bad.fixed").touch()
    recipe = _with_time_limits(dag_recipe("fail", ["good", "bad"], fail="bad"))
    jobs = slurm.submit(recipe, run_dir)
    with pytest.raises(slurm.PipelineError, match="still queued or running"):
        slurm.submit(recipe, run_dir)  # the DAG just submitted takes seconds
    assert jobs["steps"]["convert"]["job_id"] == first["steps"]["convert"]["job_id"]  # not again
    assert jobs["steps"]["expert"]["job_id"] != first["steps"]["expert"]["job_id"]
    assert jobs["earlier_submissions"][0]["steps"] == first["steps"]
    rows = _wait(run_dir)
    assert [r.state for r in rows] == ["COMPLETED"] * 6, _explain(rows, run_dir)
    assert rows[0].why == "finished in an earlier submission"
    assert (run_dir / "out" / "good.json").read_text() == good  # the finished expert did not rerun
    assert _load(run_dir / "out" / "eval.json")["value"] == 9.0
    with pytest.raises(slurm.PipelineError, match="different recipe"):
        slurm.submit(dag_recipe("fail", ["good", "bad"], fail="bad", seed=1), run_dir)


def test_user_script_submits_the_dag_from_a_job(runs, slurm_cluster):
    run_dir, info = runs["sbatch"]
    deadline = time.monotonic() + _stall_s()
    while slurm_cluster.job_states(info["submit_job"]) != ["COMPLETED"]:
        states = slurm_cluster.job_states(info["submit_job"])
        assert states in (["PENDING"], ["RUNNING"], ["COMPLETING"]), info["log"].read_text()
        assert time.monotonic() < deadline
        time.sleep(0.5)
    jobs = _load(run_dir / "jobs.json")
    assert sorted(jobs["steps"]) == ["convert", "eval", "expert", "final", "merge"]
    printed = info["log"].read_text()
    assert f"expert: {jobs['steps']['expert']['job_id']}" in printed
    rows = _wait(run_dir)
    assert [r.state for r in rows] == ["COMPLETED"] * 6, _explain(rows, run_dir)


def test_deepspeed_launcher_starts_the_ranks(runs):
    run_dir, _ = runs["deepspeed"]
    rows = _wait(run_dir)
    assert [r.state for r in rows] == ["COMPLETED"] * 5, _explain(rows, run_dir)
    solo = _load(run_dir / "out" / "solo.json")
    assert solo["world_size"] == 2 and solo["value"] == 3.0  # RANK/WORLD_SIZE from the launcher
    log = next((run_dir / "logs" / "expert").glob("*_0.out")).read_text()
    assert "launcher=deepspeed" in log and "deepspeed.launcher.launch" in log


@pytest.mark.slow
def test_real_tiny_pipeline(runs):
    """The real stage commands under SLURM: a prepare array builds the data caches on CPU jobs,
    experts are 2-rank ZeRO-3 runs that find them built; outputs load."""
    import torch
    from transformers import AutoModelForCausalLM

    import megadistill.model  # noqa: F401 - registers the hybrid student with Auto classes

    run_dir, jobs = runs["real"]
    jobs["watcher"].join(timeout=300 + _stall_s())
    rows = _wait(run_dir)
    assert [r.state for r in rows] == ["COMPLETED"] * 9, _explain(rows, run_dir)
    # the prepare array (experts a, b and the final stage) built every cache on a CPU job, so
    # the training ranks found them built
    assert [(r.step, r.task) for r in rows[1:4]] == [("prepare", "a"), ("prepare", "b"),
                                                     ("prepare", "final")]  # fmt: skip
    prepare_logs = [p.read_text() for p in sorted((run_dir / "logs" / "prepare").glob("*.out"))]
    # the tasks run at once and some stages share sources and settings: each cache was built by
    # one of them (with a progress bar), the others found it or discarded their copy
    assert len(prepare_logs) == 3
    built = [t for t in prepare_logs if "building data cache" in t and "prepare data" in t]
    assert built, prepare_logs
    for log_file in (run_dir / "logs").rglob("*.out"):  # a student folder loads without asking
        assert "Do you wish to run the custom code" not in log_file.read_text(), log_file
    for log_file in [*(run_dir / "logs" / "expert").glob("*.out"),
                     *(run_dir / "logs" / "final").glob("*.out")]:  # fmt: skip
        text = log_file.read_text()
        assert "data cache hit" in text and "building data cache" not in text, log_file
    # expert a was signalled during stage I: the trainer checkpointed and exited 143, the job was
    # requeued, and stage I resumed from that checkpoint (no step trained twice) to the end.
    assert "signalled_at_step" in jobs["record"], "the watcher never saw expert a's stage I run"
    assert [r.restarts for r in rows if r.step == "expert"] == [1, 0], _explain(rows, run_dir)
    metrics = run_dir / "experts" / "a" / "align" / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    checkpoints = [r["step"] for r in records if "checkpoint" in r]
    assert steps == list(range(1, ALIGN_STEPS + 1)), steps
    assert checkpoints[0] < ALIGN_STEPS and checkpoints[-1] == ALIGN_STEPS, checkpoints
    for name in ("a", "b"):
        ckpt = run_dir / "experts" / name / "distill" / "checkpoints"
        tag = ckpt / (ckpt / "latest").read_text().strip()
        assert {p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")} == {
            "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        }  # fmt: skip
    ids = torch.tensor([[1, 72, 101, 108, 108, 111]])
    for folder in (run_dir / "merged", run_dir / "final" / "final"):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        assert torch.isfinite(model(ids).logits).all(), folder
    results = json.loads((run_dir / "eval" / "results.json").read_text())
    assert results, "eval wrote no results"


def test_preemption_while_the_ranks_start_requeues_the_job(runs):
    """SIGUSR1 kills ranks that cannot handle it yet (still starting): the job is requeued (exit
    143), not failed, and runs again from its last checkpoint."""
    run_dir, jobs = runs["startup"]
    deadline = time.monotonic() + _stall_s()
    while not ((run_dir / "up.0").exists() and (run_dir / "up.1").exists()):
        assert time.monotonic() < deadline, _explain(slurm.status(run_dir), run_dir)
        time.sleep(0.2)
    task = f"{jobs['steps']['expert']['job_id']}_0"
    subprocess.run(["scancel", "--signal=USR1", "--batch", task], check=True, timeout=30)
    rows = _wait(run_dir)
    assert [r.state for r in rows] == ["COMPLETED"] * 5, _explain(rows, run_dir)
    assert rows[1].restarts == 1, _explain(rows, run_dir)
    assert sorted((run_dir / "second").read_text().split()) == ["0", "1"]
    log = next((run_dir / "logs" / "expert").glob("*_0.out")).read_text()
    assert "before it could checkpoint" in log and "requeueing job" in log
