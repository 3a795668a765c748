"""Stage I (align) and stage II (distill) runs: engines, loss, trainer, final export.

Each rank runs :func:`run_stage`; the stage owns the engines and the loss, the
:class:`~megadistill.trainer.Trainer` owns the loop, cadence and checkpoints.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from megadistill.config import ConfigError, apply_overrides, load_yaml, missing_local_path, to_dict
from megadistill.errors import MegadistillError
from megadistill.stages.config import StageConfig, default_teacher_engine, stage_config_from_dict
from megadistill.trainer import Trainer, TrainResult

log = logging.getLogger(__name__)
INIT_FILE = "megadistill_init.json"
# Keys a resume must not change: they define what the checkpoint's optimizer state means.
RESUME_KEYS = ("stage", "data.seq_len", "engine.global_batch_size", "engine.micro_batch_size")


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


def _check_student(path: str) -> None:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MegadistillError(
            f"student {folder} is not a Hugging Face folder (no config.json); create it with "
            "`megadistill convert` or point to a previous stage's out_dir/final"
        )


def _student_fn(cfg: StageConfig):
    def build() -> torch.nn.Module:
        from megadistill.engine.loading import from_pretrained_zero3
        from megadistill.model import HybridForCausalLM

        model = from_pretrained_zero3(cfg.student, HybridForCausalLM, dtype=torch.float32)
        if cfg.stage == "align":
            new = set(model.new_parameter_names())
            for name, p in model.named_parameters():
                p.requires_grad_(name in new)
        if cfg.activation_checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        return model

    return build


def _teacher_fn(path: str):
    def build() -> torch.nn.Module:
        from megadistill.engine.loading import from_pretrained_zero3

        # Not AutoModelForCausalLM.from_pretrained: under ZeRO-3 it reads every shard into one
        # state dict on rank 0 (a full copy of the teacher); this reads partitions shard by shard.
        return from_pretrained_zero3(path, dtype=torch.float32)

    return build


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


def _export_final(cfg: StageConfig, result: TrainResult) -> Path | None:
    """Consolidate the last checkpoint into out_dir/final, carrying the init fingerprint."""
    from megadistill.engine.distributed import barrier, rank
    from megadistill.integrity import write_manifest
    from megadistill.merge.merge import consolidate

    final = Path(cfg.out_dir) / "final"
    if not cfg.export_final or result.preempted or result.last_checkpoint is None:
        return None
    if rank() == 0:
        consolidate(str(result.last_checkpoint), str(final), overwrite=True, tokenizer=cfg.student)
        init = Path(cfg.student) / INIT_FILE
        if init.is_file():
            (final / INIT_FILE).write_text(init.read_text())
            write_manifest(final)
        log.info("consolidated student written to %s", final)
    barrier()
    return final


def run_stage(cfg: StageConfig) -> TrainResult:
    """Run one stage on every rank (call under torchrun / deepspeed / the SLURM entrypoint)."""
    from transformers import AutoTokenizer

    from megadistill.data.loader import build_loader
    from megadistill.engine import CheckpointMeta, build_student_engine
    from megadistill.engine.distributed import device_type, init_distributed
    from megadistill.engine.ds_config import build_ds_config

    _check_student(cfg.student)
    if cfg.teacher and missing_local_path(cfg.teacher):
        raise MegadistillError(f"teacher {cfg.teacher}: no such folder; fix 'teacher' (a Hugging "
                               "Face model folder or hub id)")  # fmt: skip
    _, world = init_distributed(cfg.timeout_s)
    ds_cfg = build_ds_config(cfg.engine, world_size=world, device_type=device_type())
    tok = AutoTokenizer.from_pretrained(cfg.student)
    loader = build_loader(
        cfg.data, tok, micro_batch=cfg.engine.micro_batch_size,
        grad_accum=int(ds_cfg["gradient_accumulation_steps"]),
    )  # fmt: skip
    engine = build_student_engine(_student_fn(cfg), ds_cfg, cfg.optim, cfg.scheduler)
    probe = contextlib.nullcontext()
    if cfg.stage == "align":
        from megadistill.stages.align import AlignLoss, AttentionProbe

        probe = AttentionProbe(engine.module)
        loss_fn: Any = AlignLoss(probe)
    else:
        loss_fn = _distill_loss(cfg, loader, world)
    meta = CheckpointMeta(
        fingerprint=student_fingerprint(cfg.student),
        model_config=engine.module.config.to_dict(),
        config=to_dict(cfg),
        tokenizer=str(Path(cfg.student).resolve()),
        config_keys_must_match=RESUME_KEYS,
    )
    trainer = Trainer(engine, loss_fn, loader, cfg.trainer, meta=meta, callbacks=_callbacks(cfg))
    with probe:
        result = trainer.fit()
    _export_final(cfg, result)
    return result


def _distill_loss(cfg: StageConfig, loader: Any, world: int) -> DistillLoss:
    from megadistill.engine import build_teacher_engine
    from megadistill.engine.distributed import device_type
    from megadistill.engine.ds_config import build_ds_config

    if cfg.distill.teacher_mode == "offline":
        from megadistill.stages.teacher_targets import TeacherTargets

        targets = TeacherTargets(
            cfg.distill.targets_dir, k=cfg.distill.top_k, seq_len=cfg.data.seq_len,
            data_fingerprint=loader.fingerprint,
            teacher_fingerprint=student_fingerprint(cfg.teacher) if cfg.teacher else None,
        )  # fmt: skip
        return DistillLoss(cfg, targets=targets)
    assert cfg.teacher is not None
    t_cfg = build_ds_config(
        default_teacher_engine(cfg), world_size=world, device_type=device_type()
    )
    teacher = build_teacher_engine(_teacher_fn(cfg.teacher), t_cfg)
    return DistillLoss(cfg, teacher_engine=teacher)


def run_teacher_targets(cfg: StageConfig) -> Path:
    """Precompute the teacher's top-k targets for cfg.data into cfg.distill.targets_dir."""
    from transformers import AutoTokenizer

    from megadistill.data.loader import build_loader
    from megadistill.engine import build_teacher_engine
    from megadistill.engine.distributed import device_type, init_distributed
    from megadistill.engine.ds_config import build_ds_config
    from megadistill.stages.teacher_targets import write_teacher_targets

    if not cfg.teacher or not cfg.distill.targets_dir:
        raise ConfigError("teacher-targets needs 'teacher' and 'distill.targets_dir'")
    _, world = init_distributed(cfg.timeout_s)
    t_cfg = build_ds_config(
        default_teacher_engine(cfg), world_size=world, device_type=device_type()
    )
    tok = AutoTokenizer.from_pretrained(cfg.teacher)
    loader = build_loader(
        cfg.data, tok, micro_batch=cfg.engine.micro_batch_size, shuffle=False, drop_last=False
    )
    teacher = build_teacher_engine(_teacher_fn(cfg.teacher), t_cfg)
    dev = teacher.device

    def forward(batch: dict[str, torch.Tensor]):
        from megadistill.stages.losses import topk_logprobs

        with torch.no_grad():
            logits = teacher_logits(teacher, batch, dev)
            return topk_logprobs(logits, cfg.distill.top_k, cfg.distill.chunk_size)

    return write_teacher_targets(
        forward, loader, cfg.distill.targets_dir, cfg.distill.top_k,
        teacher_fingerprint=student_fingerprint(cfg.teacher), tokenizer=cfg.teacher,
    )  # fmt: skip


def run_from_cli(path: str | None, overrides: list[str], stage: str) -> int:
    """``megadistill align|distill RECIPE [overrides]``: exit code for the shell/SLURM."""
    if stage == "teacher-targets":
        run_teacher_targets(load_stage_config(path, ["stage=distill", *overrides]))
        return 0
    cfg = load_stage_config(path, [f"stage={stage}", *overrides])
    return run_stage(cfg).exit_code
