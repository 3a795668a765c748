"""Run one step's commands in one rank: ``megadistill pipeline step RUN_DIR STEP``.

``slurm/entrypoint.sh`` starts this in every rank (after exporting RANK, WORLD_SIZE, MASTER_ADDR,
...). It looks up the step's commands for this array task in ``plan.json`` and runs them one after
the other, forwarding SIGUSR1/SIGTERM/SIGINT to the running command so a trainer can checkpoint on
preemption. A command's non-zero exit code (e.g. :data:`REQUEUE_EXIT_CODE`) becomes the step's; a
preemption signal that ends a command before it can handle it (or comes between commands) also
gives :data:`REQUEUE_EXIT_CODE`, so a job preempted while starting up is requeued, not failed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path

from megadistill.pipeline.dag import STATE_DIR, PipelineError, plan_step, read_plan

REQUEUE_EXIT_CODE = 143
"""Exit code of a program that checkpointed on a preemption signal and wants to run again: the
trainer's ``megadistill.engine.signals.EXIT_PREEMPTED`` (128 + SIGTERM; kept equal by a test, not
imported, because that module needs torch). ``slurm/entrypoint.sh`` requeues the job on it."""

FORWARDED_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
log = logging.getLogger(__name__)


def task_index(index: int | None = None) -> int:
    """The array task index: ``index`` if given, else ``SLURM_ARRAY_TASK_ID``, else 0."""
    if index is not None:
        return index
    for var in ("SLURM_ARRAY_TASK_ID", "MEGADISTILL_TASK_INDEX"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


def step_task_commands(run_dir: str | Path, step: str, index: int) -> list[list[str]]:
    """The argv lists of array task ``index`` of ``step`` in the run's plan."""
    entry = plan_step(read_plan(run_dir), step)
    tasks = entry["commands"]
    if not 0 <= index < len(tasks):
        raise PipelineError(
            f"step {step!r} has {len(tasks)} task(s); array task index {index} is out of range"
        )
    return tasks[index]


class _Forwarder:
    """Forward preemption signals to the running command; remember those that came between."""

    def __init__(self) -> None:
        self.child: subprocess.Popen | None = None
        self.received: list[int] = []

    def __call__(self, signum: int, _frame: object) -> None:
        self.received.append(signum)
        child = self.child
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    def run(self, argv: list[str]) -> int:
        """Run ``argv``; return its exit code (128+N if killed by signal N).

        A preemption signal that came before the command started, or that ended the command
        before it could handle it (a program still starting up), gives ``REQUEUE_EXIT_CODE``:
        nothing was lost, so the job runs again.
        """
        if self.received:
            log.warning("preempted (signal %d) before %s started", self.received[0], argv[0])
            return REQUEUE_EXIT_CODE
        self.child = subprocess.Popen(argv)
        try:
            code = self.child.wait()
        finally:
            self.child = None
        if code < 0 and -code in self.received:
            log.warning("%s ended by forwarded signal %d before it could checkpoint; it runs "
                        "again", argv[0], -code)  # fmt: skip
            return REQUEUE_EXIT_CODE
        return 128 - code if code < 0 else code


def _marker(run_dir: str | Path, step: str, index: int, cmd: int, rank: int) -> Path:
    return Path(run_dir) / STATE_DIR / f"{step}_{index}" / f"cmd{cmd}.rank{rank}.done"


def task_finished(run_dir: str | Path, step: str, index: int, commands: int, world: int) -> bool:
    """Whether every rank finished every command of array task ``index`` of ``step``."""
    return all(
        _marker(run_dir, step, index, i, r).exists() for i in range(commands) for r in range(world)
    )


def run_step(run_dir: str | Path, step: str, index: int | None = None) -> int:
    """Run the commands of one array task of ``step`` in this rank; return the exit code.

    A command that every rank finished in an earlier attempt of this task (a requeued job) is
    skipped, so a preempted expert does not redo stage I; the stages themselves resume from
    their newest checkpoint.

    Args:
        run_dir: the run directory holding ``plan.json``.
        step: step name.
        index: array task index (default: from ``SLURM_ARRAY_TASK_ID``).
    """
    forwarder = _Forwarder()  # first: a signal during start-up is kept, not fatal
    previous = {sig: signal.signal(sig, forwarder) for sig in FORWARDED_SIGNALS}
    try:
        return _run_commands(run_dir, step, task_index(index), forwarder)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run_commands(run_dir: str | Path, step: str, idx: int, forwarder: _Forwarder) -> int:
    commands = step_task_commands(run_dir, step, idx)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    for i, argv in enumerate(commands):
        if all(_marker(run_dir, step, idx, i, r).exists() for r in range(world)):
            log.info("%s[%d]: command %d finished in an earlier attempt; skipping", step, idx, i)
            continue
        log.debug("rank %d, %s[%d]: %s", rank, step, idx, " ".join(argv))
        code = forwarder.run(argv)
        if code != 0:
            if rank == 0:
                log.error("%s[%d]: %s exited with %d", step, idx, " ".join(argv[:4]), code)
            return code
        marker = _marker(run_dir, step, idx, i, rank)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    return 0
