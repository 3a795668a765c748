"""The training data loader: packed samples, sharded by :class:`ShardedSampler`, as tensors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megadistill.data.config import DataConfig
from megadistill.data.errors import DataError
from megadistill.data.packing import PackedDataset, prepare_packed
from megadistill.data.sampler import PAD_SAMPLE, ShardedSampler
from megadistill.integrity import verify_manifest_shared

log = logging.getLogger(__name__)


class DistillLoader:
    """Iterates this rank's micro-batches for the rest of the current epoch.

    Each batch is a dict of int64 tensors of shape ``[micro_batch, seq_len]``: ``input_ids``,
    ``labels`` (already shifted: ``labels[:, t]`` is the target of position ``t``; -100 where
    ignored), ``position_ids`` (restart at 0 at each document), and ``sample_ids`` of shape
    ``[micro_batch]`` (index of each sample in the packed split, -1 for a padding slot).

    ``state_dict()`` taken after consuming a batch resumes at the next one.
    """

    def __init__(self, dataset: PackedDataset, sampler: ShardedSampler) -> None:
        self.dataset = dataset
        self.sampler = sampler

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the packed data (sources, tokenizer, packing settings)."""
        return self.dataset.fingerprint

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for ids in self.sampler:
            yield self.collate(ids)

    def collate(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        """Stack the samples ``ids`` (``-1`` gives an all-padding sample) into a batch."""
        rows = [
            self.dataset.padding_sample() if i == PAD_SAMPLE else self.dataset[int(i)] for i in ids
        ]
        batch = {k: torch.from_numpy(np.stack([r[k] for r in rows])) for k in rows[0]}
        batch["sample_ids"] = torch.as_tensor(ids, dtype=torch.int64)
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Sampler position plus the data fingerprint (checked on load)."""
        return {"sampler": self.sampler.state_dict(), "data_fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the exact next micro-batch; refuse a state saved on other data."""
        if state["data_fingerprint"] != self.fingerprint:
            raise DataError(
                f"data loader state was saved on data {state['data_fingerprint'][:12]} but this "
                f"run's data is {self.fingerprint[:12]}; resume with the same data config and "
                "tokenizer"
            )
        self.sampler.load_state_dict(state["sampler"])


def _dist_rank_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_loader(
    cfg: DataConfig,
    tokenizer: Any,
    rank: int | None = None,
    world_size: int | None = None,
    micro_batch: int = 1,
    grad_accum: int = 1,
    *,
    split: str = "train",
    shuffle: bool | None = None,
    drop_last: bool = True,
) -> DistillLoader:
    """Build (or reuse) the packed cache for ``cfg`` and a loader for this rank.

    In an initialised process group only rank 0 keys the sources and builds the cache (normally
    the pipeline's prepare step has built it already); the others receive its folder (which must
    be on a filesystem all ranks share). Its checksums are verified once, split across the ranks,
    and every rank opens it read-only (memory-mapped).

    Args:
        cfg: data config.
        tokenizer: the teacher's tokenizer.
        rank: data-parallel rank (default: the process group's, else 0).
        world_size: data-parallel ranks (default: the process group's, else 1).
        micro_batch: samples per rank per forward.
        grad_accum: micro-batches per optimizer step.
        split: 'train' or 'heldout'.
        shuffle: shuffle every epoch (default ``cfg.shuffle``).
        drop_last: drop the last incomplete global batch (else pad it with ignored samples).
    """
    dist_rank, dist_world = _dist_rank_world()
    rank = dist_rank if rank is None else rank
    world_size = dist_world if world_size is None else world_size
    if dist_world > 1:
        import torch.distributed as dist

        # rank 0 hashes the sources and builds; the others wait and receive the folder
        holder = [str(prepare_packed(cfg, tokenizer)) if dist_rank == 0 else None]
        dist.broadcast_object_list(holder, src=0)
        path = Path(holder[0])
    else:
        path = prepare_packed(cfg, tokenizer)
    if cfg.verify_cache:  # each file hashed by one rank, the verdict shared (a collective)
        verify_manifest_shared(path, what="data cache")
    dataset = PackedDataset(path, split, tokenizer=tokenizer, verify=False)
    sampler = ShardedSampler(
        len(dataset),
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        grad_accum=grad_accum,
        seed=cfg.seed,
        shuffle=cfg.shuffle if shuffle is None else shuffle,
        drop_last=drop_last,
    )
    log.info(
        "data %s/%s: %d samples of %d tokens, %d micro-batches per epoch on rank %d/%d",
        path.name,
        split,
        len(dataset),
        dataset.seq_len,
        len(sampler),
        rank,
        world_size,
    )
    return DistillLoader(dataset, sampler)
