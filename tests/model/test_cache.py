"""The decoding cache: every way of feeding a stream through it equals the parallel forward.

One visibility rule (``model/swa.py``'s :func:`visible`) decides what a query sees in the
parallel, blocked and Flex masks, in a decoding step and in a chunk after a non-empty cache; these
tests feed the same stream whole, token by token and in chunks (cut inside documents and at their
borders) and compare the logits.
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megadistill.model.attention import rotation_matrix
from megadistill.teachers import convert
from megadistill.teachers.tiny import TINY_FAMILIES, tiny_teacher
from tests.decoding import fed, make_both_branches_matter, set_on_attention, stepped_with_cache

# W = 8, S = 2: the streams below are several windows long.
MODES = {
    "learned": {},
    "swa": {"gate_mode": "swa"},
    "mlstm": {"gate_mode": "mlstm"},
    "shared_norm": {"mix": "shared_norm"},  # rope_on "none": feature maps before RoPE
    "shared_norm_rope_input": {"mix": "shared_norm", "rope_on": "input"},
    "rope_on_features": {"rope_on": "features"},
    "rope_on_none": {"rope_on": "none"},
    "softmax_layer": {"softmax_layers": [1]},
    "softmax_heads": {"softmax_heads": [[0, 1]]},
    "softmax_heads_shared_norm": {"mix": "shared_norm", "softmax_heads": [[1, 0]]},
}
# Mistral's every layer is local (W_t = 12): kept as the teacher's window, or a hybrid whose
# window is min(W, W_t) without sinks.
LOCAL = {"local_swa": {"local_layers": "swa"}, "local_hybrid": {"local_layers": "hybrid"}}


def _student(family="llama", **hybrid):
    teacher = tiny_teacher(family, **({"sliding_window": 12} if family == "mistral" else {}))
    hybrid = {"window": 8, "num_sinks": 2, "chunk_size": 4, "local_layers": "hybrid", **hybrid}
    student, _ = convert(teacher, seed=0, **hybrid)
    return make_both_branches_matter(student.eval())


def _cases():
    for name, hybrid in MODES.items():
        yield pytest.param("llama", hybrid, id=name)
    for name, hybrid in LOCAL.items():
        yield pytest.param("mistral", hybrid, id=name)


def _packed(*rows):
    """Packed rows, one per list of document lengths (same total): (ids, position_ids)."""
    pos = torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in rows])
    return torch.randint(0, 256, pos.shape), pos


@pytest.mark.parametrize(("family", "hybrid"), _cases())
def test_chunk_after_a_non_empty_cache_equals_parallel(family, hybrid):
    student = _student(family, **hybrid)
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = student(ids).logits
        for cuts in ([0, 5, 40], [0, 11, 14, 31, 40], [0, 1, 2, 40]):
            torch.testing.assert_close(fed(student, ids, cuts), full)


@pytest.mark.parametrize(("family", "hybrid"), _cases())
def test_packed_documents_through_a_cache_equal_parallel(family, hybrid):
    # Three documents, the second shorter than the sinks + window, the third several windows
    # long (and in the other row two documents, starting elsewhere): each has its own sinks and
    # never sees an earlier document's keys, whether a document starts inside a chunk, at a
    # chunk's first token or in a one-token decoding step.
    student = _student(family, **hybrid)
    ids, pos = _packed([17, 5, 26], [9, 39])
    t = ids.shape[1]
    with torch.no_grad():
        full = student(ids, position_ids=pos).logits
        for cuts in (list(range(t + 1)), [0, 13, 20, 22, 23, 30, t], [0, 17, 22, t]):
            torch.testing.assert_close(fed(student, ids, cuts, position_ids=pos), full)


@pytest.mark.parametrize(("family", "hybrid"), _cases())
def test_left_padded_decoding_equals_parallel(family, hybrid):
    student = _student(family, **hybrid)
    ids = torch.randint(3, 256, (2, 34))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # the second row starts 7 tokens later
    with torch.no_grad():
        full = student(ids, attention_mask=mask).logits
        for cuts in ([0, 12, *range(13, 35)], [0, 3, 9, 20, 34], list(range(35))):
            got = fed(student, ids, cuts, attention_mask=mask)
            torch.testing.assert_close(got[0], full[0])
            torch.testing.assert_close(got[1, 7:], full[1, 7:])


def test_row_starting_mid_document_through_a_cache_equals_parallel():
    # A row that begins inside a document (its position ids start at 5, no reset): its first
    # tokens are the sinks on every path, also shared_norm's blocked form (rows > 2W).
    for hybrid in ({"mix": "shared_norm"}, {}):
        student = _student(**hybrid)
        ids = torch.randint(0, 256, (2, 40))
        pos = torch.arange(5, 45)[None].expand(2, -1)
        with torch.no_grad():
            full = student(ids, position_ids=pos).logits
            for cuts in ([0, 1, 40], [0, 19, 20, 40]):
                torch.testing.assert_close(fed(student, ids, cuts, position_ids=pos), full)


@pytest.mark.parametrize(("family", "hybrid"), _cases())
def test_fused_step_equals_the_step_through_the_modules(family, hybrid):
    # The fused decoding step (one product for q/k/v and the gates, RoPE as a product, the
    # [C | n] state; shared_norm's attention compiled) against the step through the modules,
    # token by token over several windows, with packed documents and left padding: logits and
    # the state they leave.
    student = _student(family, **hybrid)
    ids, pos = _packed([17, 5, 26], [9, 39])
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    for kw in ({}, {"position_ids": pos}, {"attention_mask": mask}):
        fused, fused_cache = stepped_with_cache(student, ids, 3, **kw)
        set_on_attention(student, fused_step=False)
        ref, ref_cache = stepped_with_cache(student, ids, 3, **kw)
        set_on_attention(student, fused_step=True)
        torch.testing.assert_close(fused, ref)
        for a, b in zip(fused_cache.layers, ref_cache.layers, strict=True):
            for x, y in zip(a.tensors(), b.tensors(), strict=True):
                torch.testing.assert_close(x, y)
        assert fused_cache.step_weights and not ref_cache.step_weights


class _HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host (``item``, ``bool``, ``nonzero``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("hybrid", [{}, {"mix": "shared_norm"}, {"softmax_layers": [1]}])
def test_decoding_steps_read_nothing_back_from_the_device(hybrid, monkeypatch):
    # After a prefill past the sinks, a step without mask or positions (generate()'s steps) is
    # decided on the host: no sync per step (on a GPU each would stall the launch queue).
    student = _student(**hybrid)
    tolist = []
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist.append(1) or [])
    ids = torch.randint(0, 256, (2, 30))
    cache = student.new_cache()
    with torch.no_grad():
        monkeypatch.undo()
        student(ids[:, :5], cache=cache)
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: tolist.append(1) or [])
        with _HostReads() as reads:
            for i in range(5, 30):
                student(ids[:, i : i + 1], cache=cache)
    assert reads.count == 0 and not tolist


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_step_rope_as_a_product_is_each_familys_apply_rotary_pos_emb(family):
    # The fused step rotates q and k heads with one product (attention.rotation_matrix) instead
    # of the family's transformers function; Phi-3's partial RoPE and Gemma 3's per-layer-type
    # RoPE included. Leans on transformers' private apply_rotary_pos_emb: a release that changes
    # it fails here.
    student = _student(family)
    model, attn = student.model, student.model.layers[-1].self_attn
    pos = torch.tensor([[37], [1000]])
    args = (model.layers[-1].layer_type,) if model.adapter.rope_per_layer_type else ()
    x = torch.randn(2, 1, model.config.hidden_size)
    cos, sin = model.rotary_emb(x, pos, *args)
    q = torch.randn(2, attn.num_heads, 1, attn.head_dim)
    k = torch.randn(2, attn.num_kv, 1, attn.head_dim)
    q_ref, k_ref = attn.apply_rotary(q, k, cos, sin)
    rot = rotation_matrix(cos, sin, attn.head_dim)
    torch.testing.assert_close(torch.bmm(q[:, :, 0], rot)[:, :, None], q_ref)
    torch.testing.assert_close(torch.bmm(k[:, :, 0], rot)[:, :, None], k_ref)
