"""``megadistill prepare-data``: tokenise and pack a recipe's data once, before the training job.

The pipeline runs it as its ``prepare`` step on CPU nodes; by hand, run it on one machine (e.g. a
login node) so that training ranks start on a cache hit. Unless the recipe sets
``data.num_proc``, it tokenises with one process per CPU of the job.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from megadistill.config import ConfigError, apply_overrides, from_dict, load_yaml
from megadistill.data.config import DataConfig
from megadistill.data.packing import PackedDataset, prepare_packed


def job_cpus() -> int:
    """CPUs of this job: ``SLURM_CPUS_PER_TASK``, else the cores this process may run on."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    return int(slurm) if slurm.isdigit() else len(os.sched_getaffinity(0))


def prepare_from_recipe(recipe: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """Build the cache of a stage recipe's ``data`` section with its ``student``'s tokenizer.

    Args:
        recipe: a stage YAML (the keys ``data`` and ``student`` are read; others are ignored).
        overrides: dotted overrides (``data.seq_len=4096``, ``student=/path``).

    Returns:
        A summary: cache folder, fingerprint, tokens/documents/samples per split, sources.
    """
    from megadistill.model import load_tokenizer

    raw = apply_overrides(load_yaml(recipe) if recipe else {}, overrides)
    if "data" not in raw:
        raise ConfigError("the recipe has no 'data' section; add one or pass data.* overrides")
    tokenizer_dir = raw.get("student") or raw.get("teacher")
    if not tokenizer_dir:
        raise ConfigError(
            "the recipe names no 'student' (or 'teacher') folder to take the tokenizer from; "
            "add student=/path/to/model"
        )
    data = dict(raw["data"])
    data.setdefault("num_proc", job_cpus())
    cfg = from_dict(DataConfig, data, "data.")
    tokenizer = load_tokenizer(str(tokenizer_dir))
    started = time.monotonic()
    path = prepare_packed(cfg, tokenizer)
    meta = PackedDataset(path, tokenizer=tokenizer, verify=cfg.verify_cache).meta
    return {
        "cache": str(path),
        "seconds": round(time.monotonic() - started, 3),
        "num_proc": cfg.num_proc,
        "fingerprint": meta["fingerprint"],
        "splits": meta["splits"],
        "sources": meta["sources"],
    }


MEASURED_TOKENS_PER_S_PER_WORKER = 490_000.0
"""Tokens per CPU-second of one tokenizer process (SmolLM2's BPE on the demo's English text,
256-document batches, ids to uint32), measured in CPU time on this project's shared 2-core
machine, whose wall-clock rates were meaningless under its load (README). The parent process
that reads and writes for all workers is not counted: a source parsed slower than N workers
tokenise (JSON lines, tens of MB/s per core) caps the rate, so the estimate is a lower bound."""

_BYTES_PER_TOKEN = 4 + 0.02
"""uint32 tokens plus ~one int64 document start per 400 tokens."""


def prepare_estimates(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """Estimated time and disk of each task of a pipeline recipe's prepare step.

    Per stage config: the tokens read are ``num_tokens / (1 - heldout_fraction)`` (an upper
    bound: a source smaller than its share is read once and repeated); the time is that over
    ``MEASURED_TOKENS_PER_S_PER_WORKER * resources.prepare.cpus_per_task``; the disk is the cache
    (``tokens * 4`` bytes), twice that while it is being built (the per-source token files).

    Args:
        recipe: the recipe as a mapping (``experts``, ``align``, ``distill``, ``final``,
            ``resources``).

    Returns:
        One row per task: ``task``, ``tokens`` (None if a budget is null), ``seconds``,
        ``cache_bytes``, ``peak_bytes``.
    """
    cpus = int(((recipe.get("resources") or {}).get("prepare") or {}).get("cpus_per_task", 1))
    rate = MEASURED_TOKENS_PER_S_PER_WORKER * cpus

    def stage(section: dict[str, Any] | None, extra: dict[str, Any]) -> float | None:
        data = {**((section or {}).get("data") or {}), **extra}
        if data.get("num_tokens") is None:
            return None
        return float(data["num_tokens"]) / (1.0 - float(data.get("heldout_fraction", 0.0)))

    tasks = [
        (e["name"], [stage(recipe.get(s), e.get("data") or {}) for s in ("align", "distill")])
        for e in recipe["experts"]
    ]
    tasks.append(("final", [stage(recipe.get("final"), {})]))
    rows = []
    for name, tokens in tasks:
        total = None if any(t is None for t in tokens) else sum(tokens)  # type: ignore[arg-type]
        rows.append({
            "task": name,
            "tokens": total,
            "seconds": None if total is None else total / rate,
            "cache_bytes": None if total is None else total * _BYTES_PER_TOKEN,
            "peak_bytes": None if total is None else 2 * total * _BYTES_PER_TOKEN,
        })  # fmt: skip
    return rows


def format_estimates(rows: list[dict[str, Any]], cpus: int) -> str:
    """The prepare step's estimate as lines for ``megadistill plan``."""
    lines = [
        "",
        f"== prepare (CPU array task per expert + final; {cpus} tokenizer process(es) each, "
        f"{MEASURED_TOKENS_PER_S_PER_WORKER:,.0f} tokens/s per process as measured):",
    ]
    for r in rows:
        if r["tokens"] is None:
            lines.append(f"  {r['task']:<12} a null num_tokens reads whole sources: no estimate")
            continue
        lines.append(
            f"  {r['task']:<12} {r['tokens'] / 1e9:7.2f}B tokens  {r['seconds'] / 3600:7.2f} h  "
            f"cache {r['cache_bytes'] / 2**30:7.1f} GiB (peak {r['peak_bytes'] / 2**30:.1f} GiB)"
        )
    known = [r for r in rows if r["tokens"] is not None]
    if known:
        lines.append(
            f"  all tasks side by side: {max(r['seconds'] for r in known) / 3600:.2f} h; "
            f"disk {sum(r['cache_bytes'] for r in known) / 2**30:.1f} GiB of caches"
        )
    return "\n".join(lines)
