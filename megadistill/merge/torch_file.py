"""Lazy access to ``torch.save`` files: parse the pickle, read tensor bytes on demand.

``torch.save`` writes an uncompressed zip: ``<archive>/data.pkl`` (the object tree, with tensors
as references to storages) and one ``<archive>/data/<key>`` record per storage. :class:`TorchFile`
unpickles the tree with every tensor replaced by a :class:`LazyTensor` (storage key, offset,
shape) and reads element ranges with ``os.pread`` into fresh buffers. Nothing is memory-mapped,
so the resident memory of a reader is what it has asked for, not the pages it has touched.
"""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadistill.errors import CheckpointError

_LOCAL_HEADER = struct.Struct("<4sHHHHHIIIHH")
_LOCAL_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: torch.dtype
    numel: int


@dataclass(frozen=True)
class LazyTensor:
    """A tensor inside a :class:`TorchFile` whose bytes have not been read.

    Attributes:
        file: the file holding the storage.
        storage: which storage record, its dtype and element count.
        offset: element offset of the tensor inside its storage.
        shape: the tensor's shape.
        stride: the tensor's stride (only contiguous tensors can be read in slices).
    """

    file: TorchFile
    storage: _StorageRef
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    @property
    def dtype(self) -> torch.dtype:
        return self.storage.dtype

    def numel(self) -> int:
        return math.prod(self.shape)

    def read_into(self, start: int, out: torch.Tensor) -> None:
        """Fill the contiguous 1-D tensor ``out`` with elements from ``start`` on (no copy)."""
        if start < 0 or start + out.numel() > self.numel():
            raise IndexError(f"range [{start}, {start + out.numel()}) outside {self.numel()}")
        if not _is_contiguous(self.shape, self.stride):
            out.copy_(self.load().reshape(-1)[start : start + out.numel()])
            return
        self.file.read_into(self.storage, self.offset + start, out)

    def load(self) -> torch.Tensor:
        """The whole tensor (small tensors: buffers, metadata)."""
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride) if n > 0)
        flat = torch.empty(span if self.numel() else 0, dtype=self.dtype)
        if flat.numel():
            self.file.read_into(self.storage, self.offset, flat)
        return flat.as_strided(self.shape, self.stride).clone()


def _is_contiguous(shape: tuple[int, ...], stride: tuple[int, ...]) -> bool:
    expected = 1
    for n, s in reversed(list(zip(shape, stride))):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


class TorchFile:
    """One ``torch.save`` zip file, opened for lazy reads.

    Args:
        path: the file.

    Raises:
        CheckpointError: the file is missing, truncated, compressed or not a torch zip file.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fd = -1
        if not self.path.is_file():
            raise CheckpointError(f"{self.path} is missing")
        self.size = self.path.stat().st_size
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = zf.infolist()
                prefix = infos[0].filename.split("/", 1)[0]
                pkl = zf.read(f"{prefix}/data.pkl")
                byteorder = _read_optional(zf, f"{prefix}/byteorder")
                records = {info.filename: info for info in infos}
        except (zipfile.BadZipFile, IndexError, KeyError, OSError, EOFError) as exc:
            raise CheckpointError(
                f"{self.path} is not a readable torch checkpoint (truncated or corrupt: {exc}); "
                "restore it or use another checkpoint"
            ) from exc
        if byteorder not in (None, sys.byteorder):
            raise CheckpointError(f"{self.path} was written {byteorder}-endian; not supported")
        self._prefix = prefix
        self._records = records
        self._offsets: dict[str, int] = {}
        self._fd = os.open(self.path, os.O_RDONLY)
        self._pickle = pkl

    def load(self) -> Any:
        """The unpickled object tree, with every tensor a :class:`LazyTensor`."""
        return _LazyUnpickler(io.BytesIO(self._pickle), self).load()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def _data_offset(self, key: str) -> int:
        if key not in self._offsets:
            name = f"{self._prefix}/data/{key}"
            info = self._records.get(name)
            if info is None:
                raise CheckpointError(f"{self.path}: storage record {name} is missing")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{self.path}: record {name} is compressed; not a torch file")
            header = os.pread(self._fd, _LOCAL_HEADER.size, info.header_offset)
            fields = _LOCAL_HEADER.unpack(header)
            if fields[0] != _LOCAL_MAGIC:
                raise CheckpointError(
                    f"{self.path}: bad zip header for {name}; the file is corrupt"
                )
            start = info.header_offset + _LOCAL_HEADER.size + fields[9] + fields[10]
            if start + info.file_size > self.size:
                raise CheckpointError(f"{self.path} is truncated (record {name} ends past EOF)")
            self._offsets[key] = start
        return self._offsets[key]

    def read_into(self, storage: _StorageRef, element: int, out: torch.Tensor) -> None:
        """Fill the contiguous tensor ``out`` from ``storage`` starting at element ``element``."""
        itemsize = out.element_size()
        if element + out.numel() > storage.numel:
            raise CheckpointError(f"{self.path}: read past the end of storage {storage.key}")
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        pos = self._data_offset(storage.key) + element * itemsize
        done = 0
        while done < len(view):
            got = os.preadv(self._fd, [view[done:]], pos + done)
            if got <= 0:
                raise CheckpointError(f"{self.path} is truncated (storage {storage.key})")
            done += got


def _read_optional(zf: zipfile.ZipFile, name: str) -> str | None:
    try:
        return zf.read(name).decode()
    except KeyError:
        return None


def _storage_dtype(storage_type: Any) -> torch.dtype:
    if storage_type is torch.UntypedStorage:
        return torch.uint8
    with warnings.catch_warnings():
        # The legacy typed-storage classes are only names in the pickle; asking their dtype warns.
        warnings.simplefilter("ignore", UserWarning)
        return storage_type.dtype


class _LazyUnpickler(pickle.Unpickler):
    """torch's unpickling protocol with tensors rebuilt as :class:`LazyTensor`."""

    def __init__(self, data: io.BytesIO, file: TorchFile) -> None:
        super().__init__(data)
        self._file = file

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_v2"):
            return lambda data, *_args: data
        if module in ("torch._tensor", "torch.tensor") and name == "_rebuild_from_type_v2":
            return lambda func, _type, args, _state: func(*args)
        if module == "torch" and name.endswith("Storage"):
            return getattr(torch, name)
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> _StorageRef:
        kind = pid[0].decode() if isinstance(pid[0], bytes) else pid[0]
        if kind != "storage":
            raise CheckpointError(f"{self._file.path}: unknown persistent id {kind!r}")
        storage_type, key, _location, numel = pid[1:]
        return _StorageRef(str(key), _storage_dtype(storage_type), int(numel))

    def _rebuild_tensor(
        self, storage: _StorageRef, offset: int, size: Any, stride: Any, *_rest: Any
    ) -> LazyTensor:
        return LazyTensor(self._file, storage, int(offset), tuple(size), tuple(stride))
