"""Rank functions of tests/test_sharded.py: a ~160M-parameter teacher saved in small shards,
converted by streaming, then student and teacher built ZeRO-3-partitioned on 2 gloo ranks.

Memory is measured per process from /proc/self/status: VmHWM (peak RSS) after writing "5" to
/proc/self/clear_refs (which resets the peak) minus VmRSS just before the measured step.
The ranks run with MALLOC_MMAP_THRESHOLD_=1 MiB (see ``RANK_ENV``): deepspeed.zero.Init creates
every parameter full-size and frees it after partitioning; with glibc's default *dynamic* mmap
threshold those freed blocks stay in the heap (fragmented between live partitions) and RSS keeps
them, which would measure the allocator rather than what the ranks hold.
"""

from __future__ import annotations

import json
from pathlib import Path

TEXT = "/usr/share/common-licenses/GPL-3"
# Llama-like: 12 layers, hidden 1024, vocab 16000, untied head: 173M parameters, 692 MB in fp32.
BIG = dict(
    hidden_size=1024,
    intermediate_size=2816,
    num_hidden_layers=12,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=16000,
    max_position_embeddings=4096,
)
SHARD = "64MB"
RANK_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
SEQ = 48


def status_kib(field: str) -> int:
    """A memory field (VmRSS, VmHWM, ...) of this process in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak() -> int:
    """Reset VmHWM to the current RSS (Linux >= 4.0) and return the current RSS in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


def save_teacher(root_str: str) -> None:
    """Random big teacher, saved in ~64 MB safetensors shards (one process)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megadistill.assets import byte_tokenizer
    from megadistill.teachers.tiny import tiny_teacher_config

    torch.manual_seed(0)
    root = Path(root_str)
    cfg = tiny_teacher_config("llama", **BIG)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    model.save_pretrained(root / "teacher", max_shard_size=SHARD)
    byte_tokenizer(root / "teacher")
    n = sum(p.numel() for p in model.parameters())
    (root / "model.json").write_text(json.dumps({"params": n, "bytes": 4 * n}))


def convert_measured(root_str: str) -> None:
    """Streaming conversion in a fresh process; records its peak RSS growth."""
    from megadistill.teachers.conversion import convert_pretrained

    root = Path(root_str)
    base = reset_peak()
    # gate 'swa' with a window over the whole sequence: the student must equal the teacher.
    convert_pretrained(root / "teacher", root / "student", ["gate_mode=swa", "window=4096"])
    peak = status_kib("VmHWM") - base
    (root / "convert.json").write_text(json.dumps({"peak_delta_bytes": peak * 1024}))


def stage_overrides(root: Path) -> list[str]:
    return [
        "stage=distill",
        f"student={root / 'student'}",
        f"teacher={root / 'teacher'}",
        f"out_dir={root / 'run'}",
        f"data.sources=[{{path: {TEXT}}}]",
        f"data.seq_len={SEQ}",
        f"data.cache_dir={root / 'data-cache'}",
        "engine.ds_config=student_zero3",
        "engine.global_batch_size=2",
        "engine.micro_batch_size=1",
        "engine.param_persistence_threshold=0",
        "engine.precision=fp32",
        "trainer.max_steps=1",
        "optim.lr=1e-5",
        "logging.wandb_mode=disabled",
        "timeout_s=300",
    ]


def _measured(fn, rec: dict, key: str):
    """Wrap a model_fn: record the peak RSS growth of building the model alone."""

    def build():
        base = reset_peak()
        model = fn()
        rec[key] = (status_kib("VmHWM") - base) * 1024
        return model

    return build


def _check_weights(module, folder: Path, names: list[str]) -> float:
    """Max |gathered parameter - file value| over ``names`` (a collective per parameter)."""
    import deepspeed
    from safetensors import safe_open

    from megadistill.engine.loading import weight_files

    files, params, worst = weight_files(folder), dict(module.named_parameters()), 0.0
    for name in names:
        with deepspeed.zero.GatheredParameters([params[name]]):
            with safe_open(files[name], framework="pt") as fh:
                ref = fh.get_tensor(name)
            worst = max(worst, (params[name].detach().float() - ref.float()).abs().max().item())
    return worst


def _warm_imports(root: Path) -> None:
    """Import what building the models imports (~130 MiB of code and tables, paid once per
    process and independent of the model size), so the measured growth is the model's."""
    import safetensors.torch  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoConfig

    import megadistill.model  # noqa: F401

    AutoConfig.from_pretrained(root / "student")
    AutoConfig.from_pretrained(root / "teacher")


def sharded_run(root_str: str) -> None:
    """Every rank: student engine and teacher engine built sharded from the shards, measured."""
    import torch

    from megadistill.engine import build_student_engine, build_teacher_engine
    from megadistill.engine.builders import partition_numel
    from megadistill.engine.distributed import init_distributed
    from megadistill.engine.ds_config import build_ds_config
    from megadistill.stages.config import default_teacher_engine
    from megadistill.stages.runner import load_stage_config, student_builder, teacher_builder

    root = Path(root_str)
    rank, world = init_distributed(300)
    _warm_imports(root)
    cfg = load_stage_config(None, stage_overrides(root))
    s_ds = build_ds_config(cfg.engine, world_size=world, device_type="cpu")
    t_ds = build_ds_config(default_teacher_engine(cfg), world_size=world, device_type="cpu")
    rec: dict = {"rank": rank}
    base = status_kib("VmRSS")
    student = build_student_engine(
        _measured(student_builder(cfg), rec, "student_build"), s_ds, cfg.optim, cfg.scheduler
    )
    rec["student_engine_rss"] = (status_kib("VmRSS") - base) * 1024
    teacher = build_teacher_engine(
        _measured(teacher_builder(cfg.teacher), rec, "teacher_build"), t_ds
    )
    rec["student_partition"] = partition_numel(student.module)
    rec["teacher_partition"] = partition_numel(teacher.module)
    rec["local_shards"] = [
        [n, int(p.ds_numel), int(p.ds_tensor.ds_numel)]
        for n, p in student.module.named_parameters()
    ]
    names = [n for n, _ in student.module.named_parameters()]
    rec["student_weight_err"] = _check_weights(student.module, root / "student", names)
    t_names = [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.11.mlp.down_proj.weight",
    ]
    rec["teacher_weight_err"] = _check_weights(teacher.module, root / "teacher", t_names)
    ids = torch.randint(3, BIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        s_logits = student(input_ids=ids).logits
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    rec["logits_max_diff"] = (s_logits - t_logits).abs().max().item()
    rec["logits_scale"] = t_logits.abs().max().item()
    (root / f"rank{rank}.json").write_text(json.dumps(rec))
