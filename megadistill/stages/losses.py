"""Stage II loss: ``gamma * CE + beta * top-k KL``, computed in chunks with exact gradients.

Definition, per token ``t`` with target ``y_t`` (``labels[t]``, already shifted; -100 = ignored):

- ``z_t = h_t @ W^T (+ b)``: the student's full-vocabulary logits from its final hidden state.
- ``CE_t = logsumexp(z_t) - z_t[y_t]``: next-token cross-entropy over the full vocabulary.
- Teacher top-k: ``ids_t`` (k distinct token ids) and ``a_t`` = the teacher's log-probabilities of
  those ids under its full-vocabulary softmax. Renormalised over the k ids:
  ``p_t = softmax(a_t)`` (so ``sum_j p_t[j] = 1``).
- Student restricted to the same ids: ``q_t = softmax(z_t[ids_t])``, i.e. the student's
  log-softmax taken over the k gathered logits only (not its full-vocabulary log-probs).
- ``KL_t = sum_j p_t[j] * (log p_t[j] - log q_t[j])``.
- ``loss = sum_{t valid} (gamma * CE_t + beta * KL_t) / N`` where valid means ``y_t != -100``
  (padding, document boundaries) and ``N`` is the number of valid tokens (or a given normaliser,
  e.g. the valid tokens of the whole global batch).

:func:`distill_loss` never holds more than ``chunk_size`` rows of full-vocabulary logits, forward
or backward: it calls the lm_head *module* on one chunk of hidden states at a time under activation
checkpointing, so backward recomputes that chunk's logits instead of keeping them, and under ZeRO-3
calling the module gathers (and in backward re-gathers) its partitioned weight.
:func:`distill_loss_reference` is the plain autograd version on full logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
DEFAULT_GAMMA = 0.9
DEFAULT_BETA = 0.1
DEFAULT_TOP_K = 256
DEFAULT_CHUNK = 1024


@dataclass
class DistillLossOutput:
    """The stage II loss and its parts (``ce``/``kl`` are detached means over valid tokens)."""

    loss: Tensor
    """Scalar ``(gamma * sum CE + beta * sum KL) / normaliser``; differentiable."""
    ce: Tensor
    """Mean cross-entropy over valid tokens (detached)."""
    kl: Tensor
    """Mean top-k KL over valid tokens (detached)."""
    num_tokens: Tensor
    """Number of valid tokens (int64 scalar)."""


def _chunk_terms(z: Tensor, labels: Tensor, t_lp: Tensor, t_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token CE and top-k KL of one chunk of logits ``z``."""
    ce = torch.logsumexp(z, dim=-1) - z.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    log_p = torch.log_softmax(t_lp.to(z.dtype), dim=-1)
    log_q = torch.log_softmax(z.gather(1, t_ids), dim=-1)
    return ce, (log_p.exp() * (log_p - log_q)).sum(-1)


def _check_shapes(hidden: Tensor, labels: Tensor, t_lp: Tensor, t_ids: Tensor) -> None:
    lead = tuple(labels.shape)
    if tuple(hidden.shape[:-1]) != lead:
        raise ValueError(f"hidden {tuple(hidden.shape)} does not match labels {lead} + (hidden,)")
    if tuple(t_lp.shape[:-1]) != lead or t_lp.shape != t_ids.shape:
        raise ValueError(
            f"teacher top-k log-probs {tuple(t_lp.shape)} and ids {tuple(t_ids.shape)} must both "
            f"be labels' shape {lead} + (k,)"
        )


