"""Crash-safe ZeRO-3 checkpoints with metadata, checksums and exact resume.

Layout (the contract the merge tool reads)::

    <ckpt_dir>/latest                 name of the newest complete tag (written last, atomically)
    <ckpt_dir>/<tag>/                 engine.save_checkpoint output (model/optimizer shards)
    <ckpt_dir>/<tag>/rank_state_RRRRR.pt   per-rank client state: step, data position, RNG states
    <ckpt_dir>/<tag>/megadistill.json format, tag, step, world_size, fingerprint, model_config,
                                      config, version, git_revision, tokenizer
    <ckpt_dir>/<tag>/checksums.json   sha256 of every file in the tag folder

Every rank writes into ``<ckpt_dir>/.<tag>.partial``; after a barrier the ranks hash the files in
parallel, rank 0 writes the metadata and manifest, renames the folder to ``<tag>`` and only then
updates ``latest``. A crash at any point leaves the previous checkpoint and ``latest`` untouched.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import megadistill
from megadistill.engine.distributed import all_gather_objects, barrier, rank, world_size
from megadistill.errors import CheckpointError
from megadistill.integrity import MANIFEST, atomic_write_json, atomic_write_text, sha256_file

log = logging.getLogger(__name__)

FORMAT = 1
META_FILE = "megadistill.json"
LATEST_FILE = "latest"
TAG_RE = re.compile(r"^step_(\d{8})$")
# Keys of an HF config dict that may differ between otherwise identical models.
_VOLATILE_MODEL_KEYS = {"transformers_version", "_name_or_path", "torch_dtype", "dtype"}


@dataclass(kw_only=True)
class CheckpointMeta:
    """What a checkpoint records about where it came from (written into megadistill.json)."""

    fingerprint: str
    """sha256 of the initial student weights the run started from."""
    model_config: dict[str, Any]
    """HF config dict of the student."""
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved run config."""
    tokenizer: str | None = None
    """Tokenizer path, or None."""
    config_keys_must_match: tuple[str, ...] = ()
    """Dotted keys of ``config`` that a resume must not change (e.g. 'data.global_batch_size')."""


@dataclass
class ResumeState:
    """What :func:`load_checkpoint` hands back to the trainer."""

    tag: str
    step: int
    data_state: Any
    extra: dict[str, Any]


