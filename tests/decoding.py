"""Feeding a stream through a student's decoding cache, for the tests that compare it with the
parallel forward."""

from __future__ import annotations

import torch


def fed(student, ids, cuts, position_ids=None, attention_mask=None) -> torch.Tensor:
    """Logits of ``ids`` fed through one new cache in the pieces [cuts[i], cuts[i+1])."""
    cache, parts = student.new_cache(), []
    with torch.no_grad():
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            kw = {}
            if position_ids is not None:
                kw["position_ids"] = position_ids[:, a:b]
            if attention_mask is not None:
                kw["attention_mask"] = attention_mask[:, :b]
            parts.append(student(ids[:, a:b], cache=cache, **kw).logits)
    return torch.cat(parts, 1)


def prefilled_then_stepped(student, ids, prefill: int) -> torch.Tensor:
    """Logits of a ``prefill``-token prefill, then one token at a time (0: steps from empty)."""
    steps = list(range(prefill, ids.shape[1] + 1))
    return fed(student, ids, [0, *steps] if prefill else steps)
