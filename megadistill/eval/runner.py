"""`megadistill eval`: teacher vs student through lm-eval (+ NIAH), then the report."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from megadistill.errors import MegadistillError
from megadistill.eval.lmeval import EvalSettings, evaluate_pair
from megadistill.eval.report import write_report

log = logging.getLogger(__name__)


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Held-out documents: a ``.jsonl`` file gives one per line (``text`` field), else one per file."""
    docs: list[str] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise MegadistillError(f"held-out text {p} not found")
        if p.suffix == ".jsonl":
            docs += [
                json.loads(line)["text"] for line in p.read_text().splitlines() if line.strip()
            ]
        else:
            docs.append(p.read_text())
    return [d for d in docs if d.strip()]


def run_eval(
    teacher: str | Path,
    student: str | Path,
    settings: EvalSettings,
    out_dir: str | Path,
    *,
    cache_dir: Path | None,
    ppl_documents: list[str] | None = None,
    niah_lengths: Sequence[int] = (),
) -> Path:
    """Evaluate, probe and write ``results.json``, ``report.md`` and ``recovery.png``.

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists():
        raise MegadistillError(f"{out_dir} already holds results.json: pick a new --out folder")
    results = evaluate_pair(
        teacher, student, settings, cache_dir=cache_dir, ppl_documents=ppl_documents
    )
    if niah_lengths:
        from megadistill.eval.niah import niah_pair

        results["niah"] = niah_pair(teacher, student, niah_lengths, seed=settings.seed)
    return write_report(results, out_dir)
