"""Read a DeepSpeed ZeRO-3 checkpoint from disk, tensor by tensor, without an engine.

A ZeRO-3 tag folder holds, per data-parallel rank R,
``zero_pp_rank_R_mp_rank_00_model_states.pt`` (``param_shapes``: the trainable parameters in
flat-buffer order, one dict per optimizer group; ``frozen_param_shapes`` / ``frozen_param_fragments``:
the parameters the optimizer does not own, each rank's slice in the model dtype; buffers inside
``module``; ``shared_params``: tied names) and ``zero_pp_rank_R_mp_rank_00_optim_states.pt``
(``fp32_flat_groups``: rank R's fp32 partition of every optimizer group). Every parameter with N
elements is split into ``ceil(N / world_size)`` elements per rank, the last rank zero-padded; in a
group the partitions follow each other in ``param_shapes`` order.

:class:`ZeroCheckpoint` parses only this metadata and reads any element range of any consolidated
tensor with positional reads from the rank files, so memory stays at what the caller asks for.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from megadistill.errors import CheckpointError
from megadistill.integrity import verify_manifest
from megadistill.merge.torch_file import LazyTensor, TorchFile

log = logging.getLogger(__name__)

META_FILE = "megadistill.json"
_MODEL_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_OPTIM_RE = re.compile(r"^zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")

Kind = Literal["trainable", "frozen", "buffer"]


@dataclass(frozen=True)
class TensorSpec:
    """What one consolidated tensor is: its name, shape, stored dtype and where it lives."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    kind: Kind

    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class _FlatSlot:
    group: int
    offset: int
    partition: int


