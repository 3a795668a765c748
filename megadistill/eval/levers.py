"""Several students against one teacher and its SWA floor, by position, in one table.

``megadistill compare-positions`` is the quick loop for stage I choices (feature maps, gates,
softmax layers, ...): each student folder (e.g. a stage's ``final/``) is scored on the same held-out
documents as the teacher and the floor (the teacher cut to the students' window), and the report
puts the headline numbers side by side: the relative NLL gap to the teacher at positions >= 4W and
the share of the floor's gap each student wins back, per held-out set, with standard errors.
With needle lengths, every model (teacher, floor, students) also gets the same needle probes
(:mod:`megadistill.eval.niah`: exact match with its Wilson interval, digit accuracy, answer
log-probability), so retrieval sits beside the loss in one report. Teacher and floor losses and
needle scores are cached by content (model fingerprint, documents or probes, settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
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
NIAH_CACHE_FORMAT = 1
"""Version of the cached needle scores (bump when probe_model's probes or scores change)."""


def compare_students(
    teacher: str,
    students: Mapping[str, str],
    sets: Sequence[HeldoutSet],
    *,
    max_length: int = 2048,
    cache_dir: Path | None = None,
    reference: str | None = None,
    niah: Sequence[int] = (),
) -> dict[str, Any]:
    """Score teacher, floor and every student; returns the comparison (see module docstring).

    ``niah``: needle lengths in tokens (none: no probes); each model's scores go into
    ``result["niah"]`` (:func:`megadistill.eval.niah.probe_model`'s, keyed by model, then length).

    ``reference`` names a student that serves as a second floor: every other student's share of
    its gap is reported too (e.g. a SWA-only student trained through the same stage II: its
    adaptation to the training text then cancels, and the share is what the recurrent branch
    carries)."""
    from megadistill.eval.heldout import _floor, _score_role, _tokenize
    from megadistill.eval.lmeval import load_model, model_fingerprint
    from megadistill.model import load_tokenizer

    if not students:
        raise MegadistillError("pass at least one student NAME=DIR")
    if reference is not None and reference not in students:
        raise MegadistillError(
            f"reference {reference!r} is not one of the students ({', '.join(students)})"
        )
    configs = {n: json.loads((Path(d) / "config.json").read_text()) for n, d in students.items()}
    hybrid = {(c.get("window"), c.get("num_sinks")) for c in configs.values()}
    if len(hybrid) != 1 or None in next(iter(hybrid)):
        raise MegadistillError(
            f"students must be hybrids with one window and sink count, got {sorted(hybrid)}"
        )
    window, sinks = next(iter(hybrid))
    for name in students:
        if name in ("teacher", "floor"):
            raise MegadistillError(f"student name {name!r} is reserved; pick another")
    tokenizer = load_tokenizer(teacher)
    windows = _tokenize(tokenizer, sets, max_length)
    settings = {"window": window, "num_sinks": sinks, "max_length": max_length}
    fp = model_fingerprint(teacher)
    lengths = sorted({int(n) for n in niah})
    if lengths:
        _check_needle_lengths(teacher, lengths)
    # The same cache entries as `megadistill eval --heldout` (teacher and floor only).
    keys = {"teacher": f"teacher:{fp}", "floor": f"floor:{fp}:{window}:{sinks}"}
    loaders = {"teacher": lambda: load_model(teacher)[0],
               "floor": lambda: _floor(teacher, window, sinks)}  # fmt: skip
    nll: dict[str, Any] = {}
    needles: dict[str, Any] = {}
    for name in ("teacher", "floor", *students):
        path = students.get(name)
        load = _LoadOnce(loaders[name] if path is None else lambda p=path: load_model(p)[0])
        cache = cache_dir if name in keys else None
        nll[name] = _score_role(name, keys.get(name), load, windows, cache)[0]
        if lengths:
            needles[name] = _needles(name, keys.get(name), load, tokenizer, lengths, cache)
        load.release()
    edges = bucket_edges(window, max_length)
    out: dict[str, Any] = {**settings, "students": dict(students), "reference": reference,
                           "sets": {}}  # fmt: skip
    if lengths:
        out["niah"] = {"lengths": lengths, "models": needles}
    for s in sets:
        per = {m: nll[m][s.name] for m in nll}
        rows = bucket_stats(per, edges)
        out["sets"][s.name] = {
            "domain": s.domain,
            "num_docs": len(windows[s.name]),
            "buckets": rows,
            "beyond": _beyond(per, 4 * window, list(students), reference),
        }
    return out


class _LoadOnce:
    """Builds its model with ``factory`` at the first call and hands the same model to later
    calls (a model's losses, then its needles) until :meth:`release`."""

    def __init__(self, factory: Any) -> None:
        self.factory, self.model = factory, None

    def __call__(self) -> Any:
        if self.model is None:
            self.model = self.factory()
        return self.model

    def release(self) -> None:
        self.model = None


def _check_needle_lengths(teacher: str, lengths: Sequence[int]) -> None:
    """:func:`megadistill.eval.niah.check_lengths` against the teacher's config, before any
    model is read."""
    from megadistill.eval.niah import check_lengths

    config = json.loads((Path(teacher) / "config.json").read_text())
    check_lengths(lengths, config.get("text_config", config).get("max_position_embeddings"))


def _needles(
    role: str, model_key: str | None, loader: Any, tokenizer: Any, lengths: list[int],
    cache_dir: Path | None,
) -> dict[str, Any]:  # fmt: skip
    """One model's needle scores per length (keys: str lengths), from the cache where a
    ``model_key`` is given (teacher, floor)."""
    from megadistill.eval.niah import DEFAULT_FILLER, DEPTHS, default_trials, probe_model

    trials = default_trials(len(DEPTHS))
    file = None
    if cache_dir is not None and model_key is not None:
        probes = json.dumps([model_key, lengths, list(DEPTHS), trials, 0, DEFAULT_FILLER])
        key = hashlib.sha256(f"{NIAH_CACHE_FORMAT}\0{probes}".encode()).hexdigest()[:32]
        file = cache_dir / f"needles-{key}.json"
        if file.is_file():
            return json.loads(file.read_text())["needles"]
    log.info("needles: %s at %s tokens", role, ", ".join(map(str, lengths)))
    result = probe_model(loader(), tokenizer, lengths, num_trials=trials)
    out = {str(n): r for n, r in result.items()}
    if file is not None:
        atomic_write_json(file, {"role": role, "needles": out})
    return out


def _share(won: list[float], gaps: list[float]) -> dict[str, Any]:
    """``sum(won) / sum(gaps)`` with its delta-method SE over documents; None (both) where the
    gap is not above two standard errors (a share of noise)."""
    from megadistill.eval.metrics import ratio_se

    gap, gap_se = _mean_se(gaps)
    if not gap > max(2 * (0.0 if math.isnan(gap_se) else gap_se), 1e-9):
        return {"share": None, "se": None}
    share, se = ratio_se(won, gaps)
    return {"share": share, "se": se}


def _beyond(
    per: Mapping[str, list[list[float]]], start: int, students: list[str],
    reference: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Per student, at positions >= start: relative gap to the teacher and recovered share of the
    floor's gap (and of ``reference``'s gap, a student used as a floor), each with a standard
    error over documents."""
    docs = range(len(per["teacher"]))

    def mean(name, d):
        tail = per[name][d][start:]
        return sum(tail) / len(tail) if tail else None

    ok = [d for d in docs if mean("teacher", d) is not None]
    t = {d: mean("teacher", d) for d in ok}
    out: dict[str, Any] = {"from": start, "num_docs": len(ok), "reference": reference}
    out["teacher"] = sum(t.values()) / len(ok) if ok else None
    for name in ["floor", *students]:
        rel = [(mean(name, d) - t[d]) / t[d] for d in ok]
        m, se = _mean_se(rel) if rel else (float("nan"), float("nan"))
        out[name] = {"rel_gap": m, "rel_gap_se": se}
        for floor, key in (("floor", "recovered"), (reference, "recovered_ref")):
            if floor is None or name in ("floor", floor) or not ok:
                continue
            gaps = [mean(floor, d) - t[d] for d in ok]
            won = [mean(floor, d) - mean(name, d) for d in ok]
            share = _share(won, gaps)
            out[name][key], out[name][f"{key}_se"] = share["share"], share["se"]
    return out


def _won(row: dict[str, Any], key: str) -> str:
    share, se = row.get(key), row.get(f"{key}_se")
    if share is None:
        return "won -"
    return f"won {share:.0%}" + ("" if se is None or math.isnan(se) else f" +- {se:.0%}")


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
    ref = result.get("reference")
    if ref:
        lines[2] += (
            f" The second share (vs {ref}) takes the student {ref!r} as the floor. A share is "
            '"-" where that floor\'s gap is under two standard errors.'
        )
    for set_name, s in result["sets"].items():
        b = s["beyond"]
        cells = [f"{b['floor']['rel_gap']:+.1%}"]
        for n in names:
            won = [_won(b[n], "recovered")]
            if ref and n != ref:
                won.append(f"vs {ref} {_won(b[n], 'recovered_ref')}")
            cells.append(f"{b[n]['rel_gap']:+.1%} +- {b[n]['rel_gap_se']:.1%} ({'; '.join(won)})")
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
    if result.get("niah"):
        lines += _needle_lines(result["niah"], ["teacher", "floor", *names])
    return "\n".join(lines)


def _needle_lines(niah: dict[str, Any], order: list[str]) -> list[str]:
    """The needle table: per model and length, exact match with its Wilson 95% interval, the
    share of answer tokens that are the argmax (digits) and the answer's mean log-probability."""
    from megadistill.eval.niah import wilson_interval

    lengths = [str(n) for n in niah["lengths"]]
    first = niah["models"]["teacher"][lengths[0]]
    lines = [
        f"Needle ({first['n']} identical probes per length; exact match [Wilson 95%], digits, "
        "answer logp):",
        "",
        "| model | " + " | ".join(f"{n} tokens" for n in lengths) + " |",
        "|---|" + "---:|" * len(lengths),
    ]
    for name in order:
        cells = []
        for n in lengths:
            r = niah["models"][name][n]
            lo, hi = wilson_interval(r["hits"], r["n"])
            cells.append(f"{r['hits']}/{r['n']} [{lo:.2f}, {hi:.2f}], {r['digit_acc']:.2f}, "
                         f"{r['logp']:.2f}")  # fmt: skip
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def write_comparison(result: dict[str, Any], out_dir: str | Path) -> Path:
    """``positions.json`` and ``positions.md`` into ``out_dir``; returns the markdown path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "positions.json", result)
    atomic_write_text(out / "positions.md", render_markdown(result))
    return out / "positions.md"
