"""Preemption: SIGTERM / SIGUSR1 set a flag; the trainer checkpoints at the next step boundary.

SLURM sends SIGTERM (or the signal chosen with ``--signal=USR1@90``) before it kills a job. The
handler only records the signal; the trainer asks :meth:`PreemptionHandler.should_stop`, which
all-reduces the flag, so every rank stops after the same step even if only one was signalled.
The process then exits with :data:`EXIT_PREEMPTED` so a wrapper can requeue the job.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

import torch

from megadistill.engine.distributed import any_rank

log = logging.getLogger(__name__)

EXIT_PREEMPTED = 143
"""Exit code after a preemption checkpoint (128 + SIGTERM, what SLURM and shells expect)."""

DEFAULT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


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
        stop = any_rank(self.local_flag, device)
        if stop:
            log.warning(
                "preemption requested (%s on this rank): checkpoint and exit",
                self.received.name if self.received else "another rank",
            )
        return stop
