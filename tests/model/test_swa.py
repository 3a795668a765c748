"""SWA + sinks backends agree with the dense reference, and the reference means what it says."""

import pytest
import torch

from megadistill.model.swa import (
    Tokens,
    blocked_layout,
    document_layout,
    swa_blocked,
    swa_flex,
    swa_reference,
    token_mask,
)

B, H, KV, T, DH = 2, 4, 2, 150, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, DH, generator=g, dtype=torch.float64)
    k = torch.randn(B, KV, T, DH, generator=g, dtype=torch.float64)
    v = torch.randn(B, KV, T, DH, generator=g, dtype=torch.float64)
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = True
    reset[0, 60] = True
    reset[1, 120] = True
    valid = torch.ones(B, T, dtype=torch.bool)
    valid[1, :5] = False  # left padding
    return q, k, v, reset, valid


@pytest.mark.parametrize(("window", "sinks"), [(16, 4), (32, 0), (1000, 4), (None, 0)])
def test_blocked_equals_reference(window, sinks):
    q, k, v, reset, valid = _inputs()
    ref = swa_reference(q, k, v, reset, valid, window, sinks, 0.3)
    out = swa_blocked(q, k, v, reset, valid, window, sinks, 0.3, block=24)
    torch.testing.assert_close(out, ref)


def test_full_causal_attention_over_packed_documents_is_blocked_on_cpu():
    """Stage I's target and kept softmax layers on long packed rows: ``auto`` takes the blocked
    path (no T x T mask) and equals the dense reference."""
    from megadistill.model.swa import swa_attention

    g = torch.Generator().manual_seed(3)
    t = 300
    q, k, v = (torch.randn(2, n, t, DH, generator=g, dtype=torch.float64) for n in (H, KV, KV))
    reset = torch.zeros(2, t, dtype=torch.bool)
    reset[:, 0] = reset[0, 70] = reset[1, 290] = True
    valid = torch.ones(2, t, dtype=torch.bool)
    valid[1, :9] = False
    reset &= valid
    reset[1, 9] = True
    memo: dict = {}
    out = swa_attention(q, k, v, reset, valid, None, 0, 0.3, "auto", memo=memo)
    assert any(key[:3] == ("swa_blocked", None, 0) for key in memo)
    torch.testing.assert_close(out, swa_reference(q, k, v, reset, valid, None, 0, 0.3))


@pytest.mark.parametrize(("window", "sinks"), [(16, 4), (32, 0), (3, 4), (1000, 4)])
@pytest.mark.parametrize("starts", [True, False])
def test_blocked_plain_rows_take_key_ranges_and_equal_reference(window, sinks, starts):
    # Rows of one document from their first token, no padding (a document start there, or a
    # row beginning mid-document): the blocks read key columns by ranges (sinks, then the
    # window), not by gathered indices; the function is the same.
    q, k, v, _, _ = _inputs()
    reset = torch.zeros(B, T, dtype=torch.bool)
    reset[:, 0] = starts
    valid = torch.ones(B, T, dtype=torch.bool)
    ref = swa_reference(q, k, v, reset, valid, window, sinks, 0.3)
    layout = blocked_layout(reset, valid, window, sinks, T, block=24, plain=True, dtype=q.dtype)
    assert all(isinstance(keys, list) for _, _, keys, _ in layout)
    out = swa_blocked(q, k, v, reset, valid, window, sinks, 0.3, layout=layout)
    torch.testing.assert_close(out, ref)


def test_flex_equals_reference_on_cpu():
    q, k, v, reset, valid = (x.float() if x.is_floating_point() else x for x in _inputs())
    ref = swa_reference(q, k, v, reset, valid, 16, 4, 0.3)
    torch.testing.assert_close(
        swa_flex(q, k, v, reset, valid, 16, 4, 0.3), ref, atol=1e-5, rtol=1e-5
    )


