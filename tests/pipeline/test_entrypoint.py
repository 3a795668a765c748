"""`slurm/entrypoint.sh` (local launcher) under faults: ranks dying together, crashes, signals.

Each run starts in a session of its own, so its process group holds the entrypoint, its ranks and
whatever they started; every test checks that this group is empty afterwards (only processes the
test started are looked at). The deadlines only catch a runaway launcher (which never ends): the
scripts end in well under a second.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from megadistill.pipeline.process import describe, group_pids, kill_group
from megadistill.pipeline.slurm import ENTRYPOINT

RUNAWAY_DEADLINE_S = 60.0
"""A run of the repro that has not ended by then is the runaway loop (it never ends)."""
LOG_LIMIT = 4096
"""The runaway loop wrote gigabytes; a healthy run writes a few lines."""


def _default_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)


def _start(
    tmp: Path, nproc: int, *program: str, name: str = "log"
) -> tuple[subprocess.Popen, Path]:
    log = tmp / f"{name}.txt"
    env = {**os.environ, "MEGADISTILL_LAUNCHER": "local", "MEGADISTILL_NPROC": str(nproc)}
    env.pop("SLURM_JOB_ID", None)
    with open(log, "wb") as out:
        # A shell cannot trap a signal that was ignored when it started (e.g. SIGINT under
        # `nohup ... &`): start the entrypoint with the default dispositions, as sbatch does.
        proc = subprocess.Popen(["bash", str(ENTRYPOINT), *program], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_default_signals)  # fmt: skip
    return proc, log


def _finish(proc: subprocess.Popen, log: Path, deadline_s: float = RUNAWAY_DEADLINE_S) -> int:
    """Wait for the entrypoint; fail (after killing its group) if it runs past ``deadline_s``."""
    try:
        code = proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid)
        proc.wait()
        size = log.stat().st_size
        pytest.fail(f"entrypoint still running after {deadline_s:.0f} s; log {size} bytes: "
                    f"{log.read_bytes()[:300]!r}")  # fmt: skip
    left = group_pids(proc.pid)
    assert not left, f"processes left behind: {describe(left)}"
    return code


def _wait_for(path: Path, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + RUNAWAY_DEADLINE_S
    while not path.exists():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"{path} never appeared: {log.read_text()}"
        time.sleep(0.05)


@pytest.mark.parametrize("nproc", [2, 3])
def test_ranks_killed_together_end_the_launcher_at_once(tmp_path, nproc):
    """The issue's repro looped on `wait: <pid>: no such job` in about 1 run of 5."""
    for attempt in range(20):
        proc, log = _start(tmp_path, nproc, "sh", "-c", "kill -KILL $$", name=f"run{attempt}")
        code = _finish(proc, log)
        text = log.read_text()
        assert log.stat().st_size < LOG_LIMIT, text[:LOG_LIMIT]
        assert code == 128 + signal.SIGKILL, text
        assert "no such job" not in text and "ranks finished with exit code 137" in text


@pytest.mark.parametrize(
    ("program", "expected"),
    [("exit 0", 0), ("exit 143", 143), ("kill -TERM $$", 143), ('exit "$RANK"', 1)],
)
def test_exit_codes_of_ranks_ending_together_are_never_lost(tmp_path, program, expected):
    for attempt in range(10):
        proc, log = _start(tmp_path, 2, "sh", "-c", program, name=f"run{attempt}")
        assert _finish(proc, log) == expected, log.read_text()
        assert "lost" not in log.read_text()


def test_a_crash_kills_the_other_ranks_and_what_they_started(tmp_path):
    child = tmp_path / "grandchild.pid"
    script = (f'if [ "$RANK" = 0 ]; then sleep 600 & echo $! > {child}; wait; '
              f"else while [ ! -s {child} ]; do sleep 0.05; done; exit 3; fi")  # fmt: skip
    proc, log = _start(tmp_path, 2, "sh", "-c", script)
    assert _finish(proc, log) == 3, log.read_text()
    assert "a rank exited with 3; killing the others" in log.read_text()
    grandchild = int(child.read_text())
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in _state(grandchild)


def _state(pid: int) -> str:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2]


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_signals_are_forwarded_and_a_checkpointed_exit_keeps_the_requeue_code(tmp_path, sig):
    """Ranks that 'checkpoint' on the signal (exit 143) make the launcher exit 143 (background
    ranks ignore SIGINT: it reaches them as SIGTERM)."""
    name = sig.name[3:]
    script = (f"trap 'echo $RANK >> {tmp_path}/got; exit 143' USR1 TERM; touch {tmp_path}/up.$RANK; "
              "while :; do sleep 0.05; done")  # fmt: skip
    proc, log = _start(tmp_path, 2, "sh", "-c", script)
    for rank in (0, 1):
        _wait_for(tmp_path / f"up.{rank}", proc, log)
    proc.send_signal(sig)  # to the entrypoint only, as `sbatch --signal=B:USR1` does
    assert _finish(proc, log) == 143, log.read_text()
    assert f"got SIG{name}; forwarding to the ranks" in log.read_text()
    assert (sig == signal.SIGINT) == ("as SIGTERM" in log.read_text())
    assert sorted((tmp_path / "got").read_text().split()) == ["0", "1"]


def test_a_rank_killed_by_the_preemption_signal_while_starting_asks_to_run_again(tmp_path):
    """A rank that has no handler yet (still importing) dies of SIGUSR1 (138): nothing since its
    last checkpoint is lost, so the launcher exits with the requeue code instead of failing."""
    proc, log = _start(tmp_path, 2, "sh", "-c", f"touch {tmp_path}/up.$RANK; exec sleep 600")
    for rank in (0, 1):
        _wait_for(tmp_path / f"up.{rank}", proc, log)
    time.sleep(0.2)  # let `exec sleep` replace the shells (either way USR1 kills them)
    proc.send_signal(signal.SIGUSR1)
    assert _finish(proc, log) == 143, log.read_text()
    assert "ended by SIGUSR1 before it could checkpoint; counting it as 143" in log.read_text()
