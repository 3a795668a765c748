"""bf16 on CPU: the stage I and stage II losses of a tiny student held in bf16, as DeepSpeed's bf16
engine holds it on a GPU (bf16 weights, no autocast), against the same student in fp32, with the
loss functions the stages call; and the dtypes the mLSTM is given and keeps there.

Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per operation). Measured
here: stage I loss 6e-4 relative, stage II 6e-6 (its logits and loss are computed in fp32), the
trained parameters' gradients at cosine 0.99998; the tests allow 1e-2 and cosine 0.999.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from megadistill.model import attention
from megadistill.stages.align import AttentionProbe, train_new_parameters_only
from megadistill.stages.losses import distill_loss, topk_logprobs
from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher
from tests.decoding import make_both_branches_matter

LOSS_RTOL = 1e-2
MIN_GRAD_COSINE = 0.999


def _batch():
    """Two rows of two packed documents each (40 + 24 tokens)."""
    ids = torch.randint(3, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    pos = torch.cat([torch.arange(40), torch.arange(24)]).expand(2, -1)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[:, 39] = -100  # no target across the document border
    return ids, pos, labels


def _students():
    teacher = tiny_teacher("llama")  # GQA: 4 query heads on 2 K/V heads
    student, _ = convert(teacher, seed=0, window=16, num_sinks=2, chunk_size=16)
    fp32 = make_both_branches_matter(student).train()
    return teacher, fp32, copy.deepcopy(fp32).to(torch.bfloat16)


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])


def _align(model, ids, pos) -> torch.Tensor:
    train_new_parameters_only(model)
    with AttentionProbe(model) as probe:
        loss = probe.loss(model, ids, pos)
    loss.backward()
    return loss.detach()


def _distill(model, teacher, ids, pos, labels) -> torch.Tensor:
    model.requires_grad_(True)  # stage II trains the whole student
    with torch.no_grad():
        lp, top = topk_logprobs(teacher(input_ids=ids, position_ids=pos).logits, k=16)

    def head_loss(hidden, head):  # as stages/distill.py's DistillLoss
        out = distill_loss(hidden, head, labels, lp, top, chunk_size=48)
        return out.loss, out.ce, out.kl

    loss = model(input_ids=ids, position_ids=pos, head_fn=head_loss).loss[0]
    loss.backward()
    return loss.detach()


def test_stage_losses_in_bf16_match_fp32():
    teacher, fp32, bf16 = _students()
    ids, pos, labels = _batch()
    for name, run in (
        ("stage I", lambda m: _align(m, ids, pos)),
        ("stage II", lambda m: _distill(m, teacher, ids, pos, labels)),
    ):
        fp32.zero_grad(set_to_none=True)
        bf16.zero_grad(set_to_none=True)
        loss32, loss16 = run(fp32), run(bf16)
        assert loss16.dtype == torch.float32  # the stages' losses are computed in fp32
        assert torch.isfinite(loss16)
        rel = abs(float(loss16) - float(loss32)) / abs(float(loss32))
        assert rel < LOSS_RTOL, (name, float(loss32), float(loss16))
        cos = float(F.cosine_similarity(_grads(bf16), _grads(fp32), dim=0))
        assert cos > MIN_GRAD_COSINE, (name, cos)


def test_bf16_mlstm_gets_bf16_inputs_and_keeps_fp32_state(monkeypatch):
    """What a GPU run's mLSTM sees in a bf16 student: bf16 features, values and gate
    pre-activations in, computed in fp32 (the state is fp32), h handed back in bf16. The Triton
    kernel itself is given fp32 (tests/model/test_triton_kernels.py)."""
    _, _, bf16 = _students()
    ids, pos, _ = _batch()
    seen = []
    real = attention.mlstm_forward

    def spy(q, k, v, i_pre, f_pre, reset, state, **kw):
        h, st = real(q, k, v, i_pre, f_pre, reset, state, **kw)
        seen.append(([x.dtype for x in (q, k, v, i_pre, f_pre)], h.dtype, [s.dtype for s in st]))
        return h, st

    monkeypatch.setattr(attention, "mlstm_forward", spy)
    bf16(input_ids=ids, position_ids=pos)
    assert len(seen) == len(bf16.model.layers)
    for inputs, out, state in seen:
        assert inputs == [torch.bfloat16] * 5
        assert out == torch.bfloat16
        assert state == [torch.float32] * 3
