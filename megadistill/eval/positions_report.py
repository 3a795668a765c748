"""The report's headline: loss by position per held-out set (tables, curves, comparison rows).

Reads only the ``positions`` entry of results.json (:mod:`megadistill.eval.positions`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

CHART = "positions.png"
DOMAIN = {"in": "in-domain", "out": "out-of-domain"}


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _pm(x: float | None, se: float | None, fmt: str = "+.3f") -> str:
    if x is None:
        return "-"
    return f"{x:{fmt}}" if se is None or math.isnan(se) else f"{x:{fmt}} ± {se:.3f}"


def _share(x: float | None, se: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" if se is None or math.isnan(se) else f"{x:.1%} ± {se:.1%}"


def ordered_sets(pos: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The held-out sets in a fixed order (in-domain first, then by name), so a report rebuilt
    from results.json (written with sorted keys) is the same text."""
    return sorted(pos["sets"].items(), key=lambda kv: (kv[1]["domain"], kv[0]))


def _row_cells(row: dict[str, Any], has_floor: bool) -> list[str]:
    cells = [
        str(row["num_tokens"]),
        _num(row["teacher"]),
        _num(row.get("student")),
        _pm(row.get("student_gap"), row.get("student_gap_se")),
        _num(row.get("student_rel_gap"), "+.1%"),
    ]
    if has_floor:
        cells += [
            _pm(row.get("floor_gap"), row.get("floor_gap_se")),
            _share(row.get("recovered"), row.get("recovered_se")),
        ]
    return cells


def positions_lines(pos: dict[str, Any]) -> list[str]:
    """Markdown: one table per held-out set, by position bucket, then the pooled beyond row."""
    has_floor = "floor" in pos["models"]
    w, beyond = pos["window"], pos["beyond"]
    lines = [
        "## Loss by position (headline)",
        "",
        f"Mean NLL per token (nats) of the next token predicted at each position of held-out "
        f"documents (first {pos['max_length']} tokens each), W = {w}. Only positions >= W test "
        "the recurrent branch. Gaps are student - teacher, averaged over documents ± standard "
        "error over documents; relative gap = gap / teacher NLL.",
    ]
    if has_floor:
        fl = pos.get("floor") or {}
        lines.append(
            f"Floor: the teacher with every attention cut to SWA (W = {fl.get('window', w)}, "
            f"{fl.get('num_sinks', '?')} sinks, no mLSTM, no training). Recovered = share of the "
            "floor's gap the student wins back, (floor gap - student gap) / floor gap, ± its "
            "delta-method standard error over paired documents; '-' where the floor is within "
            "one standard error of the teacher."
        )
    header = ["positions", "tokens", "teacher", "student", "gap ± SE", "rel. gap"]
    if has_floor:
        header += ["floor gap ± SE", "recovered"]
    for name, st in ordered_sets(pos):
        lines += [
            "",
            f"### {name} ({DOMAIN.get(st['domain'], st['domain'])}; {st['num_docs']} documents)",
            "",
        ]
        if st.get("description"):
            lines += [st["description"], ""]
        lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for row in st["buckets"]:
            cells = [f"{row['lo']}-{row['hi'] - 1}", *_row_cells(row, has_floor)]
            lines.append("| " + " | ".join(cells) + " |")
        b = st.get("beyond")
        if b:
            cells = [f"**>= {beyond}**", *_row_cells(b, has_floor)]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def beyond_summary(pos: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """Per set: domain, the student's relative gap and the recovered share at positions >= 4W."""
    if not pos:
        return {}
    out = {}
    for name, st in ordered_sets(pos):
        b = st.get("beyond") or {}
        out[name] = {
            "domain": st["domain"],
            "from": pos["beyond"],
            "rel_gap": b.get("student_rel_gap"),
            "gap": b.get("student_gap"),
            "gap_se": b.get("student_gap_se"),
            "recovered": b.get("recovered"),
            "recovered_se": b.get("recovered_se"),
        }
    return out


def comparison_lines(runs: dict[str, dict[str, Any] | None]) -> list[str]:
    """Comparison rows: per set, the student's relative gap and recovered share beyond 4W."""
    summ = {n: beyond_summary(p) for n, p in runs.items()}
    sets: dict[str, str] = {}
    for s in summ.values():
        for name, row in s.items():
            sets.setdefault(name, DOMAIN.get(row["domain"], row["domain"]))
    lines = []
    for name, domain in sets.items():
        for key, label in (("rel_gap", "rel. gap"), ("recovered", "recovered")):
            cells = []
            for n in runs:
                row = summ[n].get(name)
                if row is None or row[key] is None:
                    cells.append("-")
                elif key == "rel_gap":
                    cells.append(f"{row['rel_gap']:+.1%} (>= {row['from']})")
                else:
                    cells.append(_share(row["recovered"], row["recovered_se"]))
            lines.append(f"| {name} ({domain}) {label} beyond 4W | " + " | ".join(cells) + " |")
    return lines


def _mid(row: dict[str, Any]) -> float:
    return (row["lo"] + row["hi"]) / 2


def plot_positions(runs: dict[str, dict[str, Any]], path: Path) -> None:
    """NLL vs position bucket, one panel per held-out set: teacher, floor and each run's student
    (with one run, exactly the teacher, student and floor of that run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(s for pos in runs.values() for s, _ in ordered_sets(pos)))
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    first = next(iter(runs.values()))
    for ax, name in zip(axes[0], names):
        ref = next(pos for pos in runs.values() if name in pos["sets"])
        rows = ref["sets"][name]["buckets"]
        xs = [_mid(r) for r in rows]
        ax.plot(xs, [r["teacher"] for r in rows], "k-o", label="teacher", markersize=3)
        for run, pos in runs.items():
            st = pos["sets"].get(name)
            if st is None:
                continue
            rs = st["buckets"]
            label = "student" if len(runs) == 1 else run
            ax.plot([_mid(r) for r in rs], [r["student"] for r in rs], "-o", label=label, ms=3)
            if "floor" in pos["models"] and (len(runs) == 1 or pos is first):
                ax.plot([_mid(r) for r in rs], [r["floor"] for r in rs], "--", color="gray",
                        label="SWA floor")  # fmt: skip
        ax.axvline(ref["window"], color="gray", linewidth=0.6, linestyle=":")
        ax.set_xscale("log", base=2)
        domain = DOMAIN.get(ref["sets"][name]["domain"], "")
        ax.set_title(f"{name} ({domain})", fontsize="medium")
        ax.set_xlabel("position (bucket middle; dotted: W)")
        ax.set_ylabel("NLL (nats/token)")
        ax.legend(fontsize="x-small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
