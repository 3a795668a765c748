"""Teacher vs student inference: prefill and decode throughput and cache memory by context length.

The teacher is a random one of a given size (throughput does not depend on the values) or a real
Hugging Face folder (``teacher=PATH`` or ``teacher=smollm2``); the student is its conversion
(``megadistill.teachers.convert``), so every shared weight is identical. Teacher and student run
in the same process, interleaved (teacher, student, student, teacher, ...), ``repeats`` times per
context; the medians are reported, so a machine that is busy with other work moves both alike.
Decode speed is the median of the per-token step times.
"""

from __future__ import annotations

import gc
import logging
import statistics
from dataclasses import dataclass
from functools import partial

import torch
from transformers import DynamicCache

from megadistill.bench.synthetic import SyntheticModelConfig
from megadistill.bench.timing import CLOCKS, Clock, measure, median_by_key
from megadistill.config import ConfigError
from megadistill.teachers import convert

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class InferenceBenchConfig(SyntheticModelConfig):
    """Settings of ``megadistill bench inference`` (model size: the synthetic defaults)."""

    contexts: tuple[int, ...] = (1024, 4096, 16384)
    """Context lengths to prefill before decoding (at most the real teacher's maximum)."""
    decode_tokens: int = 32
    """Tokens decoded after each prefill."""
    batch_size: int = 1
    """Sequences decoded together."""
    window: int = 512
    """Student SWA window."""
    num_sinks: int = 4
    """Student sink tokens."""
    softmax_layers: tuple[int, ...] = ()
    """Student layers kept as full softmax attention (their KV cache grows like the teacher's)."""
    repeats: int = 1
    """Interleaved measurements per context (teacher and student alternate; medians reported)."""
    clock: str = "cpu"
    """``cpu``: this process's CPU time (what the models cost, also on a machine busy with other
    work; with ``threads > 1`` it sums the threads); ``wall``: elapsed time."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.repeats < 1 or self.decode_tokens < 1 or not self.contexts:
            raise ConfigError("repeats and decode_tokens must be >= 1 and contexts non-empty")
        if self.clock not in CLOCKS:
            raise ConfigError(f"clock={self.clock!r} is not one of {tuple(CLOCKS)}")


def teacher_cache_bytes(cache: DynamicCache) -> int:
    """Bytes of the keys and values a Hugging Face ``DynamicCache`` holds."""
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def prefill_decode(
    model, ids: torch.Tensor, decode_tokens: int, clock: Clock, per_token: bool = True
) -> dict[str, float]:
    """Prefill ``ids`` into a fresh cache, then greedy-decode ``decode_tokens`` tokens.

    Works for the student (``model.new_cache()``) and a Hugging Face teacher (``DynamicCache``).

    Args:
        clock: the clock (and device to synchronise) every reading uses.
        per_token: time each decode step and report their median; False: one reading at each
            end of the decode (on a GPU a reading per token would stall the launch queue), mean.

    Returns:
        ``prefill_s``, ``decode_s_per_token`` and ``cache_bytes`` (after the decode).
    """
    student = hasattr(model, "new_cache")
    cache = model.new_cache() if student else DynamicCache(config=model.config)
    t0 = clock()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    nxt = out.logits[:, -1:].argmax(-1)
    t1 = clock()
    steps = []
    for _ in range(decode_tokens):
        s0 = clock() if per_token else 0.0
        nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
        if per_token:
            steps.append(clock() - s0)
    per_step = statistics.median(steps) if per_token else (clock() - t1) / decode_tokens
    return {
        "prefill_s": t1 - t0,
        "decode_s_per_token": per_step,
        "cache_bytes": cache.nbytes() if student else teacher_cache_bytes(cache),
    }


def _run(model, ids: torch.Tensor, decode_tokens: int, clock: Clock) -> dict[str, float]:
    r = prefill_decode(model, ids, decode_tokens, clock)
    return {
        "prefill_tok_s": ids.numel() / r["prefill_s"],
        "decode_tok_s": ids.shape[0] / r["decode_s_per_token"],
        "cache_mib": r["cache_bytes"] / 2**20,
    }


def build_models(cfg: InferenceBenchConfig, max_positions: int):
    """(teacher, student): the real or random teacher in ``cfg.dtype`` and its conversion."""
    teacher = cfg.load_teacher(max_positions)
    return teacher, build_student(teacher, cfg)


def build_student(teacher, cfg: InferenceBenchConfig, **hybrid):
    """The conversion of ``teacher`` with ``cfg``'s window, sinks and softmax layers (seed 0)
    and any other ``hybrid`` settings."""
    student, _ = convert(
        teacher, seed=0, window=cfg.window, num_sinks=cfg.num_sinks,
        softmax_layers=list(cfg.softmax_layers), **hybrid,
    )  # fmt: skip
    return student


def run_inference_bench(cfg: InferenceBenchConfig) -> list[dict[str, float]]:
    """Measure teacher and student at each context; return one row per context with ratios."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    limit = cfg.max_positions()
    if limit is not None and max(cfg.contexts) > limit:
        raise ConfigError(
            f"contexts={list(cfg.contexts)}: the teacher's max_position_embeddings is {limit}; "
            "choose contexts up to it"
        )
    teacher, student = build_models(cfg, max(cfg.contexts) + cfg.decode_tokens + 8)
    vocab = teacher.config.vocab_size
    clock = Clock(cfg.clock)
    models = {"teacher": teacher, "student": student}

    def calls(ids: torch.Tensor, decode_tokens: int):
        return {kind: partial(_run, m, ids, decode_tokens, clock) for kind, m in models.items()}

    gen = torch.Generator().manual_seed(0)
    rows = []
    for ctx in cfg.contexts:
        ids = torch.randint(3, vocab, (cfg.batch_size, ctx), generator=gen)
        measure(calls(ids[:, :64], 2))  # warm-up, on a short prefix
        runs = measure(
            calls(ids, cfg.decode_tokens), repeats=cfg.repeats, after=lambda _: gc.collect()
        )
        t, s = median_by_key(runs["teacher"].values), median_by_key(runs["student"].values)
        row = {"context": ctx, **{f"teacher_{k}": v for k, v in t.items()}}
        row.update({f"student_{k}": v for k, v in s.items()})
        row["prefill_ratio"] = s["prefill_tok_s"] / t["prefill_tok_s"]
        row["decode_ratio"] = s["decode_tok_s"] / t["decode_tok_s"]
        row["cache_ratio"] = s["cache_mib"] / t["cache_mib"]
        log.info("context %d: %s", ctx, {k: round(v, 3) for k, v in row.items()})
        rows.append(row)
    return rows


