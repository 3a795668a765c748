"""Every base JSON in ds_configs/ loads and fills; explicit values that disagree are refused."""

from __future__ import annotations

import json

import pytest

from megadistill.config import ConfigError, from_dict
from megadistill.engine.ds_config import (
    DS_CONFIG_DIR,
    EngineConfig,
    build_ds_config,
    fill_ds_config,
    load_ds_config,
)

ALL_CONFIGS = sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def _run(name: str, **kw) -> EngineConfig:
    base = {"ds_config": name, "global_batch_size": 16, "micro_batch_size": 2}
    if "nvme" in name:
        base["nvme_path"] = "/tmp/md-nvme"
    base.update(kw)
    return from_dict(EngineConfig, base)


def test_the_shipped_configs_are_there():
    assert {
        "student_zero3",
        "teacher_zero3",
        "teacher_zero3_offload_cpu",
        "teacher_zero3_offload_nvme",
    } <= set(ALL_CONFIGS)


@pytest.mark.parametrize("name", ALL_CONFIGS)
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_every_config_fills_completely(name: str, device_type: str):
    cfg = build_ds_config(_run(name), world_size=4, device_type=device_type)
    assert "auto" not in json.dumps(cfg)
    assert cfg["train_batch_size"] == 16
    assert cfg["train_micro_batch_size_per_gpu"] == 2
    assert cfg["gradient_accumulation_steps"] == 2
    assert cfg["bf16"]["enabled"] is (device_type == "cuda")
    assert cfg["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name", ALL_CONFIGS)
def test_deepspeed_parses_every_filled_config(name: str):
    from deepspeed.runtime.config import DeepSpeedConfig

    # without a process group DeepSpeed assumes world_size 1 and checks the batch arithmetic
    ds = DeepSpeedConfig(build_ds_config(_run(name), world_size=1, device_type="cpu"))
    assert ds.train_batch_size == 16 and ds.gradient_accumulation_steps == 8
    assert ds.zero_optimization_stage == 3


def test_offload_and_nvme_path_are_filled():
    cfg = build_ds_config(_run("teacher_zero3_offload_nvme"), world_size=1, device_type="cpu")
    node = cfg["zero_optimization"]["offload_param"]
    assert node == {**node, "device": "nvme", "nvme_path": "/tmp/md-nvme", "pin_memory": False}
    cpu = build_ds_config(_run("teacher_zero3", offload="cpu"), world_size=1, device_type="cuda")
    assert cpu["zero_optimization"]["offload_param"]["device"] == "cpu"
    none = build_ds_config(_run("teacher_zero3", offload="none"), world_size=1, device_type="cpu")
    assert "offload_param" not in none["zero_optimization"]


def test_effective_batch_does_not_depend_on_world_size():
    for world, accum in ((1, 8), (2, 4), (8, 1)):
        cfg = build_ds_config(_run("student_zero3"), world_size=world, device_type="cpu")
        assert cfg["gradient_accumulation_steps"] == accum
        assert cfg["train_micro_batch_size_per_gpu"] * world * accum == 16


def test_batch_that_does_not_divide_is_refused():
    with pytest.raises(ConfigError, match="not divisible by micro_batch_size=2 x world_size=3"):
        build_ds_config(_run("student_zero3"), world_size=3, device_type="cpu")


@pytest.mark.parametrize(
    ("key_path", "value", "run_kw", "message"),
    [
        (("train_micro_batch_size_per_gpu",), 4, {}, "train_micro_batch_size_per_gpu=4"),
        (("train_batch_size",), 32, {}, "train_batch_size=32 but the run config gives 16"),
        (("gradient_clipping",), 0.5, {"gradient_clipping": 1.0}, "gradient_clipping=0.5"),
        (("bf16", "enabled"), True, {"precision": "fp32"}, "bf16.enabled=True"),
        (("zero_optimization", "offload_param"), {"device": "cpu"}, {"offload": "none"}, "'none'"),
        (("zero_optimization", "offload_param"), {"device": "nvme"}, {"offload": "cpu"}, "'cpu'"),
    ],
)
def test_explicit_disagreement_names_both_values(key_path, value, run_kw, message):
    base = load_ds_config("student_zero3")
    node = base
    for key in key_path[:-1]:
        node = node.setdefault(key, {})
    node[key_path[-1]] = value
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        fill_ds_config(base, _run("student_zero3", **run_kw), world_size=4, device_type="cpu")


def test_explicit_agreement_is_accepted_and_unknown_auto_refused():
    base = load_ds_config("student_zero3")
    base.update(train_batch_size=16, gradient_accumulation_steps=2, bf16={"enabled": False})
    fill_ds_config(base, _run("student_zero3"), world_size=4, device_type="cpu")
    base["optimizer"] = {"params": {"lr": "auto"}}
    with pytest.raises(ConfigError, match="optimizer.params.lr"):
        fill_ds_config(base, _run("student_zero3"), world_size=4, device_type="cpu")


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="shipped: .*student_zero3"):
        load_ds_config("no_such_config")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(str(bad))
    with pytest.raises(ConfigError, match="nvme_path"):
        _run("student_zero3", offload="nvme")
    with pytest.raises(ConfigError, match="fp16"):
        fill_ds_config({"fp16": {"enabled": True}}, _run("x"), world_size=1, device_type="cpu")
