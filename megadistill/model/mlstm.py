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
- ``triton``: ``mlstm_kernels`` Triton ``limit_chunk`` kernel (CUDA only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megadistill.hybrid import MLSTM_BACKENDS

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


def _chunk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    logf: torch.Tensor,
    reset: torch.Tensor,
    state: State,
    eps: float,
) -> tuple[torch.Tensor, State]:
    """One chunk (length l) of the chunkwise form; see the module docstring for the maths."""
    c, n, m = state
    length = q.shape[2]
    idx = torch.arange(length, device=q.device)
    b = logf.cumsum(-1)  # (B,H,l): log-decay from the chunk start to t (inclusive)
    b_excl = b - logf
    last_reset = torch.where(reset, idx, -1).cummax(-1).values  # (B,l)
    cont = last_reset < 0  # the carried state still applies at t
    seg = reset.long().cumsum(-1)  # segment (document) index inside the chunk
    off = b_excl.gather(-1, last_reset.clamp(min=0)[:, None, :].expand_as(b_excl))
    # Log-weight of the state before t's segment began: carried (C, n, m) or a fresh zero state.
    base = torch.where(cont[:, None, :], b + m[..., None], b - off)
    same = (seg[:, :, None] == seg[:, None, :]) & (idx[:, None] >= idx[None, :])
    logd = (b[..., :, None] - b[..., None, :] + i_pre[..., None, :]).masked_fill(
        ~same[:, None], float("-inf")
    )
    m_t = torch.maximum(base, logd.amax(-1))
    scale = q.shape[-1] ** -0.5
    qs = q * scale
    s = (qs @ k.transpose(-1, -2)) * torch.exp(logd - m_t[..., None])
    w_state = torch.exp(base - m_t) * cont[:, None, :]
    num = s @ v + w_state[..., None] * (qs @ c)
    den = s.sum(-1) + w_state * (qs @ n[..., None]).squeeze(-1)
    h = num / (torch.maximum(den.abs(), torch.exp(-m_t)) + eps)[..., None]
    # State after the last position of the chunk.
    m_end = m_t[..., -1]
    in_last = seg == seg[:, -1:]
    logw = (b[..., -1:] - b + i_pre - m_end[..., None]).masked_fill(
        ~in_last[:, None], float("-inf")
    )
    kw = k * torch.exp(logw)[..., None]
    w_end = w_state[..., -1]
    c = w_end[..., None, None] * c + kw.transpose(-1, -2) @ v
    n = w_end[..., None] * n + kw.sum(-2)
    return h, (c, n, m_end)


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
    """Chunkwise-parallel mLSTM with exact document resets (any length, any device)."""
    dt = _compute_dtype(q)
    state = _start_state(q, v, state)
    q, k, v, i_pre = (x.to(dt) for x in (q, k, v, i_pre))
    logf = F.logsigmoid(f_pre.to(dt))
    if reset is None:
        reset = torch.zeros(q.shape[0], q.shape[2], dtype=torch.bool, device=q.device)
    outs = []
    for s in range(0, q.shape[2], chunk_size):
        e = s + chunk_size
        h, state = _chunk(
            q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], i_pre[..., s:e], logf[..., s:e],
            reset[:, s:e], state, eps,
        )  # fmt: skip
        outs.append(h)
    return torch.cat(outs, dim=2), state


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


def _kernel_segment(fn, q, k, v, i_pre, f_pre, state, chunk_size, eps):
    """Run an mlstm_kernels chunkwise kernel on one document, padding T to the chunk size."""
    t = q.shape[2]
    pad = (-t) % chunk_size
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        i_pre = F.pad(i_pre, (0, pad), value=PAD_I)
        f_pre = F.pad(f_pre, (0, pad), value=PAD_F)
    c, n, m = state
    h, (c, n, m) = fn(
        q, k, v, i_pre, f_pre, c_initial=c, n_initial=n, m_initial=m[..., None],
        return_last_states=True, chunk_size=chunk_size, eps=eps,
    )  # fmt: skip
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
    dt = _compute_dtype(q)
    state = _start_state(q, v, state)
    q, k, v, i_pre, f_pre = (x.to(dt) for x in (q, k, v, i_pre, f_pre))
    if reset is None or not bool(reset[:, 1:].any()):
        if reset is not None and bool(reset[:, 0].any()):
            state = _reset_rows(state, reset[:, 0])
        return _kernel_segment(fn, q, k, v, i_pre, f_pre, state, chunk_size, eps)
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
                i_pre[r : r + 1, :, sl], f_pre[r : r + 1, :, sl], st, chunk_size, eps,
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
) -> tuple[torch.Tensor, State]:
    """Dispatch to a backend. Returns h (B,H,T,D) in q's dtype and the final state (float32+)."""
    if q.shape[2] == 1 and state is not None:
        backend = "recurrent"  # one decoding step: the step update is exact and cheapest
    if backend == "chunkwise":
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