def test_reference_is_window_plus_sinks_softmax():
    # One head, one document: compare against an explicit softmax over the allowed keys.
    q, k, v, _, _ = _inputs()
    q, k, v = q[:1, :1], k[:1, :1], v[:1, :1]
    reset = torch.zeros(1, T, dtype=torch.bool)
    reset[0, 0] = True
    valid = torch.ones(1, T, dtype=torch.bool)
    out = swa_reference(q, k, v, reset, valid, 10, 3, 0.5)
    i = 77
    keys = sorted(set(range(i - 9, i + 1)) | {0, 1, 2})
    scores = (q[0, 0, i] @ k[0, 0, keys].T) * 0.5
    expect = torch.softmax(scores, -1) @ v[0, 0, keys]
    torch.testing.assert_close(out[0, 0, i], expect)


def test_document_layout():
    reset = torch.tensor([[True, False, False, True, False]])
    seg, pos = document_layout(reset)
    assert seg.tolist() == [[1, 1, 1, 2, 2]]
    assert pos.tolist() == [[0, 1, 2, 0, 1]]


def test_visible_is_the_documented_rule():
    # Against the rule spelled out per pair: same document, not after the query, inside the
    # window or a sink, a real key; a query always sees itself; an empty slot (-1) never.
    g = torch.Generator().manual_seed(1)
    n = 60

    def ints(low, high):
        return torch.randint(low, high, (1, n), generator=g)

    q = Tokens(ints(0, 30), ints(0, 3), None, None)
    k = Tokens(ints(-1, 30), ints(0, 3), ints(0, 5), torch.rand(1, n, generator=g) > 0.2)
    k = k._replace(ok=k.ok & (k.idx >= 0))
    for window, sinks in [(4, 2), (None, 0)]:
        mask = token_mask(q, k, window, sinks)[0].tolist()
        (qi, qd), (ki, kd, kp, ok) = ([f[0].tolist() for f in t if f is not None] for t in (q, k))
        for i in range(n):
            for j in range(n):
                near = window is None or qi[i] - ki[j] < window or kp[j] < sinks
                seen = ok[j] and qd[i] == kd[j] and ki[j] <= qi[i] and near
                assert mask[i][j] == (seen or ki[j] == qi[i]), (i, j)


@pytest.mark.slow
def test_compiled_flex_forward_equals_float64_reference_on_cpu():
    """The compiled FlexAttention path the GPU runs (compiled block mask + compiled kernel), on
    CPU, forward only, against the float64 dense reference, all cases in one compiled call: row 0
    three packed documents (each with its own sinks), row 1 left padding, row 2 two documents
    then right padding; GQA (4 query heads on 2 K/V heads); T not a multiple of Flex's block.

    Backward is GPU-only: FlexAttention has no CPU backward (``NotImplementedError``); the GPU
    check (``tools/gpu_check.sh``, check "swa flex (cuda fp32) vs fp64") compares its gradients.
    """
    g = torch.Generator().manual_seed(3)
    b, t, window, sinks = 3, 150, 16, 4
    q = torch.randn(b, H, t, DH, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, KV, t, DH, generator=g, dtype=torch.float64) for _ in range(2))
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[:, 0] = reset[0, 50] = reset[0, 90] = reset[2, 70] = True
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :9] = False
    valid[2, -13:] = False
    reset[1, 9] = True  # the first real token of the left-padded row starts its document
    with torch.no_grad():
        out = swa_flex(
            q.float(), k.float(), v.float(), reset, valid, window, sinks, 0.3, compiled=True
        )
    ref = swa_reference(q, k, v, reset, valid, window, sinks, 0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # The comparison sees a mask off by one key: one token less of window, one sink less.
    for w, s in ((window - 1, sinks), (window, sinks - 1)):
        wrong = swa_reference(q, k, v, reset, valid, w, s, 0.3)
        assert (out.double() - wrong).abs().max() > 1e-2