def resolve_tag_dir(path: str | Path, tag: str | None = None) -> Path:
    """The tag folder named by ``path``: a tag folder itself, or a checkpoint folder + ``latest``.

    Args:
        path: ``<ckpt_dir>/<tag>`` or ``<ckpt_dir>`` (then ``tag`` or ``<ckpt_dir>/latest`` picks).
        tag: an explicit tag inside ``path``.

    Raises:
        CheckpointError: nothing there looks like a checkpoint.
    """
    path = Path(path)
    if tag is not None:
        path = path / tag
    elif not _has_shards(path) and (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not _has_shards(path):
        raise CheckpointError(
            f"{path} holds no ZeRO-3 shards (zero_pp_rank_*_model_states.pt) and no 'latest' file; "
            "pass a checkpoint folder or one of its tag folders"
        )
    return path


def _has_shards(path: Path) -> bool:
    return path.is_dir() and any(_MODEL_RE.match(p.name) for p in path.iterdir())


def _rank_files(tag_dir: Path, pattern: re.Pattern[str], what: str) -> list[Path]:
    found: dict[int, Path] = {}
    for p in tag_dir.iterdir():
        m = pattern.match(p.name)
        if m:
            if int(m.group(2)) != 0:
                raise CheckpointError(f"{p}: tensor-parallel checkpoints (mp_rank > 0) unsupported")
            found[int(m.group(1))] = p
    ranks = sorted(found)
    if ranks and ranks != list(range(len(ranks))):
        missing = sorted(set(range(max(ranks) + 1)) - set(ranks))
        raise CheckpointError(
            f"checkpoint {tag_dir}: {what} of rank(s) {missing} missing (found ranks {ranks})"
        )
    return [found[r] for r in ranks]


class ZeroCheckpoint:
    """Lazy reader of one ZeRO-3 checkpoint tag folder.

    Args:
        path: a tag folder, or a checkpoint folder with a ``latest`` file.
        tag: an explicit tag inside ``path``.
        verify: check ``checksums.json`` first (a folder without it is refused as incomplete).

    Attributes:
        tag_dir: the tag folder.
        meta: the parsed ``megadistill.json`` (None for a plain DeepSpeed checkpoint).
        world_size: number of data-parallel ranks that wrote it.
        specs: name -> :class:`TensorSpec`, in checkpoint order (aliases excluded).
        aliases: tied names -> the name that holds the data.
    """

    def __init__(self, path: str | Path, tag: str | None = None, *, verify: bool = True) -> None:
        self.tag_dir = resolve_tag_dir(path, tag)
        if verify:
            verify_manifest(self.tag_dir, progress=True)  # the merge's checksum pass
        meta_path = self.tag_dir / META_FILE
        self.meta: dict[str, Any] | None = (
            json.loads(meta_path.read_text()) if meta_path.is_file() else None
        )
        self._files: list[TorchFile] = []
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return str(self.tag_dir)

    @property
    def fingerprint(self) -> str | None:
        return None if self.meta is None else self.meta.get("fingerprint")

    def _open(self) -> None:
        model_paths = _rank_files(self.tag_dir, _MODEL_RE, "model states")
        optim_paths = _rank_files(self.tag_dir, _OPTIM_RE, "optimizer states")
        self.world_size = len(model_paths)
        models = [self._load(p) for p in model_paths]
        self._check_world_size(models[0], optim_paths)
        optims = [self._load(p)["optimizer_state_dict"] for p in optim_paths]
        if optims and int(optims[0].get("zero_stage", 0)) != 3:
            raise CheckpointError(
                f"checkpoint {self.tag_dir} is ZeRO stage {int(optims[0]['zero_stage'])}; "
                "only ZeRO-3 checkpoints are read"
            )
        self.specs: OrderedDict[str, TensorSpec] = OrderedDict()
        self._buffers: dict[str, torch.Tensor] = {}
        self._frozen: dict[str, list[LazyTensor]] = {}
        self._flat: dict[str, _FlatSlot] = {}
        self._groups = [o["fp32_flat_groups"] for o in optims]
        self._add_buffers(models[0])
        self._add_frozen(models)
        self._add_trainable(models[0])
        self.aliases = {
            k: v for k, v in (models[0].get("shared_params") or {}).items() if v in self.specs
        }
        for alias in self.aliases:
            self.specs.pop(alias, None)

    def _load(self, path: Path) -> dict[str, Any]:
        f = TorchFile(path)
        self._files.append(f)
        return f.load()

    def _check_world_size(self, model0: dict[str, Any], optim_paths: list[Path]) -> None:
        written_by = [self.world_size]
        if model0.get("dp_world_size") is not None:
            written_by.append(int(model0["dp_world_size"]))
        if self.meta and self.meta.get("world_size") is not None:
            written_by.append(int(self.meta["world_size"]))
        ranks = max(written_by)
        names = [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(ranks)]
        if model0.get("param_shapes"):  # trainable parameters live in the optimizer shards
            names += [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(ranks)]
        missing = [n for n in names if not (self.tag_dir / n).is_file()]
        if missing or len(set(written_by)) != 1 or len(optim_paths) > ranks:
            raise CheckpointError(
                f"checkpoint {self.tag_dir} was written by {ranks} ranks but shard(s) "
                f"{', '.join(missing) or '(extra files)'} are missing: restore them or use "
                "another checkpoint"
            )

    def _add_buffers(self, model0: dict[str, Any]) -> None:
        module = model0.get("module") or {}
        for name in model0.get("buffer_names") or []:
            if name in module:
                tensor = module[name].load()
                self._buffers[name] = tensor
                self.specs[name] = TensorSpec(name, tuple(tensor.shape), tensor.dtype, "buffer")

    def _add_frozen(self, models: list[dict[str, Any]]) -> None:
        shapes = models[0].get("frozen_param_shapes") or {}
        for name, shape in shapes.items():
            frags = [m["frozen_param_fragments"][name] for m in models]
            spec = TensorSpec(name, tuple(shape), frags[0].dtype, "frozen")
            partition = frags[0].numel()
            if partition * self.world_size < spec.numel() or any(
                f.numel() != partition for f in frags
            ):
                raise CheckpointError(
                    f"checkpoint {self.tag_dir}: frozen tensor {name} has inconsistent shards"
                )
            self.specs[name] = spec
            self._frozen[name] = frags

    def _add_trainable(self, model0: dict[str, Any]) -> None:
        groups = model0.get("param_shapes") or []
        for g, shapes in enumerate(groups):
            offset = 0
            for name, shape in shapes.items():
                spec = TensorSpec(name, tuple(shape), torch.float32, "trainable")
                partition = math.ceil(spec.numel() / self.world_size)
                self.specs[name] = spec
                self._flat[name] = _FlatSlot(g, offset, partition)
                offset += partition
            for rank, rank_groups in enumerate(self._groups):
                if rank_groups[g].numel() != offset:
                    raise CheckpointError(
                        f"checkpoint {self.tag_dir}: rank {rank} group {g} holds "
                        f"{rank_groups[g].numel()} fp32 elements, param_shapes need {offset}"
                    )

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened consolidated tensor ``name``.

        The result is 1-D, in the stored dtype (fp32 for trainable parameters).
        """
        name = self.aliases.get(name, name)
        spec = self.specs.get(name)
        if spec is None:
            raise KeyError(f"checkpoint {self.tag_dir} has no tensor {name}")
        count = spec.numel() - start if count is None else count
        if spec.kind == "buffer":
            return self._buffers[name].reshape(-1)[start : start + count].clone()
        if spec.kind == "frozen":
            frags = self._frozen[name]
            partition = frags[0].numel()
            return _gather(
                partition, start, count, spec.dtype, lambda r, o, out: frags[r].read_into(o, out)
            )
        slot = self._flat[name]

        def part(rank: int, off: int, out: torch.Tensor) -> None:
            self._groups[rank][slot.group].read_into(slot.offset + off, out)

        return _gather(slot.partition, start, count, spec.dtype, part)

    def tensor(self, name: str) -> torch.Tensor:
        """The whole consolidated tensor ``name`` in its shape."""
        return self.read(name).view(self.specs[self.aliases.get(name, name)].shape)

    def close(self) -> None:
        for f in self._files:
            f.close()
        self._files = []

    def __enter__(self) -> ZeroCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _gather(partition: int, start: int, count: int, dtype: torch.dtype, part: Any) -> torch.Tensor:
    """Assemble elements [start, start+count) from per-rank partitions of size ``partition``.

    ``part(rank, offset, out)`` fills ``out`` from that rank's partition, so each byte is read
    once, straight into the result.
    """
    out = torch.empty(count, dtype=dtype)
    pos = start
    while pos < start + count:
        rank, local = divmod(pos, partition)
        n = min(partition - local, start + count - pos)
        part(rank, local, out[pos - start : pos - start + n])
        pos += n
    return out
