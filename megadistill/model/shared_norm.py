"""The ``shared_norm`` mix: exact softmax inside the window, the mLSTM's keys beyond it, one
normaliser for both (LoLCATs' sliding-window + linear attention, with the mLSTM's gates).

For query ``t`` the keys it sees split into the window set ``V_t`` (the last W tokens and the
document's sinks, scored exactly by softmax attention) and the older keys ``O_t``, scored through
the feature maps with the mLSTM's gates:

    a_ts = q_t . k_s / sqrt(d)                                       s in V_t
    b_ts = i_s + sum_{r=s+1..t} log f_r + log(phi(q_t) . phi(k_s)) + max_{s' in V_t} a_ts'   s in O_t
    y_t  = sum_s softmax_s([a_t | b_t]) v_s

The linear terms are measured against the largest window weight (as LoLCATs does), so the input
gate ``i`` sets how much the far past weighs relative to the best key in the window. Unlike the
gated mix, a query whose window holds all its context is exactly the teacher's, whatever the new
parameters are: the mLSTM can only add what the window misses.

Decoding keeps O(1) state: the window's ring buffer (keys, values, plus each slot's input gate and
the log-decay accumulated since it entered) and the mLSTM-like state (C, n, m) of the keys that
have left the window. A token joins the state when it leaves the window, if it is of the query's
document; a new document empties the state. Which keys each query sees is
:func:`megadistill.model.swa.visible`, as for the other paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megadistill.model.swa import Tokens, row_tokens, token_mask

NEG = -1.0e30


def _up(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the compute dtype: float32 for half types and float32, float64 stays float64
    (so the float64 parity tests compare the algorithms, not float32 rounding)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _window_masks(reset, valid, window, num_sinks):
    """(window set V, older keys O) per (query, key): O is what full attention sees beyond V."""
    tok = row_tokens(reset, valid)
    win = token_mask(tok, tok, window, num_sinks)
    return win, token_mask(tok, tok, None, 0) & ~win


def shared_norm_parallel(q, k, v, fq, fk, i_pre, f_pre, reset, valid, window, num_sinks, scaling):
    """Quadratic reference form (training and prefill).

    Args:
        q: (B,H,T,d) RoPE'd queries; k, v: (B,KV,T,d) RoPE'd keys and values.
        fq, fk: (B,H,T,F) feature-mapped queries and keys (keys already repeated to H heads).
        i_pre, f_pre: (B,H,T) input/forget gate pre-activations (padding: PAD_I / PAD_F).
        reset, valid: (B,T) document starts and real tokens.
        window, num_sinks, scaling: the SWA branch's settings.

    Returns:
        (B,H,T,d) in v's dtype.
    """
    rep = q.shape[1] // k.shape[1]
    kr, vr = _up(k.repeat_interleave(rep, 1)), _up(v.repeat_interleave(rep, 1))
    win, out = _window_masks(reset, valid, window, num_sinks)
    a = (_up(q) @ kr.transpose(-1, -2)) * scaling  # (B,H,T,T)
    a_win = a.masked_fill(~win[:, None], NEG)
    top = a_win.amax(-1, keepdim=True)
    cum = F.logsigmoid(_up(f_pre)).cumsum(-1)
    g = cum[..., :, None] - cum[..., None, :] + _up(i_pre)[..., None, :]
    lin = (_up(fq) @ _up(fk).transpose(-1, -2)).clamp_min(1e-30).log()
    b = (g + lin + top).masked_fill(~out[:, None], NEG)
    logits = torch.where(win[:, None], a_win, b)
    return (torch.softmax(logits, dim=-1) @ vr).to(v.dtype)


def prefill_state(fk, v, i_pre, f_pre, tokens: Tokens, window, num_sinks):
    """The (C, n, m) state after a prefill of T tokens (``tokens``: their (B,T) stream facts):
    the keys of the last token's document that have left its window, i.e. index <= T-1-W, minus
    sinks and padding. Also the per-token (input gate, log-decay to the last token)."""
    rep = fk.shape[1] // v.shape[1]
    vr = _up(v.repeat_interleave(rep, 1))
    t = fk.shape[2]
    cum = F.logsigmoid(_up(f_pre)).cumsum(-1)  # (B,H,T)
    decay = cum[..., -1:] - cum  # log f summed over s+1..T-1
    w = _up(i_pre) + decay
    left = torch.arange(t, device=fk.device) <= t - 1 - window
    same_doc = tokens.doc == tokens.doc[:, -1:]
    ok = (left[None] & tokens.ok & same_doc & (tokens.pos >= num_sinks))[:, None, :]  # (B,1,T)
    w = w.masked_fill(~ok, NEG)
    m = w.amax(-1).clamp_min(NEG)  # (B,H)
    e = torch.exp(w - m[..., None]) * ok
    c = torch.einsum("bht,bhtf,bhtd->bhfd", e, _up(fk), vr)
    n = torch.einsum("bht,bhtf->bhf", e, _up(fk))
    return (c, n, m), _up(i_pre), decay


def shared_norm_step(q, win_k, win_v, win_mask, fq, state, scaling):
    """Output of one query over the window buffer plus the state (already updated).

    Args:
        q: (B,H,d) RoPE'd query; win_k, win_v: (B,KV,N,d) buffer; win_mask: (B,N) visible slots.
        fq: (B,H,F); state: (C (B,H,F,d), n (B,H,F), m (B,H)).
    """
    c, n, m = state
    rep = q.shape[1] // win_k.shape[1]
    kr = _up(win_k.repeat_interleave(rep, 1))
    vr = _up(win_v.repeat_interleave(rep, 1))
    a = torch.einsum("bhd,bhnd->bhn", _up(q), kr) * scaling
    a = a.masked_fill(~win_mask[:, None, :], NEG)
    top = a.amax(-1, keepdim=True)
    pw = torch.exp(a - top)  # window weights, the largest is 1
    z = m.clamp_min(0.0)  # common scale of window (<= 1) and state (e^m) terms
    scale_w = torch.exp(-z)[..., None]
    scale_s = torch.exp(m - z)[..., None]
    fqf = _up(fq)
    num = scale_w * torch.einsum("bhn,bhnd->bhd", pw, vr) + scale_s * torch.einsum(
        "bhf,bhfd->bhd", fqf, c
    )
    den = scale_w * pw.sum(-1, keepdim=True) + scale_s * (fqf * n).sum(-1, keepdim=True)
    return num / den


def reset_rows(state, reset):
    """The empty state (no key has left the window) in the rows where ``reset`` (B,) is True."""
    c, n, m = state
    keep = ~reset[:, None]
    return c * keep[..., None, None], n * keep[..., None], m.masked_fill(~keep, NEG)


def absorb(state, fk_s, v_s, log_w, logf_t):
    """Decay the state by ``logf_t`` and add the key leaving the window with log weight
    ``log_w`` (NEG when none leaves). fk_s: (B,H,F); v_s: (B,H,d); log_w, logf_t: (B,H)."""
    c, n, m = state
    m_new = torch.maximum(logf_t + m, log_w)
    old = torch.exp(logf_t + m - m_new)
    new = torch.exp(log_w - m_new)
    c = old[..., None, None] * c + new[..., None, None] * (fk_s[..., :, None] * v_s[..., None, :])
    n = old[..., None] * n + new[..., None] * fk_s
    return c, n, m_new


def _absorb_block(state, cum, i_key, fkf, vr, doc, cum_before, doc_before):
    """The state after one block of keys leaves every window: the keys of the document of the
    block's last key only, weighted as seen from that key. A document that starts in between
    empties the state first (its keys are of an earlier document).

    Args:
        state: (C, n, m) holding the keys before the block, as seen from the key before it.
        cum, i_key: (B,H,S) the block's cumulative log forget gates and input gates.
        fkf, vr: (B,H,S,F), (B,H,S,d) its key features and values; doc: (B,S) its documents.
        cum_before, doc_before: (B,H), (B,) of the key before the block (None: none before).
    """
    c, n, m = state
    ref = cum[..., -1]
    if cum_before is not None:
        keep = (doc_before == doc[:, -1])[:, None]  # (B,1)
        c, n = c * keep[..., None, None], n * keep[..., None]
        m = m.masked_fill(~keep, NEG)
        decay = ref - cum_before
    else:
        decay = torch.zeros_like(ref)
    same = (doc == doc[:, -1:])[:, None, :]  # (B,1,S)
    wt = (i_key + ref[..., None] - cum).masked_fill(~same, NEG)
    m_new = torch.maximum(m + decay, wt.amax(-1))
    old, new = torch.exp(m + decay - m_new), torch.exp(wt - m_new[..., None])
    c = old[..., None, None] * c + torch.einsum("bhs,bhsf,bhsd->bhfd", new, fkf, vr)
    n = old[..., None] * n + torch.einsum("bhs,bhsf->bhf", new, fkf)
    return c, n, m_new


def _sink_keys(tok: Tokens, lo: int, num_sinks: int) -> torch.Tensor:
    """(B, S) the sinks of key ``lo``'s document (clamped into the row; whether each is a key of
    the block is :func:`_block_keys`' to say)."""
    start = (lo - tok.pos[:, lo : lo + 1]).clamp(min=0)  # (B,1): where key lo's document began
    sinks = start + torch.arange(num_sinks, device=tok.pos.device)
    return sinks.clamp(max=tok.pos.shape[1] - 1)


