"""Sliding-window softmax attention with attention sinks, over packed documents.

Query ``i`` sees key ``j`` when both are in the same document, ``j <= i``, and either
``i - j < window`` (the window) or ``j`` is one of the first ``num_sinks`` tokens of the document
(a sink). All visible keys share one softmax. ``window=None`` gives full causal attention (the
teacher's). :func:`visible` is that rule, written once: every mask of the model (these backends,
``shared_norm``'s, a decoding step and a chunk after a cache over the slots of
:mod:`megadistill.model.cache`) is this function on the tokens' stream index, document id and
position in the document (:class:`Tokens`).

Backends (all exact):
- ``reference``: one dense (T x T) boolean mask and SDPA.
- ``blocked``: queries in blocks; each block sees only its window plus its document's sinks, so
  memory is O(T * (window + block)) and no T x T mask is ever built (CPU default for long inputs).
- ``flex``: FlexAttention with a block mask (compiled on CUDA; its compiled forward is also tested
  on CPU, where FlexAttention has no backward).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from megadistill.hybrid import SWA_BACKENDS


class Tokens(NamedTuple):
    """What the visibility rule needs to know about a set of tokens (broadcastable tensors)."""

    idx: torch.Tensor  # index in the row's stream (-1: an empty slot)
    doc: torch.Tensor  # document id in the row's stream
    pos: torch.Tensor  # position in the document (a sink below ``num_sinks``)
    ok: torch.Tensor  # a real token (not padding, not an empty slot)


def document_layout(
    reset: torch.Tensor,
    idx: torch.Tensor | None = None,
    doc0: torch.Tensor | None = None,
    start0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Document ids and positions in the document (B,T) from document-start flags ``reset``.

    Args:
        reset: (B,T) a document starts at this token.
        idx: (T,) the tokens' indices in the row's stream (default 0..T-1).
        doc0, start0: (B,) the document the stream is in before these tokens and the index where
            it started (default: document 0, from index 0), for tokens that continue a cache.
    """
    idx = (torch.arange(reset.shape[1], device=reset.device) if idx is None else idx).expand_as(
        reset
    )
    base = torch.zeros_like(idx) if start0 is None else start0[:, None].expand_as(idx)
    start = torch.where(reset, idx, base).cummax(-1).values
    doc = reset.long().cumsum(-1)
    return (doc if doc0 is None else doc + doc0[:, None]), idx - start


def visible(
    q_idx: torch.Tensor,
    q_doc: torch.Tensor,
    k_idx: torch.Tensor,
    k_doc: torch.Tensor,
    k_pos: torch.Tensor | None,
    k_ok: torch.Tensor,
    window: int | None,
    num_sinks: int,
) -> torch.Tensor:
    """Whether a query sees a key: THE sliding-window rule, elementwise on broadcastable tensors.

    A real key is seen when it is in the query's document, not after it, and either inside the
    window or one of the document's first ``num_sinks`` tokens; a query always sees itself (a
    padding query too: its softmax stays finite). ``window=None``: full causal attention. Every
    mask is this function: the dense and blocked masks, Flex's ``mask_mod``, a decoding step and a
    chunk after a cache (whose slots hold each token once; an empty slot has index -1).
    """
    seen = k_ok & (k_doc == q_doc) & (k_idx <= q_idx)
    if window is not None:
        seen = seen & ((q_idx - k_idx < window) | (k_pos < num_sinks))
    return seen | (k_idx == q_idx)


def token_mask(q: Tokens, k: Tokens, window: int | None, num_sinks: int) -> torch.Tensor:
    """:func:`visible` for every (query, key) pair: q's fields (B,Tq), k's (B,Tk) -> (B,Tq,Tk).
    Only the queries' ``idx`` and ``doc`` are read; ``k.pos`` may be None when ``window`` is."""
    k_pos = None if window is None else k.pos[..., None, :]
    return visible(
        q.idx[..., :, None], q.doc[..., :, None], k.idx[..., None, :], k.doc[..., None, :],
        k_pos, k.ok[..., None, :], window, num_sinks,
    )  # fmt: skip


