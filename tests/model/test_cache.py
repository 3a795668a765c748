"""The decoding cache: every way of feeding a stream through it equals the parallel forward.

One visibility rule (``model/swa.py``'s :func:`visible`) decides what a query sees in the
parallel, blocked and Flex masks, in a decoding step and in a chunk after a non-empty cache; these
tests feed the same stream whole, token by token and in chunks (cut inside documents and at their
borders) and compare the logits.
"""

import pytest
import torch

from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher
from tests.decoding import fed, make_both_branches_matter

# W = 8, S = 2: the streams below are several windows long.
MODES = {
    "learned": {},
    "swa": {"gate_mode": "swa"},
    "mlstm": {"gate_mode": "mlstm"},
    "shared_norm": {"mix": "shared_norm"},
    "rope_on_features": {"rope_on": "features"},
    "softmax_layer": {"softmax_layers": [1]},
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
