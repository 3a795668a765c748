"""Conversion from teacher folders: CLI, fingerprints, 7B configs on meta, and bad input."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.config import load_yaml
from megadistill.integrity import verify_manifest
from megadistill.teachers import convert
from megadistill.teachers.conversion import (
    HUB_IDS,
    INIT_FILE,
    count_parameters,
    load_teacher_config,
    shipped_configs,
    shipped_recipes,
)
from megadistill.teachers.tiny import tiny_teacher


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher")
    tiny_teacher("llama").save_pretrained(path)
    byte_tokenizer(path)
    return path


def test_cli_convert_writes_verified_student_and_generates(teacher_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(teacher_dir), "--out", str(out), "window=16"]) == 0
    verify_manifest(out)
    meta = json.loads((out / INIT_FILE).read_text())
    assert len(meta["fingerprint"]) == 64 and meta["hybrid"] == {"window": 16}
    student = AutoModelForCausalLM.from_pretrained(out)
    assert student.config.window == 16
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir)
    for name, p in teacher.state_dict().items():
        torch.testing.assert_close(student.state_dict()[name], p, rtol=0, atol=0)
    # Converting again into the same folder is refused; the existing student stays intact.
    capsys.readouterr()
    assert main(["convert", "--teacher", str(teacher_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    verify_manifest(out)
    assert (
        main(["generate", "--model", str(out), "--prompt", "hello", "--max-new-tokens", "5"]) == 0
    )
    printed = capsys.readouterr().out
    prompt = torch.tensor([list(b"hello")])
    with torch.no_grad():
        ids = student.eval().generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    expected = bytes(i for i in ids[0, 5:].tolist() if i > 2).decode("utf-8", errors="replace")
    assert printed == expected + "\n"


def test_unknown_architecture_lists_supported(tmp_path, capsys):
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    gpt2.save_pretrained(tmp_path / "gpt2")
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(tmp_path / "gpt2"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "llama" in err and "olmo3" in err and "qwen3" in err
    assert not out.exists()


def test_mismatched_head_dim_is_named(teacher_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in teacher_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((bad / "config.json").read_text())
    cfg["head_dim"] = 8  # weights were made with head_dim 16
    (bad / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(bad), "--out", str(out)]) == 2
    assert "shape" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_or_missing_weights(teacher_dir, tmp_path, capsys, damage):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in teacher_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights = bad / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    else:
        weights.unlink()
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(bad), "--out", str(out)]) == 2
    assert "weight" in capsys.readouterr().err
    assert not out.exists() and not any(tmp_path.glob(".student*"))


def test_unknown_hybrid_setting_is_named(teacher_dir, tmp_path, capsys):
    assert (
        main(["convert", "--teacher", str(teacher_dir), "--out", str(tmp_path / "s"), "windw=8"])
        == 2
    )
    assert "windw" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(shipped_configs()))
def test_real_7b_configs_convert_on_meta(name):
    counts = count_parameters(load_teacher_config(name), window=512, num_sinks=4)
    assert counts["teacher"] > 6.5e9
    assert counts["student"] == counts["teacher"] + counts["new"]
    assert 0 < counts["new"] / counts["student"] < 0.01


def test_shipped_configs_and_recipes_share_one_naming_scheme(capsys):
    recipes = shipped_recipes()
    assert set(HUB_IDS.values()) == set(shipped_configs()) <= set(recipes)
    for name, path in recipes.items():
        recipe = load_yaml(path)
        assert recipe["name"] == name, path
        if name in shipped_configs():
            assert HUB_IDS[recipe["teacher"]] == name
    # inspect takes the name (config or recipe alike); the recipe's hybrid settings apply.
    assert main(["inspect", "olmo3_7b"]) == 0
    by_name = capsys.readouterr().out
    assert main(["inspect", str(shipped_configs()["olmo3_7b"]), "window=512", "num_sinks=4",
                 "chunk_size=64"]) == 0  # fmt: skip
    assert capsys.readouterr().out == by_name and "olmo3" in by_name
    assert main(["inspect", "olmo3-7b"]) == 2  # the old spelling is gone, and the error lists
    assert "olmo3_7b" in capsys.readouterr().err  # the names that exist


# qwen3_moe: transformers saves its experts one per tensor and fuses them on load, so the folder
# cannot be streamed as it is and is converted in memory; phi3: fused qkv_proj kept as it is.
@pytest.mark.parametrize(
    ("family", "hybrid"),
    [
        ("qwen3", {}),
        ("olmo2", {}),
        ("phi3", {}),
        ("qwen3_moe", {}),
        ("gemma3_text", {}),  # tied, scaled embedding (its sqrt(hidden) buffer is not stored)
        ("llama", {"mix": "shared_norm", "feature_map": "hedgehog_pm"}),
        ("llama", {"softmax_layers": [1], "fgate_bias": [2.0, 8.0]}),
    ],
)
def test_streaming_conversion_of_sharded_teacher_equals_in_memory(family, hybrid, tmp_path):
    teacher = tiny_teacher(family, tie_word_embeddings=family in ("olmo2", "gemma3_text"))
    teacher.save_pretrained(tmp_path / "teacher", max_shard_size="30KB")
    assert len(list((tmp_path / "teacher").glob("*.safetensors"))) > 3
    settings = [f"{k}={json.dumps(v)}" for k, v in hybrid.items()]
    out = main(["convert", "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "s"),
                "seed=5", "window=8", *settings])  # fmt: skip
    assert out == 0
    in_memory, fp = convert(teacher, seed=5, window=8, **hybrid)
    assert json.loads((tmp_path / "s" / INIT_FILE).read_text())["fingerprint"] == fp
    streamed = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    ids = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(streamed(ids).logits, in_memory(ids).logits, rtol=0, atol=0)
