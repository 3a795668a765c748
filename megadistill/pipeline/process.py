"""Process groups: find, signal and stop every process of one job on this machine (Linux /proc).

The local runner starts each job (``slurm/entrypoint.sh`` and its ranks) in a session of its own,
so the job's process group holds the entrypoint, every rank and whatever the ranks started.
Stopping the group stops all of it; an empty group proves that nothing was left behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name (state, ppid, pgrp, session, ...)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def group_pids(pgid: int) -> list[int]:
    """Live (not zombie) processes whose process group is ``pgid``."""
    out = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if fields and fields[0] != "Z" and int(fields[2]) == pgid:
            out.append(pid)
    return out


def matching_pids(predicate: Callable[[int, dict[str, str]], bool]) -> list[int]:
    """Live processes whose ``(pid, environment)`` satisfy ``predicate`` (unreadable ones skipped)."""
    out = []
    for pid in _pids():
        fields = _stat_fields(pid)
        if not fields or fields[0] == "Z":
            continue
        try:
            raw = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw.decode(errors="replace").split("\0") if "=" in kv)
        if predicate(pid, env):
            out.append(pid)
    return out


def describe(pids: list[int]) -> str:
    """``pid command line`` of each process, for error messages."""
    lines = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            cmd = "(ended)"
        lines.append(f"{pid} {cmd[:200]}")
    return "; ".join(lines)


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pgid``; False when the group is already empty."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def wait_group_empty(pgid: int, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Wait until no live process is left in group ``pgid``; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while group_pids(pgid):
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True


def kill_group(pgid: int, timeout_s: float = 10.0) -> list[int]:
    """SIGKILL group ``pgid`` until it is empty; return the pids that were still alive (if any)."""
    left = group_pids(pgid)
    deadline = time.monotonic() + timeout_s
    while left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        time.sleep(0.05)
        left = group_pids(pgid)
        if time.monotonic() > deadline:
            break
    return left