def tag_for_step(step: int) -> str:
    """Tag name of the checkpoint after ``step`` optimizer steps (``step_00000120``)."""
    return f"step_{step:08d}"


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Tags under ``ckpt_dir`` that have a manifest, oldest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if TAG_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The tag named in ``<ckpt_dir>/latest``, or None when there is none."""
    path = Path(ckpt_dir) / LATEST_FILE
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    """RNG states of python, numpy and torch (CPU and, when present, every CUDA device)."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- save
def _hash_share(folder: Path) -> dict[str, str]:
    """This rank's share of the folder's sha256 sums (files are fsynced while read)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    out = {}
    for i, path in enumerate(files):
        if i % world_size() == rank():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
            out[str(path.relative_to(folder))] = sha256_file(path)
    return out


def _distributed_manifest(folder: Path) -> None:
    """All ranks hash a share of ``folder``; rank 0 writes ``checksums.json``."""
    shares = all_gather_objects(_hash_share(folder))
    if rank() == 0:
        files = {k: v for share in shares for k, v in share.items()}  # type: ignore[union-attr]
        atomic_write_json(
            folder / MANIFEST, {"algorithm": "sha256", "files": dict(sorted(files.items()))}
        )


def _write_meta(folder: Path, tag: str, step: int, meta: CheckpointMeta) -> None:
    atomic_write_json(
        folder / META_FILE,
        {
            "format": FORMAT,
            "tag": tag,
            "step": step,
            "world_size": world_size(),
            "fingerprint": meta.fingerprint,
            "model_config": json.loads(json.dumps(meta.model_config, default=str)),
            "config": json.loads(json.dumps(meta.config, default=str)),
            "version": megadistill.__version__,
            "git_revision": megadistill.git_revision(),
            "tokenizer": meta.tokenizer,
        },
    )


def _publish(root: Path, partial: Path, tag: str) -> Path:
    """Rename the finished folder to ``tag`` and point ``latest`` at it (rank 0)."""
    final = root / tag
    if final.exists():
        old = root / f".{tag}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(partial, final)
    atomic_write_text(root / LATEST_FILE, tag)
    return final


def prune_checkpoints(ckpt_dir: str | Path, keep_last: int) -> list[str]:
    """Delete all but the newest ``keep_last`` complete tags, stale partial folders and temporary
    ``latest`` files.

    Returns:
        The tags removed.
    """
    root = Path(ckpt_dir)
    for stale in root.glob(".step_*.partial"):
        shutil.rmtree(stale, ignore_errors=True)
    for stale in root.glob(f".{LATEST_FILE}.*.tmp"):  # a write of `latest` cut short
        stale.unlink(missing_ok=True)
    if keep_last <= 0:
        return []
    tags = complete_tags(root)
    keep = set(tags[-keep_last:]) | {latest_tag(root)}
    removed = [t for t in tags if t not in keep]
    for tag in removed:
        shutil.rmtree(root / tag, ignore_errors=True)
    return removed


def save_checkpoint(
    engine: Any,
    ckpt_dir: str | Path,
    step: int,
    meta: CheckpointMeta,
    *,
    data_state: Any = None,
    extra: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write a complete, checksummed checkpoint of ``engine`` after ``step`` steps (all ranks).

    Args:
        engine: the DeepSpeed engine (every rank must call this in lockstep).
        ckpt_dir: the run's checkpoint folder.
        step: optimizer steps done.
        meta: provenance written into megadistill.json.
        data_state: this rank's data loader ``state_dict()``.
        extra: any further picklable per-rank client state.
        keep_last: complete checkpoints to keep (older ones are deleted; <= 0 keeps all).

    Returns:
        The final tag folder.
    """
    root = Path(ckpt_dir)
    tag = tag_for_step(step)
    partial = root / f".{tag}.partial"
    if rank() == 0:
        shutil.rmtree(partial, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    barrier()
    try:
        engine.save_checkpoint(
            str(root), tag=partial.name, client_state={"megadistill_step": step}, save_latest=False
        )
        torch.save(
            {"step": step, "data_state": data_state, "rng": rng_state(), "extra": extra or {}},
            partial / f"rank_state_{rank():05d}.pt",
        )
        if rank() == 0:
            _write_meta(partial, tag, step, meta)
        barrier()
        _distributed_manifest(partial)
        final = root / tag
        if rank() == 0:
            final = _publish(root, partial, tag)
    except (OSError, RuntimeError) as exc:
        if not _disk_full(exc, root):
            raise
        shutil.rmtree(partial, ignore_errors=True)  # give the space back
        raise CheckpointError(_disk_full_message(root, tag)) from None
    if rank() == 0:
        removed = prune_checkpoints(root, keep_last)
        log.info("checkpoint %s written%s", final, f" (removed {removed})" if removed else "")
    barrier()
    return final


_DISK_FULL_TEXT = ("No space left", "Disk quota exceeded", "unexpected pos", "file write failed")
"""How a full disk shows in the RuntimeErrors of torch.save (PyTorchFileWriter) and DeepSpeed."""


def _disk_full(exc: BaseException, root: Path) -> bool:
    """Whether ``exc`` (raised while writing a checkpoint under ``root``) means the disk is full."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if any(text in str(exc) for text in _DISK_FULL_TEXT):
        return True
    try:  # an error of another kind while the disk has (almost) no room left
        return shutil.disk_usage(root).free < (1 << 20)
    except OSError:
        return False


def _disk_full_message(root: Path, tag: str) -> str:
    usage = shutil.disk_usage(root)
    previous = latest_tag(root)
    kept = (
        f"the previous checkpoint {root / previous} is intact"
        if previous
        else "no earlier checkpoint"
    )
    return (
        f"checkpoint {tag} could not be written to {root}: the disk is full "
        f"({_size(usage.free)} free of {_size(usage.total)}); {kept}; free space or set "
        "trainer.checkpoint_dir to a larger disk, then resume"
    )


def _size(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if num < 1024 or unit == "TiB":
            return f"{num:.1f} {unit}" if unit != "B" else f"{int(num)} B"
        num /= 1024
    return f"{num:.1f} TiB"


# ----------------------------------------------------------------------------- load
def _verify_share(folder: Path) -> str | None:
    """Check this rank's share of the manifest; return an error message or None."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{folder} has no {MANIFEST}: it was not written completely"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return f"{manifest} is corrupt ({exc})"
    for i, (rel, expected) in enumerate(sorted(files.items())):
        if i % world_size() != rank():
            continue
        path = folder / rel
        if not path.is_file():
            return f"file {rel} listed in {MANIFEST} is missing from {folder}"
        actual = sha256_file(path)
        if actual != expected:
            return f"file {folder / rel} is corrupt (sha256 {actual[:12]} != {expected[:12]})"
    return None


def verify_checkpoint(ckpt_dir: str | Path, tag: str) -> None:
    """Verify every checksum of ``<ckpt_dir>/<tag>``, shared across ranks (a collective).

    Raises:
        CheckpointError: on every rank, naming the bad file and the other complete tags.
    """
    root = Path(ckpt_dir)
    errors = [e for e in all_gather_objects(_verify_share(root / tag)) if e]
    if errors:
        others = [t for t in complete_tags(root) if t != tag]
        hint = (
            f"resume from an earlier checkpoint with resume_tag={others[-1]} (complete tags: "
            f"{', '.join(others)})"
            if others
            else "no other complete checkpoint exists; start the run again"
        )
        raise CheckpointError(f"checkpoint {root / tag} failed verification: {errors[0]}; {hint}")


def _get_dotted(data: dict[str, Any], key: str) -> Any:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return "<missing>"
        node = node[part]
    return node


def check_compatible(saved: dict[str, Any], expected: CheckpointMeta, where: Path) -> None:
    """Refuse a checkpoint written from other weights, another model, world size or config."""
    if saved.get("format") != FORMAT:
        raise CheckpointError(
            f"{where}: checkpoint format {saved.get('format')!r} is not {FORMAT}; "
            "it was written by another megadistill version"
        )
    if saved.get("fingerprint") != expected.fingerprint:
        raise CheckpointError(
            f"{where}: checkpoint started from weights {str(saved.get('fingerprint'))[:12]} but this "
            f"run starts from {expected.fingerprint[:12]}; use the same converted student (seed) "
            "or a fresh checkpoint_dir"
        )
    if saved.get("world_size") != world_size():
        raise CheckpointError(
            f"{where}: checkpoint has ZeRO shards for world_size={saved.get('world_size')} but this "
            f"run has {world_size()} ranks; resume with {saved.get('world_size')} ranks"
        )
    old = {
        k: v for k, v in (saved.get("model_config") or {}).items() if k not in _VOLATILE_MODEL_KEYS
    }
    # compare in JSON form: the saved dict went through JSON (int keys became strings)
    current = json.loads(json.dumps(expected.model_config, default=str))
    new = {k: v for k, v in current.items() if k not in _VOLATILE_MODEL_KEYS}
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if diff:
        key = diff[0]
        raise CheckpointError(
            f"{where}: model config differs from this run's at {', '.join(diff)} "
            f"(checkpoint {key}={old.get(key)!r}, run {key}={new.get(key)!r})"
        )
    for key in expected.config_keys_must_match:
        now = _get_dotted(json.loads(json.dumps(expected.config, default=str)), key)
        was = _get_dotted(saved.get("config") or {}, key)
        if was != now:
            raise CheckpointError(
                f"{where}: config {key}={now!r} but the checkpoint was written with {was!r}; "
                f"set {key}={was!r} to resume or start a fresh checkpoint_dir"
            )


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The megadistill.json of a tag folder."""
    path = Path(folder) / META_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {META_FILE}; it is not a megadistill checkpoint")
    return json.loads(path.read_text())


def load_checkpoint(
    engine: Any, ckpt_dir: str | Path, expected: CheckpointMeta, *, tag: str | None = None
) -> ResumeState:
    """Verify, check and load a checkpoint into ``engine``; restore this rank's RNG states.

    Args:
        engine: a freshly built engine of the same model (every rank calls this in lockstep).
        ckpt_dir: the run's checkpoint folder.
        expected: the current run's provenance; a mismatch raises.
        tag: a specific tag; default: the one named in ``latest``.

    Raises:
        CheckpointError: missing, incomplete, corrupt or incompatible checkpoint.
    """
    root = Path(ckpt_dir)
    tag = tag or latest_tag(root)
    if tag is None:
        raise CheckpointError(f"{root} has no '{LATEST_FILE}' file: there is nothing to resume")
    if not (root / tag).is_dir():
        raise CheckpointError(
            f"checkpoint {root / tag} does not exist; complete: {complete_tags(root)}"
        )
    verify_checkpoint(root, tag)
    check_compatible(read_meta(root / tag), expected, root / tag)
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {root / tag}")
    state_file = root / tag / f"rank_state_{rank():05d}.pt"
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: the checkpoint lacks this rank's state")
    # our own file, verified above; it holds numpy RNG state, which weights_only refuses
    state = torch.load(state_file, map_location="cpu", weights_only=False)
    set_rng_state(state["rng"])
    log.info("resumed from %s at step %d", root / tag, state["step"])
    return ResumeState(
        tag=tag, step=state["step"], data_state=state["data_state"], extra=state["extra"]
    )
