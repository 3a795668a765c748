"""Teacher vs student inference: prefill and decode throughput and cache memory by context length.

Both models are built from the same teacher config with random weights (throughput does not
depend on the values); the student is the converted teacher, so every shared weight is identical.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from megadistill.bench.synthetic import SyntheticModelConfig
from megadistill.teachers import convert

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class InferenceBenchConfig(SyntheticModelConfig):
    """Settings of ``megadistill bench inference`` (model size: the synthetic defaults)."""

    contexts: tuple[int, ...] = (1024, 4096, 16384)
    """Context lengths to prefill before decoding."""
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
    threads: int = 0
    """torch threads (0: leave torch's default)."""


def _teacher_cache_bytes(cache: DynamicCache) -> int:
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def _run(model, ids: torch.Tensor, decode_tokens: int, student: bool) -> dict[str, float]:
    cache = model.new_cache() if student else DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(decode_tokens):
        out = model(nxt, cache=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    mem = cache.nbytes() if student else _teacher_cache_bytes(cache)
    tokens = ids.numel()
    return {
        "prefill_tok_s": tokens / (t1 - t0),
        "decode_tok_s": decode_tokens * ids.shape[0] / (t2 - t1),
        "cache_mib": mem / 2**20,
    }


def run_inference_bench(cfg: InferenceBenchConfig) -> list[dict[str, float]]:
    """Measure teacher and student at each context; return one row per context with ratios."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tcfg = cfg.teacher_config(max(cfg.contexts) + cfg.decode_tokens + 8)
    teacher = AutoModelForCausalLM.from_config(tcfg, attn_implementation="sdpa").eval()
    student, _ = convert(
        teacher, seed=0, window=cfg.window, num_sinks=cfg.num_sinks,
        softmax_layers=list(cfg.softmax_layers),
    )  # fmt: skip
    rows = []
    for ctx in cfg.contexts:
        ids = torch.randint(3, cfg.vocab_size, (cfg.batch_size, ctx))
        _run(teacher, ids[:, :64], 2, student=False)  # warm-up
        _run(student, ids[:, :64], 2, student=True)
        t = _run(teacher, ids, cfg.decode_tokens, student=False)
        gc.collect()
        s = _run(student, ids, cfg.decode_tokens, student=True)
        gc.collect()
        row = {"context": ctx, **{f"teacher_{k}": v for k, v in t.items()}}
        row.update({f"student_{k}": v for k, v in s.items()})
        row["prefill_ratio"] = s["prefill_tok_s"] / t["prefill_tok_s"]
        row["decode_ratio"] = s["decode_tok_s"] / t["decode_tok_s"]
        row["cache_ratio"] = s["cache_mib"] / t["cache_mib"]
        log.info("context %d: %s", ctx, {k: round(v, 3) for k, v in row.items()})
        rows.append(row)
    return rows


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
    return "\n".join(lines)
