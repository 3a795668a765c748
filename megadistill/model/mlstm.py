"""The mLSTM cell: sequence backends and the single-step update.

All backends compute the same function (xLSTM's stabilised mLSTM, as in ``mlstm_kernels``):

    m_t = max(log f_t + m_{t-1}, i_t)                        (m_0 = 0)
    C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(i_t - m_t) k_t v_t^T
    n_t = exp(log f_t + m_{t-1} - m_t) n_{t-1} + exp(i_t - m_t) k_t
    h_t = (C_t^T q_t') / (max(|n_t . q_t'|, exp(-m_t)) + eps),  q_t' = q_t / sqrt(d_qk)

with ``log f_t = logsigmoid(f_pre_t)`` and ``i_t`` the input-gate pre-activation. A document reset
at ``t`` sets (C, n, m) to (0, 0, 0) before step ``t``. Padding is expressed through the gates
(``i = PAD_I``, ``f = PAD_F``): such a step leaves the state exactly unchanged.

Backends:
- ``recurrent``: step-by-step loop; the reference.
- ``chunkwise``: chunkwise-parallel in plain torch with exact document resets (default; any
  device, exact autograd gradients).
- ``native``: ``mlstm_kernels`` chunkwise ``native_autograd`` (documents are run one at a time).
- ``triton``: ``mlstm_kernels`` Triton ``limit_chunk`` kernel (CUDA; needs triton < 3.8, see
  :mod:`.backends`, which falls back to ``chunkwise`` where it cannot run). Its backward leaves
  out the normaliser's gradient; :func:`_with_exact_grad` adds it, so the gradients are exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megadistill.hybrid import MLSTM_BACKENDS
from megadistill.model import cpu_step
from megadistill.model.backends import resolve_mlstm_backend

EPS = 1e-6
# Gate pre-activations that make a step an exact no-op: exp(PAD_I - m) == 0 and logsigmoid(PAD_F) == 0.
PAD_I = -1.0e4
PAD_F = 1.0e4

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # C (B,H,F,D), n (B,H,F), m (B,H)


def zero_state(q: torch.Tensor, v: torch.Tensor) -> State:
    """The initial (C, n, m) for inputs shaped like ``q`` (B,H,T,F) and ``v`` (B,H,T,D)."""
    b, h, _, f = q.shape
    d = v.shape[-1]
    dt = _compute_dtype(q)
    return (
        q.new_zeros((b, h, f, d), dtype=dt),
        q.new_zeros((b, h, f), dtype=dt),
        q.new_zeros((b, h), dtype=dt),
    )


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _start_state(q: torch.Tensor, v: torch.Tensor, state: State | None) -> State:
    """The given state (or zeros) in the compute dtype."""
    dt = _compute_dtype(q)
    state = state if state is not None else zero_state(q, v)
    return tuple(s.to(dt) for s in state)  # type: ignore[return-value]


def _reset_rows(state: State, reset: torch.Tensor) -> State:
    """Zero (C, n, m) of the rows where ``reset`` (B,) is True: a document starts there."""
    keep = (~reset).to(state[0].dtype)[:, None]
    return state[0] * keep[..., None, None], state[1] * keep[..., None], state[2] * keep


def mlstm_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    state: State,
    eps: float = EPS,
) -> tuple[torch.Tensor, State]:
    """One recurrent step. q, k: (B,H,F); v: (B,H,D); i_pre, f_pre: (B,H)."""
    c, n, m = state
    dt = c.dtype
    q, k, v, i_pre, f_pre = (x.to(dt) for x in (q, k, v, i_pre, f_pre))
    logf = F.logsigmoid(f_pre)
    m_new = torch.maximum(logf + m, i_pre)
    fa = torch.exp(logf + m - m_new)
    ia = torch.exp(i_pre - m_new)
    c = fa[..., None, None] * c + ia[..., None, None] * (k[..., :, None] * v[..., None, :])
    n = fa[..., None] * n + ia[..., None] * k
    qs = q * q.shape[-1] ** -0.5
    num = (qs[..., None, :] @ c).squeeze(-2)
    den = torch.maximum((qs * n).sum(-1).abs(), torch.exp(-m_new)) + eps
    return num / den[..., None], (c, n, m_new)


def mlstm_step_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    state: State,
    eps: float = EPS,
) -> tuple[torch.Tensor, State]:
    """:func:`mlstm_step` that updates ``state`` in place when no gradient is recorded (decoding
    allocates no new state); with autograd on it is :func:`mlstm_step` (new state tensors).
    ``k`` and ``v`` may have fewer heads than ``q`` (GQA: each is shared by H / KV query heads,
    which keep their own gates and state)."""
    c, n, m = state
    bsz, nh, fd = q.shape
    rep = nh // k.shape[1]
    if torch.is_grad_enabled():
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return mlstm_step(q, k, v, i_pre, f_pre, state, eps)
    dt = c.dtype
    if q.dtype != dt:
        q, k, v, i_pre, f_pre = (x.to(dt) for x in (q, k, v, i_pre, f_pre))
    logf = F.logsigmoid(f_pre)
    m_new = torch.maximum(logf + m, i_pre)
    fa = torch.exp(logf + m - m_new)
    ia = torch.exp(i_pre - m_new).view(bsz, -1, rep, 1)
    ka = k[:, :, None, :] * ia  # (B,KV,rep,F)
    cg = c.view(bsz, -1, rep, fd, c.shape[-1])
    c.mul_(fa[..., None, None])
    cg.addcmul_(ka[..., :, None], v[:, :, None, None, :])
    n.mul_(fa[..., None]).add_(ka.view(bsz, nh, fd))
    m.copy_(m_new)
    qs = q * fd**-0.5
    num = (qs[..., None, :] @ c).squeeze(-2)
    den = torch.maximum((qs * n).sum(-1).abs(), torch.exp(-m_new)) + eps
    return num / den[..., None], state


def joint_state(state: State) -> tuple[State, torch.Tensor]:
    """``state`` with C and n as views of one (B, H, F, D + 1) tensor ``[C | n]`` (returned
    too) and m contiguous: the layout :func:`mlstm_step_joint_` (and the compiled step,
    :mod:`~megadistill.model.cpu_step`) updates in place."""
    c, n, m = state
    cn = torch.cat([c, n[..., None]], dim=-1)
    return (cn[..., :-1], cn[..., -1], m.contiguous()), cn


def mlstm_step_joint_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gates: torch.Tensor,
    cn: torch.Tensor,
    m: torch.Tensor,
    eps: float = EPS,
) -> torch.Tensor:
    """:func:`mlstm_step` in place on the joint state (no autograd; a decoding step in few ops).

    With ``cn = [C | n]`` and ``v' = [v | 1]``, the C and n updates are one product
    (``cn <- fa cn + ia k v'^T``) and ``q.C`` and ``q.n`` one read-out (``q.cn``); the three
    exponentials of the step (``ia``, ``fa`` and the read-out's floor ``exp(-m)``) are one.

    Args:
        q: (B, H, 1, F); k: (B, KV, 1, F) and v: (B, KV, 1, D), each K/V head shared by
            H / KV query heads (GQA).
        gates: (B, 3, H): the input and forget gates' pre-activations and zeros (scratch: the
            step overwrites it).
        cn: (B, H, F, D + 1) and m: (B, H), the state (see :func:`joint_state`), updated.

    Returns:
        h (B, H, 1, D) in the state's dtype.
    """
    bsz, nh, _, fd = q.shape
    nkv, dv = k.shape[1], v.shape[-1]
    rep = nh // nkv
    dt = cn.dtype
    if q.dtype != dt:
        q, k, v, gates = (x.to(dt) for x in (q, k, v, gates))
    logf = gates[:, 1]
    torch.add(F.logsigmoid(logf), m, out=logf)  # [i, log f + m, 0]
    m_new = torch.amax(gates[:, :2], 1, out=m)  # (m is read above: updated in place now)
    e = torch.exp(gates - m_new[:, None])  # [exp(i - m'), exp(log f + m - m'), exp(-m')]
    cn.mul_(e[:, 1].view(bsz, nh, 1, 1))
    ka = k * e[:, 0].view(bsz, nkv, rep, 1)  # (B,KV,rep,F)
    v1 = F.pad(v, (0, 1), value=1.0)  # (B,KV,1,D+1)
    cn.view(bsz, nkv, rep, fd, dv + 1).addcmul_(ka[..., None], v1[:, :, None])
    qs = (q * fd**-0.5).view(bsz * nh, 1, fd)
    r = torch.bmm(qs, cn.view(bsz * nh, fd, dv + 1)).view(bsz, nh, 1, dv + 1)  # [q.C | q.n]
    den = torch.maximum(r[..., dv:].abs(), e[:, 2].view(bsz, nh, 1, 1)) + eps
    return r[..., :dv] / den


def mlstm_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    reset: torch.Tensor | None = None,
    state: State | None = None,
    eps: float = EPS,
) -> tuple[torch.Tensor, State]:
    """Reference: loop over time. q, k: (B,H,T,F); v: (B,H,T,D); gates (B,H,T); reset (B,T)."""
    state = _start_state(q, v, state)
    outs = []
    for t in range(q.shape[2]):
        if reset is not None:
            state = _reset_rows(state, reset[:, t])
        h, state = mlstm_step(
            q[:, :, t], k[:, :, t], v[:, :, t], i_pre[:, :, t], f_pre[:, :, t], state, eps
        )
        outs.append(h)
    return torch.stack(outs, dim=2), state


def _chunk_layout(reset: torch.Tensor, length: int) -> tuple[torch.Tensor, ...]:
    """Per-chunk document structure from ``reset`` (B,NC,L): for every position, the index of
    the last document start in its chunk (-1: none, the carried state still applies); for every
    pair (t, s), whether s <= t lie in the same document; whether t lies in the chunk's last."""
    idx = torch.arange(length, device=reset.device)
    last_reset = torch.where(reset, idx, -1).cummax(-1).values  # (B,NC,L)
    seg = reset.long().cumsum(-1)
    same = (seg[..., :, None] == seg[..., None, :]) & (idx[:, None] >= idx[None, :])
    in_last = seg == seg[..., -1:]
    return last_reset, same, in_last


def mlstm_chunkwise(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    reset: torch.Tensor | None = None,
    state: State | None = None,
    chunk_size: int = 64,
    eps: float = EPS,
) -> tuple[torch.Tensor, State]:
    """Chunkwise-parallel mLSTM with exact document resets (any length, any device).

    The sequence is cut into NC chunks of L steps (the tail padded with no-op steps). Each
    chunk's own contribution to the state it hands on (its last document's keys) is computed for
    all chunks at once; a short scan over the NC chunks carries the states (C, n, m) across
    chunk borders (a chunk that holds a document start carries nothing over it); then the
    outputs of every chunk (intra-chunk terms plus its entering state) are one batched product.
    """
    dt = _compute_dtype(q)
    c, n, m = _start_state(q, v, state)
    q, k, v, i_pre = (x.to(dt) for x in (q, k, v, i_pre))
    logf = F.logsigmoid(f_pre.to(dt))
    bsz, nh, t, fd = q.shape
    dv = v.shape[-1]
    el = min(chunk_size, t)
    pad = (-t) % el
    if reset is None:
        reset = torch.zeros(bsz, t, dtype=torch.bool, device=q.device)
    if pad:  # no-op steps: input gate exp(PAD_I - m) == 0, log forget gate 0
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        i_pre = F.pad(i_pre, (0, pad), value=PAD_I)
        logf = F.pad(logf, (0, pad), value=0.0)
        reset = F.pad(reset, (0, pad), value=False)
    nc = (t + pad) // el
    q, k = q.reshape(bsz, nh, nc, el, fd), k.reshape(bsz, nh, nc, el, fd)
    v = v.reshape(bsz, nh, nc, el, dv)
    i_pre, logf = i_pre.reshape(bsz, nh, nc, el), logf.reshape(bsz, nh, nc, el)
    last_reset, same, in_last = _chunk_layout(reset.reshape(bsz, nc, el), el)
    cont = (last_reset < 0)[:, None]  # (B,1,NC,L): the entering state still applies at t
    b = logf.cumsum(-1)  # (B,H,NC,L): log-decay from the chunk start to t (inclusive)
    b_excl = b - logf
    # Log-weight at t of a fresh zero state (m = 0) begun at t's document start in the chunk.
    fresh = b - b_excl.gather(-1, last_reset.clamp(min=0)[:, None].expand_as(b_excl))
    # Each chunk's own contribution to the state it hands on: its last document's keys.
    logw = (b[..., -1:] - b + i_pre).masked_fill(~in_last[:, None], float("-inf"))
    m_loc = logw.amax(-1)  # (B,H,NC); finite: the last step is in the last document
    kw = k * torch.exp(logw - m_loc[..., None])[..., None]
    c_loc = kw.transpose(-1, -2) @ v  # (B,H,NC,F,D)
    n_loc = kw.sum(-2)  # (B,H,NC,F)
    # Scan over chunks: the state entering each chunk.
    carry = cont[..., -1].expand(bsz, nh, nc)  # the entering state survives the whole chunk
    through_log = torch.where(carry, b[..., -1], fresh[..., -1])  # + m where carried
    cs, ns, ms = [], [], []
    for j in range(nc):
        cs.append(c)
        ns.append(n)
        ms.append(m)
        through = through_log[..., j] + m * carry[..., j]
        m_new = torch.maximum(through, m_loc[..., j])
        a = torch.exp(through - m_new) * carry[..., j]
        w = torch.exp(m_loc[..., j] - m_new)
        c = a[..., None, None] * c + w[..., None, None] * c_loc[:, :, j]
        n = a[..., None] * n + w[..., None] * n_loc[:, :, j]
        m = m_new
    c_in, n_in, m_in = torch.stack(cs, 2), torch.stack(ns, 2), torch.stack(ms, 2)
    # Outputs of all chunks at once.
    base = torch.where(cont, b + m_in[..., None], fresh)  # (B,H,NC,L)
    qs = q * fd**-0.5
    if torch.is_grad_enabled():
        logd = (b[..., :, None] - b[..., None, :] + i_pre[..., None, :]).masked_fill(
            ~same[:, None], float("-inf")
        )  # (B,H,NC,L,L)
        m_t = torch.maximum(base, logd.amax(-1))
        s_mat = (qs @ k.transpose(-1, -2)) * torch.exp(logd - m_t[..., None])
        w_state = torch.exp(base - m_t) * cont
        num = s_mat @ v + w_state[..., None] * (qs @ c_in)
        den = s_mat.sum(-1) + w_state * (qs @ n_in[..., None]).squeeze(-1)
        h = num / (torch.maximum(den.abs(), torch.exp(-m_t)) + eps)[..., None]
    else:  # the same in place: no backward keeps them, so no new (L, L) and (L, D) buffers
        logd = b[..., :, None] - b[..., None, :]
        logd.add_(i_pre[..., None, :]).masked_fill_(~same[:, None], float("-inf"))
        m_t = torch.maximum(base, logd.amax(-1))
        s_mat = (qs @ k.transpose(-1, -2)).mul_(logd.sub_(m_t[..., None]).exp_())
        w_state = torch.exp(base - m_t) * cont
        num = (s_mat @ v).addcmul_(w_state[..., None], qs @ c_in)
        den = s_mat.sum(-1).addcmul_(w_state, (qs @ n_in[..., None]).squeeze(-1))
        h = num.div_((torch.maximum(den.abs(), torch.exp(-m_t)) + eps)[..., None])
    return h.reshape(bsz, nh, nc * el, dv)[:, :, :t], (c, n, m)


def _kernel_fn(backend: str):
    from mlstm_kernels.torch import get_mlstm_kernel

    name = {"native": "chunkwise--native_autograd", "triton": "chunkwise--triton_limit_chunk"}
    try:
        return get_mlstm_kernel(name[backend])
    except ValueError as exc:
        raise RuntimeError(
            f"mLSTM backend '{backend}' is unavailable here ({exc}); "
            "use mlstm_backend='chunkwise' (exact, any device)"
        ) from exc


# Value columns of the normaliser call of :func:`_with_exact_grad`: on a GPU the kernel's
# tl.dot needs blocks of at least 16 along every reduced dimension.
_NORM_COLS = 16


def _with_exact_grad(fn, q, k, i_pre, f_pre, state, h, chunk_size, eps):
    """``h`` (same values) with the gradients the Triton kernel's backward leaves out.

    That backward holds the denominator ``den = max(|n.q'|, exp(-m)) + eps`` and the stabiliser
    ``m`` constant (the xLSTM blocks it was written for put a per-head norm after the cell, which
    cancels the denominator's gradient; this student has none: without this its q/k/i/f
    gradients are off by up to ~100%). The terms added:

    - where ``|n.q'|`` is the larger, the gradient of ``n.q'``: the same kernel with ones as values
      returns ``s = n.q' / den`` (a state's C for ones is its n), and its backward (den constant
      again) gives that gradient for the upstream ``-(dL/dh . h) sign(s)`` that
      ``h - h * sign(s) * (s - s.detach())`` feeds it;
    - ``m``'s: ``h`` depends on ``m`` through ``eps`` alone (``dh/dm = -h eps / den``, where
      ``eps / den`` is ``1 - |s|`` or ``eps / (exp(-m) + eps)``); ``m_t`` is the recurrence's
      running max, computed here with its gradient.
    """
    _, n, m = state
    ones = h.new_ones(*h.shape[:-1], _NORM_COLS)
    c_ones = n[..., None].expand(*n.shape, _NORM_COLS).contiguous()
    s = fn(
        q, k, ones, i_pre, f_pre, c_initial=c_ones, n_initial=n, m_initial=m[..., None],
        return_last_states=False, chunk_size=chunk_size, eps=eps,
    )[..., 0]  # fmt: skip
    b = F.logsigmoid(f_pre).cumsum(-1)
    m_t = torch.maximum(m[..., None] + b, (i_pre - b).cummax(-1).values + b)
    with torch.no_grad():
        floor = torch.exp(-m_t)
        grows = s.abs() * (floor + eps) >= floor  # |n.q'| >= exp(-m)
        eps_den = torch.where(grows, 1 - s.abs(), eps / (floor + eps))
        sign = torch.sign(s) * grows
    extra = sign * (s - s.detach()) + eps_den * (m_t - m_t.detach())  # zero, with gradients
    return h - h.detach() * extra[..., None]


def _kernel_segment(fn, q, k, v, i_pre, f_pre, state, chunk_size, eps, exact_grad=False):
    """Run an mlstm_kernels chunkwise kernel on one document, padding T to the chunk size.
    ``exact_grad``: add the gradients the Triton kernel's backward leaves out."""
    t = q.shape[2]
    pad = (-t) % chunk_size
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        i_pre = F.pad(i_pre, (0, pad), value=PAD_I)
        f_pre = F.pad(f_pre, (0, pad), value=PAD_F)
    c, n, m = state
    h, last = fn(
        q, k, v, i_pre, f_pre, c_initial=c, n_initial=n, m_initial=m[..., None],
        return_last_states=True, chunk_size=chunk_size, eps=eps,
    )  # fmt: skip
    if (
        exact_grad
        and torch.is_grad_enabled()
        and any(x.requires_grad for x in (q, k, i_pre, f_pre, n, m))
    ):
        h = _with_exact_grad(fn, q, k, i_pre, f_pre, state, h, chunk_size, eps)
        # The kernel's gradients through its last state miss terms too (n's and part of f's);
        # the state feeds a cache, which runs without autograd.
        last = tuple(x.detach() for x in last)
    c, n, m = last
    return h[:, :, :t], (c, n, m.reshape(m.shape[0], m.shape[1]))


def mlstm_kernels_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    reset: torch.Tensor | None = None,
    state: State | None = None,
    chunk_size: int = 64,
    eps: float = EPS,
    backend: str = "native",
) -> tuple[torch.Tensor, State]:
    """mlstm_kernels backends. Packed rows are split at document starts (one call per document)."""
    fn = _kernel_fn(backend)
    exact = backend == "triton"  # native_autograd's gradients are autograd's
    dt = _compute_dtype(q)
    state = _start_state(q, v, state)
    q, k, v, i_pre, f_pre = (x.to(dt) for x in (q, k, v, i_pre, f_pre))
    if reset is None or not bool(reset[:, 1:].any()):
        if reset is not None and bool(reset[:, 0].any()):
            state = _reset_rows(state, reset[:, 0])
        return _kernel_segment(fn, q, k, v, i_pre, f_pre, state, chunk_size, eps, exact)
    rows, states = [], []
    for r in range(q.shape[0]):
        starts = [0, *(reset[r, 1:].nonzero().flatten() + 1).tolist(), q.shape[2]]
        st = tuple(s[r : r + 1] for s in state)
        if bool(reset[r, 0]):
            st = tuple(torch.zeros_like(s) for s in st)
        pieces = []
        for a, b in zip(starts[:-1], starts[1:]):
            if a > 0:
                st = tuple(torch.zeros_like(s) for s in st)
            sl = slice(a, b)
            h, st = _kernel_segment(
                fn, q[r : r + 1, :, sl], k[r : r + 1, :, sl], v[r : r + 1, :, sl],
                i_pre[r : r + 1, :, sl], f_pre[r : r + 1, :, sl], st, chunk_size, eps, exact,
            )  # fmt: skip
            pieces.append(h)
        rows.append(torch.cat(pieces, dim=2))
        states.append(st)
    return torch.cat(rows), tuple(torch.cat(s) for s in zip(*states))  # type: ignore[return-value]


