"""Rank function for test_zero3_construction: a student, then its teacher, built under ZeRO-3 in a
process that has imported no transformers modeling module yet (as a real stage II rank starts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

FAMILIES = ("llama", "qwen3")


def write_models(root: Path) -> None:
    """A tiny teacher of each family in ``root/<family>/teacher`` and its student beside it."""
    from megadistill.teachers.conversion import convert_pretrained
    from megadistill.teachers.tiny import tiny_teacher

    for family in FAMILIES:
        tiny_teacher(family, seed=0).save_pretrained(root / family / "teacher")
        convert_pretrained(root / family / "teacher", root / family / "student", seed=0)


def student_then_teacher(root_str: str) -> None:
    """Per family: student engine, then teacher engine, both ZeRO-3; the teacher's logits."""
    import torch

    from megadistill.engine import build_teacher_engine
    from megadistill.engine.distributed import init_distributed
    from megadistill.engine.loading import from_pretrained_zero3
    from megadistill.model import HybridForCausalLM
    from megadistill.stages.runner import teacher_builder

    root = Path(root_str)
    init_distributed(120)
    ds = {
        "train_batch_size": 1,
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    out = {}
    for family in FAMILIES:
        module = f"transformers.models.{family}.modeling_{family}"
        # Without this the test would pass for the wrong reason: the bug needs the family's
        # module to be imported for the first time while the student is being built.
        out[f"{family}_imported_before"] = module in sys.modules
        student = build_teacher_engine(
            lambda f=family: from_pretrained_zero3(root / f / "student", HybridForCausalLM), ds
        )
        teacher = build_teacher_engine(teacher_builder(str(root / family / "teacher")), ds)
        ids = torch.arange(3, 19).reshape(1, 16)
        with torch.no_grad():
            logits = teacher(input_ids=ids, use_cache=False).logits
        torch.save(logits, root / f"{family}_logits.pt")
        del student, teacher
    (root / "construction.json").write_text(json.dumps(out))
