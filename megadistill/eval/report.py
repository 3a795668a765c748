"""Reports: results JSON -> markdown table, C_alpha summary, window fidelity, NIAH, PNG chart.

A run folder holds ``results.json`` (everything measured, see :func:`lmeval.evaluate_pair`);
``report.md`` and ``recovery.png`` are always rebuilt from it, so ``megadistill report RUN_DIR``
reproduces them without a model, and several runs can be compared side by side.
"""

from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError
from megadistill.eval import metrics
from megadistill.eval.tasks import LOWER_IS_BETTER, PERPLEXITY_TASK, base_task_name, primary_metric
from megadistill.integrity import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

RESULTS = "results.json"
REPORT = "report.md"
CHART = "recovery.png"


def task_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per task: name, metric, teacher, student, recovery, in_summary."""
    rows = []
    for task in results["tasks"]:
        metric = primary_metric(task)
        t, s = results["teacher"]["primary"][task], results["student"]["primary"][task]
        higher = metric not in LOWER_IS_BETTER
        rows.append(
            {
                "task": base_task_name(task),
                "metric": metric,
                "teacher": t,
                "student": s,
                "recovery": metrics.recovery(t, s, higher_is_better=higher),
                "in_summary": base_task_name(task) != PERPLEXITY_TASK,
            }
        )
    return rows


def lossless_summary(results: dict[str, Any]) -> dict[str, Any] | None:
    """C_0, C_0.01, C_0.05, alpha* over the benchmark tasks (perplexity excluded); None if none."""
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
        beyond = sum(max(0, total - max(window, total - n)) for total, n in lengths)
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
        "| task | metric | teacher | student | recovery |",
        "|---|---|---:|---:|---:|",
    ]
    for row in task_rows(results):
        note = "" if row["in_summary"] else " (not in C_alpha)"
        lines.append(
            f"| {row['task']}{note} | {row['metric']} | {_fmt(row['teacher'])} | "
            f"{_fmt(row['student'])} | {row['recovery']:.4f} |"
        )
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


def _summary_lines(results: dict[str, Any]) -> list[str]:
    summ = lossless_summary(results)
    if summ is None:
        return ["No benchmark task (only perplexity): no C_alpha summary."]
    verdict = "lossless" if summ["lossless"] else "not lossless"
    return [
        f"## Summary over {summ['num_tasks']} benchmark(s): {verdict}",
        "",
        f"C_0 = {summ['C_0']:.3f}, C_0.01 = {summ['C_0.01']:.3f}, C_0.05 = {summ['C_0.05']:.3f}, "
        f"alpha* = {summ['alpha_star']:.4f}  (METHOD.md: lossless means C_0 >= 0.5)",
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
        "| context tokens | teacher | student | teacher needle logp/token | student |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in niah["rows"]:
        lines.append(
            f"| {row['length']} | {row['teacher_acc']:.2f} | {row['student_acc']:.2f} | "
            f"{row['teacher_logp']:.3f} | {row['student_logp']:.3f} |"
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
    return out / "comparison.md"


def _comparison_markdown(loaded: dict[str, tuple[Path, dict[str, Any]]]) -> str:
    names = list(loaded)
    lines = ["# megadistill run comparison", "", "| | " + " | ".join(names) + " |"]
    lines.append("|---|" + "---:|" * len(names))
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
    per_task: dict[str, dict[str, float]] = {}
    for n, (_, r) in loaded.items():
        for row in task_rows(r):
            per_task.setdefault(row["task"], {})[n] = row["recovery"]
    for task, by_run in sorted(per_task.items()):
        cells = [f"{by_run[n]:.4f}" if n in by_run else "-" for n in names]
        lines.append(f"| recovery {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