def mlstm_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    reset: torch.Tensor | None = None,
    state: State | None = None,
    backend: str = "chunkwise",
    chunk_size: int = 64,
    compiled: bool = True,
) -> tuple[torch.Tensor, State]:
    """Dispatch to a backend. Returns h (B,H,T,D) in q's dtype and the final state (float32+).

    ``chunkwise`` on CPU without autograd runs the compiled scan
    (:func:`~megadistill.model.cpu_step.mlstm_scan`: the same function, one pass over the state
    per token) where it can be built, unless ``compiled`` is False."""
    if q.shape[2] == 1 and state is not None:
        backend = "recurrent"  # one decoding step: the step update is exact and cheapest
    backend = resolve_mlstm_backend(backend, q.device.type)  # triton -> chunkwise where it can't
    scanned = None
    if backend == "chunkwise" and compiled and cpu_step.scan_applies(q):
        dt = _compute_dtype(q)
        scanned = cpu_step.mlstm_scan(
            *(x.to(dt) for x in (q, k, v, i_pre, f_pre)), reset, _start_state(q, v, state), EPS
        )
    if scanned is not None:
        h, st = scanned
    elif backend == "chunkwise":
        h, st = mlstm_chunkwise(q, k, v, i_pre, f_pre, reset, state, chunk_size)
    elif backend == "recurrent":
        h, st = mlstm_recurrent(q, k, v, i_pre, f_pre, reset, state)
    elif backend in ("native", "triton"):
        h, st = mlstm_kernels_forward(
            q, k, v, i_pre, f_pre, reset, state, chunk_size, backend=backend
        )
    else:
        raise ValueError(f"unknown mlstm_backend {backend!r}; choose one of {MLSTM_BACKENDS}")
    return h.to(q.dtype), st
