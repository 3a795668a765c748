"""Held-out sets for `megadistill eval`: parse ``NAME:in|out:PATH``, score teacher / floor /
student by position (:mod:`megadistill.eval.positions`), cache the teacher's and the floor's NLLs.

The floor is the teacher converted with its gate fixed to sliding-window attention at the
student's window and sink count (no mLSTM, no kept softmax layers, no training): what the
student would be if its recurrent branch carried nothing. Its per-token NLLs, like the teacher's,
depend only on the teacher, the documents and the settings, so both are cached on disk keyed by
the teacher's content fingerprint, the token ids scored and (floor) W and the sinks.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError
from megadistill.eval.positions import HeldoutSet, set_windows, summarize_positions, token_nll
from megadistill.integrity import atomic_write_json

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
HELDOUT_SPEC = "NAME:in|out:PATH (e.g. kjv:out:kjv.jsonl)"


def parse_heldout(specs: Sequence[str]) -> list[HeldoutSet]:
    """``["kjv:out:kjv.jsonl", ...]`` -> held-out sets; a ``.jsonl`` file gives one document per
    line (``text``), any other text file one document."""
    from megadistill.eval.runner import read_documents

    sets, seen = [], set()
    for spec in specs:
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[0] or parts[1] not in ("in", "out") or not parts[2]:
            raise MegadistillError(f"--heldout {spec!r}: expected {HELDOUT_SPEC}")
        name, domain, path = parts
        if name in seen:
            raise MegadistillError(f"--heldout: the set name {name!r} is given twice")
        seen.add(name)
        desc = f"{'in-domain' if domain == 'in' else 'out-of-domain'}, {Path(path).name}"
        docs = tuple(read_documents([path]))
        if not docs:
            raise MegadistillError(f"--heldout {spec!r}: {path} holds no document")
        sets.append(HeldoutSet(name=name, domain=domain, documents=docs, description=desc))  # type: ignore[arg-type]
    return sets


def _read_config(path: str | Path) -> dict[str, Any]:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise MegadistillError(f"{path} has no config.json: pass a Hugging Face model folder")
    return json.loads(file.read_text())


def resolve_window(student: str | Path, window: int | None) -> int:
    """The W of the position buckets: ``window`` if given, else the hybrid student's window."""
    cfg = _read_config(student)
    if window is None and cfg.get("model_type") == "megadistill_hybrid":
        window = cfg.get("window")
    if not window or window < 1:
        raise MegadistillError(
            f"{student} has no sliding window: pass --positions-window W for the bucket edges"
        )
    return int(window)


def _cache_key(model_key: str, windows: Sequence[Sequence[int]]) -> str:
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{model_key}\0".encode())
    digest.update(json.dumps([list(w) for w in windows]).encode())
    return digest.hexdigest()[:32]


def _tokenize(tokenizer: Any, sets: Sequence[HeldoutSet], max_length: int):
    return {hs.name: set_windows(tokenizer, hs, max_length) for hs in sets}


def _score_role(
    role: str,
    model_key: str | None,
    loader: Any,
    windows: dict[str, list[list[int]]],
    cache_dir: Path | None,
) -> tuple[dict[str, list[list[float]]], bool]:
    """Per-token NLLs of one model on every set; from the cache where ``model_key`` is given."""
    files = {}
    out: dict[str, list[list[float]]] = {}
    if cache_dir is not None and model_key is not None:
        for name, w in windows.items():
            files[name] = cache_dir / f"positions-{_cache_key(model_key, w)}.json"
            if files[name].is_file():
                out[name] = json.loads(files[name].read_text())["nll"]
    missing = [name for name in windows if name not in out]
    if missing:
        model = loader()
        for name in missing:
            log.info("positions: %s on %s (%d documents)", role, name, len(windows[name]))
            out[name] = token_nll(model, windows[name])
            if name in files:
                atomic_write_json(files[name], {"role": role, "nll": out[name]})
        del model
    return out, not missing


def evaluate_positions(
    teacher: str | Path,
    student: str | Path,
    sets: Sequence[HeldoutSet],
    *,
    max_length: int,
    window: int | None = None,
    floor: bool | None = None,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Loss by position of teacher, student and (optionally) the SWA floor on ``sets``.

    Args:
        teacher: teacher model folder.
        student: student model folder.
        sets: held-out sets (see :func:`parse_heldout`).
        max_length: tokens scored per document.
        window: bucket edges start at W (default: the student's window; required when the
            student has none).
        floor: add the SWA floor (default: when the student is a hybrid).
        cache_dir: where the teacher's and the floor's NLLs are cached (None: no cache).

    Returns:
        The ``positions`` entry of results.json (:func:`positions.summarize_positions`) plus
        ``floor`` (its settings or None) and ``cached`` (per model, whether read from disk).
    """
    from megadistill.eval.lmeval import load_model, model_fingerprint
    from megadistill.model import load_tokenizer

    cfg = _read_config(student)
    hybrid = cfg.get("model_type") == "megadistill_hybrid"
    window = resolve_window(student, window)
    floor = hybrid if floor is None else floor
    tokenizer = load_tokenizer(str(teacher))
    windows = _tokenize(tokenizer, sets, max_length)
    student_windows = _tokenize(load_tokenizer(str(student)), sets, max_length)
    if student_windows != windows:
        raise MegadistillError(
            f"teacher {teacher} and student {student} tokenize the held-out text differently"
        )
    fp = model_fingerprint(teacher)
    teacher_key = f"teacher:{fp}"
    nll: dict[str, dict[str, list[list[float]]]] = {hs.name: {} for hs in sets}
    cached: dict[str, bool] = {}
    floor_settings = None
    roles: list[tuple[str, str | None, Any]] = [
        ("teacher", teacher_key, lambda: load_model(teacher)[0])
    ]
    if floor:
        sinks = int(cfg.get("num_sinks", 4)) if hybrid else 4
        floor_settings = {"window": int(window), "num_sinks": sinks, "gate_mode": "swa"}
        roles.append(
            ("floor", f"floor:{fp}:{window}:{sinks}", lambda: _floor(teacher, window, sinks))
        )
    roles.append(("student", None, lambda: load_model(student)[0]))
    for role, key, loader in roles:
        by_set, cached[role] = _score_role(role, key, loader, windows, cache_dir)
        for name, values in by_set.items():
            nll[name][role] = values
    doc_tokens = {name: [len(w) for w in ws] for name, ws in windows.items()}
    out = summarize_positions(nll, sets, doc_tokens, window=int(window), max_length=max_length)
    out["floor"] = floor_settings
    out["cached"] = cached
    return out


def _floor(teacher: str | Path, window: int, num_sinks: int) -> Any:
    """The teacher with every attention cut to SWA (``gate_mode='swa'``) at W and the sinks."""
    from megadistill.eval.lmeval import load_model
    from megadistill.teachers.conversion import convert

    model, _ = load_model(teacher)
    floor, _ = convert(model, window=window, num_sinks=num_sinks, gate_mode="swa")
    return floor
