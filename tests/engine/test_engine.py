"""ZeRO-3 engines (hybrid student, Llama teacher), checkpoints, preemption, Trainer on 2 gloo ranks.

Two process groups run everything (tests/engine/workers.py); the tests below assert on what the
ranks wrote: partitioning, teacher logits, loss curves, exact resume, 1 vs 2 ranks, bad files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megadistill.engine.launch import run_distributed
from tests.engine import workers

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> tuple[str, str]:
    folder = tmp_path_factory.mktemp("models")
    return str(folder), workers.write_models(str(folder))


@pytest.fixture(scope="module")
def two_ranks(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    run_distributed(workers.run_two_rank_suite, 2, *model_dir, str(out), timeout_s=400)
    return out


@pytest.fixture(scope="module")
def one_rank(model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one_rank")
    run_distributed(workers.run_one_rank, 1, *model_dir, str(out), timeout_s=300)
    return out


def _losses(path: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _report(out: Path, rank: int) -> dict:
    return json.loads((out / f"report_rank{rank}.json").read_text())


def test_student_is_partitioned_across_ranks(two_ranks):
    reports = [_report(two_ranks, r) for r in (0, 1)]
    total = reports[0]["student"]["total"]
    assert all(r["student"]["total"] == total for r in reports)
    for r in reports:
        # persistence threshold 0: every parameter is split, each rank holds about half
        assert 0.45 * total <= r["student"]["local"] <= 0.55 * total
    assert reports[0]["student"]["accum"] == 2


def test_teachers_are_partitioned_frozen_and_offload_gives_same_logits(two_ranks, model_dir):
    from transformers import AutoModelForCausalLM

    batch = torch.stack([workers.IndexedBatches.sample(i) for i in range(3)])
    with torch.no_grad():
        teacher = AutoModelForCausalLM.from_pretrained(Path(model_dir[0]) / "teacher").eval()
        reference = teacher(input_ids=batch).logits
    for rank in (0, 1):
        report = json.loads((two_ranks / f"teachers_rank{rank}.json").read_text())
        for name, info in report.items():
            assert 0.45 * info["total"] <= info["local"] <= 0.55 * info["total"], name
            assert info["trainable"] == 0 and info["training"] is False
        assert report["teacher_zero3"]["offload_device"] == "none"
        assert report["teacher_zero3_offload_cpu"]["offload_device"].endswith("cpu")
        plain = torch.load(two_ranks / f"logits_teacher_zero3_rank{rank}.pt")
        offload = torch.load(two_ranks / f"logits_teacher_zero3_offload_cpu_rank{rank}.pt")
        torch.testing.assert_close(offload, plain, rtol=0, atol=0)
        torch.testing.assert_close(plain, reference, rtol=1e-5, atol=1e-5)


def test_loss_falls_and_frozen_parameters_stay(two_ranks, model_dir):
    from safetensors.torch import load_file

    losses = _losses(two_ranks / "full.jsonl")
    assert sorted(losses) == list(range(1, workers.MAX_STEPS + 1))
    assert losses[workers.MAX_STEPS] < 0.8 * losses[1]
    final = torch.load(two_ranks / "weights_full.pt")
    initial = {}
    for shard in sorted((Path(model_dir[0]) / "student").glob("*.safetensors")):
        initial.update(load_file(str(shard)))
    torch.testing.assert_close(final[workers.FROZEN], initial[workers.FROZEN], rtol=0, atol=0)
    moved = [n for n in final if n != workers.FROZEN and not torch.equal(final[n], initial[n])]
    assert len(moved) == len(final) - 1


def test_preempted_run_resumes_exactly(two_ranks):
    for rank in (0, 1):
        report = _report(two_ranks, rank)
        assert report["preempted"] == {"step": 5, "exit_code": 143, "preempted": True}
        assert report["resumed"] == {"step": workers.MAX_STEPS, "exit_code": 0}
    full, resumed = _losses(two_ranks / "full.jsonl"), _losses(two_ranks / "resumed.jsonl")
    assert resumed == full  # exact, fp32, every step
    a = torch.load(two_ranks / "weights_full.pt")
    b = torch.load(two_ranks / "weights_resumed.pt")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_checkpoint_layout_follows_the_contract(two_ranks, model_dir):
    from megadistill.engine.checkpoint import META_FILE as META
    from megadistill.engine.checkpoint import complete_tags, read_meta
    from megadistill.integrity import MANIFEST, verify_manifest

    ckpt = two_ranks / "ckpt_full"
    assert complete_tags(ckpt) == ["step_00000006", "step_00000008"]  # keep_last=2
    assert (ckpt / "latest").read_text() == "step_00000008"
    assert not list(ckpt.glob(".*partial"))
    verify_manifest(ckpt / "step_00000008")
    meta = read_meta(ckpt / "step_00000008")
    assert meta["format"] == 1 and meta["step"] == 8 and meta["world_size"] == 2
    assert meta["fingerprint"] == model_dir[1] and meta["tag"] == "step_00000008"
    assert {"model_config", "config", "version", "git_revision", "tokenizer"} <= meta.keys()
    files = {p.name for p in (ckpt / "step_00000008").iterdir()}
    assert {"rank_state_00000.pt", "rank_state_00001.pt", META, MANIFEST} <= files
    for r in (0, 1):  # DeepSpeed's ZeRO-3 names: one model-states and one optim-states per rank
        assert {
            f"zero_pp_rank_{r}_mp_rank_00_{kind}_states.pt" for kind in ("model", "optim")
        } <= files


def test_corrupt_checkpoint_is_refused_and_earlier_one_survives(two_ranks):
    for rank in (0, 1):
        report = _report(two_ranks, rank)["corrupt"]
        assert report["newest"] == "step_00000008"
        assert report["error"] is not None, "resuming from a corrupt checkpoint must fail"
        assert "is corrupt" in report["error"] and "resume_tag=step_00000006" in report["error"]
        assert report["earlier_verified"] == "step_00000006"
        assert "started from weights" in _report(two_ranks, rank)["fingerprint_error"]


def test_one_rank_matches_two_ranks_at_same_effective_batch(two_ranks, one_rank):
    report = json.loads((one_rank / "report_one_rank.json").read_text())
    assert report["accum"] == 4 and report["step"] == workers.MAX_STEPS
    one, two = _losses(one_rank / "one_rank.jsonl"), _losses(two_ranks / "full.jsonl")
    assert one.keys() == two.keys()
    torch.testing.assert_close(
        torch.tensor([one[s] for s in sorted(one)]),
        torch.tensor([two[s] for s in sorted(two)]),
        rtol=1e-4,
        atol=1e-5,
    )
