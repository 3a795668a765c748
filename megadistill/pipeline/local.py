"""Run the pipeline DAG on one machine without SLURM: ``megadistill pipeline run RECIPE --local``.

The same plan and the same per-rank step runner as under SLURM; only the launcher differs:
``slurm/entrypoint.sh`` in its local mode starts each job's ranks on this machine. Steps run in
dependency order, expert tasks one after the other; the first failure stops the run (nothing that
depends on it runs). Running the same recipe again resumes: finished tasks are skipped.

Process control follows SLURM's:

- every job runs in a process group of its own (the entrypoint, its ranks and what they start);
  when the job ends, whatever is left in the group is killed, so no rank outlives its job;
- the time limit of a step: ``signal_before_s`` before it the entrypoint gets SIGUSR1 (ranks
  checkpoint and exit with the requeue code, and the job is started again, as SLURM requeues it);
  at the limit SIGTERM, then SIGKILL to the whole group ``kill_wait_s`` later;
- SIGTERM / SIGINT to the runner reach the running job as SIGTERM (its ranks checkpoint), the
  runner waits up to ``kill_wait_s`` for them, then kills the group and exits 128 + the signal;
  a second signal kills the group at once;
- one run per folder (:mod:`megadistill.pipeline.lock`), and ``RUN_DIR/local.json`` records
  where each task stands for ``megadistill pipeline status RUN_DIR``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megadistill.engine.launch import free_port
from megadistill.integrity import atomic_write_json
from megadistill.pipeline.dag import PipelineError, Step, check_inputs, read_plan, write_plan
from megadistill.pipeline.lock import lock_holder, run_lock
from megadistill.pipeline.process import describe, kill_group, signal_group
from megadistill.pipeline.recipe import PipelineRecipe, parse_time_s
from megadistill.pipeline.slurm import ENTRYPOINT, TaskStatus, job_environment
from megadistill.pipeline.step import REQUEUE_EXIT_CODE, task_finished

log = logging.getLogger(__name__)

STATUS_FILE = "local.json"
KILL_WAIT_S = 120.0
"""Seconds between SIGTERM and SIGKILL (SLURM's KillWait; long enough for a checkpoint)."""


class RunStopped(PipelineError):
    """The runner was told to stop (SIGTERM / SIGINT); the run resumes when started again."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


@dataclass(frozen=True)
class LocalResult:
    """Outcome of one local job (one array task)."""

    step: str
    index: int
    returncode: int
    started: float
    finished: float
    log: Path
    attempts: int


@dataclass
class _Stop:
    """Stop requests from signals to the runner (set by the handler, read by the job loop)."""

    signum: int | None = None
    count: int = 0
    job: subprocess.Popen | None = None

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signum, self.count = self.signum or signum, self.count + 1
        job = self.job
        if job is None or job.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if self.count == 1:  # to the entrypoint, which forwards it to the ranks
                job.send_signal(signal.SIGTERM)
            else:
                signal_group(job.pid, signal.SIGKILL)


@dataclass
class _Status:
    """``RUN_DIR/local.json``: the runner and the state of every task it started."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    def update(self, key: str, **values: Any) -> None:
        self.data.setdefault("tasks", {}).setdefault(key, {}).update(values)
        atomic_write_json(self.path, self.data)


def _attempt(proc: subprocess.Popen, step: Step, stop: _Stop, kill_wait_s: float) -> str:
    """Wait for one attempt of a job, applying the time limit; return how it ended.

    Returns:
        ``"exited"``, ``"timeout"`` (ran to the time limit) or ``"stopped"`` (runner signalled).
    """
    res = step.resources
    started = time.monotonic()
    limit = started + parse_time_s(res.time)
    warn_at = limit - res.signal_before_s
    kill_at: float | None = None
    outcome = "exited"
    warned = res.signal_before_s == 0
    while proc.poll() is None:
        now = time.monotonic()
        if stop.signum is not None and outcome == "exited":
            # again, in case the signal came before the job was known to the handler
            proc.send_signal(signal.SIGTERM)
            outcome, kill_at = "stopped", now + kill_wait_s
        if not warned and now >= warn_at and outcome == "exited":
            log.warning("%s: %d s before its time limit: SIGUSR1 (checkpoint)", step.name,
                        res.signal_before_s)  # fmt: skip
            proc.send_signal(signal.SIGUSR1)
            warned = True
        if now >= limit and outcome == "exited":
            log.warning("%s reached its time limit %s: SIGTERM", step.name, res.time)
            proc.send_signal(signal.SIGTERM)
            outcome, kill_at = "timeout", now + kill_wait_s
        if kill_at is not None and now >= kill_at:
            log.warning("%s still running %.0f s after SIGTERM: SIGKILL", step.name, kill_wait_s)
            kill_group(proc.pid)
        nxt = min([limit, *([] if warned else [warn_at]), *([kill_at] if kill_at else [])])
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=max(0.01, min(0.5, nxt - time.monotonic())))
    return outcome


