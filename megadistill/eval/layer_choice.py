"""Which layers to keep as softmax attention: measured, not guessed.

Starting from the *floor* (every layer of the teacher cut to sliding-window attention with sinks,
the student's window and no mLSTM), each layer in turn gets its full causal attention back and
one score is measured. A layer's *gain* is how much that one layer's full attention wins back;
the k layers with the largest gains are the ones to keep (``hybrid.softmax_layers``). Criteria:

- ``nll``: the mean NLL on calibration text at positions >= W (lower is better; the gain is in
  nats). It finds the layers that carry the most context in general.
- ``retrieval``: the mean log-probability of the needle's answer tokens over needle probes
  (:mod:`megadistill.eval.niah`, a haystack of filler text, never the training or held-out
  sets; the gain is in nats per answer token). It finds the layers that look a fact up far back,
  which the NLL of prose barely rewards.
- ``kl`` (needs a *trained* student): inside the student, each layer not yet kept in turn gets
  full softmax attention back, and the gain is the drop of the mean KL(teacher || student) at
  positions >= W on calibration text (nats per token). It ranks layers by what the trained
  student still misses, not by what the untrained floor misses (the recipe of KL-guided layer
  selection, "Distilling to Hybrid Attention Models via KL-Guided Layer Selection", ICLR 2026).
  One pass measures each layer alone; ``greedy`` picks as the paper does: the best layer is
  kept full and the others are measured again beside it, once per pick.
- ``both``: the two rankings taken in turn (:func:`combine_rankings`), retrieval first: with k
  kept layers, about half look facts up and half carry context in general.

:func:`layer_curve` then measures what keeping the top k layers of each ranking gives, beyond-W
NLL and needle accuracy, for k = 0, 1, 2, 4, 8: the curve on which a criterion is chosen.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, get_args

from megadistill.errors import MegadistillError

Criterion = Literal["nll", "retrieval"]
CRITERIA: tuple[str, ...] = get_args(Criterion)
CHOICES: tuple[str, ...] = (*CRITERIA, "both")
"""What a layer choice can follow: one criterion's ranking, or both taken in turn."""

log = logging.getLogger(__name__)


