"""DeepSpeed engines: process group, config filling, student/teacher engines, checkpoints, signals.

Heavy imports (DeepSpeed) happen inside the functions that need them.
"""

from megadistill.engine.builders import build_student_engine, build_teacher_engine, partition_numel
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
