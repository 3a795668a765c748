"""Read a Hugging Face safetensors folder tensor by tensor, with positional reads (no mmap).

Used for the initial weights theta_0 of task-arithmetic and TIES merges when they are given as a
Hugging Face folder (``model.safetensors`` or sharded with ``model.safetensors.index.json``).
Offers the same ``specs`` / ``read`` interface as :class:`~megadistill.merge.zero_reader.ZeroCheckpoint`.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from pathlib import Path

import torch

from megadistill.errors import CheckpointError
from megadistill.merge.hf_writer import INDEX_FILE, SAFETENSORS_DTYPES
from megadistill.merge.zero_reader import TensorSpec

_DTYPES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
INIT_FILE = "megadistill_init.json"


class HFWeights:
    """Lazy reader of the safetensors weights in a Hugging Face folder.

    Args:
        folder: a folder with ``model.safetensors`` or a sharded safetensors index.

    Raises:
        CheckpointError: no safetensors weights there, or a file is truncated.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.meta = None
        self.aliases: dict[str, str] = {}
        self.specs: OrderedDict[str, TensorSpec] = OrderedDict()
        self._where: dict[str, tuple[int, int]] = {}  # name -> (fd, byte offset)
        self._fds: list[int] = []
        try:
            for path in self._files():
                self._parse(path)
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return str(self.folder)

    @property
    def fingerprint(self) -> str | None:
        """The initial student's fingerprint, when the folder records it (converted students and
        stage outputs carry ``megadistill_init.json``)."""
        init = self.folder / INIT_FILE
        return json.loads(init.read_text()).get("fingerprint") if init.is_file() else None

    def _files(self) -> list[Path]:
        index = self.folder / INDEX_FILE
        if index.is_file():
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [self.folder / n for n in names]
        single = self.folder / "model.safetensors"
        if single.is_file():
            return [single]
        raise CheckpointError(
            f"{self.folder} holds neither model.safetensors nor {INDEX_FILE}; "
            "pass a Hugging Face folder saved with safetensors, or a checkpoint"
        )

    def _parse(self, path: Path) -> None:
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (named in {INDEX_FILE})")
        fd = os.open(path, os.O_RDONLY)
        self._fds.append(fd)
        size = os.fstat(fd).st_size
        try:
            n = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, n, 8))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not a safetensors file ({exc})") from exc
        header.pop("__metadata__", None)
        for name, info in header.items():
            begin, end = info["data_offsets"]
            if 8 + n + end > size:
                raise CheckpointError(f"{path} is truncated (tensor {name} ends past EOF)")
            spec = TensorSpec(name, tuple(info["shape"]), _DTYPES[info["dtype"]], "frozen")
            self.specs[name] = spec
            self._where[name] = (fd, 8 + n + begin)

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor:
        """Elements ``[start, start + count)`` of the flattened tensor ``name`` (1-D)."""
        spec = self.specs[name]
        count = spec.numel() - start if count is None else count
        out = torch.empty(count, dtype=spec.dtype)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        fd, base = self._where[name]
        pos = base + start * spec.dtype.itemsize
        done = 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], pos + done)
            if got <= 0:
                raise CheckpointError(f"{self.folder}: tensor {name} is truncated")
            done += got
        return out

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
