"""Sliding-window softmax attention with attention sinks, over packed documents.

Query ``i`` sees key ``j`` when both are in the same document, ``j <= i``, and either
``i - j < window`` (the window) or ``j`` is one of the first ``num_sinks`` tokens of the document
(a sink). All visible keys share one softmax. ``window=None`` gives full causal attention (the
teacher's).

Backends (all exact):
- ``reference``: one dense (T x T) boolean mask and SDPA.
- ``blocked``: queries in blocks; each block sees only its window plus its document's sinks, so
  memory is O(T * (window + block)) and no T x T mask is ever built (CPU default for long inputs).
- ``flex``: FlexAttention with a block mask (CUDA).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megadistill.hybrid import SWA_BACKENDS


def document_layout(reset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment ids and position-in-document from document-start flags ``reset`` (B,T)."""
    t = reset.shape[1]
    idx = torch.arange(t, device=reset.device).expand_as(reset)
    start = torch.where(reset, idx, torch.zeros_like(idx)).cummax(-1).values
    return reset.long().cumsum(-1), idx - start


def visible(
    q_idx: torch.Tensor,
    k_idx: torch.Tensor,
    q_seg: torch.Tensor,
    k_seg: torch.Tensor,
    k_pos: torch.Tensor,
    window: int | None,
    num_sinks: int,
) -> torch.Tensor:
    """Boolean visibility (B, Tq, Tk) from token indices, segment ids and key positions in doc."""
    causal = k_idx[:, None, :] <= q_idx[:, :, None]
    same = k_seg[:, None, :] == q_seg[:, :, None]
    if window is None:
        return causal & same
    near = (q_idx[:, :, None] - k_idx[:, None, :]) < window
    sink = (k_pos < num_sinks)[:, None, :]
    return causal & same & (near | sink)


def _sdpa(q, k, v, mask, scaling):
    """SDPA with a boolean mask (B, Tq, Tk) shared by all heads; GQA without repeating K/V.

    The ``rep`` query heads that share a K/V head are folded into the query length, so each K/V
    head is read once (no repeat_interleave copies of the cache or the keys).
    """
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling)
    qg = q.reshape(b, k.shape[1], rep * t, d)
    out = F.scaled_dot_product_attention(
        qg, k, v, attn_mask=mask.repeat(1, rep, 1)[:, None], scale=scaling
    )
    return out.reshape(b, h, t, -1)


def swa_reference(q, k, v, reset, key_valid, window, num_sinks, scaling):
    """Dense-mask SWA + sinks. q (B,H,T,d); k, v (B,KV,T,d); reset, key_valid (B,T)."""
    seg, pos = document_layout(reset)
    idx = torch.arange(q.shape[2], device=q.device).expand_as(seg)
    mask = visible(idx, idx, seg, seg, pos, window, num_sinks) & key_valid[:, None, :]
    mask |= torch.eye(q.shape[2], dtype=torch.bool, device=q.device)  # no empty rows (padding)
    return _sdpa(q, k, v, mask, scaling)


def blocked_layout(reset, key_valid, window, num_sinks, t, block=128):
    """Per query block of :func:`swa_blocked`: (start, end, key indices (B,K), mask (B,L,K)).
    Depends only on the document layout, so a model builds it once per forward for all layers."""
    bsz = reset.shape[0]
    dev = reset.device
    seg, pos = document_layout(reset)
    idx = torch.arange(t, device=dev)
    doc_start = idx - pos  # (B,T)
    out = []
    for s in range(0, t, block):
        e = min(s + block, t)
        ws = max(0, s - window + 1)
        q_idx = idx[s:e].expand(bsz, -1)
        # Sinks of the first query's document that lie before the window (later queries of the
        # block either share that document or started a new one inside the window).
        sink_idx = (doc_start[:, s : s + 1] + torch.arange(num_sinks, device=dev)).clamp(max=t - 1)
        sink_ok = (sink_idx < ws) & (pos.gather(1, sink_idx) < num_sinks)
        k_idx = torch.cat([sink_idx, idx[ws:e].expand(bsz, -1)], dim=1)
        k_ok = torch.cat([sink_ok, torch.ones(bsz, e - ws, dtype=torch.bool, device=dev)], 1)
        mask = visible(
            q_idx, k_idx, seg[:, s:e], seg.gather(1, k_idx), pos.gather(1, k_idx), window, num_sinks
        )
        mask &= (k_ok & key_valid.gather(1, k_idx))[:, None, :]
        # A token always sees itself (keeps padding rows finite); the sink part never holds it.
        mask |= (k_idx[:, None, :] == q_idx[:, :, None]) & k_ok[:, None, :]
        out.append((s, e, k_idx, mask))
    return out


