"""Data-preparation benchmark: tokens/s and peak RSS of ``prepare_packed`` with 1..N tokenizer
processes, side by side with ``datasets.Dataset.map(tokenizer, batched=True, num_proc=N)`` on the
same generated corpus and tokenizer, and the time to prepare a token budget from that corpus.

Every run is a fresh subprocess (``python -m megadistill.bench.data RUN_JSON``); the parent
samples the resident memory of its whole process tree (workers included) every 0.1 s and keeps
the peak. The corpus is real English (the Austen novels of the demo) cut into paragraphs,
shuffled and repeated into jsonl files until it reaches ``corpus_mb``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megadistill.bench.timing import Stopwatch
from megadistill.config import ConfigError

log = logging.getLogger(__name__)

_FILE_MB = 64


@dataclass(kw_only=True)
class DataBenchConfig:
    """Settings of ``megadistill bench data``."""

    work_dir: str = "bench-data"
    """Folder of the generated corpus, the caches and the baseline's Arrow files."""
    corpus_mb: float = 2048.0
    """Size of the generated corpus in MB of jsonl text."""
    tokenizer: str | None = None
    """Tokenizer folder; null uses the demo teacher's (SmolLM2, vocabulary 49,152)."""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    """Tokenizer process counts to measure (ours and the baseline's)."""
    budget_tokens: int = 10_000_000
    """Token budget of the budgeted run (with the largest worker count)."""
    baseline: bool = True
    """Also run ``datasets.Dataset.map(..., num_proc=N)`` for every N."""
    seq_len: int = 2048
    """Packed sequence length (does not change the tokenisation work)."""

    def __post_init__(self) -> None:
        if self.corpus_mb <= 0:
            raise ConfigError(f"corpus_mb must be > 0, got {self.corpus_mb}")
        if not self.workers or min(self.workers) < 1:
            raise ConfigError(f"workers must list counts >= 1, got {self.workers}")


def generate_corpus(folder: Path, corpus_mb: float, seed: int = 0) -> list[Path]:
    """Write shuffled real English paragraphs as jsonl files of up to 64 MB (reused if present)."""
    from megadistill.assets import english_corpus

    done = folder.with_name(folder.name + ".done.json")  # outside the corpus folder
    if done.is_file() and json.loads(done.read_text())["corpus_mb"] == corpus_mb:
        return sorted(folder.glob("part-*.jsonl"))
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*.jsonl"):
        old.unlink()
    paragraphs = [p for doc in english_corpus() for p in doc.split("\n\n") if p.strip()]
    rng = random.Random(seed)
    target, written, index = int(corpus_mb * 1e6), 0, 0
    files = []
    while written < target:
        path = folder / f"part-{index:05d}.jsonl"
        size = 0
        with open(path, "w") as fh:
            while size < _FILE_MB * 1e6 and written + size < target:
                doc = "\n\n".join(rng.sample(paragraphs, rng.randint(1, 8)))
                line = json.dumps({"text": doc}) + "\n"
                fh.write(line)
                size += len(line)
        files.append(path)
        written += size
        index += 1
    done.write_text(json.dumps({"corpus_mb": corpus_mb}))
    return files


