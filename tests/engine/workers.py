"""Rank functions for the engine tests (run through megadistill.engine.launch.run_distributed).

Each worker runs several checks in one process group (DeepSpeed import costs ~10 s per rank) and
writes what it measured to ``out_dir``; the tests in test_engine.py assert on those files.
"""

from __future__ import annotations

import functools
import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from megadistill.callbacks import Callback

SEQ_LEN = 16
VOCAB = 256
GLOBAL_BATCH = 8
MICRO_BATCH = 2
MAX_STEPS = 8
FROZEN = "model.embed_tokens.weight"


def write_models(folder: str) -> str:
    """A tiny Llama teacher in ``folder/teacher`` and its converted hybrid student in
    ``folder/student``; return the student's fingerprint."""
    from megadistill.teachers.conversion import INIT_FILE, convert_pretrained
    from megadistill.teachers.tiny import tiny_teacher

    tiny_teacher("llama", seed=0).save_pretrained(Path(folder) / "teacher")
    student = convert_pretrained(Path(folder) / "teacher", Path(folder) / "student", seed=0)
    return json.loads((student / INIT_FILE).read_text())["fingerprint"]


def load_teacher(folder: str) -> torch.nn.Module:
    """The teacher via ``from_pretrained`` (sharded under the caller's HfDeepSpeedConfig)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(Path(folder) / "teacher", dtype=torch.float32)


def load_student(folder: str) -> torch.nn.Module:
    """The hybrid student via ``from_pretrained`` (sharded), with the embedding frozen."""
    from megadistill.model import HybridForCausalLM

    model = HybridForCausalLM.from_pretrained(Path(folder) / "student", dtype=torch.float32)
    for name, param in model.named_parameters():
        if name == FROZEN:
            param.requires_grad_(False)
    return model


def student_config(folder: str) -> dict[str, Any]:
    from megadistill.model import HybridConfig

    return HybridConfig.from_pretrained(Path(folder) / "student").to_dict()


class IndexedBatches:
    """Deterministic synthetic micro-batches; the global batch of step s is samples [sG, sG+G).

    Rank r's k-th micro-batch of a step holds samples ``k*micro*world + r*micro + [0, micro)``,
    so the set of samples per optimizer step does not depend on the world size.
    """

    def __init__(self, rank: int, world: int, accum: int) -> None:
        self.rank, self.world, self.accum = rank, world, accum
        self.position = 0

    @staticmethod
    def sample(index: int) -> torch.Tensor:
        # 16 distinct tokens in arithmetic runs: learnable within a few steps
        start, stride = (index * 7) % 16, 1 + index % 3
        return 32 + (start + stride * torch.arange(SEQ_LEN)) % 16

    def batch(self, position: int) -> torch.Tensor:
        step, micro = divmod(position, self.accum)
        first = step * GLOBAL_BATCH + micro * MICRO_BATCH * self.world + self.rank * MICRO_BATCH
        return torch.stack([self.sample(first + i) for i in range(MICRO_BATCH)])

    def __iter__(self):
        while True:
            self.position += 1
            yield self.batch(self.position - 1)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def lm_loss(engine: Any, batch: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    out = engine(input_ids=batch, labels=batch)
    return out.loss, {"logit_mean": out.logits.detach().float().mean()}


class SignalAt(Callback):
    """Callback: this rank sends itself SIGTERM after ``step`` (a preemption mid-run)."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_end(self, trainer: Any, step: int) -> None:
        if step == self.step and int(os.environ["RANK"]) == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def engine_config(name: str, **kw: Any) -> Any:
    from megadistill.engine.ds_config import EngineConfig

    return EngineConfig(
        ds_config=name,
        global_batch_size=GLOBAL_BATCH,
        micro_batch_size=MICRO_BATCH,
        precision="fp32",
        param_persistence_threshold=0,
        **kw,
    )


