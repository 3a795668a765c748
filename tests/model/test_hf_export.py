"""Student folders load like any custom-code Hub model: a fresh process, the Auto classes and
``trust_remote_code=True``, nothing imported first; and the real ``lm_eval --model hf`` command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.eval.tasks import write_tiny_task
from megadistill.integrity import verify_manifest
from megadistill.model.remote_code import AUTO_MAP, CODE_FILES
from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher
from megadistill.testing import load_in_fresh_process

STUDENT_CLASS = "megadistill.model.modeling.HybridForCausalLM"


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    tiny_teacher("qwen3").save_pretrained(root / "teacher")
    byte_tokenizer(root / "teacher")
    out = root / "student"
    assert main(["convert", "--teacher", str(root / "teacher"), "--out", str(out), "window=8",
                 "num_sinks=2"]) == 0  # fmt: skip
    return out


def _assert_self_contained(folder: Path) -> None:
    assert json.loads((folder / "config.json").read_text())["auto_map"] == AUTO_MAP
    for name in CODE_FILES:
        assert (folder / name).is_file(), name


def test_converted_student_loads_in_a_fresh_process(student_dir):
    _assert_self_contained(student_dir)
    verify_manifest(student_dir)  # the code files are covered by the checksums
    ids = torch.randint(3, 256, (2, 20))
    got = load_in_fresh_process(student_dir, ids)
    assert got["model"] == STUDENT_CLASS and got["vocab"] == 256
    assert got["config"] == "megadistill.model.configuration.HybridConfig"
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(student_dir)(ids).logits
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0)


def test_saved_student_loads_in_a_fresh_process_and_resaves_cleanly(tmp_path):
    student, _ = convert(tiny_teacher("olmo3"), seed=1, window=8, num_sinks=2)
    student.save_pretrained(tmp_path / "a")
    _assert_self_contained(tmp_path / "a")
    ids = torch.randint(3, 256, (1, 24))
    byte_tokenizer(tmp_path / "a")
    got = load_in_fresh_process(tmp_path / "a", ids)
    with torch.no_grad():
        torch.testing.assert_close(got["logits"], student(ids).logits, rtol=0, atol=0)
    # After a trust_remote_code load transformers registers the class for auto-saving; the
    # folder must still hold our shims only, not a copy of the package's modules.
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True)
    loaded.save_pretrained(tmp_path / "b")
    _assert_self_contained(tmp_path / "b")
    assert sorted(p.name for p in (tmp_path / "b").glob("*.py")) == sorted(CODE_FILES)


def test_lm_eval_command_line_with_model_hf(student_dir, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    task = write_tiny_task(tasks)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}  # fmt: skip
    cmd = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={student_dir},trust_remote_code=True,dtype=float32",
        "--device", "cpu",
        "--tasks", task, "--include_path", str(tasks), "--batch_size", "2",
        "--output_path", str(tmp_path / "results"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    files = list((tmp_path / "results").rglob("results_*.json"))
    assert len(files) == 1, proc.stdout[-2000:]
    results = json.loads(files[0].read_text())
    assert results["n-samples"][task]["effective"] == 8
    assert 0.0 <= results["results"][task]["acc,none"] <= 1.0
