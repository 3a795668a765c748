"""Several students against one teacher and its SWA floor, by position, in one table.

``megadistill compare-positions`` is the quick loop for stage I choices (feature maps, gates,
softmax layers, ...): each student folder (e.g. a stage's ``final/``) is scored on the same held-out
documents as the teacher and the floor (the teacher cut to the students' window), and the report
puts the headline numbers side by side: the relative NLL gap to the teacher at positions >= 4W and
the share of the floor's gap each student wins back, per held-out set, with standard errors.
Teacher and floor losses are cached by content (model fingerprint, documents, settings).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError
from megadistill.eval.positions import (
    HeldoutSet,
    _mean_se,
    bucket_edges,
    bucket_stats,
)
from megadistill.integrity import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def compare_students(
    teacher: str,
    students: Mapping[str, str],
    sets: Sequence[HeldoutSet],
    *,
    max_length: int = 2048,
    cache_dir: Path | None = None,
) -> dict[str, Any]:
    """Score teacher, floor and every student; returns the comparison (see module docstring)."""
    from megadistill.eval.heldout import _floor, _score_role, _tokenize
    from megadistill.eval.lmeval import load_model, model_fingerprint
    from megadistill.model import load_tokenizer

    if not students:
        raise MegadistillError("pass at least one student NAME=DIR")
    configs = {n: json.loads((Path(d) / "config.json").read_text()) for n, d in students.items()}
    hybrid = {(c.get("window"), c.get("num_sinks")) for c in configs.values()}
    if len(hybrid) != 1 or None in next(iter(hybrid)):
        raise MegadistillError(
            f"students must be hybrids with one window and sink count, got {sorted(hybrid)}"
        )
    window, sinks = next(iter(hybrid))
    windows = _tokenize(load_tokenizer(teacher), sets, max_length)
    settings = {"window": window, "num_sinks": sinks, "max_length": max_length}
    fp = model_fingerprint(teacher)
    # The same cache entries as `megadistill eval --heldout` (teacher and floor only).
    nll = {
        "teacher": _score_role(
            "teacher", f"teacher:{fp}", lambda: load_model(teacher)[0], windows, cache_dir
        )[0],
        "floor": _score_role(
            "floor", f"floor:{fp}:{window}:{sinks}", lambda: _floor(teacher, window, sinks),
            windows, cache_dir,
        )[0],
    }  # fmt: skip
    for name, path in students.items():
        if name in nll:
            raise MegadistillError(f"student name {name!r} is reserved; pick another")
        nll[name] = _score_role(name, None, lambda p=path: load_model(p)[0], windows, None)[0]
    edges = bucket_edges(window, max_length)
    out: dict[str, Any] = {**settings, "students": dict(students), "sets": {}}
    for s in sets:
        per = {m: nll[m][s.name] for m in nll}
        rows = bucket_stats(per, edges)
        out["sets"][s.name] = {
            "domain": s.domain,
            "num_docs": len(windows[s.name]),
            "buckets": rows,
            "beyond": _beyond(per, 4 * window, list(students)),
        }
    return out


def _beyond(per: Mapping[str, list[list[float]]], start: int, students: list[str]):
    """Per student, at positions >= start: relative gap to the teacher and recovered share of the
    floor's gap, each with a standard error over documents."""
    docs = range(len(per["teacher"]))

    def mean(name, d):
        tail = per[name][d][start:]
        return sum(tail) / len(tail) if tail else None

    ok = [d for d in docs if mean("teacher", d) is not None]
    t = {d: mean("teacher", d) for d in ok}
    f = {d: mean("floor", d) for d in ok}
    out: dict[str, Any] = {"from": start, "num_docs": len(ok)}
    out["teacher"] = sum(t.values()) / len(ok) if ok else None
    for name in ["floor", *students]:
        rel = [(mean(name, d) - t[d]) / t[d] for d in ok]
        m, se = _mean_se(rel) if rel else (float("nan"), float("nan"))
        out[name] = {"rel_gap": m, "rel_gap_se": se}
        if name != "floor":
            gaps = sum(f[d] - t[d] for d in ok)
            won = sum(f[d] - mean(name, d) for d in ok)
            out[name]["recovered"] = won / gaps if gaps > 0 else None
    return out


def render_markdown(result: dict[str, Any]) -> str:
    """The side-by-side table (relative gap at >= 4W, recovered share) per held-out set."""
    names = list(result["students"])
    w = result["window"]
    lines = [
        f"# Students by position (W = {w}, {result['num_sinks']} sinks, first "
        f"{result['max_length']} tokens of each document)",
        "",
        f"Relative NLL gap to the teacher at positions >= {4 * w} (+- SE over documents), and the "
        "share of the SWA floor's gap the student wins back (1.0 = the teacher, 0 = the floor).",
        "",
        "| set (domain, docs) | teacher NLL | floor | " + " | ".join(names) + " |",
        "|---|---:|---:|" + "---:|" * len(names),
    ]
    for set_name, s in result["sets"].items():
        b = s["beyond"]
        cells = [f"{b['floor']['rel_gap']:+.1%}"]
        for n in names:
            rec = b[n]["recovered"]
            cells.append(
                f"{b[n]['rel_gap']:+.1%} +- {b[n]['rel_gap_se']:.1%} "
                f"(won {'n/a' if rec is None else f'{rec:.0%}'})"
            )
        lines.append(
            f"| {set_name} ({s['domain']}-domain, {s['num_docs']}) | {b['teacher']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    lines += ["", "Per bucket (student - teacher NLL, nats):", ""]
    for set_name, s in result["sets"].items():
        lines += [f"**{set_name}** ({s['domain']}-domain)", ""]
        lines.append("| positions | teacher | floor | " + " | ".join(names) + " |")
        lines.append("|---|---:|---:|" + "---:|" * len(names))
        for r in s["buckets"]:
            cells = [f"{r['floor_gap']:+.3f}"] + [
                f"{r[f'{n}_gap']:+.3f} +- {r[f'{n}_gap_se']:.3f}" for n in names
            ]
            lines.append(
                f"| [{r['lo']}, {r['hi']}) | {r['teacher']:.3f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def write_comparison(result: dict[str, Any], out_dir: str | Path) -> Path:
    """``positions.json`` and ``positions.md`` into ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "positions.json", result)
    atomic_write_text(out / "positions.md", render_markdown(result))
    return out / "positions.md"
