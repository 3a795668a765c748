"""Submit the pipeline DAG to SLURM and report where each step stands.

``submit`` writes the run directory (:func:`~megadistill.pipeline.dag.write_plan`), then submits
one job per step with ``sbatch --parsable``: the prepare and expert steps as arrays (one task per
expert; prepare has one more, for the final stage's data),
every later step ``--dependency=afterok:<previous job>`` with ``--kill-on-invalid-dep=yes`` so a
failed expert cancels what depends on it instead of leaving it pending forever. All jobs run with
``--requeue`` and ``--signal=B:USR1@<s>`` (the entrypoint forwards it to the ranks). Job ids go to
``RUN_DIR/jobs.json``.

``status`` asks ``scontrol show job`` (falling back to ``sacct`` once slurmctld has forgotten a
job) and explains each step: waiting on what, failed with which exit code, cancelled because which
upstream step failed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megadistill.integrity import atomic_write_json
from megadistill.pipeline.dag import (
    ARRAY_STEPS,
    REPO_ROOT,
    PipelineError,
    Step,
    check_inputs,
    read_plan,
    task_names,
    write_plan,
)
from megadistill.pipeline.lock import run_lock
from megadistill.pipeline.recipe import PipelineRecipe, Resources
from megadistill.pipeline.step import task_finished

JOBS_FILE = "jobs.json"
SLURM_DIR = REPO_ROOT / "slurm"
ENTRYPOINT = SLURM_DIR / "entrypoint.sh"
COMMAND_TIMEOUT_S = 60.0
TERMINAL_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
     "DEADLINE", "REVOKED", "SPECIAL_EXIT"}
)  # fmt: skip
log = logging.getLogger(__name__)


def _slurm(argv: list[str], env: dict[str, str] | None = None) -> str:
    """Run a SLURM client command with a timeout; raise PipelineError with its stderr on failure."""
    try:
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, env=env, check=False
        )
    except FileNotFoundError as exc:
        raise PipelineError(f"{argv[0]} not found: is this a SLURM login node?") from exc
    except subprocess.TimeoutExpired as exc:
        raise PipelineError(
            f"{argv[0]} did not answer in {COMMAND_TIMEOUT_S:.0f} s (is slurmctld up?)"
        ) from exc
    if proc.returncode != 0:
        raise PipelineError(f"{' '.join(argv[:2])} failed: {proc.stderr.strip() or proc.stdout}")
    return proc.stdout


# ----------------------------------------------------------------------------- submit
def sbatch_args(
    step: Step, run_dir: Path, job_name: str, dependency: str | None = None
) -> list[str]:
    """The ``sbatch`` command line of one step (resources from the recipe)."""
    res: Resources = step.resources
    log_dir = run_dir / "logs" / step.name
    pattern = "%A_%a.out" if step.is_array else "%j.out"
    argv = [
        "sbatch", "--parsable", f"--job-name={job_name}", f"--nodes={res.nodes}",
        f"--ntasks-per-node={res.ranks_per_node}", f"--cpus-per-task={res.cpus_per_task}",
        f"--time={res.time}", f"--output={log_dir / pattern}", "--open-mode=append",
        f"--signal=B:USR1@{res.signal_before_s}",
    ]  # fmt: skip
    argv.append("--requeue" if res.requeue else "--no-requeue")
    if res.gpus_per_node:
        argv.append(f"--gres=gpu:{res.gpus_per_node}")
    for flag in ("partition", "account", "mem"):
        if getattr(res, flag) is not None:
            argv.append(f"--{flag}={getattr(res, flag)}")
    if step.is_array:
        argv.append(f"--array=0-{step.num_tasks - 1}")
    if dependency:
        argv += [f"--dependency=afterok:{dependency}", "--kill-on-invalid-dep=yes"]
    argv.append(str(SLURM_DIR / f"{step.name}.sbatch"))
    return argv


def job_environment(run_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for sbatch (exported into the jobs): run dir, entrypoint, interpreter, code.

    Args:
        run_dir: the run directory.
        extra: the recipe's ``env`` (set on top of this process's environment).
    """
    env = {**os.environ, **(extra or {})}
    if "SLURM_JOB_ID" in env:  # submitting from a job: its allocation must not leak into the DAG
        env = {k: v for k, v in env.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    env["MEGADISTILL_RUN_DIR"] = str(run_dir)
    env["MEGADISTILL_ENTRYPOINT"] = str(ENTRYPOINT)
    env["MEGADISTILL_PYTHON"] = sys.executable
    # Jobs import the same megadistill that planned them, installed or not.
    path = env.get("PYTHONPATH", "")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT)
    return env