def _run_task(
    step: Step, index: int, run_dir: Path, max_requeues: int, extra_env: dict[str, str],
    stop: _Stop, status: _Status, kill_wait_s: float,
) -> LocalResult:  # fmt: skip
    """Run one array task of ``step`` through the entrypoint (local launcher), with requeues."""
    log_path = run_dir / "logs" / step.name / f"local_{index}.out"
    argv = [str(ENTRYPOINT), sys.executable, "-m", "megadistill.cli", "pipeline", "step",
            str(run_dir), step.name, "--index", str(index)]  # fmt: skip
    key = f"{step.name}[{index}]"
    started = time.time()
    log.info("%s started on %d rank(s); follow it with: tail -f %s", key,
             step.resources.num_ranks, log_path)  # fmt: skip
    for attempt in range(max_requeues + 1):
        env = job_environment(run_dir, extra_env)
        env.update(
            MEGADISTILL_LAUNCHER="local",
            MEGADISTILL_NPROC=str(step.resources.num_ranks),
            MEGADISTILL_TASK_INDEX=str(index),
            MEGADISTILL_RESTART_COUNT=str(attempt),
            MASTER_PORT=str(free_port()),
        )
        env.setdefault("OMP_NUM_THREADS", "1")  # ranks share this machine's cores
        env.pop("SLURM_JOB_ID", None)
        with open(log_path, "ab") as out:
            # a session of its own: the job's process group is the entrypoint and its ranks
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=_term_with_parent)  # fmt: skip
        stop.job = proc
        status.update(key, state="RUNNING", pid=proc.pid, started=started, attempts=attempt + 1,
                      log=str(log_path))  # fmt: skip
        try:
            outcome = _attempt(proc, step, stop, kill_wait_s)
        finally:
            stop.job = None
            left = kill_group(proc.pid)  # nothing of the job outlives it
            proc.wait()
        if left:
            log.error("%s: could not kill %s", key, describe(left))
        code = proc.returncode if proc.returncode >= 0 else 128 - proc.returncode
        status.update(key, exit_code=code, finished=time.time())
        if outcome == "stopped":
            status.update(key, state="CANCELLED", why=f"stopped by {_signame(stop.signum)}")
            raise RunStopped(
                f"stopped by {_signame(stop.signum)}: {key} ended with {code} (143: its ranks "
                f"checkpointed); run the same command again to resume; log {log_path}",
                stop.signum or signal.SIGTERM,
            )
        if outcome == "timeout":
            status.update(key, state="TIMEOUT")
            raise PipelineError(
                f"{key} ran past its time limit {step.resources.time} (SIGUSR1 "
                f"{step.resources.signal_before_s} s before, then SIGTERM; it ended with {code}); "
                f"raise resources.{step.name}.time or run again to resume; log {log_path}"
            )
        if code != REQUEUE_EXIT_CODE:
            break
        log.info("%s checkpointed and asked to run again (attempt %d)", key, attempt + 1)
    state = "COMPLETED" if code == 0 else "FAILED"
    status.update(key, state=state)
    return LocalResult(step.name, index, code, started, time.time(), log_path, attempt + 1)


