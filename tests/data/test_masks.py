"""The document mask makes a packed HF teacher equal to running each document alone."""

from __future__ import annotations

import pytest
import torch

from megadistill.data.masks import document_causal_mask, document_ids
from megadistill.teachers.tiny import tiny_teacher


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_teacher_with_document_mask_equals_documents_alone(attn):
    teacher = tiny_teacher("llama")
    teacher.config._attn_implementation = attn
    gen = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 256, (n,), generator=gen) for n in (5, 9, 2)]
    ids = torch.cat(docs)[None]
    pos = torch.cat([torch.arange(len(d)) for d in docs])[None]
    assert document_ids(pos).tolist() == [[1] * 5 + [2] * 9 + [3] * 2]
    with torch.no_grad():
        packed = teacher(ids, attention_mask=document_causal_mask(pos), position_ids=pos).logits
        leaky = teacher(ids, position_ids=pos).logits
        alone = torch.cat([teacher(d[None]).logits for d in docs], dim=1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    assert (leaky - alone).abs().max() > 1e-3  # without the mask documents see each other
