"""Offline teacher targets: the teacher's top-k log-probs and ids per token, on disk.

:func:`run_teacher_targets` is the stage (``megadistill teacher-targets``): the teacher engine on
every rank writes the targets of a stage II config's data; :class:`TeacherTargets` reads them.

Folder layout (written atomically with :func:`megadistill.integrity.atomic_dir`)::

    <out>/index.json                          format, k, seq_len, dtype, fingerprints, shard names
    <out>/sample_map.npy                      int64 [num_samples, 2]: sample id -> (shard, row); -1 =
                                              no targets for that sample
    <out>/targets-rank00000-of-00002.logprobs.npy   [rows, seq_len, k] float32 / float16 / bfloat16
                                              (bfloat16 stored as its raw uint16 bits)
    <out>/targets-rank00000-of-00002.ids.npy        int32 [rows, seq_len, k]
    <out>/targets-rank00000-of-00002.sample_ids.npy int64 [rows] (-1 = padding row)
    <out>/checksums.json                      sha256 of every file

Each rank writes its own shard from its own loader; rank 0 writes the index and the manifest once
every rank is done, then renames the folder into place. The log-probs are under the teacher's
full-vocabulary softmax (the loss renormalises them over the k ids, see
:mod:`megadistill.stages.losses`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from megadistill.config import ConfigError
from megadistill.errors import CheckpointError, MegadistillError
from megadistill.integrity import (
    atomic_dir,
    atomic_write_json,
    verify_manifest,
    verify_manifest_shared,
)
from megadistill.progress import progress_bar
from megadistill.stages.config import StageConfig
from megadistill.stages.losses import DEFAULT_CHUNK, topk_logprobs
from megadistill.stages.runner import build_teacher, student_fingerprint, teacher_logits

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX = "index.json"
SAMPLE_MAP = "sample_map.npy"
StoreDtype = Literal["float32", "float16", "bfloat16"]
_NP_STORE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

TeacherForward = Callable[[dict[str, Tensor]], "Tensor | tuple[Tensor, Tensor]"]
"""Maps a loader batch to full logits ``[B, L, V]`` or to ``(top-k log-probs, ids)`` ``[B, L, k]``."""


class TargetsError(MegadistillError):
    """Teacher targets are missing, corrupt, or were written for another teacher/data/k/seq_len."""


@dataclass(frozen=True)
class TargetsSpec:
    """What a targets folder was written for; a reader refuses any mismatch."""

    k: int
    seq_len: int
    dtype: StoreDtype
    teacher_fingerprint: str
    data_fingerprint: str
    tokenizer: str | None = None


def shard_name(rank: int, world_size: int) -> str:
    """File stem of one rank's shard: ``targets-rank00000-of-00002``."""
    return f"targets-rank{rank:05d}-of-{world_size:05d}"


def _to_storage(values: Tensor, dtype: StoreDtype) -> np.ndarray:
    stored = values.detach().to("cpu", _TORCH[dtype])
    if dtype == "bfloat16":
        stored = stored.view(torch.uint16)  # numpy has no bfloat16: keep the raw bits
    return stored.numpy()


def _from_storage(array: np.ndarray, dtype: StoreDtype) -> Tensor:
    tensor = torch.from_numpy(np.array(array))  # a writable copy of the memmapped rows
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    return tensor.float()


def _teacher_topk(fn: TeacherForward, batch: dict[str, Tensor], k: int, chunk: int) -> tuple:
    out = fn(batch)
    if isinstance(out, tuple):
        values, ids = out
    else:
        values, ids = topk_logprobs(out, k, chunk)
    want = (*batch["input_ids"].shape, k)
    if tuple(values.shape) != want or tuple(ids.shape) != want:
        raise TargetsError(
            f"teacher returned top-k of shape {tuple(values.shape)} / {tuple(ids.shape)}, "
            f"expected {want} (batch, seq_len, k)"
        )
    return values, ids


def _write_shard(
    fn: TeacherForward, loader: Any, folder: Path, spec: TargetsSpec, chunk: int
) -> None:
    sampler = loader.sampler
    name = shard_name(sampler.rank, sampler.world_size)
    rows = len(loader) * sampler.micro_batch
    shape = (rows, spec.seq_len, spec.k)
    fmt = np.lib.format
    lp = fmt.open_memmap(folder / f"{name}.logprobs.npy", "w+", _NP_STORE[spec.dtype], shape)
    ids = fmt.open_memmap(folder / f"{name}.ids.npy", "w+", np.int32, shape)
    sample_ids = np.full(rows, -1, dtype=np.int64)
    row = 0
    bar = progress_bar(rows * spec.seq_len, "teacher targets")  # tokens/s and ETA on rank 0
    with torch.no_grad(), bar:
        for batch in loader:
            values, top = _teacher_topk(fn, batch, spec.k, chunk)
            n = len(batch["sample_ids"])
            lp[row : row + n] = _to_storage(values, spec.dtype)
            ids[row : row + n] = top.to("cpu", torch.int32).numpy()
            sample_ids[row : row + n] = batch["sample_ids"].numpy()
            row += n
            bar.update(n * spec.seq_len)
    lp.flush()
    ids.flush()
    del lp, ids
    np.save(folder / f"{name}.sample_ids.npy", sample_ids)
    log.info("teacher targets: rank %d wrote %d rows", sampler.rank, int((sample_ids >= 0).sum()))