def submit(recipe: PipelineRecipe, run_dir: str | Path) -> dict[str, Any]:
    """Write the run directory and submit the DAG; return (and save) the job ids.

    Submitting the same recipe into a run directory whose earlier jobs all ended (one failed, ran
    out of time, was cancelled) resumes it: steps whose every task finished are not submitted
    again (their earlier job ids stay in ``jobs.json``), finished commands inside the others are
    skipped, and stages continue from their newest checkpoints.

    Args:
        recipe: the validated recipe.
        run_dir: run directory (created, or an ended run of the same recipe to resume).

    Returns:
        The ``jobs.json`` content: ``{"steps": {step: {"job_id", "after", "num_tasks"}}, ...}``.

    Raises:
        PipelineError: jobs of an earlier submission are still queued or running, or ``run_dir``
            holds a started run of a different recipe, or another process (a local run) holds
            its lock.
    """
    run_dir = Path(run_dir).resolve()
    check_inputs(recipe, run_dir)
    with run_lock(run_dir, "submit"):  # not while a local run drives the folder
        return _submit(recipe, run_dir)


def _submit(recipe: PipelineRecipe, run_dir: Path) -> dict[str, Any]:
    previous: dict[str, Any] = {}
    if (run_dir / JOBS_FILE).exists():
        active = [r for r in status(run_dir) if not r.done and r.state != "UNKNOWN"]
        if active:
            ids = ", ".join(sorted({r.job_id for r in active}))
            raise PipelineError(
                f"{run_dir} has jobs of an earlier submission still queued or running ({ids}); "
                "wait for them to end (or scancel them), then submit the same recipe again to "
                "resume, or choose a new --run-dir"
            )
        previous = json.loads((run_dir / JOBS_FILE).read_text())
    steps = write_plan(recipe, run_dir)
    env = job_environment(run_dir, recipe.env)
    jobs: dict[str, Any] = {"name": recipe.name, "experts": [e.name for e in recipe.experts]}
    jobs["steps"] = {}
    if previous:
        jobs["earlier_submissions"] = [
            *previous.get("earlier_submissions", []),
            {k: v for k, v in previous.items() if k != "earlier_submissions"},
        ]
    ids: dict[str, str] = {}
    try:
        for step in steps:
            if not ids and previous and _step_finished(run_dir, step):
                # not submitted again; status reports it from the run's record
                jobs["steps"][step.name] = {
                    **previous["steps"][step.name],
                    "finished_earlier": True,
                }
                log.info("%s finished in an earlier submission; not submitted", step.name)
                continue
            dep = ":".join(ids[a] for a in step.after if a in ids) or None
            argv = sbatch_args(step, run_dir, f"{recipe.name}-{step.name}", dep)
            out = _slurm(argv, env={**env, "MEGADISTILL_LAUNCHER": step.resources.launcher})
            out = out.strip()
            ids[step.name] = out.split(";")[0]
            jobs["steps"][step.name] = {
                "job_id": ids[step.name],
                "after": list(step.after),
                "num_tasks": step.num_tasks,
                "submitted_at": time.time(),
            }
            log.info("submitted %s as job %s", step.name, ids[step.name])
    except BaseException:
        if ids:  # do not leave half a DAG queued
            subprocess.run(["scancel", *ids.values()], timeout=COMMAND_TIMEOUT_S, check=False)
        raise
    atomic_write_json(run_dir / JOBS_FILE, jobs)
    return jobs


def _step_finished(run_dir: Path, step: Step) -> bool:
    """Whether every rank of every array task of ``step`` finished all its commands."""
    return all(
        task_finished(run_dir, step.name, i, len(task), step.resources.num_ranks)
        for i, task in enumerate(step.commands)
    )


# ----------------------------------------------------------------------------- status
@dataclass(frozen=True)
class TaskStatus:
    """Where one job (or one array task) of the DAG stands."""

    step: str
    task: str
    job_id: str
    state: str
    reason: str
    exit_code: str
    log: str
    restarts: int = 0
    why: str = ""

    @property
    def done(self) -> bool:
        """Whether the job reached a terminal state."""
        return self.state in TERMINAL_STATES


def _records(job_id: str) -> list[dict[str, str]]:
    """``scontrol show job -o`` records of a job (one per array task); [] if unknown."""
    try:
        text = _slurm(["timeout", "30", "scontrol", "show", "job", "-o", job_id])
    except PipelineError as exc:
        if "Invalid job id" in str(exc):
            return []
        raise
    records = []
    for line in text.splitlines():
        if line.strip():
            records.append(dict(re.findall(r"(\w[\w/:]*)=(\S*)", line)))
    return records


def _sacct_records(job_id: str) -> list[dict[str, str]]:
    """Fallback for jobs slurmctld has forgotten (needs accounting); [] if unavailable."""
    try:
        text = _slurm(["timeout", "30", "sacct", "-n", "-P", "-X", "-j", job_id,
                       "-o", "JobID,State,ExitCode,Reason"])  # fmt: skip
    except PipelineError:
        return []
    out = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) == 4:
            task = parts[0].split("_")[1] if "_" in parts[0] else ""
            out.append({"JobId": parts[0], "ArrayTaskId": task, "JobState": parts[1].split()[0],
                        "ExitCode": parts[2], "Reason": parts[3], "StdOut": ""})  # fmt: skip
    return out