def distill_loss(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    chunk_size: int = DEFAULT_CHUNK,
    normalizer: Tensor | float | None = None,
) -> DistillLossOutput:
    """Stage II loss from the student's final hidden states, chunked (see the module docstring).

    Args:
        hidden: ``[..., H]`` student final hidden states (after the final norm).
        head: the lm_head module (or any function of a ``[n, H]`` chunk -> ``[n, V]`` logits).
        labels: ``[...]`` next-token targets, -100 where ignored.
        teacher_logprobs: ``[..., k]`` the teacher's full-vocabulary log-probs of its top-k ids.
        teacher_ids: ``[..., k]`` the teacher's top-k token ids (any integer dtype).
        gamma: weight of the cross-entropy.
        beta: weight of the top-k KL.
        chunk_size: tokens per chunk of full-vocabulary logits.
        normalizer: divide the summed loss by this instead of this batch's valid-token count.

    Returns:
        :class:`DistillLossOutput`; ``loss`` backpropagates into ``hidden`` and ``head``.
    """
    from torch.utils.checkpoint import checkpoint

    _check_shapes(hidden, labels, teacher_logprobs, teacher_ids)
    h = hidden.reshape(-1, hidden.shape[-1])
    k = teacher_ids.shape[-1]
    y = labels.reshape(-1).to(h.device)
    lp = teacher_logprobs.reshape(-1, k).to(h.device)
    ids = teacher_ids.reshape(-1, k).long().to(h.device)
    valid = y != IGNORE_INDEX
    cdt = torch.promote_types(h.dtype, torch.float32)  # bf16/fp16 logits: fp32 maths

    def part(hc: Tensor, yc: Tensor, lpc: Tensor, idc: Tensor, vc: Tensor):
        ce, kl = _chunk_terms(head(hc).to(cdt), yc, lpc, idc)
        ce_sum, kl_sum = (ce * vc).sum(), (kl * vc).sum()
        return gamma * ce_sum + beta * kl_sum, ce_sum, kl_sum

    total = ce_sum = kl_sum = h.new_zeros((), dtype=cdt)
    for start in range(0, h.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        loss_c, ce_c, kl_c = checkpoint(
            part, h[sl], y[sl], lp[sl], ids[sl], valid[sl].to(cdt), use_reentrant=False
        )
        total = total + loss_c
        ce_sum, kl_sum = ce_sum + ce_c.detach(), kl_sum + kl_c.detach()
    num = valid.sum()
    n = num.clamp(min=1).to(cdt)
    denom = n if normalizer is None else torch.as_tensor(normalizer, dtype=cdt, device=h.device)
    return DistillLossOutput(loss=total / denom, ce=ce_sum / n, kl=kl_sum / n, num_tokens=num)


def distill_loss_reference(
    logits: Tensor,
    labels: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    normalizer: Tensor | float | None = None,
) -> DistillLossOutput:
    """The same loss on full ``[..., V]`` student logits with plain autograd (for tests)."""
    _check_shapes(logits, labels, teacher_logprobs, teacher_ids)
    z = logits.reshape(-1, logits.shape[-1])
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    y = labels.reshape(-1)
    k = teacher_ids.shape[-1]
    valid = (y != IGNORE_INDEX).to(z.dtype)
    ce, kl = _chunk_terms(z, y, teacher_logprobs.reshape(-1, k), teacher_ids.reshape(-1, k).long())
    num = (y != IGNORE_INDEX).sum()
    n = num.clamp(min=1).to(z.dtype)
    denom = n if normalizer is None else torch.as_tensor(normalizer, dtype=z.dtype)
    ce_sum, kl_sum = (ce * valid).sum(), (kl * valid).sum()
    loss = (gamma * ce_sum + beta * kl_sum) / denom
    return DistillLossOutput(
        loss=loss, ce=ce_sum.detach() / n, kl=kl_sum.detach() / n, num_tokens=num
    )


@torch.no_grad()
def topk_logprobs(
    logits: Tensor, k: int = DEFAULT_TOP_K, chunk_size: int = DEFAULT_CHUNK
) -> tuple[Tensor, Tensor]:
    """Top-k of full logits, chunk-wise: (log-probs under the full-vocab softmax, int64 ids)."""
    cdt = torch.promote_types(logits.dtype, torch.float32)
    return _chunked_topk(logits, logits.shape[-1], lambda x: x.to(cdt), k, chunk_size)


@torch.no_grad()
def teacher_topk(
    hidden: Tensor,
    weight: Tensor,
    k: int = DEFAULT_TOP_K,
    *,
    bias: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor]:
    """The teacher's top-k from its final hidden states and lm_head, ``chunk_size`` rows at a time.

    Returns:
        ``(logprobs, ids)`` of shape ``[..., k]``: log-probabilities (fp32, or fp64 for fp64
        inputs) under the teacher's full-vocabulary softmax (descending) and int64 token ids.
    """
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    w32, b32 = weight.to(cdt), None if bias is None else bias.to(cdt)
    return _chunked_topk(
        hidden, weight.shape[0], lambda x: F.linear(x.to(cdt), w32, b32), k, chunk_size
    )


def _chunked_topk(
    rows: Tensor, vocab: int, logits_of: Callable[[Tensor], Tensor], k: int, chunk_size: int
) -> tuple[Tensor, Tensor]:
    """Top-k log-probs and ids of ``logits_of(chunk)`` over ``rows`` ``[..., D]``, chunk-wise."""
    _check_k(k, vocab)
    flat = rows.reshape(-1, rows.shape[-1])
    vals, ids = [], []
    for start in range(0, flat.shape[0], chunk_size):
        lp = torch.log_softmax(logits_of(flat[start : start + chunk_size]), dim=-1)
        v, i = lp.topk(k, dim=-1)
        vals.append(v)
        ids.append(i)
    shape = (*rows.shape[:-1], k)
    return torch.cat(vals).reshape(shape), torch.cat(ids).reshape(shape)


def _check_k(k: int, vocab: int) -> None:
    if not 0 < k <= vocab:
        raise ValueError(f"top-k k={k} must be in [1, vocab size {vocab}]; lower distill top_k")
