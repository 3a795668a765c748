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

:func:`distill_loss` never holds more than ``chunk_size`` rows of full-vocabulary logits: it
walks the flattened tokens in chunks, and computes the gradients with respect to ``h``, ``W`` and
``b`` analytically in the same pass (``dz = gamma * (softmax(z) - onehot(y)) + beta *
scatter(ids, softmax(z[ids]) - p)``, scaled by valid / N), so backward only rescales stored
gradients. :func:`distill_loss_reference` is the plain autograd version on full logits.

Under ZeRO-3 ``W`` must be the full (gathered) lm_head weight. Memory: besides one chunk of
``[chunk_size, V]`` buffers, the forward keeps an fp32 ``[V, H]`` accumulator for ``dW`` (stored in
``W``'s dtype until backward) and ``dh`` in ``h``'s shape: the price of not recomputing the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def _chunk_terms(
    z: Tensor, labels: Tensor, t_lp: Tensor, t_ids: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-token CE and KL of one chunk, plus softmax(z) and q - p for the gradient."""
    lse = torch.logsumexp(z, dim=-1)
    ce = lse - z.gather(1, labels.clamp(min=0)[:, None])[:, 0]
    log_p = torch.log_softmax(t_lp.to(z.dtype), dim=-1)
    log_q = torch.log_softmax(z.gather(1, t_ids), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return ce, kl, torch.exp(z - lse[:, None]), log_q.exp() - log_p.exp()


class _ChunkedDistillLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        t_lp: Tensor,
        t_ids: Tensor,
        coeffs: tuple[float, float, int],
        denom: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        gamma, beta, chunk = coeffs
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        cdt = torch.promote_types(hidden.dtype, torch.float32)  # bf16/fp16 compute in fp32
        w32 = weight.to(cdt)
        b32 = None if bias is None else bias.to(cdt)
        grad_h = torch.zeros_like(hidden, dtype=cdt) if need_h else None
        grad_w = torch.zeros_like(w32) if need_w else None
        grad_b = torch.zeros_like(b32) if need_b and b32 is not None else None
        ce_sum = hidden.new_zeros((), dtype=cdt)
        kl_sum = hidden.new_zeros((), dtype=cdt)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl].to(cdt)
            z = F.linear(h, w32, b32)
            valid = (labels[sl] != IGNORE_INDEX).to(cdt)
            ce, kl, probs, q_minus_p = _chunk_terms(z, labels[sl], t_lp[sl], t_ids[sl])
            ce_sum += (ce * valid).sum()
            kl_sum += (kl * valid).sum()
            if need_h or need_w or need_b:
                dz = probs.mul_(gamma)
                dz.scatter_add_(1, labels[sl].clamp(min=0)[:, None], -gamma * valid[:, None])
                dz.scatter_add_(1, t_ids[sl], beta * q_minus_p)
                dz.mul_((valid / denom)[:, None])
                if grad_h is not None:
                    grad_h[sl] = dz @ w32
                if grad_w is not None:
                    grad_w.addmm_(dz.t(), h)
                if grad_b is not None:
                    grad_b += dz.sum(0)
        ctx.save_for_backward(
            *(
                g.to(ref.dtype) if g is not None else None
                for g, ref in ((grad_h, hidden), (grad_w, weight), (grad_b, bias))
            )
        )
        loss = (gamma * ce_sum + beta * kl_sum) / denom
        ctx.mark_non_differentiable(ce_sum, kl_sum)
        return loss, ce_sum, kl_sum

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [
            None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)
        ]
        return (*scaled, None, None, None, None, None)


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
    weight: Tensor,
    labels: Tensor,
    teacher_logprobs: Tensor,
    teacher_ids: Tensor,
    *,
    bias: Tensor | None = None,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    chunk_size: int = DEFAULT_CHUNK,
    normalizer: Tensor | float | None = None,
) -> DistillLossOutput:
    """Stage II loss from the student's final hidden states, chunked (see the module docstring).

    Args:
        hidden: ``[..., H]`` student final hidden states (after the final norm).
        weight: ``[V, H]`` lm_head weight (full, gathered).
        labels: ``[...]`` next-token targets, -100 where ignored.
        teacher_logprobs: ``[..., k]`` the teacher's full-vocabulary log-probs of its top-k ids.
        teacher_ids: ``[..., k]`` the teacher's top-k token ids (any integer dtype).
        bias: optional ``[V]`` lm_head bias.
        gamma: weight of the cross-entropy.
        beta: weight of the top-k KL.
        chunk_size: tokens per chunk of full-vocabulary logits.
        normalizer: divide the summed loss by this instead of this batch's valid-token count.

    Returns:
        :class:`DistillLossOutput`; ``loss`` backpropagates into ``hidden``, ``weight``, ``bias``.
    """
    _check_shapes(hidden, labels, teacher_logprobs, teacher_ids)
    flat_labels = labels.reshape(-1)
    num = (flat_labels != IGNORE_INDEX).sum()
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    denom = torch.as_tensor(
        num.clamp(min=1) if normalizer is None else normalizer, dtype=cdt, device=hidden.device
    )
    k = teacher_ids.shape[-1]
    loss, ce_sum, kl_sum = _ChunkedDistillLoss.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        bias,
        flat_labels,
        teacher_logprobs.reshape(-1, k),
        teacher_ids.reshape(-1, k).long(),
        (float(gamma), float(beta), int(chunk_size)),
        denom,
    )
    n = num.clamp(min=1).to(cdt)
    return DistillLossOutput(loss=loss, ce=ce_sum / n, kl=kl_sum / n, num_tokens=num)


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
    ce, kl, _, _ = _chunk_terms(
        z, y, teacher_logprobs.reshape(-1, k), teacher_ids.reshape(-1, k).long()
    )
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
    flat = logits.reshape(-1, logits.shape[-1])
    _check_k(k, flat.shape[-1])
    vals, ids = [], []
    for start in range(0, flat.shape[0], chunk_size):
        chunk = flat[start : start + chunk_size]
        lp = torch.log_softmax(chunk.to(torch.promote_types(chunk.dtype, torch.float32)), dim=-1)
        v, i = lp.topk(k, dim=-1)
        vals.append(v)
        ids.append(i)
    shape = (*logits.shape[:-1], k)
    return torch.cat(vals).reshape(shape), torch.cat(ids).reshape(shape)


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
        inputs) under the teacher's
        full-vocabulary softmax (descending) and int64 token ids.
    """
    flat = hidden.reshape(-1, hidden.shape[-1])
    _check_k(k, weight.shape[0])
    cdt = torch.promote_types(hidden.dtype, torch.float32)
    w32 = weight.to(cdt)
    b32 = None if bias is None else bias.to(cdt)
    vals, ids = [], []
    for start in range(0, flat.shape[0], chunk_size):
        z = F.linear(flat[start : start + chunk_size].to(cdt), w32, b32)
        v, i = torch.log_softmax(z, dim=-1).topk(k, dim=-1)
        vals.append(v)
        ids.append(i)
    shape = (*hidden.shape[:-1], k)
    return torch.cat(vals).reshape(shape), torch.cat(ids).reshape(shape)


def _check_k(k: int, vocab: int) -> None:
    if not 0 < k <= vocab:
        raise ValueError(f"top-k k={k} must be in [1, vocab size {vocab}]; lower distill top_k")
