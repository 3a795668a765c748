"""Deterministic, resumable sharding of packed samples over ranks and micro-batches.

The order of samples depends only on (num_samples, seed, epoch, shuffle) and the global batch
``G = micro_batch * grad_accum * world_size``: optimizer step ``s`` of an epoch consumes the
samples ``order[s * G:(s + 1) * G]`` whatever the number of ranks, so 1 rank with
``grad_accum = 2`` and 2 ranks with ``grad_accum = 1`` train on exactly the same global batches.
Within a step, micro-step ``m`` of rank ``r`` takes the slots ``(m * world_size + r) * micro_batch
+ [0, micro_batch)``: for a fixed micro_batch, micro-batch ``m * world_size + r`` of the global
batch, so even the grouping into micro-batches is the same for every layout.

With ``drop_last`` (training) the incomplete last global batch of an epoch is dropped. Without it
(covering every sample once, e.g. for teacher targets) the last global batch is filled with ``-1``:
a padding slot that the loader turns into an all-ignored sample, so every rank runs the same
number of forwards (ZeRO-3 collectives need lockstep).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from megadistill.data.errors import DataError

PAD_SAMPLE = -1


class ShardedSampler:
    """Yields this rank's micro-batches of sample ids (int64 arrays, ``-1`` = padding slot).

    Args:
        num_samples: samples in the dataset.
        rank: this rank, in ``[0, world_size)``.
        world_size: number of data-parallel ranks.
        micro_batch: samples per rank per forward.
        grad_accum: micro-batches per optimizer step.
        seed: shuffle seed (the epoch is mixed in).
        shuffle: a fresh seeded permutation every epoch; else sample order.
        drop_last: drop the incomplete last global batch instead of padding it.
    """

    def __init__(
        self,
        num_samples: int,
        *,
        rank: int,
        world_size: int,
        micro_batch: int,
        grad_accum: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is not in [0, world_size={world_size})")
        if micro_batch < 1 or grad_accum < 1:
            raise DataError(f"micro_batch={micro_batch} and grad_accum={grad_accum} must be >= 1")
        self.num_samples = num_samples
        self.rank, self.world_size = rank, world_size
        self.micro_batch, self.grad_accum = micro_batch, grad_accum
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.global_batch = micro_batch * grad_accum * world_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{num_samples} samples do not fill one global batch of {self.global_batch} "
                "(micro_batch * grad_accum * world_size); add data or lower the batch"
            )
        self.epoch = 0
        self.step = 0
        """Optimizer steps completed in the current epoch."""
        self.micro = 0
        """Micro-batches of the current step already yielded."""

    @property
    def steps_per_epoch(self) -> int:
        """Global batches (optimizer steps) per epoch."""
        if self.drop_last:
            return self.num_samples // self.global_batch
        return -(-self.num_samples // self.global_batch)

    def __len__(self) -> int:
        """Micro-batches this rank yields per full epoch."""
        return self.steps_per_epoch * self.grad_accum

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global sample order of ``epoch``, cut or padded to whole global batches."""
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch, 0x5A3]).permutation(self.num_samples)
        else:
            order = np.arange(self.num_samples)
        size = self.steps_per_epoch * self.global_batch
        if size <= len(order):
            return order[:size].astype(np.int64)
        return np.concatenate([order, np.full(size - len(order), PAD_SAMPLE)]).astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first micro-batch."""
        self.epoch, self.step, self.micro = epoch, 0, 0

    def __iter__(self) -> Iterator[np.ndarray]:
        """The rest of the current epoch. The position advances as each batch is yielded (after
        the last one it already points at the next epoch), so ``state_dict()`` taken after
        consuming a batch resumes at the one after it."""
        epoch = self.epoch
        order = self.epoch_order(epoch)
        while self.epoch == epoch and self.step < self.steps_per_epoch:
            first = self.step * self.global_batch
            first += (self.micro * self.world_size + self.rank) * self.micro_batch
            ids = order[first : first + self.micro_batch]
            self.micro += 1
            if self.micro == self.grad_accum:
                self.step, self.micro = self.step + 1, 0
            if self.step == self.steps_per_epoch:
                self.set_epoch(epoch + 1)
            yield ids

    def state_dict(self) -> dict[str, Any]:
        """Position after the last yielded micro-batch, plus what must match on resume."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "micro": self.micro,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "world_size": self.world_size,
            "grad_accum": self.grad_accum,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the next micro-batch after ``state`` (another world size is fine at a step
        boundary, as long as the global batch is the same)."""
        for key in ("num_samples", "global_batch", "seed", "shuffle", "drop_last"):
            if state[key] != getattr(self, key):
                raise DataError(
                    f"data loader state has {key}={state[key]!r} but this loader has "
                    f"{getattr(self, key)!r}; resume with the same data and global batch"
                )
        layout = (state["world_size"], state["grad_accum"])
        if state["micro"] and layout != (self.world_size, self.grad_accum):
            raise DataError(
                f"data loader state stopped inside an optimizer step (micro={state['micro']}) with "
                f"world_size, grad_accum = {layout}; resume with that layout, not "
                f"{(self.world_size, self.grad_accum)}"
            )
        self.epoch, self.step, self.micro = state["epoch"], state["step"], state["micro"]