def student_engine(model_dir: str, world: int) -> Any:
    from megadistill.engine import OptimizerConfig, SchedulerConfig, build_student_engine
    from megadistill.engine.ds_config import build_ds_config

    ds = build_ds_config(engine_config("student_zero3"), world_size=world, device_type="cpu")
    return build_student_engine(
        functools.partial(load_student, model_dir),
        ds,
        OptimizerConfig(lr=1e-2, weight_decay=0.01),
        SchedulerConfig(name="cosine", num_warmup_steps=2, num_decay_steps=MAX_STEPS, min_lr=1e-3),
    )


def full_weights(engine: Any) -> dict[str, torch.Tensor]:
    """Gathered full parameters (a collective), as CPU copies."""
    import deepspeed

    params = dict(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):
        return {name: p.detach().cpu().clone() for name, p in params.items()}


def train(
    model_dir: str,
    fingerprint: str,
    out: Path,
    name: str,
    *,
    ckpt_dir: Path | None = None,
    resume: bool = False,
    callbacks: tuple[Callback, ...] = (),
) -> tuple[Any, Any]:
    """Build a student engine and run the Trainer; return (engine, result)."""
    import torch.distributed as dist

    from megadistill.callbacks import JsonlLogger, ThroughputMonitor
    from megadistill.engine import CheckpointMeta
    from megadistill.trainer import Trainer, TrainerConfig

    world, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(1234)
    engine = student_engine(model_dir, world)
    data = IndexedBatches(rank, world, engine.gradient_accumulation_steps())
    cfg = TrainerConfig(
        max_steps=MAX_STEPS,
        log_every=1,
        checkpoint_every=3 if ckpt_dir else 0,
        checkpoint_dir=str(ckpt_dir) if ckpt_dir else None,
        keep_last=2,
        resume=resume,
    )
    meta = CheckpointMeta(
        fingerprint=fingerprint,
        model_config=student_config(model_dir),
        config={"global_batch_size": GLOBAL_BATCH},
        config_keys_must_match=("global_batch_size",),
    )
    callbacks = (ThroughputMonitor(), JsonlLogger(out / f"{name}.jsonl"), *callbacks)
    result = Trainer(engine, lm_loss, data, cfg, meta=meta, callbacks=callbacks).fit()
    return engine, result


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str))


def _check_teachers(model_dir: str, out: Path, rank: int, world: int) -> None:
    """Plain and CPU-offloaded teacher engines: partitioned, frozen, logits saved per rank."""
    import gc

    from megadistill.engine import build_teacher_engine, partition_numel
    from megadistill.engine.ds_config import build_ds_config

    batch = torch.stack([IndexedBatches.sample(i) for i in range(3)])
    report = {}
    for name in ("teacher_zero3", "teacher_zero3_offload_cpu"):
        ds = build_ds_config(engine_config(name), world_size=world, device_type="cpu")
        engine = build_teacher_engine(functools.partial(load_teacher, model_dir), ds)
        with torch.no_grad():
            logits = engine(input_ids=batch).logits
        torch.save(logits, out / f"logits_{name}_rank{rank}.pt")
        total, local = partition_numel(engine.module)
        report[name] = {
            "total": total,
            "local": local,
            "trainable": sum(p.requires_grad for p in engine.module.parameters()),
            "training": engine.module.training,
            "offload_device": str(engine.zero_offload_param().device)
            if engine.zero_offload_param()
            else "none",
            "shard_devices": sorted({str(p.ds_tensor.device) for p in engine.module.parameters()}),
        }
        del engine
        gc.collect()
    write_json(out / f"teachers_rank{rank}.json", report)


def _corrupt_and_resume(model_dir: str, fingerprint: str, out: Path, rank: int) -> dict:
    """Corrupt the newest checkpoint; resuming must fail clearly and the older one stay good."""
    import torch.distributed as dist

    from megadistill.engine.checkpoint import complete_tags, latest_tag, verify_checkpoint
    from megadistill.errors import CheckpointError

    ckpt = out / "ckpt_split"
    newest = latest_tag(ckpt)
    if rank == 0:
        victim = sorted((ckpt / newest).glob("*optim_states.pt"))[0]
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
    dist.barrier()
    report: dict[str, Any] = {"newest": newest, "tags": complete_tags(ckpt)}
    try:
        train(model_dir, fingerprint, out, "corrupt", ckpt_dir=ckpt, resume=True)
        report["error"] = None
    except CheckpointError as exc:
        report["error"] = str(exc)
    earlier = [t for t in report["tags"] if t != newest][-1]
    verify_checkpoint(ckpt, earlier)
    report["earlier_verified"] = earlier
    return report


