"""Student and teacher DeepSpeed engines, both ZeRO-3 and constructed sharded.

Sharded construction: an ``HfDeepSpeedConfig`` built from the filled DeepSpeed dict is kept alive
while ``model_fn`` runs, so ``AutoModelForCausalLM.from_config`` / ``from_pretrained`` build every
parameter under ``deepspeed.zero.Init`` with HF's weight initialisation intact (a raw
``zero.Init`` skips it; see notes/deepspeed-on-cpu.md). The config object stays attached to the
engine for its lifetime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from megadistill.config import ConfigError
from megadistill.engine.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
)

log = logging.getLogger(__name__)

ModelFn = Callable[[], torch.nn.Module]


def _zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def _build_sharded(model_fn: ModelFn, ds_config: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    """Call ``model_fn`` while an HfDeepSpeedConfig for ``ds_config`` is alive."""
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = model_fn()
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
    if _zero_stage(ds_config) == 3 and not any(hasattr(p, "ds_id") for p in model.parameters()):
        log.warning(
            "model_fn built a full, unpartitioned copy on every rank; build it with "
            "AutoModelForCausalLM.from_config(config) or Model.from_pretrained(path) inside "
            "model_fn so parameters are partitioned as they are created"
        )
    return model, hf_ds_config


def build_student_engine(
    model_fn: ModelFn,
    ds_config: dict[str, Any],
    optim: OptimizerConfig,
    scheduler: SchedulerConfig,
) -> Any:
    """A trainable ZeRO-3 engine: torch AdamW over the parameters with requires_grad.

    Args:
        model_fn: builds the model; called under an HfDeepSpeedConfig so HF constructors
            (``from_config``, ``from_pretrained``) partition parameters as they are created.
            Freeze parameters (``requires_grad_(False)``) inside ``model_fn``.
        ds_config: a filled DeepSpeed dict (:func:`megadistill.engine.ds_config.fill_ds_config`).
        optim: AdamW settings.
        scheduler: learning-rate schedule (stepped once per optimizer step).

    Returns:
        The ``deepspeed.DeepSpeedEngine``.
    """
    import deepspeed

    if _zero_stage(ds_config) != 3:
        raise ConfigError("the student ds_config must use zero_optimization.stage=3")
    model, hf_ds_config = _build_sharded(model_fn, ds_config)
    optimizer = build_optimizer(model, optim)
    lr_scheduler = build_scheduler(optimizer, scheduler, optim.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        dist_init_required=False,
    )
    engine.megadistill_hf_ds_config = hf_ds_config
    n_train = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
    log.info("student engine ready: %d trainable parameters", n_train)
    return engine


def build_teacher_engine(model_fn: ModelFn, ds_config: dict[str, Any]) -> Any:
    """A frozen, optimizer-less ZeRO-3 engine (parameters offloaded as ``ds_config`` says).

    The model is built sharded, put in ``eval()`` and ``requires_grad_(False)``. Call it under
    ``torch.no_grad()``; like every ZeRO-3 forward it is a collective, so all ranks must call it
    in lockstep.
    """
    import deepspeed

    if _zero_stage(ds_config) != 3:
        raise ConfigError("the teacher ds_config must use zero_optimization.stage=3")
    model, hf_ds_config = _build_sharded(model_fn, ds_config)
    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config, dist_init_required=False)
    engine.eval()
    engine.megadistill_hf_ds_config = hf_ds_config
    offload = ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device", "none")
    log.info("teacher engine ready (offload_param=%s)", offload)
    return engine


def partition_numel(module: torch.nn.Module) -> tuple[int, int]:
    """``(total, local)`` parameter elements: the full model vs what this rank holds.

    Under ZeRO-3 a parameter's full size is ``ds_numel`` and its local shard is ``ds_tensor``;
    a parameter that is not partitioned counts fully on every rank.
    """
    total = local = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_numel
            # an NVMe-swapped shard has no storage in memory; ds_numel keeps its size
            local += getattr(p.ds_tensor, "ds_numel", p.ds_tensor.numel())
        else:
            total += p.numel()
            local += p.numel()
    return total, local
