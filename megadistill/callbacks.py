"""Trainer callbacks: throughput and memory, progress bar, JSONL metrics, Weights & Biases.

The trainer calls every callback on every rank, except callbacks whose ``rank_zero_only`` is true,
which run on rank 0 only (the one place that filters by rank). Metrics reach callbacks as plain
floats, already averaged over ranks, once per log interval. Put :class:`ThroughputMonitor` first:
it adds ``tokens_per_s`` and memory figures that later callbacks log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

if TYPE_CHECKING:
    from megadistill.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)


class Callback:
    """Base class: override the hooks you need."""

    rank_zero_only: bool = False

    def on_train_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resume)."""

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        """After every optimizer step; must not synchronise with the device."""

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        """Every log interval with rank-averaged metrics; may add keys for later callbacks."""

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        """After a checkpoint is complete."""

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        """After the loop, also after a preemption."""


class ThroughputMonitor(Callback):
    """Adds ``tokens_per_s``, ``step_time_s`` and peak memory (GiB) to the logged metrics."""

    def __init__(self) -> None:
        self._last: tuple[float, float, int] | None = None

    def on_train_start(self, trainer: Trainer) -> None:
        self._last = (time.perf_counter(), 0.0, trainer.step)

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        now = time.perf_counter()
        t0, tokens0, step0 = self._last or (now, 0.0, step)
        tokens = metrics.get("tokens", 0.0)
        elapsed = max(now - t0, 1e-9)
        metrics["tokens_per_s"] = (tokens - tokens0) / elapsed
        metrics["step_time_s"] = elapsed / max(step - step0, 1)
        metrics.update(memory_gib())
        self._last = (now, tokens, step)


def memory_gib() -> dict[str, float]:
    """Peak accelerator memory on GPU, resident set size on CPU (this process, GiB)."""
    if torch.cuda.is_available():
        return {
            "mem_allocated_peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "mem_reserved_peak_gib": torch.cuda.max_memory_reserved() / 2**30,
        }
    import psutil

    return {"mem_rss_gib": psutil.Process(os.getpid()).memory_info().rss / 2**30}


class ProgressBar(Callback):
    """Rank-0 tqdm bar over optimizer steps with loss, tokens/s and ETA."""

    rank_zero_only = True

    def __init__(self, disable: bool = False) -> None:
        self.disable = disable
        self._bar: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(
            total=trainer.cfg.max_steps,
            initial=trainer.step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=self.disable,
        )

    def on_step_end(self, trainer: Trainer, step: int) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self._bar is not None:
            postfix = {"loss": f"{metrics.get('loss', float('nan')):.4f}"}
            if "tokens_per_s" in metrics:
                postfix["tok/s"] = f"{metrics['tokens_per_s']:.0f}"
            self._bar.set_postfix(postfix, refresh=False)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class JsonlLogger(Callback):
    """Appends one JSON object per log interval to ``path`` (rank 0)."""

    rank_zero_only = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: Trainer) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")

    def on_checkpoint(self, trainer: Trainer, step: int, path: Path) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": step, "checkpoint": str(path)}) + "\n")


WandbMode = Literal["offline", "online", "disabled"]


class WandbLogger(Callback):
    """Weights & Biases logging (rank 0); offline by default, ``mode='disabled'`` does nothing."""

    rank_zero_only = True

    def __init__(
        self,
        project: str,
        *,
        mode: WandbMode = "offline",
        run_name: str | None = None,
        directory: str | Path | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb mode {mode!r} is not one of 'offline', 'online', 'disabled'")
        self.project, self.mode, self.run_name = project, mode, run_name
        self.directory, self.config = directory, config or {}
        self._run: Any = None

    def on_train_start(self, trainer: Trainer) -> None:
        if self.mode == "disabled":
            return
        import wandb

        if self.directory is not None:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=self.project,
            name=self.run_name,
            mode=self.mode,
            dir=str(self.directory) if self.directory else None,
            config=self.config,
        )

    def on_log(self, trainer: Trainer, step: int, metrics: dict[str, float]) -> None:
        if self._run is not None:
            self._run.log(metrics, step=step)

    def on_train_end(self, trainer: Trainer, result: TrainResult) -> None:
        if self._run is not None:
            self._run.finish(exit_code=result.exit_code)
            self._run = None
