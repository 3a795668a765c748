"""The training loop: steps, gradient accumulation, cadence, checkpoints, resume, preemption.

Stage logic is injected: ``loss_fn(engine, batch) -> (loss, metrics)`` computes one micro-batch's
loss (a scalar tensor, mean over the micro-batch) and a dict of scalar metric tensors. Metrics stay
tensors until the log interval, where one all-reduce turns them into rank-averaged floats.

The data is any iterable of micro-batches with ``state_dict()`` / ``load_state_dict()``; its state
is saved per rank with every checkpoint, so a resumed run sees exactly the batches the
uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from megadistill.callbacks import Callback
from megadistill.config import ConfigError
from megadistill.engine.checkpoint import (
    CheckpointMeta,
    latest_tag,
    load_checkpoint,
    save_checkpoint,
)
from megadistill.engine.distributed import rank, world_size
from megadistill.engine.signals import EXIT_PREEMPTED, PreemptionHandler
from megadistill.errors import MegadistillError

log = logging.getLogger(__name__)

LossFn = Callable[[Any, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


class ResumableData(Protocol):
    """An iterable of micro-batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(kw_only=True)
class TrainerConfig:
    """Loop cadence, checkpointing and resume."""

    max_steps: int
    """Optimizer steps to train (each is gradient_accumulation_steps micro-batches per rank)."""
    log_every: int = 10
    """Reduce and log metrics every this many optimizer steps."""
    checkpoint_every: int = 0
    """Checkpoint every this many optimizer steps (0: only at the end and on preemption)."""
    checkpoint_dir: str | None = None
    """Folder for checkpoints; None disables checkpointing and resume."""
    keep_last: int = 2
    """Complete checkpoints to keep (older ones are deleted; 0 keeps all)."""
    resume: bool = False
    """Continue from the newest checkpoint in checkpoint_dir when one exists."""
    resume_tag: str | None = None
    """Resume from this tag instead of the newest (implies resume)."""
    handle_signals: bool = True
    """Checkpoint and stop on SIGTERM/SIGUSR1."""
    stop_check_every: int = 1
    """Agree on preemption every this many steps (an all-reduce each time)."""

    def __post_init__(self) -> None:
        for name in ("max_steps", "log_every", "stop_check_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"trainer.{name} must be >= 1, got {getattr(self, name)}")
        if self.checkpoint_every < 0 or self.keep_last < 0:
            raise ConfigError("trainer.checkpoint_every and trainer.keep_last must be >= 0")
        needs_dir = self.checkpoint_every or self.resume or self.resume_tag
        if needs_dir and not self.checkpoint_dir:
            raise ConfigError("checkpointing or resume needs trainer.checkpoint_dir: set a folder")


@dataclass
class TrainResult:
    """How the loop ended."""

    step: int
    preempted: bool
    last_checkpoint: Path | None

    @property
    def exit_code(self) -> int:
        """0 when done; EXIT_PREEMPTED after a preemption checkpoint (the job should requeue)."""
        return EXIT_PREEMPTED if self.preempted else 0


def count_tokens(batch: Any) -> int:
    """Tokens in a micro-batch: ``input_ids.numel()`` of a dict or a tensor batch."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    return int(ids.numel()) if isinstance(ids, torch.Tensor) else 0


class Trainer:
    """Owns the loop around a DeepSpeed engine; stage logic comes in as ``loss_fn``.

    Args:
        engine: the student DeepSpeed engine (its config fixes gradient accumulation).
        loss_fn: ``(engine, micro_batch) -> (loss, metrics)``.
        data: resumable iterable of this rank's micro-batches.
        cfg: loop cadence and checkpointing.
        meta: provenance for checkpoints; required when ``cfg.checkpoint_dir`` is set.
        callbacks: hooks (see :mod:`megadistill.callbacks`), called in order.
        tokens_fn: tokens in a micro-batch (for throughput).
    """

    def __init__(
        self,
        engine: Any,
        loss_fn: LossFn,
        data: ResumableData | Iterable[Any],
        cfg: TrainerConfig,
        *,
        meta: CheckpointMeta | None = None,
        callbacks: Sequence[Callback] = (),
        tokens_fn: Callable[[Any], int] = count_tokens,
    ) -> None:
        if cfg.checkpoint_dir and meta is None:
            raise ConfigError(
                "a Trainer with checkpoint_dir needs meta (fingerprint, model config)"
            )
        self.engine, self.loss_fn, self.data, self.cfg, self.meta = engine, loss_fn, data, cfg, meta
        self.tokens_fn = tokens_fn
        self.callbacks = [c for c in callbacks if rank() == 0 or not c.rank_zero_only]
        self.step = 0
        self.grad_accum = int(engine.gradient_accumulation_steps())
        self._sums: dict[str, torch.Tensor] = {}
        self._micro = 0
        self._tokens_since_log = 0
        self._tokens_total = 0.0
        self._last_ckpt: Path | None = None
        self._last_ckpt_step = -1
        self._epoch_iter: Iterator[Any] | None = None
        self._lr = 0.0

    # ------------------------------------------------------------------ resume / checkpoint
    def resume(self) -> bool:
        """Load the newest (or the configured) checkpoint if resuming; True when one was loaded."""
        cfg = self.cfg
        if not (cfg.resume or cfg.resume_tag) or not cfg.checkpoint_dir:
            return False
        tag = cfg.resume_tag or latest_tag(cfg.checkpoint_dir)
        if tag is None:
            log.info("no checkpoint in %s yet: starting from step 0", cfg.checkpoint_dir)
            return False
        assert self.meta is not None
        state = load_checkpoint(self.engine, cfg.checkpoint_dir, self.meta, tag=tag)
        self.step = state.step
        self._tokens_total = float(state.extra.get("tokens_total", 0.0))
        if state.data_state is not None:
            if not hasattr(self.data, "load_state_dict"):
                raise MegadistillError(
                    "the checkpoint has a data state but the data cannot load it"
                )
            self.data.load_state_dict(state.data_state)  # type: ignore[union-attr]
        self._last_ckpt, self._last_ckpt_step = Path(cfg.checkpoint_dir) / tag, state.step
        return True

    def save(self) -> Path:
        """Checkpoint now (all ranks)."""
        assert self.cfg.checkpoint_dir and self.meta is not None
        data_state = self.data.state_dict() if hasattr(self.data, "state_dict") else None
        path = save_checkpoint(
            self.engine,
            self.cfg.checkpoint_dir,
            self.step,
            self.meta,
            data_state=data_state,
            extra={"tokens_total": self._tokens_total + self._tokens_since_log * world_size()},
            keep_last=self.cfg.keep_last,
        )
        self._last_ckpt, self._last_ckpt_step = path, self.step
        for cb in self.callbacks:
            cb.on_checkpoint(self, self.step, path)
        return path

    # ------------------------------------------------------------------ loop
    def _next_batch(self) -> Any:
        if self._epoch_iter is None:
            self._epoch_iter = iter(self.data)
        try:
            return next(self._epoch_iter)
        except StopIteration:
            log.info("data exhausted at step %d: starting another pass", self.step)
            self._epoch_iter = iter(self.data)
            try:
                return next(self._epoch_iter)
            except StopIteration:
                raise MegadistillError("the training data yields no batch") from None

    def _train_step(self) -> None:
        """One optimizer step: grad_accum micro-batches through engine.backward/engine.step."""
        self._lr = float(self.engine.get_lr()[0])  # the LR this step uses (python float, no sync)
        for _ in range(self.grad_accum):
            batch = self._next_batch()
            loss, metrics = self.loss_fn(self.engine, batch)
            self.engine.backward(loss)
            self.engine.step()
            self._accumulate({"loss": loss, **metrics})
            self._tokens_since_log += self.tokens_fn(batch)

    def _accumulate(self, metrics: dict[str, torch.Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value.clone()
        self._micro += 1

    def _reduce_metrics(self) -> dict[str, float]:
        """Average the accumulated metrics over micro-batches and ranks (one all-reduce)."""
        keys = sorted(self._sums)
        device = self._sums[keys[0]].device if keys else torch.device("cpu")
        values = [self._sums[k] / self._micro for k in keys]
        vec = torch.stack(values + [torch.tensor(float(self._tokens_since_log), device=device)])
        if world_size() > 1:
            torch.distributed.all_reduce(vec)
            vec[: len(keys)] /= world_size()
        out = dict(zip(keys, vec[: len(keys)].tolist()))
        self._tokens_total += float(vec[-1].item())
        out["tokens"] = self._tokens_total
        out["lr"] = self._lr
        grad_norm = self.engine.get_global_grad_norm()
        if grad_norm is not None:
            out["grad_norm"] = float(grad_norm)
        self._sums, self._micro, self._tokens_since_log = {}, 0, 0
        return out

    def _log(self) -> None:
        metrics = self._reduce_metrics()
        for cb in self.callbacks:
            cb.on_log(self, self.step, metrics)

    def fit(self) -> TrainResult:
        """Resume if configured, train to ``max_steps`` or until preempted, and checkpoint."""
        self.resume()
        self.engine.train()
        for cb in self.callbacks:
            cb.on_train_start(self)
        handler = PreemptionHandler()
        first_step = self.step
        with handler if self.cfg.handle_signals else contextlib.nullcontext():
            # a signal during start-up (model load, resume) was recorded by catch_early: every
            # rank agrees on it before the first step and stops (nothing new to checkpoint)
            preempted = self.cfg.handle_signals and handler.should_stop(device=self._device())
            while not preempted and self.step < self.cfg.max_steps:
                preempted = self._one_step(handler)
        trained = self.step != first_step or not preempted
        if self.cfg.checkpoint_dir and self._last_ckpt_step != self.step and trained:
            self.save()
        result = TrainResult(step=self.step, preempted=preempted, last_checkpoint=self._last_ckpt)
        for cb in self.callbacks:
            cb.on_train_end(self, result)
        return result

    def _one_step(self, handler: PreemptionHandler) -> bool:
        """Train one step, log and checkpoint on cadence; True when the run must stop now."""
        cfg = self.cfg
        self._train_step()
        self.step += 1
        for cb in self.callbacks:
            cb.on_step_end(self, self.step)
        if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
            self._log()
        stop = False
        # the agreement is an all-reduce and, on GPU, a host sync: stop_check_every spaces it out
        if cfg.handle_signals and self.step % cfg.stop_check_every == 0:
            stop = handler.should_stop(device=self._device())
        if cfg.checkpoint_dir and (
            stop or (cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0)
        ):
            self.save()
        return stop

    def _device(self) -> torch.device:
        return (
            torch.device(self.engine.device)
            if hasattr(self.engine, "device")
            else torch.device("cpu")
        )
