"""AdamW over the trainable parameters and the learning-rate schedules.

Schedules are a torch ``LambdaLR`` whose lambda is a small picklable object, so DeepSpeed saves and
restores the scheduler state with every checkpoint. The engine steps the scheduler once per
optimizer step (after gradient accumulation).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from megadistill.config import ConfigError

ScheduleName = Literal["constant", "cosine"]


@dataclass(kw_only=True)
class OptimizerConfig:
    """AdamW settings; only parameters with requires_grad are optimised."""

    lr: float
    """Peak learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay for matrices (biases, norms and gains get none)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """Adam beta1, beta2."""
    eps: float = 1e-8
    """Adam epsilon."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must lie in [0, 1), got {self.betas}")


@dataclass(kw_only=True)
class SchedulerConfig:
    """Learning-rate schedule: linear warm-up, then constant or cosine decay to a floor."""

    name: ScheduleName = "constant"
    """'constant' (after warm-up) or 'cosine' (decay to min_lr over num_decay_steps)."""
    num_warmup_steps: int = 0
    """Optimizer steps of linear warm-up from 0 to the peak LR."""
    num_decay_steps: int = 0
    """Optimizer steps of cosine decay after the warm-up (required for 'cosine')."""
    min_lr: float = 0.0
    """Floor the cosine decays to (absolute LR)."""

    def __post_init__(self) -> None:
        if self.num_warmup_steps < 0:
            raise ConfigError(
                f"scheduler.num_warmup_steps must be >= 0, got {self.num_warmup_steps}"
            )
        if self.name == "cosine" and self.num_decay_steps < 1:
            raise ConfigError("scheduler.name='cosine' needs num_decay_steps >= 1 (e.g. max_steps)")
        if self.min_lr < 0:
            raise ConfigError(f"scheduler.min_lr must be >= 0, got {self.min_lr}")


class WarmupSchedule:
    """LR multiplier: linear warm-up, then constant or cosine to ``floor`` (picklable)."""

    def __init__(self, cfg: SchedulerConfig, peak_lr: float) -> None:
        if cfg.name == "cosine" and cfg.min_lr > peak_lr:
            raise ConfigError(f"scheduler.min_lr={cfg.min_lr} exceeds the peak lr={peak_lr}")
        self.name = cfg.name
        self.warmup = cfg.num_warmup_steps
        self.decay = cfg.num_decay_steps
        self.floor = cfg.min_lr / peak_lr

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / self.decay)
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def _is_matrix(param: torch.nn.Parameter) -> bool:
    # Under ZeRO-3 the local tensor is a flat shard; ds_shape keeps the real shape.
    shape = getattr(param, "ds_shape", param.shape)
    return len(shape) >= 2


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    """torch AdamW over the parameters with requires_grad (weight decay on matrices only).

    Raises:
        ConfigError: the model has no trainable parameter.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no parameter with requires_grad=True; nothing to train")
    decay = [p for p in params if _is_matrix(p)]
    no_decay = [p for p in params if not _is_matrix(p)]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, peak_lr: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR with :class:`WarmupSchedule` (its state travels with DeepSpeed checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupSchedule(cfg, peak_lr))
