"""One run per folder: an exclusive ``flock`` on ``RUN_DIR/run.lock`` while a run is driven.

``pipeline run --local`` holds the lock for the whole run, ``pipeline submit`` while it writes the
plan and submits. The kernel releases the lock when its holder dies, so a crashed runner never
leaves a stale lock; the file keeps the holder's PID so a refused run can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from megadistill.pipeline.dag import PipelineError

LOCK_FILE = "run.lock"


def lock_holder(run_dir: str | Path) -> int | None:
    """PID of the process holding the run directory's lock, or None when nobody holds it."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = path.read_text().strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # closing drops a shared lock we may have taken
    return None


@contextlib.contextmanager
def run_lock(run_dir: str | Path, what: str) -> Iterator[None]:
    """Hold the exclusive lock of ``run_dir`` (created) for the block.

    Args:
        run_dir: the run directory.
        what: what this process does there, for the refusal message of a second one.

    Raises:
        PipelineError: another process holds the lock (its PID is named).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # 0o666 less the umask, as open() gives: under a group-writable umask the team can take it too
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise PipelineError(
                f"{run_dir} is in use by another pipeline process (pid {holder}); wait for it to "
                f"end or stop it with `kill -TERM {holder}` before you {what} there"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