def _term_with_parent() -> None:
    """In the job's process before exec: SIGTERM it when the runner dies (even by SIGKILL), so
    its ranks checkpoint and stop instead of running on as orphans (Linux prctl)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0)


def _signame(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "a signal"


@contextlib.contextmanager
def _stop_on_signals(stop: _Stop):
    """Route SIGTERM / SIGINT to ``stop`` while the run lasts (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, stop.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_local(
    recipe: PipelineRecipe, run_dir: str | Path, max_requeues: int = 3,
    kill_wait_s: float = KILL_WAIT_S,
) -> list[LocalResult]:  # fmt: skip
    """Run every step of the DAG on this machine, in dependency order.

    Args:
        recipe: the validated recipe (``resources.<step>`` gives each job's rank count).
        run_dir: run directory (created).
        max_requeues: how often a job exiting with the requeue code is started again.
        kill_wait_s: seconds between SIGTERM and SIGKILL (time limit, or a stop request).

    Raises:
        PipelineError: naming the failed step, its exit code and log; later steps did not run;
            or another process runs in ``run_dir``.
        RunStopped: SIGTERM / SIGINT stopped the run (its ``exit_code`` is 128 + the signal).
    """
    run_dir = Path(run_dir).resolve()
    check_inputs(recipe, run_dir)
    stop = _Stop()
    results: list[LocalResult] = []
    with run_lock(run_dir, "run"), _stop_on_signals(stop):
        steps = write_plan(recipe, run_dir)
        status = _Status(run_dir / STATUS_FILE, {"runner_pid": os.getpid(), "started": time.time()})
        atomic_write_json(status.path, status.data)
        for step in steps:
            for index in range(step.num_tasks):
                commands, world = len(step.commands[index]), step.resources.num_ranks
                if task_finished(run_dir, step.name, index, commands, world):
                    log.info("%s[%d] finished in an earlier run; skipping", step.name, index)
                    continue
                if stop.signum is not None:
                    raise RunStopped(f"stopped by {_signame(stop.signum)} before {step.name}[{index}]; "
                                     "run the same command again to resume", stop.signum)  # fmt: skip
                res = _run_task(step, index, run_dir, max_requeues, recipe.env, stop, status,
                                kill_wait_s)  # fmt: skip
                results.append(res)
                if res.returncode != 0:
                    raise PipelineError(
                        f"local run stopped: {step.name}[{index}] exited with {res.returncode} "
                        f"after {res.attempts} attempt(s); log {res.log}"
                    )
                log.info("%s[%d] done in %.1f s", step.name, index, res.finished - res.started)
    return results


# ----------------------------------------------------------------------------- status
def is_local_run(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` was (or is being) run by ``pipeline run --local``."""
    return (Path(run_dir) / STATUS_FILE).is_file()


def status(run_dir: str | Path) -> list[TaskStatus]:
    """Where every task of a local run stands (``pipeline status RUN_DIR``), in DAG order."""
    run_dir = Path(run_dir).resolve()
    plan = read_plan(run_dir)
    path = run_dir / STATUS_FILE
    if not path.is_file():
        raise PipelineError(f"{run_dir} has no {STATUS_FILE}: it was not run with --local")
    record = json.loads(path.read_text())
    tasks = record.get("tasks", {})
    holder = lock_holder(run_dir)
    rows: list[TaskStatus] = []
    blocked = ""
    for entry in plan["steps"]:
        name = entry["name"]
        for index, commands in enumerate(entry["commands"]):
            task = plan["experts"][index] if name == "expert" else ""
            rec = tasks.get(f"{name}[{index}]", {})
            done = task_finished(run_dir, name, index, len(commands), entry["num_ranks"])
            state, why = _local_state(rec, done, holder, blocked)
            if state != "COMPLETED" and not blocked:
                blocked = f"{name}[{task}]" if task else name
            restarts = max(0, int(rec.get("attempts", 1)) - 1)
            code = rec.get("exit_code")
            rows.append(TaskStatus(
                step=name, task=task, job_id=str(rec.get("pid", "-")), state=state, reason="",
                exit_code="" if code is None else str(code), log=rec.get("log", ""),
                restarts=restarts, why=why,
            ))  # fmt: skip
    return rows


def _local_state(rec: dict[str, Any], done: bool, holder: int | None, blocked: str):
    if done:
        return "COMPLETED", "finished"
    state = rec.get("state")
    if state == "RUNNING":
        if holder is not None:
            return (
                "RUNNING",
                f"attempt {rec.get('attempts', 1)}; runner pid {holder}; log {rec['log']}",
            )
        return "CANCELLED", "the local runner ended while it ran; run the same command to resume"
    if state in ("FAILED", "TIMEOUT", "CANCELLED"):
        why = rec.get("why") or f"exit code {rec.get('exit_code')}"
        return state, f"{why}; log {rec.get('log')}"
    if holder is None:
        return "CANCELLED", f"never ran: {blocked} did not complete" if blocked else "not started"
    return "PENDING", f"waiting for {blocked} to complete" if blocked else "queued"