def row_tokens(reset: torch.Tensor, valid: torch.Tensor) -> Tokens:
    """The :class:`Tokens` of rows that start a stream (no cache before them)."""
    doc, pos = document_layout(reset)
    idx = torch.arange(reset.shape[1], device=reset.device).expand_as(reset)
    return Tokens(idx, doc, pos, valid)


def _sdpa(q, k, v, mask, scaling):
    """SDPA with a mask (B, Tq, Tk) shared by all heads (boolean, or additive); GQA without
    repeating K/V.

    The ``rep`` query heads that share a K/V head are folded into the query length, so each K/V
    head is read once (no repeat_interleave copies of the cache or the keys); the mask is repeated
    to match, unless the caller gives it repeated already (B, rep * Tq, Tk).
    """
    b, h, t, d = q.shape
    rep = h // k.shape[1]
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None], scale=scaling)
    qg = q.reshape(b, k.shape[1], rep * t, d)
    if mask.shape[1] != rep * t:
        mask = mask.repeat(1, rep, 1)
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask[:, None], scale=scaling)
    return out.reshape(b, h, t, -1)


def swa_reference(q, k, v, reset, key_valid, window, num_sinks, scaling):
    """Dense-mask SWA + sinks. q (B,H,T,d); k, v (B,KV,T,d); reset, key_valid (B,T)."""
    tok = row_tokens(reset, key_valid)
    return _sdpa(q, k, v, token_mask(tok, tok, window, num_sinks), scaling)


BLOCK = 128  # queries per block of the blocked backend


def blocked_layout(
    reset, key_valid, window, num_sinks, t, block=BLOCK, plain=False, dtype=None, rep=1
):
    """Per query block of :func:`swa_blocked`: (start, end, keys, mask (B,L,K)). ``keys``: the key
    indices (B,K) to gather, or, for ``plain`` rows (one document from the row's first token, no
    padding: the caller knows it), the ranges [(a, b), ...] of key columns to take, the same in
    every row (the document's sinks, then the block's window: slices, no gather). ``dtype``: the
    masks are additive (0 / -inf) in it, as SDPA would make them in every call, else boolean;
    ``rep`` > 1: repeated for that many query heads per K/V head, as :func:`_sdpa` folds them.
    Depends only on the document layout, so a model builds it once per forward for all layers."""
    dev = reset.device
    window = t if window is None else window  # full causal: a window covering the row
    tok = row_tokens(reset, key_valid)
    doc_start = tok.idx - tok.pos  # (B,T)
    out = []
    for s in range(0, t, block):
        e = min(s + block, t)
        ws = max(0, s - window + 1)
        queries = Tokens(*(f[:, s:e] for f in tok))
        if plain:  # every row's document starts at column 0: sinks 0..S-1, then the window
            ranges = [(0, e)] if ws <= num_sinks else [(0, min(num_sinks, t)), (ws, e)]
            cols = torch.cat([torch.arange(a, b, device=dev) for a, b in ranges])
            keys = Tokens(*(f[:, cols] for f in tok))
            mask = token_mask(queries, keys, window, num_sinks)
            out.append((s, e, ranges, _additive(mask, dtype, rep)))
            continue
        span = tok.idx[:, ws:e]
        # The sinks of the first query's document (later queries of the block either share that
        # document or started a new one inside the window). A sink inside the span comes with
        # it: its sink entry reads as an empty slot, so every key is listed once.
        sink_idx = (doc_start[:, s : s + 1] + torch.arange(num_sinks, device=dev)).clamp(max=t - 1)
        k_idx = torch.cat([sink_idx, span], dim=1)
        live = torch.cat([sink_idx < ws, torch.ones_like(span, dtype=torch.bool)], dim=1)
        idx, doc, pos, ok = (f.gather(1, k_idx) for f in tok)
        keys = Tokens(idx.masked_fill(~live, -1), doc, pos, ok & live)
        mask = token_mask(queries, keys, window, num_sinks)
        out.append((s, e, k_idx, _additive(mask, dtype, rep)))
    return out