def _block_keys(tok: Tokens, lo: int, e: int, sinks: torch.Tensor):
    """Explicit keys of the query block ending at ``e``: the ``sinks`` (B, S) of key ``lo``'s
    document (:func:`_sink_keys`) that lie before ``lo`` (queries of a later document find theirs
    in the span), then ``[lo, e)``. Returns the key indices (B,K) and their :class:`Tokens` (a
    sink that is not before ``lo`` reads as an empty slot, so every key is listed once)."""
    # sinks are clamped at T - 1 >= lo: those before lo are as they were
    span = torch.arange(lo, e, device=tok.doc.device).expand(tok.doc.shape[0], -1)
    keys = torch.cat([sinks, span], 1)
    live = torch.cat([sinks < lo, torch.ones_like(span, dtype=torch.bool)], 1)
    k_tok = Tokens(
        keys.masked_fill(~live, -1), tok.doc.gather(1, keys), tok.pos.gather(1, keys),
        tok.ok.gather(1, keys) & live,
    )  # fmt: skip
    return keys, k_tok


class _Blocks:
    """A tensor's values per query block, for the blocked form: the block's own tokens (a view
    of one :meth:`~torch.Tensor.split` chunk) and its keys (the sinks, gathered for all blocks by
    one ``gather``, then the previous block and its own). Autograd then sums each tensor's
    gradient once (the split's and the gather's backward, one op each) rather than once per
    block and slice: slicing and gathering the whole tensor in every block made every backward
    fill and add a zero tensor of the tensor's full size per use (O(T^2 / W); at 2K tokens,
    two thirds of a layer's step)."""

    def __init__(self, x: torch.Tensor, window: int, sinks: torch.Tensor | None):
        """x: (B, H, T, ...) split along T; sinks: (B, N, S) the N blocks' sink keys, or None."""
        self.chunks = x.split(window, 2)
        self.sinks = None
        if sinks is not None:
            bsz, nb, s = sinks.shape
            idx = sinks.reshape(bsz, 1, nb * s, *([1] * (x.dim() - 3)))
            self.sinks = x.gather(2, idx.expand(-1, x.shape[1], -1, *x.shape[3:])).split(s, 2)

    def keys(self, block: int) -> torch.Tensor:
        """The block's keys (along T): its sinks, the previous block, itself."""
        parts = [] if self.sinks is None else [self.sinks[block]]
        if block > 0:
            parts.append(self.chunks[block - 1])
        parts.append(self.chunks[block])
        return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def shared_norm_blocked(q, k, v, fq, fk, i_pre, f_pre, tok: Tokens, window, num_sinks, scaling):
    """The same function in query blocks of W tokens: each block scores its window (the previous
    block and itself) and its documents' sinks exactly, and every older key of the same document
    through the state (C, n, m) that the blocks before it have built. O(T * (2W + S)) time and
    memory instead of O(T^2), forward and backward (plus one (F, d) state per block), over packed
    documents and padding alike.

    Args:
        q, k, v, fq, fk, i_pre, f_pre, window, num_sinks, scaling: as
            :func:`shared_norm_parallel`.
        tok: the row's tokens (B,T): document ids, positions in the document (sinks are the first
            ``num_sinks``) and realness, as :func:`megadistill.model.swa.row_tokens` gives them
            (``idx`` is not read: keys are indexed 0..T-1 along the row).
    """
    bsz, h, t, d = q.shape
    w, dev = window, q.device
    rep = h // k.shape[1]
    kr, vr = _up(k.repeat_interleave(rep, 1)), _up(v.repeat_interleave(rep, 1))
    qf, fqf, fkf = _up(q), _up(fq), _up(fk)
    cum = F.logsigmoid(_up(f_pre)).cumsum(-1)
    enters = tok.ok & (tok.pos >= num_sinks)  # (B,T) keys that can join the state (no sinks)
    i_up = _up(i_pre)
    i_key = i_up.masked_fill(~enters[:, None], NEG)
    starts = range(0, t, w)
    sinks = torch.stack([_sink_keys(tok, max(0, j - w), num_sinks) for j in starts], 1)
    gathered = sinks if num_sinks else None  # (B, blocks, S): every block's sinks, gathered once
    kb_all, vb_all, fk_all, cum_all, ik_all = (
        _Blocks(x, w, gathered) for x in (kr, vr, fkf, cum, i_up)
    )
    q_all, fq_all, ikey_all = (x.split(w, 2) for x in (qf, fqf, i_key))
    doc_all = tok.doc.split(w, 1)
    state = (
        qf.new_zeros(bsz, h, fqf.shape[-1], d),
        qf.new_zeros(bsz, h, fqf.shape[-1]),
        qf.new_full((bsz, h), NEG),
    )
    end = 0  # the state holds the keys of the blocks before ``end``, as seen from its last key
    outs = []
    for bi, j in enumerate(starts):
        e = min(j + w, t)
        lo = max(0, j - w)
        if bi - 1 > end:  # block ``end`` (keys [end W, end W + W)) leaves every window from here
            cum_before = cum_all.chunks[end - 1][..., -1] if end else None
            doc_before = doc_all[end - 1][:, -1] if end else None
            state = _absorb_block(
                state, cum_all.chunks[end], ikey_all[end], fk_all.chunks[end], vb_all.chunks[end],
                doc_all[end], cum_before, doc_before,
            )  # fmt: skip
            end += 1
        c, n, m = state
        keys, k_tok = _block_keys(tok, lo, e, sinks[:, bi])
        q_tok = Tokens(torch.arange(j, e, device=dev).expand(bsz, -1), doc_all[bi], None, None)
        win = token_mask(q_tok, k_tok, w, num_sinks)
        out_m = token_mask(q_tok, k_tok, None, 0) & ~win & enters.gather(1, keys)[:, None, :]
        kb, vb = kb_all.keys(bi), vb_all.keys(bi)
        qb, fqb, cb = q_all[bi], fq_all[bi], cum_all.chunks[bi]
        a = torch.einsum("bhld,bhkd->bhlk", qb, kb) * scaling
        a_win = a.masked_fill(~win[:, None], NEG)
        top = a_win.amax(-1, keepdim=True)  # (B,H,L,1)
        g = cb[..., None] - cum_all.keys(bi)[..., None, :] + ik_all.keys(bi)[..., None, :]
        lin = torch.einsum("bhlf,bhkf->bhlk", fqb, fk_all.keys(bi)).clamp_min(1e-30).log()
        logits = torch.where(win[:, None], a_win, (g + lin + top).masked_fill(~out_m[:, None], NEG))
        # The state's keys, as one weight per query: exp(cum_t - cum_ref + m + top), for the
        # queries of the state's document only.
        if end > 0:
            ref, ref_doc = cum_all.chunks[end - 1][..., -1:], doc_all[end - 1][:, -1:]
            st = cb - ref + m[..., None] + top[..., 0]  # (B,H,L)
            st = st.masked_fill((doc_all[bi] != ref_doc)[:, None], NEG)
        else:
            st = torch.full_like(top[..., 0], NEG)
        z = torch.maximum(logits.amax(-1), st)
        p = torch.exp(logits - z[..., None])
        ps = torch.exp(st - z)[..., None]
        num = p @ vb + ps * torch.einsum("bhlf,bhfd->bhld", fqb, c)
        den = p.sum(-1, keepdim=True) + ps * torch.einsum("bhlf,bhf->bhl", fqb, n)[..., None]
        outs.append(num / den)
    return torch.cat(outs, dim=2).to(v.dtype)
