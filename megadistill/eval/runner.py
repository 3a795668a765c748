"""`megadistill eval`: teacher vs student through lm-eval (+ NIAH), then the report."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from megadistill.errors import MegadistillError
from megadistill.eval.lmeval import EvalSettings, evaluate_pair
from megadistill.eval.report import write_report

log = logging.getLogger(__name__)


def read_documents(paths: Sequence[str | Path]) -> list[str]:
    """Held-out documents: a ``.jsonl`` file gives one per line (``text`` field), any other text
    file one document (read by the data sources, so errors name the file and line)."""
    from megadistill.data.config import SourceConfig
    from megadistill.data.sources import iter_documents

    docs: list[str] = []
    for p in paths:
        docs += iter_documents(SourceConfig(path=str(p), txt_documents="file"))
    return docs


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