def _additive(mask: torch.Tensor, dtype: torch.dtype | None, rep: int = 1) -> torch.Tensor:
    """A boolean mask (B,L,K) as SDPA's additive one in ``dtype`` (0 where seen, -inf
    elsewhere; ``dtype`` None: kept boolean), repeated ``rep`` times along L (see :func:`_sdpa`)."""
    if rep > 1:
        mask = mask.repeat(1, rep, 1)
    if dtype is None:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, -math.inf)


def _block_keys(x: torch.Tensor, keys) -> torch.Tensor:
    """The keys (or values) x (B,KV,T,d) of one block: gathered by index (B,K), or the column
    ranges of plain rows (a view for one range)."""
    if isinstance(keys, list):
        parts = [x[:, :, a:b] for a, b in keys]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return x.gather(2, keys[:, None, :, None].expand(-1, x.shape[1], -1, x.shape[-1]))


def swa_blocked(
    q, k, v, reset, key_valid, window, num_sinks, scaling, block=BLOCK, layout=None, plain=False
):
    """Blocked SWA + sinks: per query block, keys = the block's window + its document's sinks.
    ``layout``: :func:`blocked_layout` of these arguments, when the caller has built it.
    ``window=None`` (full causal attention over packed documents: stage I's target, kept softmax
    layers) is a window covering the row: memory O(T * block), never a T x T mask."""
    if window is None:
        window = q.shape[2]
    if layout is None:
        rep = q.shape[1] // k.shape[1]
        layout = blocked_layout(
            reset, key_valid, window, num_sinks, q.shape[2], block, plain, q.dtype, rep
        )
    outs = []
    for s, e, keys, mask in layout:
        kb, vb = _block_keys(k, keys), _block_keys(v, keys)
        outs.append(_sdpa(q[:, :, s:e], kb, vb, mask, scaling))
    return torch.cat(outs, dim=2)


def causal_attention(q, k, v, scaling):
    """Plain causal attention (every row one document from its first token, no padding): SDPA's
    ``is_causal`` path, which skips the masked half and builds no mask. Exact."""
    gqa = q.shape[1] != k.shape[1]  # K/V heads shared by query heads, read without copies
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)


def swa_flex(q, k, v, reset, key_valid, window, num_sinks, scaling, compiled=None):
    """FlexAttention with a document/window/sink block mask. ``compiled`` (default: on CUDA):
    block mask and kernel compiled, fused (on CPU the compiled kernel has no backward); else
    eager flex, which materialises the full score matrix."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    tok = row_tokens(reset, key_valid)

    def mask_mod(b, h, qi, ki):
        del h
        return visible(
            qi, tok.doc[b, qi], ki, tok.doc[b, ki], tok.pos[b, ki], tok.ok[b, ki], window, num_sinks
        )

    bsz, _, t, _ = q.shape
    rep = q.shape[1] // k.shape[1]
    if q.is_cuda if compiled is None else compiled:
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
        elif q.shape[2] > (window if window is not None else 2 * BLOCK):
            # dense masks keep CPU SDPA from skipping masked blocks, and a T x T mask and score
            # matrix per layer is what long training rows cannot afford
            backend = "blocked"
        else:
            backend = "reference"
    if backend == "reference":
        return swa_reference(q, k, v, reset, key_valid, window, num_sinks, scaling)
    if backend == "blocked":
        layout = None
        if memo is not None:
            rep = q.shape[1] // k.shape[1]
            key = ("swa_blocked", window, num_sinks, q.shape[2], plain, q.dtype, rep)
            layout = memo.get(key)
            if layout is None:
                layout = blocked_layout(
                    reset, key_valid, window, num_sinks, q.shape[2], BLOCK, plain, q.dtype, rep
                )
                memo[key] = layout
        return swa_blocked(
            q, k, v, reset, key_valid, window, num_sinks, scaling, layout=layout, plain=plain
        )
    if backend == "flex":
        return swa_flex(q, k, v, reset, key_valid, window, num_sinks, scaling)
    raise ValueError(f"unknown swa_backend {backend!r}; choose one of {SWA_BACKENDS}")
