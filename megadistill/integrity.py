"""Atomic writes and checksum manifests: nothing half-written is ever trusted.

A directory written with :func:`atomic_dir` appears under its final name only once it is complete,
with a ``checksums.json`` manifest (sha256 of every file) that :func:`verify_manifest` checks.

Every temporary file and folder that is renamed into place is created by :func:`new_temp_file` or
:func:`new_temp_dir`, so what a run leaves has the modes a plain ``open()``/``mkdir()`` gives
under the umask (``tempfile``'s 0o600/0o700 would make checkpoints that a team sharing run
folders cannot read).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from megadistill.errors import CheckpointError

log = logging.getLogger(__name__)
MANIFEST = "checksums.json"
_CHUNK = 1 << 22
_NAME_TRIES = 100
_T = TypeVar("_T")


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


def _create_fresh(parent: Path, prefix: str, suffix: str, create: Callable[[Path], _T]) -> _T:
    """``create(path)`` at the first free random name ``parent/<prefix><random><suffix>``."""
    for _ in range(_NAME_TRIES):
        path = parent / f"{prefix}{secrets.token_hex(6)}{suffix}"
        try:
            return create(path)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free name {prefix}*{suffix} in {parent} after {_NAME_TRIES} tries")


def new_temp_file(parent: str | Path, *, prefix: str, suffix: str) -> tuple[int, Path]:
    """Create an empty file under a fresh random name in ``parent``, as ``tempfile.mkstemp`` does
    but with the mode a plain ``open()`` gives (0o666 less the umask) instead of 0o600.

    The kernel applies the umask (or the folder's default ACL) when it creates the file: the
    umask is never read, since reading it means setting it, which is process-wide and races with
    other threads creating files.

    Args:
        parent: the folder (must exist).
        prefix: start of the name (``.name.`` keeps it hidden and names what it will become).
        suffix: end of the name.

    Returns:
        The descriptor, open for writing (the caller closes it), and the path.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # O_EXCL: never an existing file or a symlink
    return _create_fresh(Path(parent), prefix, suffix, lambda p: (os.open(p, flags, 0o666), p))


def new_temp_dir(parent: str | Path, *, prefix: str, suffix: str) -> Path:
    """Create an empty folder under a fresh random name in ``parent``, as ``tempfile.mkdtemp``
    does but with the mode a plain ``mkdir()`` gives (0o777 less the umask) instead of 0o700.

    See :func:`new_temp_file` for the arguments and why the umask is not read.
    """

    def mkdir(path: Path) -> Path:
        os.mkdir(path, 0o777)
        return path

    return _create_fresh(Path(parent), prefix, suffix, mkdir)


def default_modes(folder: str | Path) -> tuple[int, int]:
    """Permission bits that a plain ``open()`` and ``mkdir()`` in ``folder`` give now.

    Found with empty probes (created, looked at, removed), not by reading the umask, for the
    reason in :func:`new_temp_file`; they also see a default ACL on ``folder``.

    Returns:
        (file mode, folder mode), e.g. (0o644, 0o755) under umask 022.
    """
    fd, path = new_temp_file(folder, prefix=".mode-probe.", suffix=".tmp")
    try:
        file_mode = stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        path.unlink()
    probe = new_temp_dir(folder, prefix=".mode-probe.", suffix=".tmp")
    try:
        return file_mode, stat.S_IMODE(probe.stat().st_mode)
    finally:
        probe.rmdir()


def follow_umask(folder: str | Path) -> list[Path]:
    """Give what this process just wrote under ``folder`` the modes a plain ``open()``/``mkdir()``
    gives there (executable files get the folder mode, as a new script would).

    Some writers ignore the umask: safetensors >= 0.8 writes through a 0o600 temporary file and
    renames it (safetensors issue 782), so every ``save_pretrained`` leaves a private shard.
    Files with other hard links are left as they are: their mode is shared with another path (a
    teacher shard linked into a student) and a chmod would change it there too. Symlinks too.

    A filesystem that refuses the chmod gets a warning, not an error: the data is complete.

    Returns:
        The paths whose mode was changed.
    """
    folder = Path(folder)
    file_mode, dir_mode = default_modes(folder)
    changed = []
    for path in [folder, *folder.rglob("*")]:
        st = path.lstat()
        if stat.S_ISDIR(st.st_mode):
            want = dir_mode
        elif stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
            want = dir_mode if st.st_mode & stat.S_IXUSR else file_mode
        else:
            continue
        if stat.S_IMODE(st.st_mode) == want:
            continue
        try:
            path.chmod(want)
        except OSError as exc:
            log.warning("cannot give %s the mode %o (%s); others may not read it", path, want, exc)
            continue
        changed.append(path)
    return changed


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder, fsync, then rename (the file
    gets the umask's mode, as a plain ``open()`` would give it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    ``overwrite`` an existing ``final`` is replaced only after the new one is complete. What it
    holds gets the umask's modes (see :func:`follow_umask`), whatever library wrote it.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final} already exists; remove it or choose another output")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(final.parent, prefix=f".{final.name}.", suffix=".partial")
    try:
        yield tmp
        follow_umask(tmp)
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
