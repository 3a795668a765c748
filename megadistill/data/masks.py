"""Attention masks for packed sequences: each document attends only to itself.

The student reads document starts from ``position_ids`` (restarting at 0). A Hugging Face teacher
with eager or SDPA attention does not: given only ``position_ids`` it attends across documents
(measured on a tiny Llama: logits differ by ~6e-2 from the document run alone). Passing
:func:`document_causal_mask` as its ``attention_mask`` makes it match the per-document run to
~1e-7. (``flash_attention_2`` derives the same from ``position_ids`` and needs no mask.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_ids(position_ids: Tensor) -> Tensor:
    """``[B, L]`` index of the document each position belongs to (0, 1, ... per row)."""
    return (position_ids == 0).long().cumsum(-1)


def document_causal_mask(position_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Additive ``[B, 1, L, L]`` mask: 0 where query ``i`` may attend key ``j`` (same document,
    ``j <= i``), the dtype's most negative value elsewhere.

    It is additive, not boolean, because eager attention adds the mask to the scores (a boolean
    4D mask would be added as 0/1). Memory is ``B * L * L`` elements (e.g. 32 MiB in bf16 at 4K).
    """
    doc = document_ids(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]
