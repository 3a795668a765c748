"""Loss by position: where in a long document does the student fall behind its teacher?

Only the mLSTM branch carries context beyond the sliding window W, so the question the method must
answer is how the student's next-token loss compares with the teacher's at positions >= W. This
module scores teacher and student on identical token windows of held-out documents, buckets the
per-token NLL by the position of the predicting token ([0, W), [W, 2W), [2W, 4W), ... up to
``max_length``) and reports, per held-out set and bucket, both means, the gap and its standard
error over documents (tokens of one document are correlated; documents are the independent
units). An optional *floor* model (the teacher with its attention cut to the window, no mLSTM)
shows how much of the window's loss the recurrent branch wins back:

    recovered = (floor - student) / (floor - teacher)      per bucket
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from megadistill.errors import MegadistillError
from megadistill.eval.metrics import ratio_se

log = logging.getLogger(__name__)

Domain = Literal["in", "out"]


@dataclass(frozen=True, kw_only=True)
class HeldoutSet:
    """Held-out documents of one domain, labelled in- or out-of-domain for the training mix."""

    name: str
    """Short name shown in the report (e.g. ``kjv``)."""
    domain: Domain
    """``in``: the training mix has text of this kind; ``out``: it has none."""
    documents: tuple[str, ...]
    """The documents; each is scored from its first token up to ``max_length`` tokens."""
    description: str = ""
    """One line for the report: what the text is and where it comes from."""

    def __post_init__(self) -> None:
        if self.domain not in ("in", "out"):
            raise MegadistillError(f"held-out set {self.name!r}: domain must be 'in' or 'out'")
        if not self.documents:
            raise MegadistillError(f"held-out set {self.name!r} has no documents")


def bucket_edges(window: int, max_length: int) -> list[int]:
    """``[0, W, 2W, 4W, ..., max_length]``: the first bucket lies inside the window."""
    if window < 1 or max_length < 2:
        raise MegadistillError(f"bad buckets: window={window}, max_length={max_length}")
    edges = [0]
    edge = window
    while edge < max_length:
        edges.append(edge)
        edge *= 2
    edges.append(max_length)
    return edges


def token_ids(tokenizer: Any, documents: Sequence[str], max_length: int) -> list[list[int]]:
    """The scored windows: each document's first ``max_length`` tokens (documents shorter than
    two tokens are dropped)."""
    out = []
    for doc in documents:
        ids = tokenizer(doc).input_ids[:max_length]
        if len(ids) >= 2:
            out.append(list(ids))
    return out


def token_nll(model: Any, windows: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-token NLL of each window: entry ``t`` is the loss of token ``t + 1`` given ``0..t``
    (so its position, the index of the predicting token, is ``t``)."""
    import torch
    import torch.nn.functional as F

    out = []
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([list(ids)])
            logits = model(input_ids=x).logits[0, :-1].float()
            nll = F.cross_entropy(logits, x[0, 1:], reduction="none")
            out.append(nll.tolist())
    return out


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def bucket_stats(
    nll: Mapping[str, Sequence[Sequence[float]]], edges: Sequence[int], reference: str = "teacher"
) -> list[dict[str, Any]]:
    """Per bucket: each model's mean NLL (token-weighted) and, against ``reference``, the mean
    per-document gap with its standard error over documents. With a ``student`` and a ``floor``
    the bucket also gets ``recovered_se``, the delta-method error of the recovered share (see
    :func:`add_recovered`, which sets the share itself).

    Args:
        nll: model name -> per-document token NLLs (same documents, same tokens for every model).
        edges: bucket edges from :func:`bucket_edges`.
        reference: the model the gaps are taken against (the teacher).
    """
    rows = []
    names = list(nll)
    for lo, hi in zip(edges[:-1], edges[1:]):
        row: dict[str, Any] = {"lo": lo, "hi": hi}
        per_doc: dict[str, list[float]] = {n: [] for n in names}
        tokens = 0
        sums = dict.fromkeys(names, 0.0)
        for d in range(len(nll[reference])):
            seg = {n: nll[n][d][lo:hi] for n in names}
            if not seg[reference]:
                continue
            tokens += len(seg[reference])
            for n in names:
                sums[n] += sum(seg[n])
                per_doc[n].append(sum(seg[n]) / len(seg[n]))
        row["num_docs"] = len(per_doc[reference])
        row["num_tokens"] = tokens
        if tokens == 0:
            continue
        gaps: dict[str, list[float]] = {}
        for n in names:
            row[n] = sums[n] / tokens
            if n != reference:
                gaps[n] = [s - t for s, t in zip(per_doc[n], per_doc[reference])]
                row[f"{n}_gap"], row[f"{n}_gap_se"] = _mean_se(gaps[n])
                row[f"{n}_rel_gap"] = row[f"{n}_gap"] / row[reference]
        if "student" in gaps and "floor" in gaps and sum(gaps["floor"]) != 0:
            row["recovered_se"] = ratio_se(gaps["student"], gaps["floor"])[1]
        rows.append(row)
    return rows


