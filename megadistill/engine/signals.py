"""Preemption: SIGTERM / SIGUSR1 set a flag; the trainer checkpoints at the next step boundary.

SLURM sends SIGTERM (or the signal chosen with ``--signal=USR1@90``) before it kills a job. The
handler only records the signal; the trainer asks :meth:`PreemptionHandler.should_stop`, which
all-reduces the flag, so every rank stops after the same step even if only one was signalled.
The process then exits with :data:`EXIT_PREEMPTED` so a wrapper can requeue the job.

A signal may come while the process is still starting (imports, model load: minutes for a 7B).
:func:`catch_early` records it from the first line of the stage command on (this module imports
nothing heavy); the :class:`PreemptionHandler` that takes over inherits it, and the trainer agrees
on it before its first step, so a job preempted while loading exits with the requeue code.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit code after a preemption checkpoint (128 + SIGTERM, what SLURM and shells expect)."""

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_early: dict[str, signal.Signals | None] = {"received": None}


def _record_early(signum: int, frame: FrameType | None) -> None:
    del frame
    _early["received"] = signal.Signals(signum)


def catch_early(signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
    """Record preemption signals from now on, until a :class:`PreemptionHandler` takes over.

    Call it first thing in a process that will train (main thread only). A recorded signal is
    handed to the next handler, and the handlers it replaced get this one back on exit.
    """
    for sig in signals:
        signal.signal(sig, _record_early)


def early_signal() -> signal.Signals | None:
    """The preemption signal :func:`catch_early` recorded, if any."""
    return _early["received"]


class PreemptionHandler:
    """Record preemption signals; install with ``with PreemptionHandler() as h:``.

    The previous handlers are restored on exit. Handlers can only be installed from the main
    thread; elsewhere the handler stays passive and only :meth:`request` sets the flag.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS) -> None:
        self.signals = signals
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, object] = {}

    def __enter__(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: preemption signals are not handled")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)
        # a signal that came during start-up is this handler's now (taken once)
        self.received = self.received or _early["received"]
        _early["received"] = None
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)  # type: ignore[arg-type]
        self._previous.clear()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        del frame
        self.received = signal.Signals(signum)
        # logging from a signal handler can deadlock on the handler lock; keep it minimal

    @property
    def local_flag(self) -> bool:
        """Whether this rank has seen a signal (no communication)."""
        return self.received is not None

    def should_stop(self, device: torch.device | None = None) -> bool:
        """True on every rank when any rank saw a signal (a collective: call it on all ranks)."""
        from megadistill.engine.distributed import any_rank

        stop = any_rank(self.local_flag, device)
        if stop:
            log.warning(
                "preemption requested (%s on this rank): checkpoint and exit",
                self.received.name if self.received else "another rank",
            )
        return stop
