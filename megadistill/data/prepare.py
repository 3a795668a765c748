"""``megadistill prepare-data``: tokenise and pack a recipe's data once, before the training job.

Run it on one machine (e.g. a login node) so that training ranks start on a cache hit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from megadistill.config import ConfigError, apply_overrides, from_dict, load_yaml
from megadistill.data.config import DataConfig
from megadistill.data.packing import PackedDataset, prepare_packed


def prepare_from_recipe(recipe: str | Path | None, overrides: list[str]) -> dict[str, Any]:
    """Build the cache of a stage recipe's ``data`` section with its ``student``'s tokenizer.

    Args:
        recipe: a stage YAML (the keys ``data`` and ``student`` are read; others are ignored).
        overrides: dotted overrides (``data.seq_len=4096``, ``student=/path``).

    Returns:
        A summary: cache folder, fingerprint, tokens/documents/samples per split, sources.
    """
    from transformers import AutoTokenizer

    raw = apply_overrides(load_yaml(recipe) if recipe else {}, overrides)
    if "data" not in raw:
        raise ConfigError("the recipe has no 'data' section; add one or pass data.* overrides")
    tokenizer_dir = raw.get("student") or raw.get("teacher")
    if not tokenizer_dir:
        raise ConfigError(
            "the recipe names no 'student' (or 'teacher') folder to take the tokenizer from; "
            "add student=/path/to/model"
        )
    cfg = from_dict(DataConfig, raw["data"], "data.")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    path = prepare_packed(cfg, tokenizer)
    meta = PackedDataset(path, tokenizer=tokenizer, verify=cfg.verify_cache).meta
    return {
        "cache": str(path),
        "fingerprint": meta["fingerprint"],
        "splits": meta["splits"],
        "sources": meta["sources"],
    }
