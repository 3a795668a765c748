"""Write a Hugging Face model folder tensor by tensor: sharded safetensors, index, config, tokenizer.

The safetensors format is an 8-byte little-endian header length, a JSON header (name -> dtype,
shape, byte range) and the raw bytes. All shapes and dtypes are known before the first byte is
written, so :class:`ShardedSafetensorsWriter` plans every shard and writes its header up front,
then appends each tensor's bytes in chunks as they are produced. Nothing bigger than one chunk
is ever held, whatever the size of a shard.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from megadistill.errors import CheckpointError
from megadistill.integrity import atomic_write_json

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: name, shape and the dtype it is written in."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor alone)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header(shard: list[OutputTensor]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in shard:
        if t.dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"tensor {t.name}: dtype {t.dtype} cannot go into safetensors")
        header[t.name] = {
            "dtype": SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors itself writes it
    return len(raw).to_bytes(8, "little") + raw


class ShardedSafetensorsWriter:
    """Stream tensors, in planned order, into ``model-0000i-of-0000n.safetensors`` files.

    Args:
        folder: output folder (exists).
        tensors: every output tensor, in the order they will be written.
        max_shard_bytes: shard size limit.

    Use :meth:`write` for each tensor's bytes (in one or more chunks, in order), then
    :meth:`close`, which checks that everything planned was written and writes the index.
    """

    def __init__(self, folder: Path, tensors: list[OutputTensor], max_shard_bytes: int) -> None:
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.files = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._pos = 0  # index into _queue of the tensor being written
        self._written = 0  # bytes of that tensor written so far
        self._shard = -1
        self._fh: BinaryIO | None = None

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append ``chunk`` (elements of tensor ``name``, in order) to the output."""
        shard, spec = self._queue[self._pos]
        if name != spec.name or chunk.dtype != spec.dtype:
            raise RuntimeError(f"expected {spec.name} ({spec.dtype}), got {name} ({chunk.dtype})")
        if shard != self._shard:
            self._open(shard)
        data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + data.nbytes > spec.nbytes:
            raise RuntimeError(f"{name}: more bytes than its shape {spec.shape} holds")
        self._fh.write(memoryview(data))
        self._written += data.nbytes
        if self._written == spec.nbytes:
            self._pos += 1
            self._written = 0

    def _open(self, shard: int) -> None:
        self._close_file()
        self._shard = shard
        self._fh = open(self.folder / self.files[shard], "wb")
        self._fh.write(_header(self.shards[shard]))

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None

    def close(self) -> dict[str, Any]:
        """Finish the last shard, check completeness, write and return the index."""
        self._close_file()
        if self._pos != len(self._queue):
            raise RuntimeError(f"output incomplete: {self._queue[self._pos][1].name} not written")
        index = {
            "metadata": {"total_size": sum(t.nbytes for s in self.shards for t in s)},
            "weight_map": {t.name: self.files[i] for i, s in enumerate(self.shards) for t in s},
        }
        atomic_write_json(self.folder / INDEX_FILE, index)
        return index

    def abort(self) -> None:
        """Close an open file after a failure (the caller discards the folder)."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def write_config(folder: Path, model_config: dict[str, Any], dtype: torch.dtype) -> None:
    """``config.json`` from a checkpoint's ``model_config``, with ``dtype`` set to the weights'."""
    config = dict(model_config)
    config.pop("torch_dtype", None)
    config["dtype"] = str(dtype).removeprefix("torch.")
    atomic_write_json(folder / "config.json", config)


def copy_tokenizer(src: str | Path, folder: Path) -> list[str]:
    """Copy the tokenizer files found in ``src`` into ``folder``; return their names.

    Raises:
        CheckpointError: ``src`` is not a folder or holds no tokenizer file.
    """
    src = Path(src)
    names = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not names:
        raise CheckpointError(
            f"tokenizer folder {src} holds none of {', '.join(TOKENIZER_FILES[:3])}...; "
            "pass tokenizer=PATH with a Hugging Face tokenizer folder"
        )
    for n in names:
        shutil.copyfile(src / n, folder / n)
    return names
