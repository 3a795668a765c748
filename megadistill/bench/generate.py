"""Teacher vs student through Hugging Face ``generate()``: what a user runs.

Both models generate greedily (``do_sample=False``) exactly ``new_tokens`` tokens
(``min_new_tokens`` equal, so an end-of-sequence token stops neither) after the same random
prompt, in one process, interleaved (teacher, student, student, teacher, ...), ``repeats`` times
per prompt length; medians are reported (:mod:`megadistill.bench.timing`). A forward hook reads
the clock when the prompt's forward (the prefill) returns, so each time splits into prefill and
decode. Aten ops per generated token are counted once per model (a ``TorchDispatchMode`` around
two generations at the shortest prompt that differ by ``count_tokens`` tokens): a load-independent
measure of the per-token work besides the big matrix products.
"""

from __future__ import annotations

import copy
import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megadistill.bench.inference import build_student
from megadistill.bench.synthetic import SyntheticModelConfig
from megadistill.bench.timing import CLOCKS, Clock, measure
from megadistill.config import ConfigError
from megadistill.hybrid import HybridSettings
from megadistill.model import cpu_step

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class GenerateBenchConfig(SyntheticModelConfig):
    """Settings of ``megadistill bench generate`` (model size: the synthetic defaults)."""

    prompts: tuple[int, ...] = (128, 1024, 4096, 8192)
    """Prompt lengths (tokens)."""
    new_tokens: int = 128
    """Tokens each model generates after the prompt (exactly: ``min_new_tokens`` equal)."""
    batch_size: int = 1
    """Prompts generated together."""
    window: int = 512
    """Student SWA window."""
    num_sinks: int = 4
    """Student sink tokens."""
    softmax_layers: tuple[int, ...] = ()
    """Student layers kept as full softmax attention."""
    softmax_heads: tuple[tuple[int, ...], ...] = ()
    """Student KV heads kept as full softmax attention, ``[layer, kv_head]`` pairs
    (``hybrid.softmax_heads``; the floor keeps them too)."""
    repeats: int = 3
    """Interleaved measurements per prompt length (medians reported)."""
    threads: int = 1
    """torch threads (0: leave torch's default)."""
    clock: str = "cpu"
    """Clock of the reported seconds and ratios: ``cpu`` (this process's CPU time, also fair on
    a busy machine; with ``threads > 1`` it sums the threads) or ``wall``. Both are in the JSON."""
    count_tokens: int = 8
    """Generated tokens whose aten ops are counted (0: do not count)."""
    floor: bool = False
    """Also time the SWA-only student (``gate_mode: swa``: the same window, sinks and softmax
    layers, no mLSTM), interleaved with the other two: the fastest any student of this window can
    run here, so ``floor_ratio`` bounds ``ratio`` (what the recurrent branch costs is between)."""
    eager_step: bool = False
    """Also time the student on eager ops (the compiled CPU paths of
    :mod:`megadistill.model.cpu_step` off: the decoding step's recurrent branch and the prefill's
    mLSTM scan; same weights): ``eager_ratio`` is the ratio without them."""
    mix: str = "gate"
    """The student's mix (``hybrid.mix``): ``gate`` (conversion's default) or ``shared_norm`` (the
    quality recipe's)."""
    feature_map: str = "hedgehog"
    """The student's feature map (``hybrid.feature_map``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repeats < 1 or self.new_tokens < 1 or not self.prompts or min(self.prompts) < 1:
            raise ConfigError("repeats, new_tokens and every prompt length must be >= 1")
        if self.count_tokens < 0:
            raise ConfigError(f"count_tokens must be >= 0, got {self.count_tokens}")
        if self.clock not in CLOCKS:
            raise ConfigError(f"clock={self.clock!r} is not one of {tuple(CLOCKS)}")
        # the student's settings checked by conversion's own rules, before a teacher is loaded
        HybridSettings(window=self.window, num_sinks=self.num_sinks, mix=self.mix,
                       feature_map=self.feature_map, softmax_layers=list(self.softmax_layers),
                       softmax_heads=[list(p) for p in self.softmax_heads])  # fmt: skip


# The models timed besides teacher and student on request, as the table names them.
EXTRAS = {
    "floor": "SWA-only student s (the bound of ratio)",
    "eager": "s of the student on eager ops (no compiled step or scan)",
}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside its ``with`` block (views included)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """Greedy ``generate()`` of exactly ``new_tokens`` tokens after ``ids``."""
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
    )  # fmt: skip
    if out.shape[1] != ids.shape[1] + new_tokens:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {new_tokens}")
    return out


def ops_per_token(model, ids: torch.Tensor, count_tokens: int) -> float:
    """Aten ops per generated token: ops of a ``2 + count_tokens``-token generation minus those
    of a 2-token one, over ``count_tokens`` (the prefill, generate's set-up and the first
    step's one-off work, such as the student's fused step weights, cancel)."""
    counts = []
    for n in (2, 2 + count_tokens):
        with OpCounter() as counter:
            generate(model, ids, n)
        counts.append(counter.count)
    return (counts[1] - counts[0]) / count_tokens


def timed_generate(model, ids: torch.Tensor, new_tokens: int, clock: Clock) -> dict[str, float]:
    """One ``generate()``: total seconds and the prefill's (until the first forward returns)."""
    marks: list[float] = []
    hook = model.register_forward_hook(lambda *_: marks.append(clock()) if not marks else None)
    try:
        t0 = clock()
        generate(model, ids, new_tokens)
        total = clock() - t0
    finally:
        hook.remove()
    return {"total_s": total, "prefill_s": marks[0] - t0, "decode_s": t0 + total - marks[0]}


