"""Reports: results JSON -> markdown table, C_alpha summary, window fidelity, NIAH, PNG chart.

A run folder holds ``results.json`` (everything measured, see :func:`lmeval.evaluate_pair`);
``report.md`` and ``recovery.png`` are always rebuilt from it, so ``megadistill report RUN_DIR``
reproduces them without a model, and several runs can be compared side by side.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError
from megadistill.eval import metrics
from megadistill.eval import positions_report as posrep
from megadistill.eval.tasks import (
    LOWER_IS_BETTER,
    PERPLEXITY_TASK,
    base_task_name,
    display_name,
    primary_metric,
)
from megadistill.integrity import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

RESULTS = "results.json"
REPORT = "report.md"
CHART = "recovery.png"


def task_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: name, metric, teacher, student and their standard errors, recovery and
    its error (see :func:`metrics.recovery_se`), chance level, whether the teacher is within noise
    of chance (``at_chance``) and whether the task counts towards C_alpha (``in_summary``).
    Results written before standard errors were kept give NaN errors and no chance flag."""
    rows = []
    t_res, s_res = results["teacher"], results["student"]
    for task in results["tasks"]:
        metric = primary_metric(task)
        t, s = t_res["primary"][task], s_res["primary"][task]
        t_se = t_res.get("stderr", {}).get(task, {}).get(metric)
        s_se = s_res.get("stderr", {}).get(task, {}).get(metric)
        higher = metric not in LOWER_IS_BETTER
        rec_se, method = metrics.recovery_se(
            t,
            s,
            t_se,
            s_se,
            teacher_items=t_res.get("per_doc", {}).get(task),
            student_items=s_res.get("per_doc", {}).get(task),
            higher_is_better=higher,
        )
        chance = t_res.get("chance", {}).get(task)
        at_chance = metrics.near_chance(t, t_se, chance)
        benchmark = base_task_name(task) != PERPLEXITY_TASK
        rows.append(
            {
                "task": display_name(task),
                "metric": metric,
                "teacher": t,
                "student": s,
                "teacher_se": math.nan if t_se is None else t_se,
                "student_se": math.nan if s_se is None else s_se,
                "recovery": metrics.recovery(t, s, higher_is_better=higher),
                "recovery_se": rec_se,
                "recovery_se_method": method,
                "chance": chance,
                "at_chance": at_chance,
                "in_summary": benchmark and not at_chance,
                **_task_window(results, task),
            }
        )
    return rows


def _task_window(results: dict[str, Any], task: str) -> dict[str, Any]:
    """Per task: the share of input tokens at positions >= W and of scored tokens beyond W."""
    window = results["student"].get("config", {}).get("window")
    lengths = results["student"].get("requests", {}).get(task, [])
    if window is None or not lengths:
        return {"input_beyond_window": None, "scored_beyond_window": None}
    inputs = sum(total for total, _ in lengths)
    scored = sum(n for _, n in lengths)
    return {
        "input_beyond_window": sum(max(0, total - window) for total, _ in lengths) / inputs,
        "scored_beyond_window": _scored_beyond(lengths, window) / scored if scored else None,
    }


def _scored_beyond(lengths: list[list[int]], window: int) -> int:
    return sum(max(0, total - max(window, total - n)) for total, n in lengths)


def lossless_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """C_0, C_0.01, C_0.05, alpha* over the benchmark tasks (perplexity and tasks whose teacher
    is within noise of chance excluded); None if none is left."""
    rows = [r for r in task_rows(results) if r["in_summary"]]
    if not rows:
        return None
    lower = frozenset(r["task"] for r in rows if r["metric"] in LOWER_IS_BETTER)
    teacher = {r["task"]: r["teacher"] for r in rows}
    student = {r["task"]: r["student"] for r in rows}
    return metrics.summary(teacher, student, lower)


def window_fidelity(results: dict[str, Any]) -> dict[str, Any]:
    """W, the model input lengths evaluated and the share of scored tokens beyond W.

    A scored token is *beyond W* when it is predicted from position p >= W, i.e. its prefix is
    longer than the sliding window, so the softmax branch alone cannot see all of it.
    """
    window = results["student"].get("config", {}).get("window")
    lengths = [tuple(r) for reqs in results["student"]["requests"].values() for r in reqs]
    scored = sum(n for _, n in lengths)
    beyond = None
    if window is not None:
        beyond = _scored_beyond(lengths, window)
    inputs = [total for total, _ in lengths] or [0]
    return {
        "window": window,
        "max_length": results["settings"]["max_length"],
        "input_len_min": min(inputs),
        "input_len_median": statistics.median(inputs),
        "input_len_max": max(inputs),
        "scored_tokens": scored,
        "scored_beyond_window": beyond,
        "share_beyond_window": (beyond / scored) if beyond is not None and scored else None,
    }