class LayerInputs:
    """The hidden states entering a student's layers, recorded over some forwards, so that a
    later forward on the same ids whose layers below ``i`` are unchanged starts at layer ``i``
    (:meth:`from_layer`): flipping layer ``i`` to full attention then costs the layers from
    ``i`` up, not the whole model, and a scan over every layer about half of its passes. The
    result is the same to the bit (``tests/eval/test_layer_choice.py``). Memory: every recorded
    forward's T x hidden floats per recorded layer (SmolLM2, 6 documents of 1K tokens, all
    30 layers: 0.4 GB)."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inputs: dict[tuple[bytes, int], Any] = {}

    @contextmanager
    def record(self, layers: Sequence[int] | None = None):
        """Inside: every forward stores the input of ``layers`` (default: all) per its ids."""
        body = self.model.model
        wanted = range(len(body.layers)) if layers is None else layers
        ids: list[bytes] = []

        def store(i: int):
            def hook(_m, args):
                self.inputs[(ids[-1], i)] = args[0].detach().clone()

            return hook

        hooks = [body.embed_tokens.register_forward_pre_hook(lambda _m, a: ids.append(_key(a[0])))]
        hooks += [body.layers[i].register_forward_pre_hook(store(i)) for i in wanted]
        try:
            yield self
        finally:
            for h in hooks:
                h.remove()

    @contextmanager
    def from_layer(self, start: int):
        """Inside: every forward starts at layer ``start`` from the recorded input of its ids
        (the embedding's output is replaced, the layers below are not run). A forward on ids
        whose input there was never recorded is refused: its result would be wrong."""
        from torch import nn

        body = self.model.model
        layers = body.layers
        ids: list[bytes] = []

        def recorded(_m, _a, _out):
            key = (ids[-1], start)
            if key not in self.inputs:
                raise MegadistillError(f"no recorded input of layer {start} for these ids")
            return self.inputs[key]

        hooks = [
            body.embed_tokens.register_forward_pre_hook(lambda _m, a: ids.append(_key(a[0]))),
            body.embed_tokens.register_forward_hook(recorded),
        ]
        body.layers = nn.ModuleList(layers[start:])
        try:
            yield self
        finally:
            body.layers = layers
            for h in hooks:
                h.remove()


def _key(ids: Any) -> bytes:
    """A forward's input ids as a dictionary key."""
    return bytes(str(tuple(ids.shape)), "ascii") + ids.cpu().numpy().tobytes()


@contextmanager
def full_attention(model: Any, layers: Sequence[int]):
    """Inside: ``layers`` of the floor or student ``model`` run the teacher's full attention in
    place of their hybrid (the flag eval/layer_choice flips); after, each is as it was (a
    student's own softmax layers stay full), on an error too."""
    attns = [model.model.layers[i].self_attn for i in layers]
    was = [a.full for a in attns]
    for a in attns:
        a.full = True
    try:
        yield
    finally:
        for a, full in zip(attns, was, strict=True):
            a.full = full


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


def _needle_logp(model: Any, tokenizer: Any, length: int, trials: int) -> float:
    from megadistill.eval.niah import probe_model

    return probe_model(model, tokenizer, [length], num_trials=trials)[length]["logp"]


def _calibration(teacher_dir: str | Path, documents: Sequence[str], window: int, max_length: int):
    from megadistill.eval.lmeval import load_model
    from megadistill.eval.positions import token_ids

    teacher, tokenizer = load_model(teacher_dir)
    windows = [w for w in token_ids(tokenizer, documents, max_length) if len(w) > window + 1]
    if not windows:
        raise MegadistillError(
            f"no calibration document is longer than the window ({window} tokens): pass longer text"
        )
    return teacher, tokenizer, windows


def _logprobs(model: Any, ids: Sequence[int], start: int) -> Any:
    """Full-vocabulary log-probabilities of the next token at positions >= start."""
    import torch

    logits = model(input_ids=torch.tensor([list(ids)])).logits[0, start:-1]
    return torch.log_softmax(logits.float(), dim=-1)


def _beyond_kl(model: Any, windows: Sequence[Sequence[int]], start: int, teacher_lp) -> float:
    """Mean KL(teacher || model) per token at positions >= start."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for ids, t_lp in zip(windows, teacher_lp):
            kl = (t_lp.exp() * (t_lp - _logprobs(model, ids, start))).sum(-1)
            total += float(kl.sum())
            count += kl.numel()
    return total / count


def rank_by_kl(
    teacher_dir: str | Path,
    student_dir: str | Path,
    documents: Sequence[str],
    *,
    max_length: int = 1024,
    greedy: int = 0,
) -> dict[str, Any]:
    """The ``kl`` criterion (see module docstring) on a trained student.

    Args:
        greedy: layers to pick greedily (0: one pass, each layer alone). Each pick keeps the
            best layer full and measures every layer not yet picked again beside the picks:
            ``greedy`` passes over the remaining layers.

    Returns:
        ``{"criterion": "kl", "teacher": 0.0, "floor": the student's KL, "gains": [per layer
        alone; 0 for layers the student already keeps], "ranking": [layers not yet kept, best
        first: the greedy picks, then the rest by their gain beside them], "kept": [layers the
        student keeps], "window", "num_sinks", "num_docs", "num_tokens"}``; with ``greedy``
        also ``"greedy": [{"layer", "kl": the student's KL with it and the picks before it
        full}]``.
    """
    import torch

    from megadistill.eval.lmeval import load_model

    student, _ = load_model(student_dir)
    window, sinks = student.config.window, student.config.num_sinks
    teacher, _, windows = _calibration(teacher_dir, documents, window, max_length)
    with torch.no_grad():
        teacher_lp = [_logprobs(teacher, ids, window) for ids in windows]
    del teacher
    layers = [layer.self_attn for layer in student.model.layers]
    kept = [i for i, attn in enumerate(layers) if attn.kept]

    prefix = LayerInputs(student)

    def scan(base: float, picks: list[int]) -> list[float]:
        gains = [0.0] * len(layers)
        for i, attn in enumerate(layers):
            if attn.kept or i in picks:
                continue
            # the hybrid path is skipped: this layer is the teacher's attention; the layers
            # below i run as recorded (unchanged)
            with full_attention(student, [i]), prefix.from_layer(i):
                gains[i] = base - _beyond_kl(student, windows, window, teacher_lp)
            log.info(
                "layer %d (beside %s): full attention lowers the KL by %.4f", i, picks, gains[i]
            )
        return gains

    with prefix.record():
        floor = base = _beyond_kl(student, windows, window, teacher_lp)
    gains = current = scan(base, [])
    picks: list[dict[str, Any]] = []
    free = [i for i in range(len(layers)) if i not in kept]
    for _ in range(min(greedy, len(free))):
        chosen = [p["layer"] for p in picks]
        best = max((i for i in free if i not in chosen), key=lambda i: current[i])
        layers[best].full = True
        base -= current[best]
        picks.append({"layer": best, "kl": base})
        log.info("greedy pick %d: layer %d, KL %.4f", len(picks), best, base)
        if len(picks) < min(greedy, len(free)):
            # the inputs of the layers above the pick have changed: record them again
            with prefix.record(range(best + 1, len(layers))), prefix.from_layer(best):
                _beyond_kl(student, windows, window, teacher_lp)
            current = scan(base, [*chosen, best])
    for p in picks:
        layers[p["layer"]].full = False
    chosen = [p["layer"] for p in picks]
    rest = sorted((i for i in free if i not in chosen), key=lambda i: -current[i])
    result = {
        "criterion": "kl",
        "window": window,
        "num_sinks": sinks,
        "num_docs": len(windows),
        "num_tokens": sum(len(w) - 1 - window for w in windows),
        "teacher": 0.0,
        "floor": floor,
        "gains": gains,
        "kept": kept,
        "ranking": [*chosen, *rest],
    }
    if greedy:
        result["greedy"] = picks
    return result


def rank_heads(
    teacher_dir: str | Path,
    *,
    needle_length: int = 1024,
    num_trials: int = 2,
    seed: int = 1,
) -> dict[str, Any]:
    """Rank the teacher's key/value heads by how they look the needle up (``softmax_heads``).

    One forward of the teacher per needle probe (eager attention; 3 depths x ``num_trials``;
    ``seed`` 1 by default: not the probes the evaluation scores, seed 0). A query head's score is
    the attention it gives to the needle's tokens from the positions that predict the answer,
    averaged over probes; a KV head scores as its best query head (with GQA they share its
    cache). A head with most of its attention there is a retrieval head: the one that copies
    the number from thousands of tokens back, which a window of W cannot. Heads of layers
    whose teacher attends to a sliding window are left out (``softmax_heads`` refuses them).
    Memory: one layer's attention weights at a time (heads x T^2 floats).

    Returns:
        ``{"criterion": "heads", "scores": [layer][kv_head], "ranking": [[layer, kv_head], ...]
        best first, "needle_length", "num_probes"}``.
    """
    import torch

    from megadistill.eval.lmeval import load_model
    from megadistill.eval.niah import DEFAULT_FILLER, DEPTHS, NEEDLE, _probe_ids, probe_plan
    from megadistill.teachers.registry import adapter_for

    teacher, tokenizer = load_model(teacher_dir)
    teacher.set_attn_implementation("eager")  # the only one that returns the probabilities
    cfg = teacher.config.get_text_config()
    layers = teacher.model.layers
    num_heads = cfg.num_attention_heads
    num_kv = getattr(cfg, "num_key_value_heads", None) or num_heads
    adapter = adapter_for(cfg.model_type)
    local = {i for i in range(len(layers)) if adapter.teacher_window(cfg, i) is not None}
    scores = torch.zeros(len(layers), num_heads)
    span: list[int] = []
    rows: list[int] = []

    def hook(i: int):
        def record(_m, _args, out):
            weights = out[1]  # (1, H, T, T): eager attention's probabilities
            scores[i] += weights[0][:, rows][:, :, span].sum(-1).mean(-1).float()

        return record

    handles = [layer.self_attn.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    filler = tokenizer(DEFAULT_FILLER, add_special_tokens=False).input_ids
    probes = probe_plan([needle_length], DEPTHS, num_trials, seed)[int(needle_length)]
    try:
        for depth, value in probes:
            ids, n_ans = _probe_ids(tokenizer, filler, needle_length, depth, value)
            needle = tokenizer(NEEDLE.format(value=value), add_special_tokens=False).input_ids
            start = next(j for j in range(len(ids)) if ids[j : j + len(needle)] == needle)
            span[:] = range(start, start + len(needle))
            rows[:] = range(len(ids) - n_ans - 1, len(ids) - 1)
            with torch.no_grad():
                teacher(input_ids=torch.tensor([ids]))
    finally:
        for h in handles:
            h.remove()
    kv_scores = (scores / len(probes)).view(len(layers), num_kv, -1).amax(-1)
    pairs = [[i, h] for i in range(len(layers)) if i not in local for h in range(num_kv)]
    ranking = sorted(pairs, key=lambda p: -float(kv_scores[p[0], p[1]]))
    return {
        "criterion": "heads",
        "scores": kv_scores.tolist(),
        "ranking": ranking,
        "needle_length": int(needle_length),
        "num_probes": len(probes),
    }


def format_heads(result: dict[str, Any], k: int) -> str:
    """The top heads' scores and the ``softmax_heads`` setting for the top ``k``."""
    lines = [
        f"attention on the needle from the answer's positions ({result['num_probes']} probes of "
        f"{result['needle_length']} tokens), per KV head (its best query head):",
        "layer  kv_head  attention",
    ]
    for i, h in result["ranking"][: max(k, 5)]:
        lines.append(f"{i:5d}  {h:7d}  {result['scores'][i][h]:9.3f}")
    lines.append(f"softmax_heads for k = {k}: {json.dumps(sorted(result['ranking'][:k]))}")
    return "\n".join(lines)


