"""What every training stage shares: config loading, engines, the trainer and its checkpoints.

A stage module (:mod:`.align`, :mod:`.distill`) owns its loss and calls :func:`train` with it;
:func:`train` builds the process group, the data loader and the student engine on every rank and
hands the loop, cadence and checkpoints to the :class:`~megadistill.trainer.Trainer`. Exporting
the result is the pipeline's step (:mod:`megadistill.pipeline.stage`), not a stage's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from megadistill.config import apply_overrides, load_yaml, missing_local_path, to_dict
from megadistill.errors import MegadistillError
from megadistill.stages.config import StageConfig, stage_config_from_dict
from megadistill.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)
INIT_FILE = "megadistill_init.json"
# Keys a resume must not change: they define what the checkpoint's optimizer state means.
RESUME_KEYS = ("stage", "data.seq_len", "engine.global_batch_size", "engine.micro_batch_size")

LossFn = Callable[[Any, dict[str, torch.Tensor]], tuple[torch.Tensor, dict[str, torch.Tensor]]]
MakeLoss = Callable[[Any, Any, int], tuple[LossFn, contextlib.AbstractContextManager]]
"""``(student engine, loader, world size) -> (loss function, context entered around the loop)``."""


def load_stage_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> StageConfig:
    """YAML recipe + dotted overrides -> StageConfig (checkpoint_dir defaults to out_dir)."""
    return stage_config_from_dict(apply_overrides(load_yaml(path) if path else {}, overrides))


def student_fingerprint(student_dir: str | Path) -> str:
    """The fingerprint of the initial student the folder descends from.

    Converted students and stage outputs carry it in ``megadistill_init.json``; other folders
    (e.g. a merge) are identified by the sha256 of their weight files.
    """
    folder = Path(student_dir)
    init = folder / INIT_FILE
    if init.is_file():
        return str(json.loads(init.read_text())["fingerprint"])
    digest = hashlib.sha256()
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MegadistillError(f"student folder {folder} has no *.safetensors weights")
    from megadistill.integrity import sha256_file

    for f in files:
        digest.update(f"{f.name}:{sha256_file(f)}".encode())
    return digest.hexdigest()


def _check_fresh_start(cfg: StageConfig) -> None:
    """A run that does not resume must not start over in a folder holding another run's
    checkpoints: its own checkpoints would replace them (``latest``) and prune them (keep_last)."""
    from megadistill.engine.checkpoint import latest_tag

    t = cfg.trainer
    if t.resume or t.resume_tag or not t.checkpoint_dir:
        return
    tag = latest_tag(t.checkpoint_dir)
    if tag is not None:
        raise MegadistillError(
            f"{t.checkpoint_dir} already holds checkpoints (newest {tag}) and this run does not "
            "resume: add --resume (trainer.resume=true) to continue that run, or set a new "
            "out_dir (or trainer.checkpoint_dir) to start another"
        )


def _check_inputs(cfg: StageConfig) -> None:
    _check_fresh_start(cfg)
    folder = Path(cfg.student)
    if not (folder / "config.json").is_file():
        raise MegadistillError(
            f"student {folder} is not a Hugging Face folder (no config.json); create it with "
            "`megadistill convert` or point to a previous stage's out_dir/final"
        )
    if cfg.teacher and missing_local_path(cfg.teacher):
        raise MegadistillError(f"teacher {cfg.teacher}: no such folder; fix 'teacher' (a Hugging "
                               "Face model folder or hub id)")  # fmt: skip
    from megadistill.engine.distributed import device_type
    from megadistill.model.backends import require_mlstm_backend

    # Before any weight loads: a Triton that cannot run is one line now, not a trace later.
    student = json.loads((folder / "config.json").read_text())
    require_mlstm_backend(student.get("mlstm_backend", "chunkwise"), device_type())


def student_builder(
    cfg: StageConfig, prepare: Callable[[torch.nn.Module], None] | None = None
) -> Callable[[], torch.nn.Module]:
    """A function that loads ``cfg.student`` partitioned (ZeRO-3), then calls ``prepare`` on it
    (e.g. stage I freezes the teacher's parameters) before the engine builds its optimizer."""

    def build() -> torch.nn.Module:
        from megadistill.engine.loading import from_pretrained_zero3
        from megadistill.model import HybridForCausalLM

        model = from_pretrained_zero3(cfg.student, HybridForCausalLM, dtype=torch.float32)
        if prepare is not None:
            prepare(model)
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        return model

    return build


def teacher_builder(path: str) -> Callable[[], torch.nn.Module]:
    """A function that loads the teacher at ``path`` partitioned (ZeRO-3), shard by shard."""

    def build() -> torch.nn.Module:
        from megadistill.engine.loading import from_pretrained_zero3

        # Not AutoModelForCausalLM.from_pretrained: under ZeRO-3 it reads every shard into one
        # state dict on rank 0 (a full copy of the teacher); this reads partitions shard by shard.
        return from_pretrained_zero3(path, dtype=torch.float32)

    return build


def build_teacher(cfg: StageConfig, world: int) -> Any:
    """The frozen teacher engine of ``cfg.teacher`` (ZeRO-3, offloaded as the config says)."""
    from megadistill.engine import build_teacher_engine
    from megadistill.engine.distributed import device_type
    from megadistill.engine.ds_config import build_ds_config
    from megadistill.stages.config import default_teacher_engine

    assert cfg.teacher is not None
    t_cfg = build_ds_config(
        default_teacher_engine(cfg), world_size=world, device_type=device_type()
    )
    return build_teacher_engine(teacher_builder(cfg.teacher), t_cfg)


def teacher_logits(teacher: Any, batch: dict[str, torch.Tensor], dev: Any) -> torch.Tensor:
    """Teacher logits on a packed batch. ``use_cache=False`` matters: without a cache,
    transformers reads document starts from ``position_ids`` and masks attention across them."""
    return teacher(
        input_ids=batch["input_ids"].to(dev),
        position_ids=batch["position_ids"].to(dev),
        use_cache=False,
    ).logits


def _callbacks(cfg: StageConfig) -> list[Any]:
    from megadistill.callbacks import JsonlLogger, ProgressBar, ThroughputMonitor, WandbLogger

    out = Path(cfg.out_dir)
    return [
        ThroughputMonitor(),
        JsonlLogger(out / "metrics.jsonl"),
        ProgressBar(disable=not cfg.logging.progress_bar),
        WandbLogger(
            cfg.logging.wandb_project,
            mode=cfg.logging.wandb_mode,
            run_name=f"{cfg.stage}-{out.name}",
            directory=out / "wandb",
            config=to_dict(cfg),
        ),
    ]


def train(
    cfg: StageConfig,
    make_loss: MakeLoss,
    prepare_student: Callable[[torch.nn.Module], None] | None = None,
) -> TrainResult:
    """Train the student on every rank (call under torchrun / deepspeed / the SLURM entrypoint).

    Args:
        cfg: the stage's config.
        make_loss: builds the stage's loss from the student engine, the loader and the world size,
            with a context (e.g. a probe) that stays entered while the trainer runs.
        prepare_student: called on the loaded student before its engine is built.
    """
    from megadistill.data.loader import build_loader
    from megadistill.engine import CheckpointMeta, build_student_engine
    from megadistill.engine.distributed import device_type, init_distributed
    from megadistill.engine.ds_config import build_ds_config
    from megadistill.model import load_tokenizer

    _check_inputs(cfg)
    _, world = init_distributed(cfg.timeout_s)
    ds_cfg = build_ds_config(cfg.engine, world_size=world, device_type=device_type())
    tok = load_tokenizer(cfg.student)
    loader = build_loader(
        cfg.data, tok, micro_batch=cfg.engine.micro_batch_size,
        grad_accum=int(ds_cfg["gradient_accumulation_steps"]),
    )  # fmt: skip
    builder = student_builder(cfg, prepare_student)
    engine = build_student_engine(builder, ds_cfg, cfg.optim, cfg.scheduler)
    loss_fn, around = make_loss(engine, loader, world)
    meta = CheckpointMeta(
        fingerprint=student_fingerprint(cfg.student),
        model_config=engine.module.config.to_dict(),
        config=to_dict(cfg),
        tokenizer=str(Path(cfg.student).resolve()),
        config_keys_must_match=RESUME_KEYS,
    )
    trainer = Trainer(engine, loss_fn, loader, cfg.trainer, meta=meta, callbacks=_callbacks(cfg))
    with around:
        return trainer.fit()
