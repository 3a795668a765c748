"""A teacher built under ZeRO-3 after its student works on every transformers release tested.

transformers 5.25 wraps the attention classes' ``__init__`` (``kernels.use_kernelized_func``). If
the family's modeling module was first imported while the student was being built inside
``deepspeed.zero.Init``, DeepSpeed restored the undecorated ``__init__`` on exit, and the teacher
built next died at its first forward (``'LlamaAttention' object has no attribute
'_kernel_funcs'``): stage II crashed in the demo and in CI. One fresh rank reproduces the order.
"""

from __future__ import annotations

import json

import torch

from megadistill.engine.launch import run_distributed
from tests.engine import construction_workers as w


def test_teacher_built_after_its_student_under_zero3_matches_the_plain_teacher(tmp_path):
    from transformers import AutoModelForCausalLM

    w.write_models(tmp_path)
    run_distributed(w.student_then_teacher, 1, str(tmp_path), timeout_s=300)
    seen = json.loads((tmp_path / "construction.json").read_text())
    ids = torch.arange(3, 19).reshape(1, 16)
    for family in w.FAMILIES:
        assert not seen[f"{family}_imported_before"], f"{family}: imported before the student"
        with torch.no_grad():
            want = AutoModelForCausalLM.from_pretrained(tmp_path / family / "teacher")(ids).logits
        got = torch.load(tmp_path / f"{family}_logits.pt")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