def add_recovered(rows: list[dict[str, Any]], student: str = "student", floor: str = "floor"):
    """Per bucket, the share of the floor's gap that the student wins back,
    ``(floor_gap - student_gap) / floor_gap`` (None where the floor's gap is under two standard
    errors: a share of noise, e.g. "-650% +- 393%"; its error ``recovered_se`` is then None
    too, and the report prints "-")."""
    for row in rows:
        fg, sg = row.get(f"{floor}_gap"), row.get(f"{student}_gap")
        if fg is None or sg is None:
            continue
        se = row.get(f"{floor}_gap_se") or 0.0
        row["recovered"] = (fg - sg) / fg if fg > max(2 * se, 1e-9) else None
        if row["recovered"] is None:
            row["recovered_se"] = None
    return rows


def summarize_beyond(rows: Sequence[dict[str, Any]], start: int, names: Sequence[str]):
    """Token-weighted means over the buckets that start at or after ``start``."""
    sel = [r for r in rows if r["lo"] >= start and r["num_tokens"] > 0]
    tokens = sum(r["num_tokens"] for r in sel)
    if tokens == 0:
        return None
    out: dict[str, Any] = {"from": start, "num_tokens": tokens}
    for n in names:
        out[n] = sum(r[n] * r["num_tokens"] for r in sel) / tokens
    return out


def position_losses(
    models: Mapping[str, Any],
    tokenizer: Any,
    sets: Sequence[HeldoutSet],
    *,
    window: int,
    max_length: int,
    beyond: int | None = None,
) -> dict[str, Any]:
    """Score every model on every held-out set; the results.json entry ``positions``.

    Args:
        models: name -> causal LM (must include ``teacher``; ``student``; optionally ``floor``).
        tokenizer: the shared tokenizer.
        sets: held-out sets.
        window: the student's W (bucket edges start there).
        max_length: tokens scored per document.
        beyond: position from which the headline "beyond" numbers are averaged (default 4W).
    """
    if "teacher" not in models:
        raise MegadistillError("position losses need a 'teacher' model")
    nll: dict[str, dict[str, list[list[float]]]] = {}
    doc_tokens: dict[str, list[int]] = {}
    for hs in sets:
        windows = set_windows(tokenizer, hs, max_length)
        doc_tokens[hs.name] = [len(w) for w in windows]
        nll[hs.name] = {}
        for name, model in models.items():
            log.info("positions: %s on %s (%d documents)", name, hs.name, len(windows))
            nll[hs.name][name] = token_nll(model, windows)
    return summarize_positions(
        nll, sets, doc_tokens, window=window, max_length=max_length, beyond=beyond
    )


def set_windows(tokenizer: Any, hs: HeldoutSet, max_length: int) -> list[list[int]]:
    """:func:`token_ids` of one set, with an error naming the set when nothing is left."""
    windows = token_ids(tokenizer, hs.documents, max_length)
    if not windows:
        raise MegadistillError(f"held-out set {hs.name!r}: no document has 2 tokens")
    return windows


def summarize_positions(
    nll: Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
    sets: Sequence[HeldoutSet],
    doc_tokens: Mapping[str, Sequence[int]],
    *,
    window: int,
    max_length: int,
    beyond: int | None = None,
) -> dict[str, Any]:
    """The ``positions`` entry from per-token NLLs already computed (``set -> model -> docs``).

    Each set's ``beyond`` entry pools the positions ``>= beyond`` (default 4W) into one bucket:
    token-weighted mean NLLs, per-document gaps with standard errors, the relative gap and, with
    a floor, the recovered share with its delta-method error.
    """
    edges = bucket_edges(window, max_length)
    beyond = 4 * window if beyond is None else beyond
    names = list(next(iter(nll.values()))) if nll else []
    out: dict[str, Any] = {
        "window": window,
        "max_length": max_length,
        "beyond": beyond,
        "models": names,
        "sets": {},
    }
    for hs in sets:
        by_model = nll[hs.name]
        rows = bucket_stats(by_model, edges)
        pooled = bucket_stats(by_model, [beyond, max_length]) if beyond < max_length else []
        if "floor" in by_model and "student" in by_model:
            add_recovered(rows)
            add_recovered(pooled)
        out["sets"][hs.name] = {
            "domain": hs.domain,
            "description": hs.description,
            "num_docs": len(doc_tokens[hs.name]),
            "doc_tokens": list(doc_tokens[hs.name]),
            "buckets": rows,
            "beyond": {"from": beyond, **pooled[0]} if pooled else None,
        }
    return out
