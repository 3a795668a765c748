"""DeepSpeed engines: process group, config filling, student/teacher engines, checkpoints, signals.

Names are imported on first use (PEP 562): ``import megadistill.engine.signals`` must not pull
in torch, so that a stage can install its preemption handlers before any slow import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "build_student_engine": "builders",
    "build_teacher_engine": "builders",
    "partition_numel": "builders",
    "CheckpointMeta": "checkpoint",
    "ResumeState": "checkpoint",
    "load_checkpoint": "checkpoint",
    "save_checkpoint": "checkpoint",
    "init_distributed": "distributed",
    "EngineConfig": "ds_config",
    "build_ds_config": "ds_config",
    "fill_ds_config": "ds_config",
    "OptimizerConfig": "optim",
    "SchedulerConfig": "optim",
    "EXIT_PREEMPTED": "signals",
    "PreemptionHandler": "signals",
}

if TYPE_CHECKING:
    from megadistill.engine.builders import (
        build_student_engine,
        build_teacher_engine,
        partition_numel,
    )
    from megadistill.engine.checkpoint import (
        CheckpointMeta,
        ResumeState,
        load_checkpoint,
        save_checkpoint,
    )
    from megadistill.engine.distributed import init_distributed
    from megadistill.engine.ds_config import EngineConfig, build_ds_config, fill_ds_config
    from megadistill.engine.optim import OptimizerConfig, SchedulerConfig
    from megadistill.engine.signals import EXIT_PREEMPTED, PreemptionHandler


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'megadistill.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f"megadistill.engine.{_EXPORTS[name]}"), name)


__all__ = [
    "EXIT_PREEMPTED",
    "CheckpointMeta",
    "EngineConfig",
    "OptimizerConfig",
    "PreemptionHandler",
    "ResumeState",
    "SchedulerConfig",
    "build_ds_config",
    "build_student_engine",
    "build_teacher_engine",
    "fill_ds_config",
    "init_distributed",
    "load_checkpoint",
    "partition_numel",
    "save_checkpoint",
]