def run_two_rank_suite(model_dir: str, fingerprint: str, out_dir: str) -> None:
    """Teachers, full run, preempted + resumed run, corrupt checkpoint, fingerprint mismatch."""
    from megadistill.engine import (
        CheckpointMeta,
        init_distributed,
        load_checkpoint,
        partition_numel,
    )
    from megadistill.errors import CheckpointError

    rank, world = init_distributed(timeout_s=300)
    out = Path(out_dir)
    _check_teachers(model_dir, out, rank, world)

    engine, result = train(model_dir, fingerprint, out, "full", ckpt_dir=out / "ckpt_full")
    total, local = partition_numel(engine.module)
    weights = full_weights(engine)
    report: dict[str, Any] = {
        "student": {"total": total, "local": local, "accum": engine.gradient_accumulation_steps()},
        "full": {"step": result.step, "exit_code": result.exit_code},
    }
    if rank == 0:
        torch.save(weights, out / "weights_full.pt")
    del engine

    engine, result = train(
        model_dir, fingerprint, out, "resumed", ckpt_dir=out / "ckpt_split",
        callbacks=(SignalAt(step=5, rank=1),),
    )  # fmt: skip
    report["preempted"] = {"step": result.step, "exit_code": result.exit_code,
                           "preempted": result.preempted}  # fmt: skip
    del engine
    engine, result = train(
        model_dir, fingerprint, out, "resumed", ckpt_dir=out / "ckpt_split", resume=True
    )
    report["resumed"] = {"step": result.step, "exit_code": result.exit_code}
    weights = full_weights(engine)
    if rank == 0:
        torch.save(weights, out / "weights_resumed.pt")
    wrong = CheckpointMeta(fingerprint="0" * 64, model_config=student_config(model_dir))
    try:
        load_checkpoint(engine, out / "ckpt_split", wrong)
    except CheckpointError as exc:
        report["fingerprint_error"] = str(exc)
    del engine
    report["corrupt"] = _corrupt_and_resume(model_dir, fingerprint, out, rank)
    write_json(out / f"report_rank{rank}.json", report)


def run_one_rank(model_dir: str, fingerprint: str, out_dir: str) -> None:
    """The same training with the same effective batch on one rank."""
    from megadistill.engine import init_distributed

    init_distributed(timeout_s=300)
    out = Path(out_dir)
    engine, result = train(model_dir, fingerprint, out, "one_rank")
    weights = full_weights(engine)
    torch.save(weights, out / "weights_one_rank.pt")
    write_json(out / "report_one_rank.json", {"accum": engine.gradient_accumulation_steps(),
                                              "step": result.step})  # fmt: skip