def _task_indices(spec: str) -> list[int]:
    """Expand an ``ArrayTaskId`` such as ``3``, ``0-3`` or ``0,2-3%2`` into indices."""
    out: list[int] = []
    for part in spec.split("%")[0].split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out.extend(range(int(lo), int(hi) + 1))
        elif part.isdigit():
            out.append(int(part))
    return out


def _step_rows(step: str, info: dict[str, Any], experts: list[str]) -> list[TaskStatus]:
    job_id = info["job_id"]
    names = task_names(step, experts)
    if info.get("finished_earlier"):  # every rank marked every command done
        return [TaskStatus(step, name, job_id, "COMPLETED", "", "0:0", "",
                           why="finished in an earlier submission") for name in names]  # fmt: skip
    records = _records(job_id) or _sacct_records(job_id)
    if not records:
        return [TaskStatus(step, "", job_id, "UNKNOWN", "", "", "",
                           "slurmctld no longer knows this job and sacct has no record")]  # fmt: skip
    rows = []
    for rec in records:
        indices = _task_indices(rec.get("ArrayTaskId", "")) if step in ARRAY_STEPS else [0]
        for idx in indices or [0]:
            name = names[idx] if idx < len(names) else ""
            array_id = rec.get("ArrayJobId")
            rows.append(TaskStatus(
                step=step, task=name, job_id=f"{array_id}_{idx}" if array_id else job_id,
                state=rec.get("JobState", "UNKNOWN"), reason=rec.get("Reason", ""),
                exit_code=rec.get("ExitCode", ""), log=rec.get("StdOut", ""),
                restarts=int(rec.get("Restarts", "0") or 0),
            ))  # fmt: skip
    return sorted(rows, key=lambda r: names.index(r.task) if r.task in names else 0)


def _explain(row: TaskStatus, rows: list[TaskStatus], after: list[str]) -> str:
    upstream = [r for r in rows if r.step in after]
    if row.state == "PENDING" and row.reason == "Dependency":
        waiting = sorted({r.step for r in upstream if r.state != "COMPLETED"})
        return f"waiting for {', '.join(waiting) or 'dependencies'} to complete"
    if row.reason == "DependencyNeverSatisfied" or (
        row.state == "CANCELLED" and any(r.state != "COMPLETED" and r.done for r in upstream)
    ):
        bad = [r for r in upstream if r.done and r.state != "COMPLETED"]
        named = ", ".join(f"{r.step}{'[' + r.task + ']' if r.task else ''} {r.state}" for r in bad)
        return f"never ran: dependency afterok failed ({named or 'upstream step failed'})"
    if row.state in ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL"):
        return f"exit code {row.exit_code}; log {row.log}"
    requeued = f"requeued {row.restarts} time(s); " if row.restarts else ""
    if row.state == "PENDING":
        return f"{requeued}queued ({row.reason})"
    return requeued.rstrip("; ")


def status(run_dir: str | Path) -> list[TaskStatus]:
    """Where every job of a submitted run stands, with an explanation (``why``) per row."""
    run_dir = Path(run_dir).resolve()
    plan = read_plan(run_dir)
    path = run_dir / JOBS_FILE
    if not path.is_file():
        raise PipelineError(
            f"{run_dir} has no {JOBS_FILE}: it was neither submitted to SLURM nor run with --local"
        )
    jobs = json.loads(path.read_text())
    rows: list[TaskStatus] = []
    for entry in plan["steps"]:  # DAG order (jobs.json keys are sorted)
        rows.extend(_step_rows(entry["name"], jobs["steps"][entry["name"]], jobs["experts"]))
    out = []
    for row in rows:
        why = row.why or _explain(row, rows, jobs["steps"][row.step]["after"])
        out.append(TaskStatus(**{**row.__dict__, "why": why}))
    return out


def format_status(rows: list[TaskStatus]) -> str:
    """A table of :func:`status` rows for the terminal."""
    lines = [f"{'STEP':<16} {'JOB':<12} {'STATE':<12} {'REASON':<26} WHY"]
    for r in rows:
        step = f"{r.step}[{r.task}]" if r.task else r.step
        lines.append(f"{step:<16} {r.job_id:<12} {r.state:<12} {r.reason:<26} {r.why}")
    return "\n".join(lines)


def wait(
    run_dir: str | Path, timeout_s: float, poll_s: float = 1.0,
    status_fn: Callable[[str | Path], list[TaskStatus]] | None = None,
) -> list[TaskStatus]:  # fmt: skip
    """Poll :func:`status` (or ``status_fn``) until every job is in a terminal state; raise on
    timeout."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows = (status_fn or status)(run_dir)
        if rows and all(r.done for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise PipelineError(
                f"run {run_dir} not finished after {timeout_s:.0f} s:\n{format_status(rows)}"
            )
        time.sleep(poll_s)
