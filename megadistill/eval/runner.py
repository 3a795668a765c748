"""`megadistill eval`: teacher vs student through lm-eval (+ NIAH), then the report."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from megadistill.errors import MegadistillError
from megadistill.eval.lmeval import EvalSettings, evaluate_pair
from megadistill.eval.positions import HeldoutSet
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
    niah_trials: int | None = None,
    heldout: Sequence[HeldoutSet] = (),
    positions_max_length: int | None = None,
    positions_window: int | None = None,
    floor: bool | None = None,
) -> Path:
    """Evaluate, probe and write ``results.json``, ``report.md`` and the PNGs.

    Args:
        teacher, student: model folders.
        settings: lm-eval settings.
        out_dir: new folder for the results.
        cache_dir: teacher cache (lm-eval results, and the teacher's and floor's position NLLs).
        ppl_documents: held-out documents for the perplexity task.
        niah_lengths: needle-probe context lengths (none: no probe).
        niah_trials: needle trials per depth (default: enough for 20 probes per length).
        heldout: held-out sets scored by position (see :mod:`megadistill.eval.heldout`).
        positions_max_length: tokens scored per held-out document (default: ``max_length``).
        positions_window: W of the position buckets (default: the student's window).
        floor: add the SWA floor (default: when the student is a hybrid).

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    if (out_dir / "results.json").exists():
        raise MegadistillError(f"{out_dir} already holds results.json: pick a new --out folder")
    if heldout:  # fail before the long lm-eval run, not after it
        from megadistill.eval.heldout import resolve_window

        positions_window = resolve_window(student, positions_window)
    results = evaluate_pair(
        teacher, student, settings, cache_dir=cache_dir, ppl_documents=ppl_documents
    )
    if heldout:
        from megadistill.eval.heldout import evaluate_positions

        results["positions"] = evaluate_positions(
            teacher,
            student,
            heldout,
            max_length=positions_max_length or settings.max_length,
            window=positions_window,
            floor=floor,
            cache_dir=cache_dir,
        )
    if niah_lengths:
        from megadistill.eval.niah import niah_pair

        kwargs = {} if niah_trials is None else {"num_trials": niah_trials}
        results["niah"] = niah_pair(teacher, student, niah_lengths, seed=settings.seed, **kwargs)
    return write_report(results, out_dir)
