"""Needle in a haystack: can the model recall a number planted at some depth of a long context?

The paper's known weak spot (~1.0 -> 0.15 at 4K context). Each probe is one forward pass over
``haystack[:depth] + needle + haystack[depth:] + question + answer``; the probe passes when every
answer token is the argmax given its prefix, which is exactly what greedy decoding would emit.
Graded scores beside exact match, so progress shows before exact match moves: the mean
log-probability per answer token and the share of answer tokens (digits: the tokenisers here
split numbers into single digits) that are the argmax, per length and per depth.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError

DEFAULT_FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
NEEDLE = " The secret number is {value}."
QUESTION = " What is the secret number? The secret number is"
ANSWER = " {value}"
DEPTHS = (0.1, 0.5, 0.9)
MIN_PROBES = 20
"""Probes per length at least (the default ``num_trials`` per depth is chosen to reach it)."""


def default_trials(num_depths: int) -> int:
    """Trials per depth so that every length gets at least ``MIN_PROBES`` probes."""
    return math.ceil(MIN_PROBES / num_depths)


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of a binomial proportion ``hits / n``; unlike the
    normal approximation it stays inside [0, 1] and is not empty at 0 or n hits."""
    if n < 1:
        raise MegadistillError("a Wilson interval needs at least one trial")
    p = hits / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def check_lengths(lengths: Sequence[int], context: int | None) -> None:
    """Refuse needle lengths beyond the teacher's context (``max_position_embeddings``; None:
    unbounded): the teacher would be off its training distribution there."""
    too_long = [n for n in lengths if context is not None and n > context]
    if too_long:
        raise MegadistillError(
            f"NIAH lengths {too_long} exceed the teacher's context ({context} tokens); "
            "pass lengths up to it"
        )


def probe_plan(
    lengths: Sequence[int], depths: Sequence[float], num_trials: int, seed: int
) -> dict[int, list[tuple[float, int]]]:
    """(depth, needle value) of every probe per length; a function of the seed only, so teacher
    and student get identical probes."""
    plan = {}
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        plan[int(length)] = [
            (float(d), rng.randint(10000, 99999)) for d in depths for _ in range(num_trials)
        ]
    return plan


def _probe_ids(
    tokenizer: Any, filler_ids: list[int], length: int, depth: float, value: int
) -> tuple[list[int], int]:
    """Token ids of one probe of ``length`` tokens and the number of answer tokens at its end."""
    needle = tokenizer(NEEDLE.format(value=value), add_special_tokens=False).input_ids
    question = tokenizer(QUESTION, add_special_tokens=False).input_ids
    answer = tokenizer(ANSWER.format(value=value), add_special_tokens=False).input_ids
    room = length - len(needle) - len(question) - len(answer)
    if room < 1:
        raise MegadistillError(f"NIAH length {length} is too short for the needle and question")
    reps = room // max(1, len(filler_ids)) + 1
    hay = (filler_ids * reps)[:room]
    cut = int(round(depth * room))
    return hay[:cut] + needle + hay[cut:] + question + answer, len(answer)


def probe_model(
    model: Any,
    tokenizer: Any,
    lengths: Sequence[int],
    *,
    depths: Sequence[float] = DEPTHS,
    num_trials: int | None = None,
    seed: int = 0,
    filler: str = DEFAULT_FILLER,
) -> dict[int, dict[str, float]]:
    """Run the probes for one model: ``{length: {"acc", "hits", "n", "digit_acc", "logp",
    "by_depth": {depth: the same five}}}``.

    The probes come from :func:`probe_plan` (``num_trials`` per depth, default: enough for
    ``MIN_PROBES`` per length), so teacher and student see identical ones.
    """
    import torch

    num_trials = default_trials(len(depths)) if num_trials is None else num_trials
    if num_trials < 1 or not depths:
        raise MegadistillError(f"NIAH needs depths and num_trials >= 1, got {num_trials}")
    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids
    out: dict[int, dict[str, Any]] = {}
    for length, probes in probe_plan(lengths, depths, num_trials, seed).items():
        scored: dict[float, list[tuple[bool, float, float]]] = {}
        for depth, value in probes:
            ids, n_ans = _probe_ids(tokenizer, filler_ids, length, depth, value)
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x).logits[0, -n_ans - 1 : -1].float()
            target = x[0, -n_ans:]
            logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])
            right = logits.argmax(-1) == target
            scored.setdefault(depth, []).append(
                (bool(right.all()), float(right.float().mean()), float(logp.mean()))
            )
        out[length] = {
            **_scores([p for d in scored.values() for p in d]),
            "by_depth": {str(d): _scores(p) for d, p in scored.items()},
        }
    return out


def _scores(probes: list[tuple[bool, float, float]]) -> dict[str, float]:
    """Exact-match rate, per-token (digit) accuracy and mean answer log-probability."""
    n = len(probes)
    hits = sum(p[0] for p in probes)
    return {
        "acc": hits / n,
        "hits": hits,
        "n": n,
        "digit_acc": sum(p[1] for p in probes) / n,
        "logp": sum(p[2] for p in probes) / n,
    }


def niah_pair(
    teacher: str | Path,
    student: str | Path,
    lengths: Sequence[int],
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Teacher vs student on the same probes; the ``niah`` section of ``results.json``.

    Every row carries both accuracies with their 95% Wilson intervals. Lengths beyond the
    teacher's context (``max_position_embeddings``) are refused: the teacher would be off its
    training distribution and the comparison would say nothing about the student.
    """
    from megadistill.eval.lmeval import load_model

    depths = tuple(probe_kwargs.get("depths", DEPTHS))
    num_trials = probe_kwargs.get("num_trials") or default_trials(len(depths))
    probe_kwargs = {**probe_kwargs, "depths": depths, "num_trials": num_trials}
    results = {}
    context = None
    for role, path in (("teacher", teacher), ("student", student)):
        model, tokenizer = load_model(path)
        if role == "teacher":
            context = getattr(model.config, "max_position_embeddings", None)
            check_lengths(lengths, context)
        results[role] = probe_model(model, tokenizer, lengths, **probe_kwargs)
        del model
    rows = []
    for n in lengths:
        row: dict[str, Any] = {"length": int(n), "num_probes": results["teacher"][n]["n"]}
        for role in ("teacher", "student"):
            r = results[role][n]
            lo, hi = wilson_interval(r["hits"], r["n"])
            row.update({f"{role}_acc": r["acc"], f"{role}_acc_lo": lo, f"{role}_acc_hi": hi,
                        f"{role}_logp": r["logp"], f"{role}_digit_acc": r["digit_acc"],
                        f"{role}_by_depth": r["by_depth"]})  # fmt: skip
        rows.append(row)
    seed = probe_kwargs.get("seed", 0)
    plan = probe_plan(lengths, depths, num_trials, seed)
    return {
        "rows": rows,
        "teacher_context": context,
        "settings": {k: str(v) for k, v in probe_kwargs.items()},
        "probes": {str(k): v for k, v in plan.items()},
    }