def _fmt(x: float) -> str:
    return f"{x:.4g}" if abs(x) < 1e5 else f"{x:.3e}"


def render_markdown(results: dict[str, Any]) -> str:
    """The report text for one run."""
    t, s = results["teacher"], results["student"]
    lines = [
        "# megadistill eval report",
        "",
        f"- teacher: `{t.get('path')}` ({t.get('config', {}).get('model_type')}, "
        f"fingerprint {t.get('fingerprint', '')[:12]}, {'cached' if t.get('cached') else 'run'})",
        f"- student: `{s.get('path')}` ({s.get('config', {}).get('model_type')})",
        f"- tasks ({results['source']}): {', '.join(results['tasks'])}; settings "
        f"{json.dumps(results['settings'], sort_keys=True)}",
        "",
    ]
    if results.get("positions"):
        lines += [*posrep.positions_lines(results["positions"]), "", "## Tasks", ""]
    lines += _task_table(results)
    lines += ["", *_summary_lines(results), "", *_window_lines(results)]
    if results.get("niah"):
        lines += ["", *_niah_lines(results["niah"])]
    if results.get("training_budget"):
        lines += ["", *_budget_lines(results["training_budget"])]
    return "\n".join(lines) + "\n"


def _budget_lines(budget: dict[str, Any]) -> list[str]:
    """The training budget a run spent (``results["training_budget"]``, written by the demo)."""
    tokens = budget.get("tokens", {})
    lines = ["## Training budget (read the numbers above with this in mind)", ""]
    lines += [f"- {stage}: {int(n):,} tokens" for stage, n in tokens.items()]
    lines.append(f"- total: {int(sum(tokens.values())):,} tokens")
    lines += [f"- {note}" for note in budget.get("notes", [])]
    return lines


def _se(value: float, se: float) -> str:
    return _fmt(value) if se is None or math.isnan(se) else f"{_fmt(value)} ± {se:.2g}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _task_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "| task | metric | teacher ± SE | student ± SE | recovery ± SE | chance | "
        "input beyond W | scored beyond W |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in task_rows(results):
        note = ""
        if row["at_chance"]:
            note = " (teacher at chance: not in C_alpha)"
        elif not row["in_summary"]:
            note = " (not in C_alpha)"
        rec = f"{row['recovery']:.4f}"
        if not math.isnan(row["recovery_se"]):
            rec += f" ± {row['recovery_se']:.2g}"
        if row["recovery_se_method"] == "independent":
            rec += " †"
        chance = "-" if row["chance"] is None else f"{row['chance']:.3f}"
        lines.append(
            f"| {row['task']}{note} | {row['metric']} | {_se(row['teacher'], row['teacher_se'])} | "
            f"{_se(row['student'], row['student_se'])} | {rec} | {chance} | "
            f"{_pct(row['input_beyond_window'])} | {_pct(row['scored_beyond_window'])} |"
        )
    lines += [
        "",
        "Standard errors: lm-eval's (over items). Recovery ± SE: delta method for the ratio of "
        "the paired per-item means (teacher and student answer the same items); † marks the "
        "independent-ratio formula r·sqrt((SE_s/s)² + (SE_t/t)²), used where per-item scores "
        "are missing. Chance: 1 / number of choices, averaged over the items. Input beyond W: "
        "share of the model-input tokens at positions >= W; scored beyond W: share of the "
        "scored tokens predicted from positions >= W.",
    ]
    return lines


