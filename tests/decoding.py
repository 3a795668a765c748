"""Feeding a stream through a student's decoding cache, for the tests that compare it with the
parallel forward."""

from __future__ import annotations

import torch


def fed(student, ids, cuts, position_ids=None, attention_mask=None, cache=None) -> torch.Tensor:
    """Logits of ``ids`` fed through one cache (a new one, or ``cache``: empty, to look at after)
    in the pieces [cuts[i], cuts[i+1])."""
    cache = student.new_cache() if cache is None else cache
    parts = []
    with torch.no_grad():
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            kw = {}
            if position_ids is not None:
                kw["position_ids"] = position_ids[:, a:b]
            if attention_mask is not None:
                kw["attention_mask"] = attention_mask[:, :b]
            parts.append(student(ids[:, a:b], cache=cache, **kw).logits)
    return torch.cat(parts, 1)


def stepped_with_cache(student, ids, prefill: int, **kw):
    """Logits of a ``prefill``-token prefill, then one token at a time (0: steps from empty), and
    the cache they leave; ``kw``: ``position_ids`` / ``attention_mask`` as :func:`fed` takes."""
    steps = list(range(prefill, ids.shape[1] + 1))
    cache = student.new_cache()
    return fed(student, ids, [0, *steps] if prefill else steps, cache=cache, **kw), cache


def prefilled_then_stepped(student, ids, prefill: int) -> torch.Tensor:
    """Logits of a ``prefill``-token prefill, then one token at a time (0: steps from empty)."""
    return stepped_with_cache(student, ids, prefill)[0]


def set_on_attention(student, **flags) -> None:
    """Set attributes of every layer's attention block (``fused_step``, ``step_kernel``)."""
    for layer in student.model.layers:
        for name, value in flags.items():
            setattr(layer.self_attn, name, value)


@torch.no_grad()
def make_both_branches_matter(student):
    """Move a fresh student off its start so every path is exercised: the learned gate to
    sigmoid(0.3) at full scale (a fresh ``gate_init: floor`` student is exactly the SWA floor, so
    a test of the mLSTM branch through the gate would compare nothing), and shared_norm's input
    gate up so the far past weighs. Returns the student."""
    for layer in student.model.layers:
        attn = layer.self_attn
        if hasattr(attn, "ogate"):
            attn.ogate.bias.fill_(0.3)
            if hasattr(attn, "ogate_scale"):
                attn.ogate_scale.weight.fill_(1.0)
        elif hasattr(attn, "igate"):
            attn.igate.bias.fill_(2.0)
    return student
