"""Offline teacher targets: written per rank, read back exactly, mismatches and corruption refused.

The student is the real hybrid (``convert`` of a tiny Llama); the teacher is that tiny Llama.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megadistill.data import DataConfig, SourceConfig, build_loader
from megadistill.data.masks import document_causal_mask
from megadistill.engine.launch import run_distributed
from megadistill.stages.losses import distill_loss, teacher_topk
from megadistill.stages.teacher_targets import TargetsError, TeacherTargets, write_teacher_targets

K = 8
WORDS = "the quick brown fox jumps over a lazy dog while seven cats sleep".split()


def _setup(root: Path) -> tuple[DataConfig, object]:
    """Byte tokenizer and a small two-source data config under ``root`` (idempotent)."""
    from megadistill.assets import byte_tokenizer

    tok = byte_tokenizer(root / "tok")
    rng = np.random.default_rng(0)
    docs = [" ".join(rng.choice(WORDS, rng.integers(3, 12))) for _ in range(16)]
    (root / "a.txt").write_text("\n\n".join(docs[:10]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[10:]))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(root / "a.txt")), SourceConfig(path=str(root / "b.jsonl"))],
        seq_len=16,
        seed=1,
        cache_dir=str(root / "cache"),
    )
    return cfg, tok


def _teacher():
    from megadistill.teachers.tiny import tiny_teacher

    return tiny_teacher("llama", seed=0)


def _teacher_fn(teacher, full_logits: bool = False):
    def forward(batch: dict[str, torch.Tensor]):
        pos = batch["position_ids"]
        mask = document_causal_mask(pos)  # the teacher sees one document at a time
        out = teacher.model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=pos)
        hidden = out.last_hidden_state
        if full_logits:
            return teacher.lm_head(hidden)
        return teacher_topk(hidden, teacher.lm_head.weight, K, chunk_size=7)

    return forward


def _write(
    root: Path, out: Path, rank: int | None, world: int, fp: str, dtype: str = "float32"
) -> Path:
    cfg, tok = _setup(root)
    loader = build_loader(cfg, tok, rank, world, micro_batch=4, shuffle=False, drop_last=False)
    return write_teacher_targets(
        _teacher_fn(_teacher()), loader, out, K, teacher_fingerprint=fp, dtype=dtype
    )


@pytest.fixture(scope="module")
def teacher_fp() -> str:
    from megadistill.teachers.conversion import fingerprint

    return fingerprint(_teacher())


def run_write_two_ranks(root: str, out: str, fp: str) -> None:
    """Rank body of the 2-rank test (gloo process group, no DeepSpeed needed)."""
    torch.distributed.init_process_group("gloo")
    _write(Path(root), Path(out), None, 2, fp)
    assert (Path(out) / "checksums.json").is_file()  # in place on every rank on return


def test_two_ranks_union_equals_one_rank(tmp_path, teacher_fp):
    one = _write(tmp_path, tmp_path / "one", 0, 1, teacher_fp)
    run_distributed(
        run_write_two_ranks, 2, str(tmp_path), str(tmp_path / "two"), teacher_fp, timeout_s=300
    )
    a, b = TeacherTargets(one), TeacherTargets(tmp_path / "two")
    index = json.loads((tmp_path / "two" / "index.json").read_text())
    assert index["world_size"] == 2 and index["num_missing"] == 0
    assert [p.name for p in sorted((tmp_path / "two").glob("*.logprobs.npy"))] == [
        "targets-rank00000-of-00002.logprobs.npy",
        "targets-rank00001-of-00002.logprobs.npy",
    ]
    assert len(a) == len(b) and len(a) > 8
    assert set(b.sample_map[:, 0].tolist()) == {0, 1}  # both ranks hold samples
    ids = torch.arange(len(a))
    (lp_a, ids_a), (lp_b, ids_b) = a.get(ids), b.get(ids)
    assert torch.equal(ids_a, ids_b)
    # ranks run 1 thread and other batch compositions: equal up to float rounding
    torch.testing.assert_close(lp_a, lp_b, rtol=1e-5, atol=1e-5)


def test_online_and_offline_give_the_same_loss(tmp_path, teacher_fp):
    from megadistill.teachers import convert

    cfg, tok = _setup(tmp_path)
    teacher = _teacher()
    student, _ = convert(teacher, seed=0)
    paths = {
        "float32": _write(tmp_path, tmp_path / "fp32", 0, 1, teacher_fp),
        "bfloat16": _write(tmp_path, tmp_path / "bf16", 0, 1, teacher_fp, dtype="bfloat16"),
    }
    loader = build_loader(cfg, tok, 0, 1, micro_batch=2, grad_accum=1)  # shuffled training order
    readers = {
        d: TeacherTargets(p, k=K, seq_len=16, data_fingerprint=loader.fingerprint)
        for d, p in paths.items()
    }
    online_fn, logits_fn = _teacher_fn(teacher), _teacher_fn(teacher, full_logits=True)
    for step, batch in enumerate(loader):
        if step == 3:
            break
        hidden = student.model(batch["input_ids"], position_ids=batch["position_ids"])
        w = student.lm_head.weight

        def loss(t_lp, t_ids, hidden=hidden, w=w, batch=batch):
            head = student.lm_head
            return distill_loss(hidden, head, batch["labels"], t_lp, t_ids, chunk_size=5).loss

        with torch.no_grad():
            online = loss(*online_fn(batch))
            from_logits = loss(*teacher_topk(*_full_to_pair(logits_fn(batch)), K))
        offline = loss(*readers["float32"].get(batch["sample_ids"]))
        offline_bf16 = loss(*readers["bfloat16"].get(batch["sample_ids"]))
        torch.testing.assert_close(offline.detach(), online, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(from_logits, online, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(offline_bf16.detach(), online, rtol=2e-3, atol=2e-3)
        assert online > 0
        # gradients flow to the student from the offline targets
        assert torch.autograd.grad(offline, w)[0].abs().sum() > 0


def _full_to_pair(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Full logits as (hidden, weight) = (logits, identity) so teacher_topk reuses its path."""
    return logits, torch.eye(logits.shape[-1])


def test_mismatch_and_corruption_are_refused(tmp_path, teacher_fp):
    path = _write(tmp_path, tmp_path / "t", 0, 1, teacher_fp, dtype="float16")
    good = TeacherTargets(path, k=K, seq_len=16, teacher_fingerprint=teacher_fp)
    assert good.spec.dtype == "float16" and good.get([-1])[0].abs().sum() == 0
    for kwargs, field in (
        ({"k": K + 1}, "k=8"),
        ({"seq_len": 32}, "seq_len=16"),
        ({"teacher_fingerprint": "f" * 64}, "teacher_fingerprint="),
        ({"data_fingerprint": "d" * 64}, "data_fingerprint="),
    ):
        with pytest.raises(TargetsError, match=f"were written with {field}"):
            TeacherTargets(path, **kwargs)
    with pytest.raises(TargetsError, match="already exist"):
        _write(tmp_path, path, 0, 1, teacher_fp)
    with pytest.raises(TargetsError, match="sample 100000 has no teacher targets"):
        good.get([0, 100000])
    shard = path / "targets-rank00000-of-00001.ids.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(TargetsError, match="ids.npy is corrupt .* write the teacher targets again"):
        TeacherTargets(path)
    (path / "checksums.json").unlink()
    with pytest.raises(TargetsError, match="no checksums.json"):
        TeacherTargets(path)