def swa_blocked(q, k, v, reset, key_valid, window, num_sinks, scaling, block=128, layout=None):
    """Blocked SWA + sinks: per query block, keys = the block's window + its document's sinks.
    ``layout``: :func:`blocked_layout` of these arguments, when the caller has built it."""
    if window is None:
        return swa_reference(q, k, v, reset, key_valid, window, num_sinks, scaling)
    if layout is None:
        layout = blocked_layout(reset, key_valid, window, num_sinks, q.shape[2], block)
    outs = []
    for s, e, k_idx, mask in layout:
        gather = k_idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        kb, vb = k.gather(2, gather), v.gather(2, gather)
        outs.append(_sdpa(q[:, :, s:e], kb, vb, mask, scaling))
    return torch.cat(outs, dim=2)


def causal_attention(q, k, v, scaling):
    """Plain causal attention (every row one document from its first token, no padding): SDPA's
    ``is_causal`` path, which skips the masked half and builds no mask. Exact."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling)


def swa_flex(q, k, v, reset, key_valid, window, num_sinks, scaling):
    """FlexAttention with a document/window/sink block mask (compiled; meant for CUDA)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    seg, pos = document_layout(reset)
    win = window if window is not None else q.shape[2] + 1

    def mask_mod(b, h, qi, ki):
        del h
        ok = (ki <= qi) & (seg[b, qi] == seg[b, ki]) & key_valid[b, ki]
        return (ok & ((qi - ki < win) | (pos[b, ki] < num_sinks))) | (qi == ki)

    bsz, _, t, _ = q.shape
    rep = q.shape[1] // k.shape[1]
    if q.is_cuda:  # uncompiled flex materialises the full score matrix; compiled it is fused
        block_mask = create_block_mask(mask_mod, bsz, None, t, t, device=q.device, _compile=True)
        return _compiled_flex()(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=rep > 1)
    block_mask = create_block_mask(mask_mod, bsz, None, t, t, device=q.device)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scaling, enable_gqa=rep > 1)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def swa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    reset: torch.Tensor,
    key_valid: torch.Tensor,
    window: int | None,
    num_sinks: int,
    scaling: float,
    backend: str = "auto",
    plain: bool = False,
    memo: dict | None = None,
) -> torch.Tensor:
    """Dispatch to a backend (``auto``: flex on CUDA, blocked on CPU beyond one window, else
    reference). ``plain``: the caller knows that every row is one document from its first token
    and holds no padding; then, where the window covers the whole sequence (or there is none),
    ``auto`` uses SDPA's causal path (the same function, no mask). ``memo``: a dict shared by the
    layers of one forward; the blocked backend keeps its block layout there (built once)."""
    if backend == "auto" and plain and (window is None or q.shape[2] <= window):
        return causal_attention(q, k, v, scaling)
    if backend == "auto":
        if q.is_cuda:
            backend = "flex"
        elif window is not None and q.shape[2] > window:
            backend = "blocked"  # dense masks keep CPU SDPA from skipping masked blocks
        else:
            backend = "reference"
    if backend == "reference":
        return swa_reference(q, k, v, reset, key_valid, window, num_sinks, scaling)
    if backend == "blocked":
        layout = None
        if memo is not None:
            key = ("swa_blocked", window, num_sinks, q.shape[2])
            layout = memo.get(key)
            if layout is None:
                layout = blocked_layout(reset, key_valid, window, num_sinks, q.shape[2])
                memo[key] = layout
        return swa_blocked(q, k, v, reset, key_valid, window, num_sinks, scaling, layout=layout)
    if backend == "flex":
        return swa_flex(q, k, v, reset, key_valid, window, num_sinks, scaling)
    raise ValueError(f"unknown swa_backend {backend!r}; choose one of {SWA_BACKENDS}")