def _median(samples: list[dict[str, float]], key: str) -> float:
    return sorted(s[key] for s in samples)[len(samples) // 2] if samples else 0.0


def run_generate_bench(cfg: GenerateBenchConfig) -> dict:
    """Measure teacher and student ``generate()`` at each prompt length.

    Returns:
        ``rows`` (one per prompt length: median seconds of each model in ``clock``, their prefill
        and decode parts, ratios teacher / student (> 1: the student is faster) in both clocks)
        and ``ops_per_token`` per model.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    longest = max(cfg.prompts) + cfg.new_tokens
    limit = cfg.max_positions()
    if limit is not None and longest > limit:
        log.warning(
            "prompt + new tokens reach %d positions, past the teacher's max_position_embeddings "
            "(%d): RoPE is defined there and the timing does not depend on the values",
            longest, limit,
        )  # fmt: skip
    teacher = cfg.load_teacher(longest + 8)
    heads = [list(p) for p in cfg.softmax_heads]
    student = build_student(
        teacher, cfg, mix=cfg.mix, feature_map=cfg.feature_map, softmax_heads=heads
    )
    models = {"teacher": teacher, "student": student}
    if cfg.floor:
        models["floor"] = build_student(teacher, cfg, gate_mode="swa", softmax_heads=heads)
    if cfg.eager_step:
        models["eager"] = copy.deepcopy(student)
        cpu_step.set_enabled(models["eager"], False)
    gen = torch.Generator().manual_seed(0)
    vocab = teacher.config.vocab_size
    prompts = {n: torch.randint(3, vocab, (cfg.batch_size, n), generator=gen) for n in cfg.prompts}
    first = prompts[min(cfg.prompts)]
    for model in models.values():  # warm-up: allocator, lazy imports, first-call paths
        generate(model, first[:, :16], 2)
    ops = {}
    if cfg.count_tokens:
        ops = {k: ops_per_token(m, first, cfg.count_tokens) for k, m in models.items()}
        log.info("aten ops per generated token: %s", ops)
    clocks = {kind: Clock(kind) for kind in CLOCKS}
    rows = []
    for n, ids in prompts.items():
        row: dict[str, float] = {"prompt": n, "new_tokens": cfg.new_tokens}
        calls: dict[str, Callable[[], dict[str, float]]] = {
            k: partial(timed_generate, m, ids, cfg.new_tokens, clocks[cfg.clock])
            for k, m in models.items()
        }
        runs = measure(calls, repeats=cfg.repeats, after=lambda _: gc.collect())
        for kind, samples in runs.items():
            row[f"{kind}_s"] = samples.median(cfg.clock)
            for part in ("prefill_s", "decode_s"):
                row[f"{kind}_{part}"] = _median(samples.values, part)
            for clock in CLOCKS:
                row[f"{kind}_{clock}_s"] = samples.median(clock)
        for kind in models.keys() - {"teacher"}:
            pre = "" if kind == "student" else f"{kind}_"
            row[f"{pre}ratio"] = row["teacher_s"] / row[f"{kind}_s"]
            for clock in CLOCKS:
                row[f"{pre}ratio_{clock}"] = row[f"teacher_{clock}_s"] / row[f"{kind}_{clock}_s"]
            for part in ("prefill", "decode"):
                row[f"{pre}{part}_ratio"] = row[f"teacher_{part}_s"] / row[f"{kind}_{part}_s"]
        log.info("prompt %d: %s", n, {k: round(v, 3) for k, v in row.items()})
        rows.append(row)
    sc = student.config
    return {"clock": cfg.clock, "threads": torch.get_num_threads(), "rows": rows,
            "ops_per_token": ops, "student": {"window": sc.window, "mix": sc.mix,
            "feature_map": sc.feature_map, "softmax_layers": list(sc.softmax_layers),
            "softmax_heads": list(sc.softmax_heads)}}  # fmt: skip


def format_result(result: dict) -> str:
    """A plain-text table: seconds per model, ratio teacher / student (> 1: student faster)."""
    extras = [k for k in EXTRAS if f"{k}_s" in result["rows"][0]]
    st = result["student"]
    lines = [
        f"generate(), greedy; {result['clock']} seconds, {result['threads']} thread(s); student: "
        f"W = {st['window']}, mix {st['mix']}, feature map {st['feature_map']}, "
        f"{len(st['softmax_layers'])} softmax layer(s), "
        f"{len(st['softmax_heads'])} softmax KV head(s); "
        "ratio = teacher s / student s (> 1: the student is faster)"
        + "".join(f"; {k} = teacher s / {EXTRAS[k]}" for k in extras),
        f"{'prompt':>7} {'new':>5} {'teacher s':>10} {'student s':>10} {'ratio':>6} "
        f"{'prefill':>8} {'decode':>7} {'wall':>6} {'cpu':>6}"
        + "".join(f" {k:>6} {'prefill':>8} {'decode':>7}" for k in extras),
    ]
    for r in result["rows"]:
        lines.append(
            f"{int(r['prompt']):>7} {int(r['new_tokens']):>5} {r['teacher_s']:>10.3f} "
            f"{r['student_s']:>10.3f} {r['ratio']:>6.2f} {r['prefill_ratio']:>8.2f} "
            f"{r['decode_ratio']:>7.2f} {r['ratio_wall']:>6.2f} {r['ratio_cpu']:>6.2f}"
            + "".join(
                f" {r[f'{k}_ratio']:>6.2f} {r[f'{k}_prefill_ratio']:>8.2f} "
                f"{r[f'{k}_decode_ratio']:>7.2f}"
                for k in extras
            )
        )
    if result["ops_per_token"]:
        ops = result["ops_per_token"]
        lines.append(
            "aten ops per generated token: " + ", ".join(f"{k} {v:.0f}" for k, v in ops.items())
        )
    return "\n".join(lines)
