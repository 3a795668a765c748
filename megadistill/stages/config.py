"""Typed configs of stage I (align), stage II (distill) and offline teacher targets."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megadistill.config import ConfigError, from_dict
from megadistill.data.config import DataConfig
from megadistill.engine.ds_config import EngineConfig
from megadistill.engine.optim import OptimizerConfig, SchedulerConfig
from megadistill.trainer import TrainerConfig

StageName = Literal["align", "distill"]
TeacherMode = Literal["online", "offline"]


@dataclass(kw_only=True)
class LoggingConfig:
    """Where metrics go."""

    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """W&B mode; 'offline' writes a local run folder, 'disabled' does nothing."""
    wandb_project: str = "megadistill"
    """W&B project name."""
    progress_bar: bool = True
    """Show the rank-0 tqdm bar."""


@dataclass(kw_only=True)
class DistillLossConfig:
    """Stage II loss: gamma * CE + beta * KL over the teacher's top-k tokens."""

    gamma: float = 0.9
    """Weight of the next-token cross-entropy."""
    beta: float = 0.1
    """Weight of the sparse top-k KL(teacher || student)."""
    top_k: int = 256
    """Teacher tokens kept per position."""
    chunk_size: int = 1024
    """Tokens per chunk of full-vocabulary logits (bounds the loss's memory)."""
    teacher_mode: TeacherMode = "online"
    """'online': run the frozen ZeRO-3 teacher; 'offline': stream precomputed targets."""
    targets_dir: str | None = None
    """Folder of precomputed teacher targets (teacher_mode='offline')."""

    def __post_init__(self) -> None:
        if self.gamma < 0 or self.beta < 0 or self.gamma + self.beta == 0:
            raise ConfigError("distill.gamma and distill.beta must be >= 0 and not both 0")
        if self.top_k < 1:
            raise ConfigError(f"distill.top_k must be >= 1, got {self.top_k}")
        if self.teacher_mode == "offline" and not self.targets_dir:
            raise ConfigError(
                "distill.teacher_mode='offline' needs distill.targets_dir (a folder written by "
                "`megadistill teacher-targets`)"
            )


@dataclass(kw_only=True)
class StageConfig:
    """One stage-I or stage-II run of a student on one data mix."""

    stage: StageName
    """'align' (stage I: new parameters only, layer-wise MSE) or 'distill' (stage II)."""
    student: str
    """Hugging Face folder of the student to start from (converted, or a previous stage's)."""
    out_dir: str
    """Run folder: checkpoints/, metrics.jsonl, final/ (the consolidated student)."""
    data: DataConfig
    """Training data."""
    engine: EngineConfig
    """Student DeepSpeed engine (ZeRO-3)."""
    optim: OptimizerConfig
    """AdamW."""
    trainer: TrainerConfig
    """Steps, cadence, checkpoints (checkpoint_dir defaults to out_dir/checkpoints)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Learning-rate schedule."""
    teacher: str | None = None
    """Hugging Face folder of the teacher (stage II online, teacher-targets)."""
    teacher_engine: EngineConfig | None = None
    """Teacher DeepSpeed engine (ZeRO-3, parameters offloaded); defaults from engine."""
    distill: DistillLossConfig = field(default_factory=DistillLossConfig)
    """Stage II loss and teacher mode."""
    align_loss: Literal["mse", "relative"] = "mse"
    """Stage I's loss per hybrid layer: ``mse``, the mean squared error to the teacher's
    attention output over real tokens; ``relative``, that error divided by the target's own mean
    square on the same tokens (each layer and micro-batch weighs alike, whatever its scale)."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics sinks."""
    activation_checkpointing: bool = False
    """Recompute decoder layers in backward (saves activation memory at 4K-8K tokens)."""
    export_final: bool = True
    """Consolidate the last checkpoint into out_dir/final (an HF folder) at the end."""
    timeout_s: float = 1800.0
    """Limit of every collective: a dead rank makes the others fail instead of hanging."""

    def __post_init__(self) -> None:
        if self.stage == "distill" and self.distill.teacher_mode == "online" and not self.teacher:
            raise ConfigError(
                "stage 'distill' with teacher_mode='online' needs 'teacher' (the teacher's HF "
                "folder); or set distill.teacher_mode=offline with distill.targets_dir"
            )
        if self.timeout_s <= 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")


def default_teacher_engine(cfg: StageConfig) -> EngineConfig:
    """The teacher engine: the student's batch settings, the CPU-offload teacher JSON."""
    if cfg.teacher_engine is not None:
        return cfg.teacher_engine
    e = cfg.engine
    return EngineConfig(
        ds_config="teacher_zero3_offload_cpu",
        global_batch_size=e.global_batch_size,
        micro_batch_size=e.micro_batch_size,
        precision=e.precision,
        param_persistence_threshold=e.param_persistence_threshold,
    )


def stage_config_from_dict(data: dict[str, Any]) -> StageConfig:
    """Validate a stage config mapping; ``trainer.checkpoint_dir`` defaults to out_dir/checkpoints."""
    data = dict(data)
    trainer = data.get("trainer")
    if isinstance(trainer, dict) and "out_dir" in data and "checkpoint_dir" not in trainer:
        data["trainer"] = {**trainer, "checkpoint_dir": str(Path(data["out_dir"]) / "checkpoints")}
    return from_dict(StageConfig, data)