def _tree_rss(proc: Any) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def _measure(run: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in a subprocess; add its wall time and the tree's peak RSS."""
    import resource

    import psutil

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with Stopwatch() as sw:
        child = subprocess.Popen(
            [sys.executable, "-m", "megadistill.bench.data", json.dumps(run)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        proc, peak = psutil.Process(child.pid), 0
        while child.poll() is None:  # sample the tree's RSS every 0.1 s until the run ends
            peak = max(peak, _tree_rss(proc))
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=0.1)
    out = child.stdout.read() if child.stdout else ""
    if child.returncode != 0:
        raise RuntimeError(f"benchmark run {run['mode']} failed with {child.returncode}")
    result = json.loads(out.strip().splitlines()[-1])
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the run and its waited-for workers
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result.update(
        wall_s=round(sw.wall, 2),
        peak_rss_mib=round(peak / 2**20),
        cpu_s=round(cpu, 2),  # includes interpreter start and imports
        tokens_per_cpu_s=round(result["tokens"] / cpu) if cpu else None,
    )
    return result


def _run_ours(run: dict[str, Any]) -> dict[str, Any]:
    from megadistill.data import DataConfig, PackedDataset, SourceConfig, prepare_packed
    from megadistill.model import load_tokenizer

    tok = load_tokenizer(run["tokenizer"])
    cfg = DataConfig(
        sources=[SourceConfig(path=run["corpus"])],
        seq_len=run["seq_len"],
        num_tokens=run.get("num_tokens"),
        num_proc=run["workers"],
        cache_dir=run["cache_dir"],
    )
    with Stopwatch() as sw:
        path = prepare_packed(cfg, tok)
    seconds = sw.wall
    meta = PackedDataset(path, verify=False).meta
    source = meta["sources"][0]
    return {
        "tokens": source["tokens_read"],
        "documents": source["documents_read"],
        "train_tokens": meta["splits"]["train"]["tokens"],
        "seconds": round(seconds, 2),
        "tokens_per_s": round(source["tokens_read"] / seconds),
    }


def _run_baseline(run: dict[str, Any]) -> dict[str, Any]:
    import datasets

    from megadistill.model import load_tokenizer

    tok = load_tokenizer(run["tokenizer"])
    files = sorted(str(p) for p in Path(run["corpus"]).glob("part-*.jsonl"))
    with Stopwatch() as total:
        with Stopwatch() as load:
            ds = datasets.load_dataset(
                "json", data_files=files, split="train", cache_dir=run["cache_dir"]
            )
        mapped = ds.map(
            lambda b: tok(b["text"], return_attention_mask=False),
            batched=True,
            num_proc=run["workers"] if run["workers"] > 1 else None,
            remove_columns=["text"],
        )
        lengths = mapped.map(
            lambda b: {"n": [len(x) for x in b["input_ids"]]},
            batched=True,
            remove_columns=["input_ids"],
        )["n"]
    seconds = total.wall
    tokens = int(sum(lengths))
    return {
        "tokens": tokens,
        "documents": len(lengths),
        "seconds": round(seconds, 2),
        "load_s": round(load.wall, 2),
        "tokens_per_s": round(tokens / seconds),
    }


def run_data_bench(cfg: DataBenchConfig) -> list[dict[str, Any]]:
    """Generate the corpus, then measure every run; return one row per run."""
    work = Path(cfg.work_dir).resolve()
    corpus = work / "corpus"
    files = generate_corpus(corpus, cfg.corpus_mb)
    tokenizer = cfg.tokenizer
    if tokenizer is None:
        from megadistill.assets import smollm2_teacher

        tokenizer = str(smollm2_teacher())
    base = {"tokenizer": tokenizer, "corpus": str(corpus), "seq_len": cfg.seq_len}
    corpus_bytes = sum(f.stat().st_size for f in files)
    runs = []
    for n in cfg.workers:
        runs.append({**base, "mode": "ours", "workers": n, "cache_dir": str(work / f"cache-{n}")})
        if cfg.baseline:
            runs.append({**base, "mode": "baseline", "workers": n,
                         "cache_dir": str(work / f"hf-{n}")})  # fmt: skip
    if cfg.budget_tokens:
        runs.append({**base, "mode": "ours", "workers": max(cfg.workers),
                     "num_tokens": cfg.budget_tokens, "cache_dir": str(work / "cache-budget")})  # fmt: skip
    rows = []
    for run in runs:
        _clear(Path(run["cache_dir"]))
        row = {"mode": run["mode"], "workers": run["workers"], "budget": run.get("num_tokens"),
               "corpus_mb": round(corpus_bytes / 1e6, 1), **_measure(run)}  # fmt: skip
        log.info("data bench: %s", row)
        rows.append(row)
    return rows


def _clear(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def format_rows(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    lines = [
        "| run | workers | tokens | seconds | tokens/s | tokens/s per worker | tokens per CPU-s "
        "| peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = r["mode"] + (f" (budget {r['budget']:,})" if r.get("budget") else "")
        lines.append(
            f"| {name} | {r['workers']} | {r['tokens']:,} | {r['seconds']} | {r['tokens_per_s']:,}"
            f" | {r['tokens_per_s'] // r['workers']:,} | {r['tokens_per_cpu_s'] or 0:,} "
            f"| {r['peak_rss_mib']} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    run = json.loads(argv[0])
    logging.basicConfig(level=logging.WARNING)
    result = _run_ours(run) if run["mode"] == "ours" else _run_baseline(run)
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