def combine_rankings(*rankings: Sequence[int]) -> list[int]:
    """One ranking from several: each one's best layer not yet taken, in turn (the first
    ranking's best, then the second's, ...), until every layer is taken."""
    out: list[int] = []
    taken: set[int] = set()
    pending = [list(r) for r in rankings]
    while any(pending):
        for ranking in pending:
            while ranking and ranking[0] in taken:
                ranking.pop(0)
            if ranking:
                taken.add(ranking[0])
                out.append(ranking.pop(0))
    return out


def rank_softmax_layers(
    teacher_dir: str | Path,
    documents: Sequence[str],
    *,
    window: int,
    num_sinks: int = 4,
    max_length: int = 1024,
    criterion: Criterion = "nll",
    needle_length: int = 1024,
    needle_trials: int = 2,
) -> dict[str, Any]:
    """Measure every layer's gain (see module docstring).

    Args:
        teacher_dir: the teacher's Hugging Face folder.
        documents: calibration text (a few long documents of the training mix; ``nll``).
        window: the student's W; losses are averaged over positions >= W.
        num_sinks: the student's sink tokens.
        max_length: tokens scored per document.
        criterion: ``nll`` or ``retrieval``.
        needle_length, needle_trials: probe length and probes per depth (3 depths) of
            ``retrieval``.

    Returns:
        ``{"criterion", "teacher": score, "floor": score, "gains": [per layer, larger is
        better], "ranking": [layers, best first], "window", "num_docs", "num_tokens"}``; the
        score is the beyond-W NLL (``nll``) or the needle answer's log-probability.
    """
    from megadistill.teachers.conversion import convert

    if criterion not in CRITERIA:
        raise MegadistillError(f"criterion={criterion!r} is not one of {CRITERIA}")
    teacher, tokenizer, windows = _calibration(teacher_dir, documents, window, max_length)

    def score(model: Any) -> float:
        if criterion == "nll":
            return _beyond_nll(model, windows, window)
        return _needle_logp(model, tokenizer, needle_length, needle_trials)

    sign = -1.0 if criterion == "nll" else 1.0  # a gain is always "larger is better"
    floor, _ = convert(teacher, window=window, num_sinks=num_sinks, gate_mode="swa")
    result: dict[str, Any] = {
        "criterion": criterion,
        "window": window,
        "num_sinks": num_sinks,
        "num_docs": len(windows),
        "num_tokens": sum(len(w) - 1 - window for w in windows),
        "teacher": score(teacher),
    }
    del teacher
    prefix = LayerInputs(floor)
    with prefix.record():
        result["floor"] = score(floor)
    gains = []
    for i in range(len(floor.model.layers)):
        # the floor has no new parameters in use: safe to flip; the layers below i are the
        # floor's: not run again
        with full_attention(floor, [i]), prefix.from_layer(i):
            gains.append(sign * (score(floor) - result["floor"]))
        log.info("layer %d: full attention gains %.4f (%s)", i, gains[-1], criterion)
    result["gains"] = gains
    result["ranking"] = sorted(range(len(gains)), key=lambda i: -gains[i])
    return result


