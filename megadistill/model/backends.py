"""Whether the ``triton`` mLSTM backend can run here, and what runs instead.

The ``triton`` backend is mlstm_kernels' ``chunkwise--triton_limit_chunk``. mlstm_kernels 2.0.6
(the newest release) writes every Triton kernel with block pointers (``tl.make_block_ptr``,
``tl.advance``), which triton 3.8 removed (``NotImplementedError: Block pointers have been removed
in favor of the tensor descriptor API``). The backend therefore needs triton < 3.8: the pin is
3.7.1, the version PyTorch 2.13's CUDA wheels ship (it accepts block pointers with a deprecation
warning). The kernels are not rewritten here; a newer triton is refused with one line.

Where the backend cannot run, :func:`resolve_mlstm_backend` falls back to ``chunkwise`` (the same
function, exact, any device) with one warning per reason and process; at the start of training
on a GPU, :func:`require_mlstm_backend` raises instead (a silent fallback would cost the speed
the run asked for).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
from importlib import metadata

from megadistill.errors import MegadistillError

log = logging.getLogger(__name__)

TRITON_PIN = "3.7.1"
"""The triton the ``triton`` backend is tested with (PyTorch 2.13's CUDA wheels ship it)."""
TRITON_BLOCK_POINTERS_REMOVED = (3, 8)
"""The first triton (major, minor) without ``tl.make_block_ptr``: mlstm_kernels 2.0.6 fails there."""
TORCH_NEEDS_NEW_TRITON = (2, 14)
"""The first torch (major, minor) whose wheels require triton 3.8 (torch 2.14.1: ``triton~=3.8.0``,
seen by the drift canary on 2026-12-06): there, installing the pinned triton alone breaks torch."""

_warned: set[str] = set()


@functools.cache
def _torch_version() -> str | None:
    """The installed torch's version (None: not installed), read without importing it."""
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def _triton_fix() -> str:
    """What to install for the ``triton`` backend: the pinned triton, and with a torch that
    requires a newer one, the torch that ships the pin."""
    torch_version = _torch_version()
    if torch_version is not None and _major_minor(torch_version) >= TORCH_NEEDS_NEW_TRITON:
        return (
            f"torch {torch_version} requires triton >= 3.8, so install the torch that ships "
            f"{TRITON_PIN} with it: pip install 'torch==2.13.*' triton=={TRITON_PIN} (or the "
            "tested set: pip install -c constraints.txt -e .)"
        )
    return f"pip install triton=={TRITON_PIN}"


@functools.cache
def _triton_version() -> str | None:
    """The installed triton's version (None: not installed), read without importing it."""
    for dist in ("triton", "pytorch-triton"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _interpreting() -> bool:
    """Whether Triton's interpreter runs kernels on CPU tensors (``TRITON_INTERPRET=1``, which
    must be set before triton is imported)."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")


def _major_minor(version: str) -> tuple[int, int]:
    found = re.match(r"(\d+)\.(\d+)", version)
    return (int(found[1]), int(found[2])) if found else (0, 0)


def triton_backend_status(device_type: str) -> str | None:
    """Why the ``triton`` mLSTM backend cannot run on ``device_type`` here (None: it can).

    Args:
        device_type: the device of the mLSTM's inputs (``cuda``, ``cpu``, ...).
    """
    version = _triton_version()
    if version is None:
        return f"triton is not installed ({_triton_fix()})"
    if _major_minor(version) >= TRITON_BLOCK_POINTERS_REMOVED:
        return (
            f"triton {version} removed the block pointers that mlstm_kernels' kernels use "
            f"({_triton_fix()})"
        )
    if importlib.util.find_spec("mlstm_kernels") is None:
        return "mlstm_kernels is not installed"
    if device_type != "cuda" and not _interpreting():
        return (
            f"its kernels need CUDA tensors, not {device_type} ones (TRITON_INTERPRET=1, set "
            "before triton is imported, runs them on CPU, slowly)"
        )
    return None


def resolve_mlstm_backend(backend: str, device_type: str) -> str:
    """``backend``, or ``chunkwise`` where it is ``triton`` and that cannot run here (logged once
    per reason and process)."""
    if backend != "triton":
        return backend
    why = triton_backend_status(device_type)
    if why is None:
        return backend
    if why not in _warned:
        _warned.add(why)
        log.warning("mlstm_backend='triton' cannot run here: %s; using 'chunkwise'", why)
    return "chunkwise"


def require_mlstm_backend(backend: str, device_type: str) -> None:
    """Check the mLSTM backend once at the start of training: on a GPU a ``triton`` backend that
    cannot run is an error naming the fix; elsewhere it falls back (one warning)."""
    if backend != "triton":
        return
    why = triton_backend_status(device_type)
    if why is not None and device_type == "cuda":
        raise MegadistillError(
            f"mlstm_backend='triton' (the student's config.json) cannot run: {why}; or set it to "
            "'chunkwise' there"
        )
    resolve_mlstm_backend(backend, device_type)
