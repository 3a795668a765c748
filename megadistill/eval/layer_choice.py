"""Which layers to keep as softmax attention: measured, not guessed.

Starting from the *floor* (every layer of the teacher cut to sliding-window attention with sinks,
the student's window and no mLSTM), each layer in turn gets its full causal attention back and
the mean NLL on calibration text at positions >= W is measured. A layer's *gain* is how much
loss that one layer's full attention wins back beyond the window; the k layers with the largest
gains are the ones to keep (``hybrid.softmax_layers``). The measurement needs only the teacher
and a few long documents of the training mix (never the held-out sets).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError

log = logging.getLogger(__name__)


def _beyond_nll(model: Any, windows: Sequence[Sequence[int]], start: int) -> float:
    from megadistill.eval.positions import token_nll

    total, count = 0.0, 0
    for nll in token_nll(model, windows):
        tail = nll[start:]
        total += sum(tail)
        count += len(tail)
    if count == 0:
        raise MegadistillError(f"calibration documents have no token beyond position {start}")
    return total / count


def rank_softmax_layers(
    teacher_dir: str | Path,
    documents: Sequence[str],
    *,
    window: int,
    num_sinks: int = 4,
    max_length: int = 1024,
) -> dict[str, Any]:
    """Measure every layer's gain (see module docstring).

    Args:
        teacher_dir: the teacher's Hugging Face folder.
        documents: calibration text (a few long documents of the training mix).
        window: the student's W; losses are averaged over positions >= W.
        num_sinks: the student's sink tokens.
        max_length: tokens scored per document.

    Returns:
        ``{"teacher": nll, "floor": nll, "gains": [per layer], "ranking": [layers, best first],
        "window": W, "num_docs": n, "num_tokens": scored tokens per model}``.
    """
    from megadistill.eval.lmeval import load_model
    from megadistill.eval.positions import token_ids
    from megadistill.teachers.conversion import convert

    teacher, tokenizer = load_model(teacher_dir)
    windows = [w for w in token_ids(tokenizer, documents, max_length) if len(w) > window + 1]
    if not windows:
        raise MegadistillError(
            f"no calibration document is longer than the window ({window} tokens): pass longer text"
        )
    floor, _ = convert(teacher, window=window, num_sinks=num_sinks, gate_mode="swa")
    result: dict[str, Any] = {
        "window": window,
        "num_sinks": num_sinks,
        "num_docs": len(windows),
        "num_tokens": sum(len(w) - 1 - window for w in windows),
        "teacher": _beyond_nll(teacher, windows, window),
    }
    del teacher
    result["floor"] = _beyond_nll(floor, windows, window)
    gains = []
    for i, layer in enumerate(floor.model.layers):
        layer.self_attn.full = True  # the floor has no new parameters in use: safe to flip
        nll = _beyond_nll(floor, windows, window)
        layer.self_attn.full = False
        gains.append(result["floor"] - nll)
        log.info("layer %d: full attention wins back %.4f nats beyond W", i, gains[-1])
    result["gains"] = gains
    result["ranking"] = sorted(range(len(gains)), key=lambda i: -gains[i])
    return result


def format_ranking(result: dict[str, Any], k: int) -> str:
    """A short table: the floor's gap and the top layers' gains."""
    gap = result["floor"] - result["teacher"]
    lines = [
        f"W = {result['window']}: teacher {result['teacher']:.4f}, floor {result['floor']:.4f} "
        f"nats/token beyond W (gap {gap:+.4f}; {result['num_docs']} documents, "
        f"{result['num_tokens']} tokens)",
        "layer  gain (nats)  share of gap",
    ]
    for i in result["ranking"][: max(k, 5)]:
        g = result["gains"][i]
        lines.append(f"{i:5d}  {g:11.4f}  {g / gap if gap > 0 else float('nan'):11.1%}")
    chosen = sorted(result["ranking"][:k])
    lines.append(f"softmax_layers for k = {k}: {chosen}")
    return "\n".join(lines)
