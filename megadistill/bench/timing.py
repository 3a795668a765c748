"""One timing helper for every benchmark and ``megadistill selftest``.

The project's rule for speed on a shared machine: the things compared run in one process, side by
side, interleaved (A, B, B, A, ...), repeated, and their ratio of medians is reported, so other
work on the machine slows both alike. :func:`measure` does that for named callables: warm-up
rounds (run, not recorded), then ``repeats`` rounds, the order reversed every other round, each
call timed with wall and CPU clocks. On a CUDA device every reading waits for the queued kernels
first (:class:`Clock`), so a time is the device's work, not the launch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

ClockKind = Literal["wall", "cpu"]
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}
"""``wall``: elapsed time; ``cpu``: this process's CPU time (what the work costs, also on a
machine busy with other jobs; with several threads it sums them)."""


def synchronize(device: torch.device | str | None) -> None:
    """Wait for the work queued on ``device`` when it is a CUDA device (a CPU-GPU sync point)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Reads one clock after waiting for ``device``'s queued work: ``t0 = clock(); ...; clock() - t0``.

    Args:
        kind: ``wall`` or ``cpu``.
        device: synchronised before each reading when it is a CUDA device (None: never).
    """

    def __init__(self, kind: str = "wall", device: torch.device | str | None = None) -> None:
        if kind not in CLOCKS:
            raise ValueError(f"clock={kind!r} is not one of {tuple(CLOCKS)}")
        self.kind, self.device = kind, device

    def __call__(self) -> float:
        synchronize(self.device)
        return CLOCKS[self.kind]()


@dataclass
class Samples:
    """The measured calls of one callable: wall and CPU seconds and its return values."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    def median(self, kind: ClockKind = "wall") -> float:
        """Median seconds per call."""
        return statistics.median(getattr(self, kind))

    def total(self, kind: ClockKind = "wall") -> float:
        """Seconds of all measured calls together."""
        return sum(getattr(self, kind))

    def stderr(self, kind: ClockKind = "wall") -> float:
        """Standard error of the mean seconds per call (0.0 with fewer than two calls)."""
        xs = getattr(self, kind)
        return statistics.stdev(xs) / len(xs) ** 0.5 if len(xs) > 1 else 0.0


def measure(
    calls: Mapping[str, Callable[[], Any]],
    repeats: int = 1,
    warmup: int = 0,
    alternate: bool = True,
    device: torch.device | str | None = None,
    before: Callable[[str], None] | None = None,
    after: Callable[[str], None] | None = None,
) -> dict[str, Samples]:
    """Time ``calls`` side by side: ``warmup`` rounds, then ``repeats`` recorded rounds.

    Every round calls each callable once, in the mapping's order, reversed in every odd round
    (counted from the first warm-up round) when ``alternate``. ``before(name)`` and
    ``after(name)`` run around each call, untimed (a barrier, a ``zero_grad``, a ``gc.collect``).

    Args:
        calls: name -> callable taking no arguments; what it returns is kept in ``values``.
        repeats: recorded rounds (>= 1).
        warmup: rounds run first and not recorded (compilation, allocator, caches).
        alternate: reverse the order every other round (A B, B A, ...), so neither side always
            runs right after the other.
        device: synchronised before and after each call when it is a CUDA device.
        before: called with the name before each call, outside the timed span.
        after: called with the name after each call, outside the timed span.

    Returns:
        name -> :class:`Samples` of the ``repeats`` recorded calls.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    names = list(calls)
    out = {name: Samples() for name in names}
    for round_ in range(warmup + repeats):
        order = names[::-1] if alternate and round_ % 2 else names
        for name in order:
            if before is not None:
                before(name)
            synchronize(device)
            w0, c0 = CLOCKS["wall"](), CLOCKS["cpu"]()
            value = calls[name]()
            synchronize(device)
            w1, c1 = CLOCKS["wall"](), CLOCKS["cpu"]()
            if after is not None:
                after(name)
            if round_ >= warmup:
                out[name].wall.append(w1 - w0)
                out[name].cpu.append(c1 - c0)
                out[name].values.append(value)
    return out


def median_by_key(rows: list[Mapping[str, float]]) -> dict[str, float]:
    """Per-key median of measurement dicts that share their keys (the first row's)."""
    return {k: statistics.median(r[k] for r in rows) for k in rows[0]}


class Stopwatch:
    """Wall and CPU seconds of one ``with`` block (the device synchronised at both ends).

    ``with Stopwatch() as sw: work()`` then ``sw.wall``, ``sw.cpu``: for a run measured once,
    such as a whole merge or a data-preparation pass in its own process.
    """

    def __init__(self, device: torch.device | str | None = None) -> None:
        self.device = device
        self.wall = self.cpu = 0.0

    def __enter__(self) -> Stopwatch:
        synchronize(self.device)
        self._w0, self._c0 = CLOCKS["wall"](), CLOCKS["cpu"]()
        return self

    def __exit__(self, *exc: object) -> None:
        synchronize(self.device)
        self.wall = CLOCKS["wall"]() - self._w0
        self.cpu = CLOCKS["cpu"]() - self._c0
