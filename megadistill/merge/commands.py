"""Argument parsing for the merge and checkpoint commands, shared by ``megadistill`` and ``tools/``.

Each command is an ``add_*_args(parser)`` / ``run_*(args)`` pair: ``megadistill/cli.py`` registers
them as subcommands and ``tools/*.py`` wrap them as standalone scripts.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from megadistill.config import ConfigError, from_dict, load_yaml, parse_csv, parse_size
from megadistill.errors import CheckpointError

# torch and the merge library are imported inside the functions: building the CLI parser stays
# fast.

# Where the pipeline's expert job leaves its final (stage II) checkpoint inside an expert folder.
_EXPERT_SUBDIRS = ("", "distill", "distill/checkpoints", "checkpoints")


def add_merge_args(p: argparse.ArgumentParser, *, single: bool = False) -> None:
    """Options of ``merge`` (and of ``consolidate`` with ``single``)."""
    if single:
        p.add_argument("checkpoint", help="ZeRO-3 checkpoint folder (uses 'latest') or tag folder")
        p.add_argument("--tag", help="explicit tag inside the checkpoint folder")
    else:
        p.add_argument("experts", nargs="*", help="expert checkpoint folders or tag folders")
        p.add_argument("--config", help="merge settings YAML written by the pipeline")
        p.add_argument("--weights", help="comma-separated lambda_i (default uniform)")
        p.add_argument("--method", choices=["average", "task_arithmetic", "ties"])
        p.add_argument("--base", help="initial weights theta_0 (task_arithmetic, ties)")
        p.add_argument("--scaling", type=float, help="task-vector scale (default 1)")
        p.add_argument("--density", type=float, help="TIES: fraction kept (default 0.2)")
    p.add_argument("--out", required=True, help="output Hugging Face folder")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--max-shard-size", help="safetensors shard size, e.g. 2GB (default)")
    p.add_argument("--tokenizer", help="tokenizer folder to copy (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")


def _expert_checkpoint(path: str) -> str:
    from megadistill.merge.zero_reader import resolve_tag_dir

    for sub in _EXPERT_SUBDIRS:
        candidate = Path(path, sub)
        try:
            resolve_tag_dir(candidate)
            return str(candidate)
        except CheckpointError:
            continue
    return path  # merge_experts reports what is wrong with it


def merge_config_from_args(args: argparse.Namespace) -> Any:
    """Build the :class:`~megadistill.merge.merge.MergeConfig` from a pipeline YAML and/or flags."""
    from megadistill.merge.merge import MergeConfig

    data: dict[str, Any] = {}
    if getattr(args, "config", None):
        step = load_yaml(args.config)
        data.update(step.get("merge") or {})
        experts = step.get("experts") or []
        data["experts"] = [_expert_checkpoint(e["checkpoint"]) for e in experts]
        if experts and all(e.get("weight") is not None for e in experts):
            data["weights"] = [float(e["weight"]) for e in experts]
    if getattr(args, "checkpoint", None):
        data.update(experts=[args.checkpoint], weights=[1.0], tags=[args.tag] if args.tag else [])
    elif getattr(args, "experts", None):
        data["experts"] = list(args.experts)
    if getattr(args, "weights", None):
        data["weights"] = parse_csv(args.weights, float, "--weights")
    for key in ("method", "base", "scaling", "density", "dtype", "tokenizer"):
        if getattr(args, key, None) is not None:
            data[key] = getattr(args, key)
    if args.max_shard_size:
        data["max_shard_bytes"] = parse_size(args.max_shard_size)
    data.update(out=args.out, overwrite=args.overwrite, verify=not args.no_verify)
    return from_dict(MergeConfig, data, "merge.")


def run_merge(args: argparse.Namespace) -> int:
    """``merge`` / ``consolidate``: write the Hugging Face folder."""
    from megadistill.merge.merge import merge_experts

    out = merge_experts(merge_config_from_args(args))
    print(out)
    return 0


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder or tag folder")
    p.add_argument("--verify", action="store_true", help="hash every file against checksums.json")
    p.add_argument("--tensors", action="store_true", help="list every tensor")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_inspect(args: argparse.Namespace) -> int:
    """``inspect-ckpt``: print tags, steps, ranks, tensors, sizes and integrity."""
    from megadistill.merge.tools import format_inspection, inspect_checkpoint

    report = inspect_checkpoint(args.checkpoint, verify=args.verify, tensors=args.tensors)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    bad = [t for t in report["tags"] if "error" in t or t["integrity"].startswith("CORRUPT")]
    return 1 if bad else 0


def add_universal_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint folder (uses 'latest') or tag folder")
    p.add_argument("--tag", help="explicit tag inside the checkpoint folder")
    p.add_argument("--out", help="output folder (default <ckpt_dir>/<tag>_universal)")
    p.add_argument("--num-workers", type=int, default=1, help="worker processes")
    p.add_argument("--no-verify", action="store_true", help="skip checksum verification")


def run_universal(args: argparse.Namespace) -> int:
    """``to-universal``: DeepSpeed universal checkpoint of one tag."""
    from megadistill.merge.tools import to_universal

    out = to_universal(
        args.checkpoint,
        args.out,
        tag=args.tag,
        num_workers=args.num_workers,
        verify=not args.no_verify,
    )
    print(out)
    return 0


def tool_main(description: str, add_args: Any, run: Any, argv: list[str] | None = None) -> int:
    """Entry point of a ``tools/*.py`` script: parse, set up logging, run, one-line errors."""
    import sys

    from megadistill.errors import MegadistillError
    from megadistill.logs import setup_logging

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_args(parser)
    args = parser.parse_args(argv)
    setup_logging(debug=args.verbose)
    try:
        return run(args)
    except (ConfigError, MegadistillError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