def check_rankings(rankings: dict[str, Sequence[int]], num_layers: int) -> None:
    """Refuse a ranking naming a layer the model does not have."""
    for name, ranking in rankings.items():
        if bad := [i for i in ranking if not 0 <= i < num_layers]:
            raise MegadistillError(
                f"ranking {name!r}: layers {bad} are not in 0..{num_layers - 1} (the teacher "
                f"has {num_layers} layers)"
            )


def layer_curve(
    teacher_dir: str | Path,
    documents: Sequence[str],
    rankings: dict[str, Sequence[int]],
    *,
    window: int,
    num_sinks: int = 4,
    max_length: int = 1024,
    ks: Sequence[int] = (0, 1, 2, 4, 8),
    needle_lengths: Sequence[int] = (1024, 2048),
    needle_trials: int | None = None,
    student_dir: str | Path | None = None,
) -> dict[str, Any]:
    """The floor with the top k layers of each ranking kept as full attention, for each k:
    beyond-W NLL on the documents, and needle exact match, digit accuracy and answer logp per
    length. Row ``teacher`` is the teacher itself; k = 0 is the floor. A ranking shorter than
    k has no row for it; a set of layers two rankings share is measured once.

    With ``student_dir`` (a trained student) the curve is measured inside that student instead
    of the floor: k = 0 is the student as trained, and a row gives the top k layers of a ranking
    full attention in place of their hybrid (``window`` and ``num_sinks`` are the student's).
    Rankings measured on one trained student then compare on the same footing: what keeping
    each criterion's layers would give after training.

    Returns:
        ``{"teacher": metrics, "rows": [{"criterion", "k", "layers", **metrics}], "base":
        "floor" or the student's folder, ...}``.
    """
    from megadistill.eval.lmeval import load_model
    from megadistill.eval.niah import probe_model
    from megadistill.teachers.conversion import convert

    student = None
    if student_dir is not None:
        student, _ = load_model(student_dir)
        if window != student.config.window:
            raise MegadistillError(
                f"window {window} is not the student's ({student.config.window} in "
                f"{student_dir}/config.json): pass --window {student.config.window}"
            )
        num_sinks = student.config.num_sinks
    teacher, tokenizer, windows = _calibration(teacher_dir, documents, window, max_length)

    def metrics(model: Any) -> dict[str, Any]:
        needle = probe_model(model, tokenizer, needle_lengths, num_trials=needle_trials)
        return {
            "nll": _beyond_nll(model, windows, window),
            "needle": {str(n): {k: v for k, v in r.items() if k != "by_depth"}
                       for n, r in needle.items()},
        }  # fmt: skip

    check_rankings(rankings, teacher.config.get_text_config().num_hidden_layers)  # before measuring
    out: dict[str, Any] = {"window": window, "num_docs": len(windows), "ks": list(ks)}
    out["base"] = "floor" if student_dir is None else str(student_dir)
    out["teacher"] = metrics(teacher)
    if student is None:
        base, _ = convert(teacher, window=window, num_sinks=num_sinks, gate_mode="swa")
    else:
        base = student  # the rows flip layers inside the trained student
    del teacher
    # The base (floor or student) is measured once, recording the input of each row's lowest
    # kept layer: a row then runs the layers from there up (the ones below are the base's).
    prefix = LayerInputs(base)
    starts = {min(r[:k]) for r in rankings.values() for k in ks if k and r[:k]}
    with prefix.record(sorted(starts)):
        at_base = metrics(base)
    rows = []
    seen: dict[tuple[int, ...], dict[str, Any]] = {(): at_base}
    for name, ranking in rankings.items():
        for k in ks:
            if k > len(ranking):  # a ranking given in part (--ranking) has no such row
                continue
            kept = sorted(ranking[:k])
            if tuple(kept) not in seen:  # two rankings sharing their top k measure it once
                with full_attention(base, kept), prefix.from_layer(kept[0]):
                    seen[tuple(kept)] = metrics(base)
            rows.append({"criterion": name, "k": k, "layers": kept, **seen[tuple(kept)]})
            log.info("%s k=%d %s: %s", name, k, kept, rows[-1])
    out["rows"] = rows
    return out


