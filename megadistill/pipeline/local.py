"""Run the pipeline DAG on one machine without SLURM: ``megadistill pipeline run RECIPE --local``.

The same plan and the same per-rank step runner as under SLURM; only the launcher differs:
``slurm/entrypoint.sh`` in its local mode starts each job's ranks on this machine. Steps run in
dependency order, expert tasks one after the other; the first failure stops the run (nothing that
depends on it runs). Running the same recipe again resumes: finished tasks are skipped. A job whose ranks exit with the requeue code is started again, as SLURM would.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megadistill.pipeline.dag import PipelineError, Step, write_plan
from megadistill.pipeline.recipe import PipelineRecipe, parse_time_s
from megadistill.pipeline.slurm import ENTRYPOINT, job_environment
from megadistill.pipeline.step import REQUEUE_EXIT_CODE, task_finished

log = logging.getLogger(__name__)


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


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_task(
    step: Step, index: int, run_dir: Path, max_requeues: int, extra_env: dict[str, str]
) -> LocalResult:
    """Run one array task of ``step`` through the entrypoint (local launcher), with requeues."""
    log_path = run_dir / "logs" / step.name / f"local_{index}.out"
    argv = [str(ENTRYPOINT), sys.executable, "-m", "megadistill.cli", "pipeline", "step",
            str(run_dir), step.name, "--index", str(index)]  # fmt: skip
    timeout_s = parse_time_s(step.resources.time)
    started = time.time()
    log.info("%s[%d] started on %d rank(s); follow it with: tail -f %s", step.name, index,
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
            try:
                proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                      timeout=timeout_s, check=False)  # fmt: skip
            except subprocess.TimeoutExpired as exc:
                raise PipelineError(
                    f"{step.name}[{index}] ran past its time limit {step.resources.time}; "
                    f"log {log_path}"
                ) from exc
        if proc.returncode != REQUEUE_EXIT_CODE:
            break
        log.info("%s[%d] checkpointed and asked to run again (attempt %d)", step.name, index,
                 attempt + 1)  # fmt: skip
    return LocalResult(step.name, index, proc.returncode, started, time.time(), log_path,
                       attempt + 1)  # fmt: skip


def run_local(
    recipe: PipelineRecipe, run_dir: str | Path, max_requeues: int = 3
) -> list[LocalResult]:
    """Run every step of the DAG on this machine, in dependency order.

    Args:
        recipe: the validated recipe (``resources.<step>`` gives each job's rank count).
        run_dir: run directory (created).
        max_requeues: how often a job exiting with the requeue code is started again.

    Raises:
        PipelineError: naming the failed step, its exit code and log; later steps did not run.
    """
    run_dir = Path(run_dir).resolve()
    steps = write_plan(recipe, run_dir)
    results: list[LocalResult] = []
    for step in steps:
        for index in range(step.num_tasks):
            commands, world = len(step.commands[index]), step.resources.num_ranks
            if task_finished(run_dir, step.name, index, commands, world):
                log.info("%s[%d] finished in an earlier run; skipping", step.name, index)
                continue
            res = _run_task(step, index, run_dir, max_requeues, recipe.env)
            results.append(res)
            if res.returncode != 0:
                raise PipelineError(
                    f"local run stopped: {step.name}[{index}] exited with {res.returncode} "
                    f"after {res.attempts} attempt(s); log {res.log}"
                )
            log.info("%s[%d] done in %.1f s", step.name, index, res.finished - res.started)
    return results