def _summary_lines(results: dict[str, Any]) -> list[str]:
    rows = task_rows(results)
    excluded = [r for r in rows if r["at_chance"]]
    notes = []
    if excluded:
        notes = [
            "",
            f"Left out of C_alpha (teacher within {metrics.CHANCE_SE:g} standard errors of "
            "chance, so its recovery would measure noise): "
            + "; ".join(
                f"{r['task']} (teacher {_se(r['teacher'], r['teacher_se'])}, chance "
                f"{r['chance']:.3f})"
                for r in excluded
            )
            + ".",
        ]
    summ = lossless_summary(results)
    if summ is None:
        return ["No benchmark task left for a C_alpha summary.", *notes]
    verdict = "lossless" if summ["lossless"] else "not lossless"
    return [
        f"## Summary over {summ['num_tasks']} benchmark(s): {verdict}",
        "",
        f"C_0 = {summ['C_0']:.3f}, C_0.01 = {summ['C_0.01']:.3f}, C_0.05 = {summ['C_0.05']:.3f}, "
        f"alpha* = {summ['alpha_star']:.4f}  (METHOD.md: lossless means C_0 >= 0.5)",
        *notes,
    ]


def _window_lines(results: dict[str, Any]) -> list[str]:
    w = window_fidelity(results)
    share = w["share_beyond_window"]
    window = "n/a (the student has no sliding window)" if w["window"] is None else str(w["window"])
    beyond = "n/a" if share is None else f"{share:.1%} ({w['scored_beyond_window']} tokens)"
    return [
        "## Window fidelity",
        "",
        f"- SWA window W: {window}",
        f"- model input lengths evaluated: min {w['input_len_min']}, median "
        f"{w['input_len_median']}, max {w['input_len_max']} tokens (max_length {w['max_length']})",
        f"- scored tokens: {w['scored_tokens']}; beyond W: {beyond}",
        "- Tokens within W are answered by softmax attention over the whole prefix; only those "
        "beyond W test the mLSTM branch.",
    ]


def _niah_lines(niah: dict[str, Any]) -> list[str]:
    lines = [
        "## Needle in a haystack (greedy exact match of the needle, teacher-forced)",
        "",
        "Teacher and student answer identical probes (same haystacks, depths and needles); "
        "exact-match accuracies with 95% Wilson intervals, and two graded scores that move "
        "before exact match does: the share of answer digits that are the argmax, and the "
        "mean log-probability per answer token.",
        "",
        "| context tokens | probes | teacher acc [95% CI] | student acc [95% CI] | "
        "teacher digits | student digits | teacher logp/token | student logp/token |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in niah["rows"]:
        cells = [str(row["length"]), str(row.get("num_probes", "?"))]
        for role in ("teacher", "student"):
            acc = f"{row[f'{role}_acc']:.2f}"
            if f"{role}_acc_lo" in row:
                acc += f" [{row[f'{role}_acc_lo']:.2f}, {row[f'{role}_acc_hi']:.2f}]"
            cells.append(acc)
        cells += [_opt(row.get(f"{role}_digit_acc")) for role in ("teacher", "student")]
        cells += [f"{row['teacher_logp']:.3f}", f"{row['student_logp']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    depth_rows = _niah_depth_lines(niah["rows"])
    return lines + (["", *depth_rows] if depth_rows else [])


def _opt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _niah_depth_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per length and depth: exact match, digit accuracy, logp/token, teacher | student."""
    if not rows or "student_by_depth" not in rows[0]:
        return []  # results saved before the per-depth scores existed
    lines = [
        "| context tokens | depth | probes | exact match (T / S) | digits (T / S) | "
        "logp/token (T / S) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        for depth, s in row["student_by_depth"].items():
            t = row["teacher_by_depth"][depth]
            lines.append(
                f"| {row['length']} | {float(depth):.1f} | {s['n']} | {t['acc']:.2f} / "
                f"{s['acc']:.2f} | {t['digit_acc']:.2f} / {s['digit_acc']:.2f} | "
                f"{t['logp']:.2f} / {s['logp']:.2f} |"
            )
    return lines


def plot_recovery(rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Bar chart of recovery per task, one bar group per run, with the parity line at 1.0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for run in rows.values() for r in run})
    fig, ax = plt.subplots(figsize=(max(4.0, 0.9 * len(tasks) * max(1, len(rows))), 3.5))
    width = 0.8 / max(1, len(rows))
    for i, (name, run) in enumerate(rows.items()):
        by_task = {r["task"]: min(r["recovery"], 2.0) for r in run}
        xs = [j + i * width for j, _ in enumerate(tasks)]
        ax.bar(xs, [by_task.get(t, 0.0) for t in tasks], width=width, label=name)
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(tasks))], tasks, rotation=30, ha="right")
    ax.set_ylabel("recovery (student / teacher)")
    if len(rows) > 1:
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(results: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``results.json`` (if new), ``report.md`` and ``recovery.png`` into ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / REPORT, render_markdown(results))
    plot_recovery({run_dir.name: task_rows(results)}, run_dir / CHART)
    if results.get("positions"):
        posrep.plot_positions({run_dir.name: results["positions"]}, run_dir / posrep.CHART)
    if not (run_dir / RESULTS).exists():  # last: an eval that died before this can run again
        atomic_write_json(run_dir / RESULTS, results)
    log.info("report written to %s", run_dir / REPORT)
    return run_dir / REPORT


def load_results(run_dir: str | Path) -> dict[str, Any]:
    """Read a run's ``results.json`` with a clear error when it is missing."""
    path = Path(run_dir) / RESULTS
    if not path.is_file():
        raise MegadistillError(f"{path} not found: pass a folder written by `megadistill eval`")
    return json.loads(path.read_text())


def run_labels(run_dirs: list[str | Path]) -> list[str]:
    """Column names for runs: the shortest trailing parts of their paths that tell them apart
    (``q64/pipeline/eval`` and ``q512/pipeline/eval``, not ``eval`` twice)."""
    parts = [Path(d).resolve().parts for d in run_dirs]
    if len(set(parts)) != len(parts):
        raise MegadistillError(f"the same run folder is given twice: {[str(d) for d in run_dirs]}")
    for k in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-k:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(Path(*p)) for p in parts]  # unreachable: distinct full paths differ somewhere


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> Path:
    """Rebuild every run's report; with several runs, also write a side-by-side comparison.

    Returns:
        The single run's ``report.md``, or ``comparison.md`` in ``out_dir`` (default: the first
        run's parent folder).
    """
    if not run_dirs:
        raise MegadistillError("pass at least one RUN_DIR")
    labels = run_labels(run_dirs)
    loaded = {label: (Path(d), load_results(d)) for label, d in zip(labels, run_dirs, strict=True)}
    paths = [write_report(res, d) for d, res in loaded.values()]
    if len(loaded) == 1:
        return paths[0]
    out = Path(out_dir) if out_dir is not None else Path(run_dirs[0]).parent
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "comparison.md", _comparison_markdown(loaded))
    plot_recovery({n: task_rows(r) for n, (_, r) in loaded.items()}, out / "comparison.png")
    positions = {n: r["positions"] for n, (_, r) in loaded.items() if r.get("positions")}
    if positions:
        posrep.plot_positions(positions, out / "comparison_positions.png")
    return out / "comparison.md"


