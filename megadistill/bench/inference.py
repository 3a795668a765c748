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
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from megadistill.bench.synthetic import SyntheticModelConfig
from megadistill.config import ConfigError
from megadistill.teachers import convert

log = logging.getLogger(__name__)
CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


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


def _teacher_cache_bytes(cache: DynamicCache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def _run(model, ids: torch.Tensor, decode_tokens: int, student: bool, clock) -> dict[str, float]:
    cache = model.new_cache() if student else DynamicCache(config=model.config)
    t0 = clock()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    t1 = clock()
    nxt = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(decode_tokens):
        s0 = clock()
        out = model(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        steps.append(clock() - s0)
    mem = cache.nbytes() if student else _teacher_cache_bytes(cache)
    return {
        "prefill_tok_s": ids.numel() / (t1 - t0),
        "decode_tok_s": ids.shape[0] / statistics.median(steps),
        "cache_mib": mem / 2**20,
    }


def build_models(cfg: InferenceBenchConfig, max_positions: int):
    """(teacher, student): the real or random teacher in ``cfg.dtype`` and its conversion."""
    path = cfg.teacher_path()
    if path is not None:
        teacher = AutoModelForCausalLM.from_pretrained(
            path, dtype=cfg.torch_dtype, attn_implementation="sdpa"
        ).eval()
    else:
        tcfg = cfg.teacher_config(max_positions)
        teacher = AutoModelForCausalLM.from_config(tcfg, attn_implementation="sdpa")
        teacher = teacher.to(cfg.torch_dtype).eval()
    student, _ = convert(
        teacher, seed=0, window=cfg.window, num_sinks=cfg.num_sinks,
        softmax_layers=list(cfg.softmax_layers),
    )  # fmt: skip
    return teacher, student


def _median_rows(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


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
    clock = CLOCKS[cfg.clock]
    gen = torch.Generator().manual_seed(0)
    rows = []
    for ctx in cfg.contexts:
        ids = torch.randint(3, vocab, (cfg.batch_size, ctx), generator=gen)
        _run(teacher, ids[:, :64], 2, student=False, clock=clock)  # warm-up
        _run(student, ids[:, :64], 2, student=True, clock=clock)
        runs: dict[str, list[dict[str, float]]] = {"teacher": [], "student": []}
        for r in range(cfg.repeats):
            order = ("teacher", "student") if r % 2 == 0 else ("student", "teacher")
            for kind in order:
                model = teacher if kind == "teacher" else student
                res = _run(model, ids, cfg.decode_tokens, student=kind == "student", clock=clock)
                runs[kind].append(res)
                gc.collect()
        t, s = _median_rows(runs["teacher"]), _median_rows(runs["student"])
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
