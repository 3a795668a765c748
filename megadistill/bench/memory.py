"""Peak memory of a stage I step against the sequence length: ``megadistill bench memory``.

Each (length, form) runs in a fresh process (peak RSS only grows within a process): the teacher
(random of the given size, or a real one) is converted to a ``shared_norm`` student, then one
stage I step runs (the summed layer-wise MSE to the teacher's attention, backward through the
new parameters) on rows of packed documents. Reported: the step's peak RSS above the RSS before
it, i.e. the activations autograd keeps plus the transients. ``blocked`` is the training form
(O(T * W) memory), ``quadratic`` the parallel reference form forced at every length (O(T^2));
their ratio at 4K is what training at long context costs without the blocked form.
"""

from __future__ import annotations

import json
import resource
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from megadistill.bench.synthetic import SyntheticModelConfig
from megadistill.config import ConfigError

FORMS = ("blocked", "quadratic")


@dataclass(kw_only=True)
class MemoryBenchConfig(SyntheticModelConfig):
    """Settings of ``megadistill bench memory``."""

    num_layers: int = 2
    """Decoder layers of the random teacher (memory per layer is what scales with T)."""
    seq_lens: tuple[int, ...] = (1024, 2048, 4096)
    """Tokens per row."""
    window: int = 64
    """Student SWA window."""
    num_sinks: int = 4
    """Student sink tokens."""
    doc_len: int = 700
    """Tokens per packed document (a row holds several, as training rows do)."""
    forms: tuple[str, ...] = FORMS
    """Training forms of shared_norm to measure."""
    timeout_s: float = 900.0
    """Limit of each measuring process."""

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [f for f in self.forms if f not in FORMS]
        if bad or not self.forms:
            raise ConfigError(f"forms={list(self.forms)}: each must be one of {FORMS}")
        if any(t <= 2 * self.window for t in self.seq_lens):
            raise ConfigError(f"seq_lens must exceed 2 * window = {2 * self.window}")


def _rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_step(cfg_dict: dict[str, Any], seq_len: int, form: str, out: str) -> None:
    """In a fresh process: one stage I step at ``seq_len``; writes its peak RSS growth."""
    from megadistill.model import attention
    from megadistill.stages.align import AttentionProbe
    from megadistill.teachers import convert

    cfg = MemoryBenchConfig(**cfg_dict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    attention.BLOCKED_SHARED_NORM = form == "blocked"
    teacher = cfg.load_teacher(max(cfg.seq_lens))
    student, _ = convert(
        teacher, seed=0, window=cfg.window, num_sinks=cfg.num_sinks, mix="shared_norm"
    )
    del teacher
    new = set(student.new_parameter_names())
    for name, p in student.named_parameters():
        p.requires_grad_(name in new)
    vocab = student.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (1, seq_len), generator=gen)
    pos = (torch.arange(seq_len) % cfg.doc_len)[None]
    student.train()
    before = _rss_kib()
    with AttentionProbe(student) as probe:
        probe.loss(student, ids, pos).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    Path(out).write_text(json.dumps({"peak_step_bytes": max(0, peak - before) * 1024}))


def run_memory_bench(cfg: MemoryBenchConfig) -> list[dict[str, Any]]:
    """Peak step memory per (length, form), each in its own process."""
    from megadistill.engine.launch import run_distributed

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for t in cfg.seq_lens:
            row: dict[str, Any] = {"seq_len": t}
            for form in cfg.forms:
                out = str(Path(tmp) / f"{form}-{t}.json")
                run_distributed(measure_step, 1, asdict(cfg), t, form, out, timeout_s=cfg.timeout_s)
                row[form] = json.loads(Path(out).read_text())["peak_step_bytes"]
            rows.append(row)
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """The table: peak step memory (MiB) per length and form, and its growth from the first."""
    forms = [f for f in FORMS if f in rows[0]]
    head = "| tokens | " + " | ".join(f"{f} MiB | {f} x first" for f in forms) + " |"
    lines = [head, "|" + "---:|" * (1 + 2 * len(forms))]
    for r in rows:
        cells = [f"{r[f] / 2**20:.0f} | {r[f] / max(rows[0][f], 1):.2f}" for f in forms]
        lines.append(f"| {r['seq_len']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