def decode_flatness(rows: list[dict[str, float]]) -> float:
    """Student decode tokens/s at the longest context over the shortest (1.0: flat)."""
    return rows[-1]["student_decode_tok_s"] / rows[0]["student_decode_tok_s"]


def format_rows(rows: list[dict[str, float]]) -> str:
    """A plain-text table of the measurements."""
    head = (
        f"{'context':>8} {'prefill tok/s T':>16} {'S':>10} {'ratio':>6} "
        f"{'decode tok/s T':>15} {'S':>8} {'ratio':>6} {'cache MiB T':>12} {'S':>8}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{int(r['context']):>8} {r['teacher_prefill_tok_s']:>16.0f} "
            f"{r['student_prefill_tok_s']:>10.0f} {r['prefill_ratio']:>6.2f} "
            f"{r['teacher_decode_tok_s']:>15.1f} {r['student_decode_tok_s']:>8.1f} "
            f"{r['decode_ratio']:>6.2f} {r['teacher_cache_mib']:>12.2f} {r['student_cache_mib']:>8.2f}"
        )
    if len(rows) > 1:
        lines.append(
            f"student decode tok/s at {int(rows[-1]['context'])} / at {int(rows[0]['context'])}: "
            f"{decode_flatness(rows):.2f}"
        )
    return "\n".join(lines)