def format_curve(curve: dict[str, Any]) -> str:
    """Markdown: per criterion and k, the layers, beyond-W NLL and needle scores per length."""
    lengths = list(curve["teacher"]["needle"])
    head = "| criterion | k | layers | NLL >= W | " + " | ".join(
        f"needle {n}: exact / digits / logp" for n in lengths
    )
    lines = [head + " |", "|---|---:|---|---:|" + "---:|" * len(lengths)]

    def cells(m: dict[str, Any]) -> str:
        needle = [m["needle"][n] for n in lengths]
        return f"{m['nll']:.4f} | " + " | ".join(
            f"{r['acc']:.2f} / {r['digit_acc']:.2f} / {r['logp']:.2f}" for r in needle
        )

    lines.append(f"| teacher | - | all | {cells(curve['teacher'])} |")
    for r in curve["rows"]:
        lines.append(f"| {r['criterion']} | {r['k']} | {r['layers']} | {cells(r)} |")
    return "\n".join(lines)


def format_ranking(result: dict[str, Any], k: int) -> str:
    """A short table: the floor's gap and the top layers' gains."""
    criterion = result.get("criterion", "nll")
    sign = -1.0 if criterion in ("nll", "kl") else 1.0
    gap = sign * (result["teacher"] - result["floor"])
    what = {"nll": "nats/token beyond W", "kl": "KL(teacher || student) nats/token beyond W",
            "retrieval": "needle answer logp/token"}[criterion]  # fmt: skip
    base = "the student" if criterion == "kl" else "floor"
    lines = [
        f"W = {result['window']}, {criterion}: teacher {result['teacher']:.4f}, {base} "
        f"{result['floor']:.4f} {what} (gap {gap:+.4f}; {result['num_docs']} documents, "
        f"{result['num_tokens']} tokens)",
        "layer  gain (nats)  share of gap",
    ]
    for i in result["ranking"][: max(k, 5)]:
        g = result["gains"][i]
        lines.append(f"{i:5d}  {g:11.4f}  {g / gap if gap > 0 else float('nan'):11.1%}")
    if result.get("greedy"):
        lines.append("greedy picks (the student's KL with the layer and the picks before it):")
        lines += [f"{p['layer']:5d}  KL {p['kl']:.4f}" for p in result["greedy"]]
    kept = result.get("kept", [])
    chosen = sorted([*kept, *result["ranking"][:k]])
    more = f" (the student's {kept} and {k} more)" if kept else ""
    lines.append(f"softmax_layers for k = {k}{more}: {chosen}")
    return "\n".join(lines)