def run_faults(model_dir: str, fingerprint: str, out_dir: str, disk_dir: str) -> None:
    """One rank: a preemption signal while starting up; a checkpoint onto a disk that fills up."""
    import shutil

    from megadistill.engine import CheckpointMeta, init_distributed
    from megadistill.engine.checkpoint import latest_tag, save_checkpoint, verify_checkpoint
    from megadistill.engine.signals import catch_early
    from megadistill.errors import CheckpointError

    catch_early()  # what `megadistill align|distill` does first
    init_distributed(timeout_s=300)
    out, disk = Path(out_dir), Path(disk_dir)
    os.kill(os.getpid(), signal.SIGUSR1)  # preempted while the model loads
    engine, result = train(model_dir, fingerprint, out, "startup", ckpt_dir=out / "ckpt_startup")
    report: dict[str, Any] = {
        "startup": {"step": result.step, "exit_code": result.exit_code,
                    "saved": sorted(p.name for p in (out / "ckpt_startup").glob("*"))},
    }  # fmt: skip

    meta = CheckpointMeta(fingerprint=fingerprint, model_config=student_config(model_dir))
    first = save_checkpoint(engine, disk / "ckpt", 1, meta)
    size = sum(p.stat().st_size for p in first.rglob("*") if p.is_file())
    room = shutil.disk_usage(disk).free - size // 2  # the next checkpoint cannot fit
    with open(disk / "ballast", "wb") as fh:
        fh.write(b"\0" * room)
    try:
        save_checkpoint(engine, disk / "ckpt", 2, meta)
        report["disk_error"] = None
    except CheckpointError as exc:
        report["disk_error"] = str(exc)
    (disk / "ballast").unlink()
    report["latest"] = latest_tag(disk / "ckpt")
    verify_checkpoint(disk / "ckpt", first.name)  # raises if the earlier one was damaged
    report["left"] = sorted(p.name for p in (disk / "ckpt").iterdir())
    report["mid_checkpoint"] = _signal_mid_checkpoint(model_dir, fingerprint, out)
    write_json(out / "report_faults.json", report)


def _signal_mid_checkpoint(model_dir: str, fingerprint: str, out: Path) -> dict[str, Any]:
    """SIGTERM while the cadence checkpoint of step 3 is being written (its shards on disk, its
    manifest not yet): the write completes, the run stops at the next step boundary with a
    checkpoint and the requeue code, and a resumed run ends where an uninterrupted one does."""
    from megadistill.engine import checkpoint as ckpt_module
    from megadistill.engine.checkpoint import complete_tags, latest_tag, verify_checkpoint

    write_manifest = ckpt_module._distributed_manifest
    sent: list[str] = []

    def signalled_manifest(folder: Path) -> None:
        if not sent:  # the first checkpoint only
            sent.append(folder.name)
            os.kill(os.getpid(), signal.SIGTERM)
        write_manifest(folder)

    ckpt = out / "ckpt_mid"
    ckpt_module._distributed_manifest = signalled_manifest
    try:
        _, first = train(model_dir, fingerprint, out, "mid", ckpt_dir=ckpt)
    finally:
        ckpt_module._distributed_manifest = write_manifest
    tags = complete_tags(ckpt)
    for tag in tags:
        verify_checkpoint(ckpt, tag)  # raises if a checkpoint was damaged
    engine, resumed = train(model_dir, fingerprint, out, "mid_resumed", ckpt_dir=ckpt, resume=True)
    final = full_weights(engine)
    engine, straight = train(model_dir, fingerprint, out, "mid_straight")
    reference = full_weights(engine)
    return {
        "signalled_during": sent,
        "step": first.step,
        "exit_code": first.exit_code,
        "tags": tags,
        "latest": latest_tag(ckpt) if resumed.step else None,
        "resumed_step": resumed.step,
        "resumed_equals_uninterrupted": sorted(final) == sorted(reference)
        and all(torch.equal(final[k], reference[k]) for k in final),
    }


def dangling_all_gather(delay_s: float) -> None:
    """Each rank leaves an async all-gather unwaited (as ZeRO-3's prefetch may), rank 1
    ``delay_s`` later than rank 0, and returns.

    The process group stays referenced past teardown (as DeepSpeed's objects keep it), so gloo's
    worker thread frees a request whenever it completes: without the final barrier, on rank 1
    that is while its interpreter shuts down, the thread cannot take the GIL and the process
    aborts.
    """
    import builtins
    import time

    import torch.distributed as dist

    from megadistill.engine.distributed import init_distributed

    rank, world = init_distributed(timeout_s=60)
    builtins._megadistill_test_pg = dist.distributed_c10d._get_default_group()  # type: ignore[attr-defined]
    if rank == 1:
        time.sleep(delay_s)
    out = torch.empty(1024 * world)
    dist.all_gather_into_tensor(out, torch.full((1024,), float(rank)), async_op=True)  # dropped
