"""Stage II (distill): the whole student learns the teacher's next-token distribution.

Loss per micro-batch: ``gamma * CE + beta * top-k KL`` (:mod:`.losses`) on the student's final
hidden states, with the teacher's top-k log-probabilities computed online (a frozen, offloaded
teacher engine) or read from precomputed targets (:mod:`.teacher_targets`).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from megadistill.stages.config import StageConfig
from megadistill.stages.runner import build_teacher, student_fingerprint, teacher_logits, train
from megadistill.trainer import TrainResult


class DistillLoss:
    """Stage II loss on one micro-batch: teacher top-k (online or offline), then the chunked
    CE + top-k KL on the student's final hidden states (full logits are never materialised for
    student and teacher at once)."""

    def __init__(self, cfg: StageConfig, teacher_engine: Any = None, targets: Any = None) -> None:
        self.cfg, self.teacher, self.targets = cfg, teacher_engine, targets

    def teacher_targets(self, batch: dict[str, torch.Tensor], dev: Any):
        from megadistill.stages.losses import topk_logprobs

        if self.targets is not None:
            lp, ids = self.targets.get(batch["sample_ids"])
            return lp.to(dev), ids.to(dev)
        with torch.no_grad():
            logits = teacher_logits(self.teacher, batch, dev)
            lp, ids = topk_logprobs(logits, self.cfg.distill.top_k, self.cfg.distill.chunk_size)
            del logits
        return lp, ids

    def __call__(self, engine: Any, batch: dict[str, torch.Tensor]):
        from megadistill.stages.losses import distill_loss

        dev = engine.device
        t_lp, t_ids = self.teacher_targets(batch, dev)
        d = self.cfg.distill
        labels = batch["labels"].to(dev)

        def head_loss(hidden: torch.Tensor, head: torch.nn.Module):
            out = distill_loss(hidden, head, labels, t_lp, t_ids, gamma=d.gamma, beta=d.beta,
                               chunk_size=d.chunk_size)  # fmt: skip
            return out.loss, out.ce, out.kl

        out = engine(
            input_ids=batch["input_ids"].to(dev),
            position_ids=batch["position_ids"].to(dev),
            head_fn=head_loss,
        )
        loss, ce, kl = out.loss
        return loss, {"ce": ce, "kl": kl}


def distill_loss_for(cfg: StageConfig, loader: Any, world: int) -> DistillLoss:
    """The stage's loss: offline targets from ``cfg.distill.targets_dir`` (checked against the
    loader's data and the teacher), or an online teacher engine."""
    if cfg.distill.teacher_mode == "offline":
        from megadistill.stages.teacher_targets import TeacherTargets, verify_targets_shared

        verify_targets_shared(cfg.distill.targets_dir)  # each file hashed by one rank
        targets = TeacherTargets(
            cfg.distill.targets_dir, k=cfg.distill.top_k, seq_len=cfg.data.seq_len, verify=False,
            data_fingerprint=loader.fingerprint,
            teacher_fingerprint=student_fingerprint(cfg.teacher) if cfg.teacher else None,
        )  # fmt: skip
        return DistillLoss(cfg, targets=targets)
    return DistillLoss(cfg, teacher_engine=build_teacher(cfg, world))


def freeze_unused_parameters(model: torch.nn.Module) -> None:
    """A SWA-only student (``gate_mode: swa``, the trained floor) never uses the parameters it
    adds to the teacher: freeze them, so no optimizer state or gradient exists for them."""
    if getattr(model.config, "gate_mode", None) != "swa":
        return
    unused = set(model.new_parameter_names())
    for name, p in model.named_parameters():
        if name in unused:
            p.requires_grad_(False)


def run_distill(cfg: StageConfig) -> TrainResult:
    """Run stage II on every rank (call under torchrun / deepspeed / the SLURM entrypoint)."""
    if cfg.stage != "distill":
        raise ValueError(f"run_distill needs stage 'distill', got {cfg.stage!r}")
    return train(
        cfg,
        lambda _engine, loader, world: (
            distill_loss_for(cfg, loader, world),
            contextlib.nullcontext(),
        ),  # fmt: skip
        prepare_student=freeze_unused_parameters,
    )
