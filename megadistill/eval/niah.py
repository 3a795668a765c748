"""Needle in a haystack: can the model recall a number planted at some depth of a long context?

The paper's known weak spot (~1.0 -> 0.15 at 4K context). Each probe is one forward pass over
``haystack[:depth] + needle + haystack[depth:] + question + answer``; the probe passes when every
answer token is the argmax given its prefix, which is exactly what greedy decoding would emit.
The mean log-probability per answer token is reported too (smoother for weak models).
"""

from __future__ import annotations

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
    depths: Sequence[float] = (0.1, 0.5, 0.9),
    num_trials: int = 2,
    seed: int = 0,
    filler: str = DEFAULT_FILLER,
) -> dict[int, dict[str, float]]:
    """Run the probes for one model: ``{length: {"acc": ..., "logp": ...}}``.

    The needle values depend only on ``seed``, so teacher and student see identical probes.
    """
    import torch

    filler_ids = tokenizer(filler, add_special_tokens=False).input_ids
    out: dict[int, dict[str, float]] = {}
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        hits, logps = [], []
        for depth in depths:
            for _ in range(num_trials):
                ids, n_ans = _probe_ids(
                    tokenizer, filler_ids, length, depth, rng.randint(10000, 99999)
                )
                x = torch.tensor([ids])
                with torch.no_grad():
                    logits = model(input_ids=x).logits[0, -n_ans - 1 : -1].float()
                target = x[0, -n_ans:]
                logp = torch.log_softmax(logits, dim=-1).gather(1, target[:, None])
                hits.append(bool((logits.argmax(-1) == target).all()))
                logps.append(float(logp.mean()))
        out[int(length)] = {"acc": sum(hits) / len(hits), "logp": sum(logps) / len(logps)}
    return out


def niah_pair(
    teacher: str | Path,
    student: str | Path,
    lengths: Sequence[int],
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Teacher vs student on the same probes; the ``niah`` section of ``results.json``."""
    from megadistill.eval.lmeval import load_model

    results = {}
    for role, path in (("teacher", teacher), ("student", student)):
        model, tokenizer = load_model(path)
        results[role] = probe_model(model, tokenizer, lengths, **probe_kwargs)
        del model
    rows = [
        {
            "length": int(n),
            "teacher_acc": results["teacher"][n]["acc"],
            "student_acc": results["student"][n]["acc"],
            "teacher_logp": results["teacher"][n]["logp"],
            "student_logp": results["student"][n]["logp"],
        }
        for n in lengths
    ]
    return {"rows": rows, "settings": {k: str(v) for k, v in probe_kwargs.items()}}