def _write_index(folder: Path, spec: TargetsSpec, world_size: int, num_samples: int) -> None:
    names = [shard_name(r, world_size) for r in range(world_size)]
    sample_map = np.full((num_samples, 2), -1, dtype=np.int64)
    for shard, name in enumerate(names):
        sids = np.load(folder / f"{name}.sample_ids.npy")
        rows = np.flatnonzero(sids >= 0)
        sample_map[sids[rows], 0] = shard
        sample_map[sids[rows], 1] = rows
    np.save(folder / SAMPLE_MAP, sample_map)
    missing = int((sample_map[:, 0] < 0).sum())
    atomic_write_json(
        folder / INDEX,
        {
            "format": FORMAT_VERSION,
            **asdict(spec),
            "world_size": world_size,
            "shards": names,
            "num_samples": num_samples,
            "num_missing": missing,
            "sample_map": SAMPLE_MAP,
        },
    )
    if missing:
        log.warning("teacher targets: %d of %d samples have no targets", missing, num_samples)


def _check_loader(loader: Any, out: Path, overwrite: bool) -> None:
    sampler = loader.sampler
    if sampler.step or sampler.micro:
        raise TargetsError(
            f"the loader is inside epoch {sampler.epoch} (step {sampler.step}); teacher targets "
            "need a loader at the start of an epoch"
        )
    if sampler.drop_last:
        log.warning(
            "teacher targets from a drop_last loader miss the samples of the last incomplete "
            "global batch; build the loader with drop_last=False to cover every sample"
        )
    if sampler.world_size > 1 and not torch.distributed.is_initialized():
        raise TargetsError(
            f"the loader is sharded over {sampler.world_size} ranks but no process group is "
            "initialised; call torch.distributed / deepspeed.init_distributed() first"
        )
    if out.exists() and not overwrite:
        raise TargetsError(
            f"teacher targets {out} already exist; remove them or set distill.targets_dir to a "
            "new folder"
        )


def write_teacher_targets(
    teacher_forward_fn: TeacherForward,
    loader: Any,
    out_dir: str | Path,
    k: int,
    *,
    teacher_fingerprint: str,
    dtype: StoreDtype = "float32",
    tokenizer: str | None = None,
    chunk_size: int = DEFAULT_CHUNK,
    overwrite: bool = False,
) -> Path:
    """Run the teacher over one epoch of ``loader`` on every rank and write the targets folder.

    Call it on every rank at once (a collective when the loader is sharded over several ranks:
    rank 0 writes the index after a barrier). For full coverage use a loader built with
    ``shuffle=False, drop_last=False``; its padding slots keep ranks in lockstep (ZeRO-3).

    Args:
        teacher_forward_fn: batch -> logits ``[B, L, V]`` or ``(log-probs, ids)`` ``[B, L, k]``
            (e.g. from :func:`megadistill.stages.losses.teacher_topk` on gathered weights).
        loader: a :class:`megadistill.data.DistillLoader` at the start of an epoch.
        out_dir: the targets folder (appears only when complete).
        k: top-k size.
        teacher_fingerprint: fingerprint of the teacher weights (readers check it).
        dtype: storage dtype of the log-probs.
        tokenizer: the tokenizer's name or path, recorded in the index.
        chunk_size: rows per chunk when the teacher returns full logits.
        overwrite: replace an existing folder (only once the new one is complete).

    Returns:
        ``out_dir`` as a Path (on every rank, after the folder is in place).
    """
    out = Path(out_dir)
    _check_loader(loader, out, overwrite)
    if dtype not in _NP_STORE:
        raise TargetsError(f"teacher targets dtype {dtype!r} is not one of {list(_NP_STORE)}")
    spec = TargetsSpec(
        k=k,
        seq_len=loader.dataset.seq_len,
        dtype=dtype,
        teacher_fingerprint=teacher_fingerprint,
        data_fingerprint=loader.fingerprint,
        tokenizer=tokenizer,
    )
    rank, world = loader.sampler.rank, loader.sampler.world_size
    if rank != 0:
        holder: list[Any] = [None]
        torch.distributed.broadcast_object_list(holder, src=0)
        _write_shard(teacher_forward_fn, loader, Path(holder[0]), spec, chunk_size)
        torch.distributed.barrier()  # shards done
        torch.distributed.barrier()  # index written and folder renamed by rank 0
        return out
    with atomic_dir(out, overwrite=overwrite) as tmp:
        if world > 1:
            torch.distributed.broadcast_object_list([str(tmp)], src=0)
        _write_shard(teacher_forward_fn, loader, tmp, spec, chunk_size)
        if world > 1:
            torch.distributed.barrier()
        _write_index(tmp, spec, world, len(loader.dataset))
    if world > 1:
        torch.distributed.barrier()
    log.info("teacher targets written to %s", out)
    return out


