"""Atomic writes and checksum manifests: nothing half-written is ever trusted.

A directory written with :func:`atomic_dir` appears under its final name only once it is complete,
with a ``checksums.json`` manifest (sha256 of every file) that :func:`verify_manifest` checks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megadistill.errors import CheckpointError

MANIFEST = "checksums.json"
_CHUNK = 1 << 22


def sha256_file(path: str | Path, bar: Any = None) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks (``bar``: a progress bar counting bytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
            if bar is not None:
                bar.update(len(block))
    return digest.hexdigest()


def _bytes_bar(folder: Path, files: list[str], what: str) -> Any:
    """A bytes progress bar (rate and ETA) over ``files`` of ``folder`` (missing ones count 0)."""
    from megadistill.progress import progress_bar

    total = sum((folder / f).stat().st_size for f in files if (folder / f).is_file())
    return progress_bar(total, f"verify {what}", unit="B")


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Text version of :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: object) -> None:
    """Write JSON atomically (indented, sorted keys)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_manifest(folder: str | Path) -> dict[str, str]:
    """Checksum every file under ``folder`` (recursively) into ``folder/checksums.json``."""
    folder = Path(folder)
    files = {
        str(p.relative_to(folder)): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    atomic_write_json(folder / MANIFEST, {"algorithm": "sha256", "files": files})
    return files


def _check_file(folder: Path, rel: str, expected: str, what: str, bar: Any) -> None:
    """Raise CheckpointError naming ``rel`` when it is missing or its sha256 is not ``expected``."""
    path = folder / rel
    if not path.is_file():
        raise CheckpointError(f"{what} {folder}: file {rel} listed in {MANIFEST} is missing")
    actual = sha256_file(path, bar)
    if actual != expected:
        raise CheckpointError(
            f"{what} {folder}: file {rel} is corrupt (sha256 {actual[:12]} != {expected[:12]})"
        )


def verify_manifest(
    folder: str | Path, *, what: str = "checkpoint", progress: bool = False
) -> dict[str, str]:
    """Check every file listed in ``folder/checksums.json``; raise CheckpointError on a mismatch.

    With ``progress`` a bar shows bytes/s and the ETA of the pass."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        raise CheckpointError(f"{what} {folder} does not exist")
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{what} {folder} has no {MANIFEST}: it was not written completely; "
            "use an earlier checkpoint or write it again"
        )
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{what} {folder}: {MANIFEST} is corrupt ({exc})") from exc
    bar = _bytes_bar(folder, list(files), what) if progress else None
    try:
        for rel, expected in files.items():
            _check_file(folder, rel, expected, what, bar)
    finally:
        if bar is not None:
            bar.close()
    return files


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``final``; on success write the manifest and rename it.

    On any exception the temporary folder is removed and ``final`` is untouched. With
    ``overwrite`` an existing ``final`` is replaced only after the new one is complete.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it or choose another output")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
        write_manifest(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_manifest_shared(folder: str | Path, *, what: str = "checkpoint") -> list[str]:
    """:func:`verify_manifest` split across the ranks of a process group, verdict shared.

    Rank ``r`` hashes the files ``r, r + world, ...`` of the sorted manifest (so every file is
    read once by one rank, not by every rank) and the ranks exchange their errors in one
    collective, bounded by the process group's timeout. Without a process group (or with one
    rank) it is :func:`verify_manifest`. A collective: every rank must call it.

    Returns:
        The files this rank hashed.

    Raises:
        CheckpointError: on every rank when any file is missing or corrupt (naming the file).
    """
    import torch.distributed as dist

    folder = Path(folder)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sorted(verify_manifest(folder, what=what))
    rank, world = dist.get_rank(), dist.get_world_size()
    mine: list[str] = []
    error: str | None = None
    bar = None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())["files"]
        share = [item for i, item in enumerate(sorted(manifest.items())) if i % world == rank]
        bar = _bytes_bar(folder, [rel for rel, _ in share], what)
        for rel, expected in share:
            mine.append(rel)
            _check_file(folder, rel, expected, what, bar)
    except FileNotFoundError:
        error = f"{what} {folder} has no {MANIFEST}: it was not written completely; write it again"
    except (json.JSONDecodeError, KeyError) as exc:
        error = f"{what} {folder}: {MANIFEST} is corrupt ({exc})"
    except CheckpointError as exc:
        error = str(exc)
    finally:
        if bar is not None:
            bar.close()
    verdicts: list[str | None] = [None] * world
    dist.all_gather_object(verdicts, error)
    errors = [e for e in verdicts if e]
    if errors:
        raise CheckpointError(errors[0])
    return mine