def _comparison_markdown(loaded: dict[str, tuple[Path, dict[str, Any]]]) -> str:
    names = list(loaded)
    lines = ["# megadistill run comparison", "", "| | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---:|" * len(names))
    lines += posrep.comparison_lines({n: r.get("positions") for n, (_, r) in loaded.items()})
    summaries = {n: lossless_summary(r) or {} for n, (_, r) in loaded.items()}
    windows = {n: window_fidelity(r) for n, (_, r) in loaded.items()}
    for key in ("C_0", "C_0.01", "C_0.05", "alpha_star"):
        cells = [_fmt(summaries[n][key]) if key in summaries[n] else "-" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("| W | " + " | ".join(str(windows[n]["window"] or "n/a") for n in names) + " |")
    shares = [windows[n]["share_beyond_window"] for n in names]
    lines.append(
        "| scored beyond W | "
        + " | ".join("n/a" if s is None else f"{s:.1%}" for s in shares)
        + " |"
    )
    per_task: dict[str, dict[str, str]] = {}
    for n, (_, r) in loaded.items():
        for row in task_rows(r):
            cell = f"{row['recovery']:.4f}"
            if not math.isnan(row["recovery_se"]):
                cell += f" ± {row['recovery_se']:.2g}"
            per_task.setdefault(row["task"], {})[n] = cell + (
                " (chance)" if row["at_chance"] else ""
            )
    for task, by_run in sorted(per_task.items()):
        cells = [by_run.get(n, "-") for n in names]
        lines.append(f"| recovery {task} | " + " | ".join(cells) + " |")
    lines += ["", "(chance): the teacher is within 2 SE of chance there; left out of C_alpha."]
    return "\n".join(lines) + "\n"