def verify_targets_shared(path: str | Path) -> None:
    """Verify a targets folder's checksums once across the ranks (a collective; see
    :func:`megadistill.integrity.verify_manifest_shared`)."""
    try:
        verify_manifest_shared(path, what="teacher targets")
    except CheckpointError as exc:
        raise TargetsError(f"{exc}; write the teacher targets again") from exc


class TeacherTargets:
    """Reads a targets folder: verifies checksums and what it was written for, then serves the
    targets of given sample ids straight from memory-mapped shards.

    Args:
        path: the targets folder.
        k: expected top-k (None: accept the folder's).
        seq_len: expected sequence length.
        teacher_fingerprint: expected teacher fingerprint.
        data_fingerprint: expected data fingerprint (``DistillLoader.fingerprint``).
        verify: check the sha256 manifest (reads every byte once).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        k: int | None = None,
        seq_len: int | None = None,
        teacher_fingerprint: str | None = None,
        data_fingerprint: str | None = None,
        verify: bool = True,
    ) -> None:
        self.path = Path(path)
        if verify:
            try:
                verify_manifest(self.path, what="teacher targets")
            except CheckpointError as exc:
                raise TargetsError(f"{exc}; write the teacher targets again") from exc
        index = json.loads((self.path / INDEX).read_text())
        if index.get("format") != FORMAT_VERSION:
            raise TargetsError(
                f"teacher targets {self.path} have format {index.get('format')}; this code "
                f"reads format {FORMAT_VERSION}: write them again"
            )
        fields = {f: index[f] for f in TargetsSpec.__dataclass_fields__}
        self.spec = TargetsSpec(**fields)
        expected = {
            "k": k,
            "seq_len": seq_len,
            "teacher_fingerprint": teacher_fingerprint,
            "data_fingerprint": data_fingerprint,
        }
        for name, want in expected.items():
            have = getattr(self.spec, name)
            if want is not None and have != want:
                raise TargetsError(
                    f"teacher targets {self.path} were written with {name}={have!r}, but this run "
                    f"needs {want!r}; write targets for this teacher/data/k/seq_len "
                    "(megadistill teacher-targets) or point to the matching folder"
                )
        self.sample_map = np.load(self.path / index["sample_map"])
        self._logprobs = [
            np.load(self.path / f"{s}.logprobs.npy", mmap_mode="r") for s in index["shards"]
        ]
        self._ids = [np.load(self.path / f"{s}.ids.npy", mmap_mode="r") for s in index["shards"]]

    def __len__(self) -> int:
        return len(self.sample_map)

    def get(self, sample_ids: Tensor | np.ndarray | list[int]) -> tuple[Tensor, Tensor]:
        """Targets of ``sample_ids`` (``-1`` = padding slot, all zeros).

        Returns:
            ``(logprobs, ids)``: fp32 ``[B, seq_len, k]`` and int64 ``[B, seq_len, k]``.
        """
        sids = np.asarray(torch.as_tensor(sample_ids).cpu(), dtype=np.int64).reshape(-1)
        shape = (len(sids), self.spec.seq_len, self.spec.k)
        logprobs = torch.zeros(shape, dtype=torch.float32)
        ids = torch.zeros(shape, dtype=torch.int64)
        for j, sid in enumerate(sids):
            if sid < 0:
                continue
            shard, row = self.sample_map[sid] if sid < len(self.sample_map) else (-1, -1)
            if shard < 0:
                raise TargetsError(
                    f"sample {sid} has no teacher targets in {self.path} ({len(self)} samples "
                    "indexed); write them with a loader built with drop_last=False"
                )
            logprobs[j] = _from_storage(self._logprobs[shard][row], self.spec.dtype)
            ids[j] = torch.from_numpy(np.asarray(self._ids[shard][row], dtype=np.int64))
        return logprobs, ids


def run_teacher_targets(cfg: StageConfig) -> Path:
    """Precompute the teacher's top-k targets for cfg.data into cfg.distill.targets_dir (call on
    every rank, as a stage)."""
    from megadistill.data.loader import build_loader
    from megadistill.engine.distributed import init_distributed
    from megadistill.model import load_tokenizer

    if not cfg.teacher or not cfg.distill.targets_dir:
        raise ConfigError("teacher-targets needs 'teacher' and 'distill.targets_dir'")
    _, world = init_distributed(cfg.timeout_s)
    tok = load_tokenizer(cfg.teacher)
    loader = build_loader(
        cfg.data, tok, micro_batch=cfg.engine.micro_batch_size, shuffle=False, drop_last=False
    )
    teacher = build_teacher(cfg, world)
    dev = teacher.device

    def forward(batch: dict[str, torch.Tensor]):
        with torch.no_grad():
            logits = teacher_logits(teacher, batch, dev)
            return topk_logprobs(logits, cfg.distill.top_k, cfg.distill.chunk_size)

    return write_teacher_targets(
        forward, loader, cfg.distill.targets_dir, cfg.distill.top_k,
        teacher_fingerprint=student_fingerprint(cfg.teacher), tokenizer=cfg.teacher,
    )  # fmt: skip
