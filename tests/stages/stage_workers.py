"""Rank functions for the stage tests: real align/distill/teacher-targets runs on 2 gloo ranks."""

from __future__ import annotations

from pathlib import Path

TEXT = "/usr/share/common-licenses/GPL-3"  # real English prose, on every Debian machine


def make_models(root: Path) -> None:
    """Tiny Llama teacher + byte tokenizer, and its converted student (window 16, 2 sinks)."""
    from megadistill.assets import byte_tokenizer
    from megadistill.teachers.conversion import convert_pretrained
    from megadistill.teachers.tiny import tiny_teacher

    (root / "gpl3.txt").write_text(Path(TEXT).read_text())
    teacher = root / "teacher"
    tiny_teacher("llama", seed=0).save_pretrained(teacher)
    byte_tokenizer(teacher)
    # The paper's gate at 0.5 (not the floor-equal default): 6 steps then have a clear descent
    # to show (the half-trained mix is far from the teacher; a floor-init student starts where
    # the SWA floor is, which on a tiny random teacher is already within 1e-5).
    convert_pretrained(
        teacher, root / "student", ["window=16", "num_sinks=2", "chunk_size=16", "gate_init=half"]
    )


def overrides(root: Path, name: str, stage_steps: int) -> list[str]:
    return [
        f"student={root / 'student'}",
        f"teacher={root / 'teacher'}",
        f"out_dir={root / name}",
        f"data.sources=[{{path: {root / 'gpl3.txt'}}}]",
        "data.seq_len=64",
        f"data.cache_dir={root / 'data-cache'}",
        "data.seed=0",
        "engine.ds_config=student_zero3",
        "engine.global_batch_size=4",
        "engine.micro_batch_size=2",
        "engine.param_persistence_threshold=0",
        "engine.precision=fp32",
        f"trainer.max_steps={stage_steps}",
        "trainer.log_every=1",
        "logging.wandb_mode=disabled",
        "logging.progress_bar=false",
        "distill.top_k=16",
        "distill.chunk_size=32",
        "timeout_s=300",
    ]


def run_stages(root_str: str) -> None:
    """align (6 steps), distill online (6 steps), teacher-targets, distill offline (1 step)."""
    import torch.distributed as dist

    from megadistill.pipeline.stage import run_stage
    from megadistill.stages.runner import load_stage_config
    from megadistill.stages.teacher_targets import run_teacher_targets

    root = Path(root_str)
    align = load_stage_config(None, ["stage=align", "optim.lr=1e-2", *overrides(root, "align", 6)])
    run_stage(align)
    distill = overrides(root, "distill", 6)
    distill[0] = f"student={root / 'align' / 'final'}"
    run_stage(load_stage_config(None, ["stage=distill", "optim.lr=1e-3", *distill]))
    targets = f"distill.targets_dir={root / 'targets'}"
    run_teacher_targets(load_stage_config(None, ["stage=distill", "optim.lr=1e-3", targets,
                                                 *overrides(root, "targets", 1)]))  # fmt: skip
    for mode in ("online", "offline"):
        cfg = load_stage_config(
            None,
            ["stage=distill", "optim.lr=1e-3", targets, f"distill.teacher_mode={mode}",
             *overrides(root, f"first-{mode}", 1)],
        )  # fmt: skip
        run_stage(cfg)
    dist.barrier()
