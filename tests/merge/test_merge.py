"""The merge tool against DeepSpeed's own consolidation, on real 2-rank ZeRO-3 checkpoints."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from megadistill.config import ConfigError
from megadistill.engine.launch import run_distributed
from megadistill.errors import CheckpointError
from megadistill.integrity import write_manifest
from megadistill.merge import MergeConfig, ZeroCheckpoint, consolidate, merge_experts
from megadistill.merge.merge import ties_merge
from megadistill.merge.tools import inspect_checkpoint, to_universal
from megadistill.testing import load_in_fresh_process
from tests.merge.experts import TAG, build_experts

NUM_EXPERTS = 3


@pytest.fixture(scope="session")
def experts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All expert checkpoints, trained once per session by one 2-rank process group."""
    root = tmp_path_factory.mktemp("experts")
    run_distributed(build_experts, 2, str(root), NUM_EXPERTS, timeout_s=300)
    return root


def _ds_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt))


def _weighted(states: list[dict[str, torch.Tensor]], weights: list[float]):
    out = {}
    for name in states[0]:
        acc = states[0][name] * weights[0]
        for w, sd in zip(weights[1:], states[1:]):
            acc = acc + sd[name] * w
        out[name] = acc
    return out


def _assert_loaded_equals(folder: Path, expected: dict[str, torch.Tensor]) -> None:
    """``from_pretrained(folder)`` holds exactly ``expected`` and gives the same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import megadistill.model  # noqa: F401  (registers the student with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    state = model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)
    reference = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder)).eval()
    reference.load_state_dict(expected, strict=False)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def _assert_fresh_process_load(folder: Path) -> None:
    """A merged student loads with trust_remote_code in a process that imported nothing."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(1))
    got = load_in_fresh_process(folder, ids)
    assert got["model"] == "megadistill.model.modeling.HybridForCausalLM"
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
    torch.testing.assert_close(got["logits"], want, rtol=0, atol=0)


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_reader_matches_deepspeed_consolidation(experts: Path) -> None:
    """Every tensor and every slice across the rank boundary, trainable, frozen and tied."""
    for name in ("expert_0", "frozen_0", "student_0"):
        reference = _ds_state(experts / name)
        with ZeroCheckpoint(experts / name) as ckpt:
            assert set(reference) == set(ckpt.specs) | set(ckpt.aliases)
            kinds = {s.kind for s in ckpt.specs.values()}
            for key, tensor in reference.items():
                torch.testing.assert_close(ckpt.tensor(key), tensor, rtol=0, atol=0)
                n = tensor.numel()
                middle = tensor.reshape(-1)[n // 3 : n // 3 + n // 2]
                torch.testing.assert_close(ckpt.read(key, n // 3, n // 2), middle, rtol=0, atol=0)
        assert kinds == ({"trainable"} if name == "expert_0" else {"trainable", "frozen"})
    with ZeroCheckpoint(experts / "student_0") as ckpt:
        assert ckpt.aliases == {"lm_head.weight": "model.embed_tokens.weight"}


def test_average_is_exact_weighted_average(experts: Path, tmp_path: Path) -> None:
    weights = [0.5, 0.3, 0.2]
    paths = [experts / f"expert_{k}" for k in range(NUM_EXPERTS)]
    out = merge_experts(
        MergeConfig(
            experts=[str(p) for p in paths],
            out=str(tmp_path / "merged"),
            weights=weights,
            max_shard_bytes=60_000,  # several shards
            chunk_numel=999,  # chunks that straddle the rank partitions
        )
    )
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert (out / "tokenizer.json").is_file() and (out / "checksums.json").is_file()
    _assert_loaded_equals(out, _weighted([_ds_state(p) for p in paths], weights))


def test_single_expert_reproduces_consolidation(experts: Path, tmp_path: Path) -> None:
    out = consolidate(experts / "expert_1", tmp_path / "one")
    _assert_loaded_equals(out, _ds_state(experts / "expert_1"))


def test_stage1_student_experts_with_frozen_params(experts: Path, tmp_path: Path) -> None:
    """Hybrid students whose teacher weights are frozen (kept in model-state shards), tied head."""
    paths = [experts / "student_0", experts / "student_1"]
    out = merge_experts(MergeConfig(experts=[str(p) for p in paths], out=str(tmp_path / "s")))
    states = [_ds_state(p) for p in paths]
    _assert_loaded_equals(out, _weighted(states, [0.5, 0.5]))
    assert json.loads((out / "config.json").read_text())["model_type"] == "megadistill_hybrid"
    _assert_fresh_process_load(out)
    frozen = [_ds_state(experts / f"frozen_{k}") for k in range(2)]
    out = merge_experts(
        MergeConfig(
            experts=[str(experts / f"frozen_{k}") for k in range(2)], out=str(tmp_path / "f")
        )
    )
    _assert_loaded_equals(out, _weighted(frozen, [0.5, 0.5]))


def test_task_arithmetic_and_ties(experts: Path, tmp_path: Path) -> None:
    paths = [str(experts / f"expert_{k}") for k in range(NUM_EXPERTS)]
    base = str(experts / "theta0")
    avg = _weighted([_ds_state(Path(p)) for p in paths], [1 / 3] * 3)
    out = merge_experts(
        MergeConfig(experts=paths, out=str(tmp_path / "ta"), method="task_arithmetic", base=base)
    )
    from safetensors.torch import load_file

    merged = load_file(out / "model-00001-of-00001.safetensors")
    for name, tensor in avg.items():  # theta0 + mean(theta_i - theta0) == mean(theta_i)
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    one = merge_experts(
        MergeConfig(
            experts=paths[:1], out=str(tmp_path / "t1"), method="ties", base=base, density=1.0
        )
    )
    merged = load_file(one / "model-00001-of-00001.safetensors")
    for name, tensor in _ds_state(Path(paths[0])).items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    merge_experts(MergeConfig(experts=paths, out=str(tmp_path / "t3"), method="ties", base=base))
    assert (tmp_path / "t3" / "merge.json").is_file()


def test_ties_merge_rule() -> None:
    taus = [torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([2.0, 1.0, -0.2, -1.0])]
    # density 0.5 keeps the two largest magnitudes: [_, -2, _, 3] and [2, 1, _, _]
    merged = ties_merge([t.clone() for t in taus], [0.5, 0.5], density=0.5)
    # elected signs: +, -, 0, +; the agreeing entries' weighted mean
    torch.testing.assert_close(merged, torch.tensor([2.0, -2.0, 0.0, 3.0]))


def _copy(experts: Path, name: str, dest: Path) -> Path:
    return Path(shutil.copytree(experts / name, dest / name))


def _refused(cfg: MergeConfig, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        merge_experts(cfg)
    out = Path(cfg.out)
    assert not out.exists(), "a refused merge left an output folder"
    assert _leftovers(out.parent) == [], "a refused merge left a temporary folder"


def test_refuses_mismatched_experts(experts: Path, tmp_path: Path) -> None:
    other = _copy(experts, "expert_1", tmp_path)
    meta_path = other / TAG / "megadistill.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "fingerprint": "0" * 64}))
    write_manifest(other / TAG)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    _refused(MergeConfig(experts=[str(experts / "expert_0"), str(other)], out=str(out)),
             match=r"expert_1.*different initial student.*fingerprint")  # fmt: skip
    _refused(MergeConfig(experts=[str(experts / "expert_0"), str(experts / "wide")], out=str(out)),
             match=r"wide.*tensor model\.layers\.0\.mlp\.gate_proj\.weight is \(102, 63\)")  # fmt: skip
    with pytest.raises(ConfigError, match="sum to"):
        MergeConfig(experts=["a", "b"], out=str(out), weights=[0.7, 0.7])
    with pytest.raises(ConfigError, match="base is required"):
        MergeConfig(experts=["a"], out=str(out), method="ties")


@pytest.mark.parametrize("field", ["window", "num_sinks", "teacher_config.sliding_window"])
def test_refuses_students_of_different_hybrid_settings(experts: Path, tmp_path: Path, field):
    # Same tensors, same fingerprint on file: only the settings differ, and the merge names them.
    other = _copy(experts, "student_1", tmp_path)
    meta_path = other / TAG / "megadistill.json"
    meta = json.loads(meta_path.read_text())
    if field.startswith("teacher_config."):
        meta["model_config"]["teacher_config"][field.split(".", 1)[1]] = 8
    else:
        meta["model_config"][field] = meta["model_config"][field] + 1
    meta_path.write_text(json.dumps(meta))
    write_manifest(other / TAG)
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    _refused(MergeConfig(experts=[str(experts / "student_0"), str(other)], out=str(out)),
             match=rf"student_1\S* is a different architecture .*\({field}=")  # fmt: skip


def test_refuses_student_folders_of_different_windows(tmp_path: Path) -> None:
    # Hugging Face folders (no checkpoint metadata): config.json carries the settings.
    from megadistill.teachers import convert
    from megadistill.teachers.tiny import tiny_teacher

    teacher = tiny_teacher("llama")
    for window in (8, 16):
        convert(teacher, seed=0, window=window)[0].save_pretrained(tmp_path / f"w{window}")
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    _refused(MergeConfig(experts=[str(tmp_path / "w8"), str(tmp_path / "w16")], out=str(out)),
             match=r"w16 is a different architecture .*\(window=8 vs window=16\)")  # fmt: skip


def test_missing_shard_and_truncated_file(experts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "merged"
    out.parent.mkdir()
    missing = _copy(experts, "expert_2", tmp_path / "missing")
    (missing / TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    cfg = MergeConfig(experts=[str(experts / "expert_0"), str(missing)], out=str(out))
    _refused(cfg, match=r"zero_pp_rank_1_mp_rank_00_optim_states\.pt.*missing")
    cfg.verify = False  # the reader's own check, for checkpoints without a manifest
    _refused(cfg, match=r"written by 2 ranks but .*zero_pp_rank_1_mp_rank_00_optim_states\.pt")
    truncated = _copy(experts, "expert_2", tmp_path / "truncated")
    shard = truncated / TAG / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    cfg = MergeConfig(experts=[str(experts / "expert_0"), str(truncated)], out=str(out))
    _refused(cfg, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt is corrupt")
    cfg.verify = False
    _refused(cfg, match=r"zero_pp_rank_0_mp_rank_00_optim_states\.pt is not a readable")


def test_inspect_cli_and_universal(experts: Path, tmp_path: Path) -> None:
    from megadistill.cli import main

    report = inspect_checkpoint(experts / "frozen_0", verify=True, tensors=True)
    (tag,) = report["tags"]
    assert report["latest"] == TAG and tag["integrity"] == "ok (verified)"
    assert tag["world_size"] == 2 and tag["step"] == 3
    assert tag["num_params"] == sum(t.numel() for t in _ds_state(experts / "frozen_0").values())
    assert 0 < tag["num_trainable"] < tag["num_params"]
    assert main(["inspect-ckpt", str(experts / "expert_0")]) == 0
    # The pipeline's merge step: `megadistill merge --config merge.yaml --out DIR`.
    import yaml

    # An expert job leaves its stage II checkpoints in <run_dir>/experts/<name>/distill/checkpoints.
    run_expert = tmp_path / "run" / "experts" / "e1"
    shutil.copytree(experts / "expert_1", run_expert / "distill" / "checkpoints")
    checkpoints = [experts / "expert_0", run_expert]
    step = {
        "experts": [
            {"name": f"e{k}", "weight": w, "checkpoint": str(checkpoints[k])}
            for k, w in enumerate([0.25, 0.75])
        ],
        "merge": {"dtype": "bfloat16"},
    }
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(step))
    out = tmp_path / "merged"
    assert main(["merge", "--config", str(tmp_path / "merge.yaml"), "--out", str(out)]) == 0
    info = json.loads((out / "merge.json").read_text())
    assert info["config"]["weights"] == [0.25, 0.75] and info["config"]["dtype"] == "bfloat16"
    assert info["experts"][1]["path"] == str(run_expert / "distill" / "checkpoints" / TAG)
    assert main(["merge", str(experts / "expert_0"), "--out", str(out)]) == 2  # exists already
    universal = to_universal(experts / "expert_0", tmp_path / "universal")
    assert (universal / "zero" / "lm_head.weight" / "fp32.pt").is_file()
    assert (universal / "megadistill.json").is_file()


def test_a_half_pruned_tag_is_listed_as_incomplete(tmp_path: Path) -> None:
    """A prune killed mid-rmtree leaves a tag without its model states: inspect lists it."""
    ckpt = tmp_path / "checkpoints"
    half = ckpt / "step_00000001"
    half.mkdir(parents=True)
    (half / "megadistill.json").write_text(json.dumps({"step": 1}))
    (half / "rank_state_00000.pt").write_bytes(b"left over")
    (ckpt / "latest").write_text("step_00000002")
    (tag,) = inspect_checkpoint(ckpt)["tags"]
    assert tag["tag"] == "step_00000001" and tag["step"] == 1
    assert tag["integrity"].startswith("incomplete (no model states"), tag
    assert "error" in tag
    merge = MergeConfig(experts=[str(ckpt)], out=str(tmp_path))  # an existing output folder
    with pytest.raises(CheckpointError, match="remove it or pass --overwrite"):
        merge_experts(merge)
