"""Stage I (align): each hybrid layer learns to reproduce the teacher's attention output.

Loss, per hybrid layer ``l`` (softmax layers have nothing to learn and add nothing):
``MSE_l = sum_t valid_t * mean_d (s_l[t, d] - a_l[t, d])^2 / sum_t valid_t``, where ``s_l`` is the
layer's output (``o_proj`` of the gated mix) and ``a_l`` the teacher's attention output over the
teacher's own span, both from the same projections; the stage I loss is ``sum_l MSE_l``. Every
layer's input comes from the teacher path: the layer passes ``a_l`` on, not ``s_l``, so layer
``l`` is trained on exactly the inputs the teacher gives it.

The model knows nothing of this: :class:`AttentionProbe` installs an observer on every hybrid
layer (and removes it on exit), which reads the pair, records the MSE and passes ``a_l`` on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from megadistill.stages.config import StageConfig
from megadistill.stages.runner import train
from megadistill.trainer import TrainResult


def layer_mse(
    out: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, relative: bool = False
) -> torch.Tensor:
    """Mean over real tokens (``valid`` (B, T)) of the per-token mean squared error (B, T, D);
    ``relative``: divided by the target's mean square over the same tokens."""
    target = target.float()
    w = valid.to(target.dtype)
    err = ((out.float() - target).pow(2).mean(-1) * w).sum()
    if relative:
        return err / (target.pow(2).mean(-1) * w).sum().clamp(min=torch.finfo(w.dtype).tiny)
    return err / w.sum().clamp(min=1)


def _no_logits(hidden: torch.Tensor, head: nn.Module) -> torch.Tensor:
    # Stage I needs no logits; a zero that depends on the hidden states keeps the graph connected
    # when no layer adds a loss (every layer kept as softmax).
    del head
    return hidden.sum() * 0.0


class AttentionProbe:
    """Observes every hybrid layer of ``model`` (a HybridForCausalLM) while installed.

    ``with AttentionProbe(model) as probe:`` installs it; inside, each hybrid layer returns the
    teacher's attention output, and :meth:`loss` runs one forward and returns the stage I loss.
    Layers recomputed in backward (activation checkpointing) pass the same output on and record
    nothing.
    """

    def __init__(self, model: nn.Module, relative: bool = False) -> None:
        self.layers = [layer.self_attn for layer in model.model.layers if not layer.self_attn.kept]
        self.relative = relative  # see StageConfig.align_loss
        self._losses: list[torch.Tensor] | None = None

    def __enter__(self) -> AttentionProbe:
        taken = [attn.layer_idx for attn in self.layers if attn.observer is not None]
        if taken:
            raise RuntimeError(f"layers {taken} already have an observer installed")
        for attn in self.layers:
            attn.observer = self._observe
        return self

    def __exit__(self, *exc: object) -> None:
        for attn in self.layers:
            attn.observer = None

    def _observe(self, layer: nn.Module, out: torch.Tensor, q_r, k_r, v, info) -> torch.Tensor:
        with torch.no_grad():
            target = layer.teacher_attention(q_r, k_r, v, info)
        if self._losses is not None:
            self._losses.append(layer_mse(out, target, info.valid, self.relative))
        return target

    @contextlib.contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Inside, every hybrid layer's forward appends its MSE to the yielded list."""
        self._losses = []
        try:
            yield self._losses
        finally:
            self._losses = None

    def loss(
        self, model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One forward of ``model`` (the probed model or its DeepSpeed engine): the summed
        per-layer MSE (a zero connected to the graph when every layer is kept as softmax)."""
        with self.recording() as losses:
            out = model(input_ids=input_ids, position_ids=position_ids, head_fn=_no_logits)
        return torch.stack(losses).sum() if losses else out.loss


class AlignLoss:
    """The stage I loss of one micro-batch for the trainer: ``(engine, batch) -> loss, metrics``."""

    def __init__(self, probe: AttentionProbe) -> None:
        self.probe = probe

    def __call__(self, engine: Any, batch: dict[str, torch.Tensor]):
        dev = engine.device
        loss = self.probe.loss(engine, batch["input_ids"].to(dev), batch["position_ids"].to(dev))
        return loss, {"align_mse": loss.detach()}


def train_new_parameters_only(model: nn.Module) -> None:
    """Freeze every parameter the teacher has: stage I trains feature maps and gates only."""
    new = set(model.new_parameter_names())
    for name, p in model.named_parameters():
        p.requires_grad_(name in new)


def run_align(cfg: StageConfig) -> TrainResult:
    """Run stage I on every rank (call under torchrun / deepspeed / the SLURM entrypoint)."""
    if cfg.stage != "align":
        raise ValueError(f"run_align needs stage 'align', got {cfg.stage!r}")

    def make_loss(engine: Any, _loader: Any, _world: int):
        probe = AttentionProbe(engine.module, relative=cfg.align_loss == "relative")
        return AlignLoss(probe), probe

    return train(cfg, make_loss, prepare_student=train_new_parameters_only)
