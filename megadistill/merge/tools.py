"""Checkpoint tools beside the merge: inspect a checkpoint, convert it to a universal checkpoint."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from megadistill.errors import CheckpointError, MegadistillError
from megadistill.integrity import MANIFEST, atomic_dir, verify_manifest
from megadistill.merge.zero_reader import META_FILE, ZeroCheckpoint, resolve_tag_dir

log = logging.getLogger(__name__)


def _tag_dirs(path: Path) -> tuple[list[Path], str | None]:
    """Tag folders under a checkpoint folder (or the tag folder itself) and the ``latest`` tag."""
    latest_file = path / "latest"
    latest = latest_file.read_text().strip() if latest_file.is_file() else None
    if any(path.glob("zero_pp_rank_*_model_states.pt")):
        return [path], None
    # every visible folder: a tag half deleted by an interrupted prune (or half copied) is listed
    # as incomplete, not silently left out
    tags = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    return tags, latest


def inspect_tag(tag_dir: Path, *, verify: bool = False, tensors: bool = False) -> dict[str, Any]:
    """Facts about one tag folder: step, ranks, files, tensors, sizes, integrity.

    Args:
        tag_dir: the tag folder.
        verify: hash every file against ``checksums.json`` (reads all bytes).
        tensors: include every tensor's shape, dtype and kind.
    """
    info: dict[str, Any] = {"tag": tag_dir.name, "path": str(tag_dir)}
    info["files"] = {p.name: p.stat().st_size for p in sorted(tag_dir.iterdir()) if p.is_file()}
    info["bytes"] = sum(info["files"].values())
    meta_path = tag_dir / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    info.update({k: meta.get(k) for k in ("step", "fingerprint", "version", "git_revision")})
    if not any(tag_dir.glob("*_model_states.pt")):
        info["integrity"] = "incomplete (no model states: half deleted or half written)"
    elif not (tag_dir / MANIFEST).is_file():
        info["integrity"] = "incomplete (no checksums.json)"
    elif verify:
        try:
            verify_manifest(tag_dir)
            info["integrity"] = "ok (verified)"
        except CheckpointError as exc:
            info["integrity"] = f"CORRUPT: {exc}"
    else:
        info["integrity"] = "complete (not verified; pass --verify)"
    try:
        with ZeroCheckpoint(tag_dir, verify=False) as ckpt:
            specs = list(ckpt.specs.values())
            info["world_size"] = ckpt.world_size
            info["num_tensors"] = len(specs)
            info["num_params"] = sum(s.numel() for s in specs if s.kind != "buffer")
            info["num_trainable"] = sum(s.numel() for s in specs if s.kind == "trainable")
            info["tied"] = dict(ckpt.aliases)
            if tensors:
                info["tensors"] = {s.name: [list(s.shape), str(s.dtype), s.kind] for s in specs}
    except MegadistillError as exc:
        info["error"] = str(exc)
    return info


def inspect_checkpoint(
    path: str | Path, *, verify: bool = False, tensors: bool = False
) -> dict[str, Any]:
    """Facts about every tag of a checkpoint folder (or about one tag folder).

    Raises:
        CheckpointError: ``path`` is not a folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    tags, latest = _tag_dirs(path)
    return {
        "path": str(path),
        "latest": latest,
        "tags": [inspect_tag(t, verify=verify, tensors=tensors) for t in tags],
    }


def format_inspection(report: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint`'s report."""
    lines = [f"checkpoint {report['path']}  latest: {report['latest']}"]
    for tag in report["tags"]:
        lines.append(
            f"  {tag['tag']}: step {tag.get('step')}  ranks {tag.get('world_size', '?')}  "
            f"{tag['bytes'] / 2**20:.1f} MiB  {tag['integrity']}"
        )
        if "error" in tag:
            lines.append(f"    ERROR: {tag['error']}")
        else:
            lines.append(
                f"    {tag['num_tensors']} tensors, {tag['num_params']:,} params "
                f"({tag['num_trainable']:,} trainable)  fingerprint {str(tag['fingerprint'])[:12]}"
            )
        for name, size in tag["files"].items():
            lines.append(f"    {size:>14,}  {name}")
        for name, (shape, dtype, kind) in tag.get("tensors", {}).items():
            lines.append(f"    {name}  {shape}  {dtype}  {kind}")
    return "\n".join(lines)


def _universal_args(tag_dir: Path, out: Path, num_workers: int) -> argparse.Namespace:
    """What ``ds_to_universal``'s command line would parse: its ``main`` takes only a Namespace
    (a private entry point, see megadistill/compat.py; the test checks these are its options)."""
    return argparse.Namespace(
        input_folder=str(tag_dir),
        output_folder=str(out),
        num_extract_workers=num_workers,
        num_merge_workers=num_workers,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )


def to_universal(
    checkpoint: str | Path,
    out: str | Path | None = None,
    *,
    tag: str | None = None,
    num_workers: int = 1,
    verify: bool = True,
) -> Path:
    """Convert a ZeRO checkpoint tag to DeepSpeed's universal format (``ds_to_universal``).

    Args:
        checkpoint: checkpoint folder (``latest`` picks the tag) or a tag folder.
        out: output folder; default ``<ckpt_dir>/<tag>_universal``. Written atomically, with
            the tag's ``megadistill.json`` copied in and a checksum manifest.
        tag: explicit tag inside ``checkpoint``.
        num_workers: extraction / merge worker processes.
        verify: check ``checksums.json`` first.

    Load it with ``"checkpoint": {"load_universal": true}`` in the DeepSpeed config.
    """
    from deepspeed.checkpoint import ds_to_universal

    tag_dir = resolve_tag_dir(checkpoint, tag)
    if verify:
        verify_manifest(tag_dir)
    out = Path(out) if out is not None else tag_dir.with_name(f"{tag_dir.name}_universal")
    with atomic_dir(out) as tmp:
        ds_to_universal.main(_universal_args(tag_dir, tmp, num_workers))
        if (tag_dir / META_FILE).is_file():
            shutil.copyfile(tag_dir / META_FILE, tmp / META_FILE)
    log.info("universal checkpoint written to %s", out)
    return out
