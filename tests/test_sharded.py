"""Sharded from the start: a teacher too big for one copy per rank is converted shard by shard
and built ZeRO-3-partitioned on 2 ranks, student and teacher, and no rank ever holds the model.

The budget: each rank may grow by at most 75% of the fp32 model while building it (a full copy
would be 100%; its own ZeRO-3 half is 50%, and deepspeed.zero.Init briefly creates each parameter
full-size before partitioning it: the largest, the 16000 x 1024 head, is 9% of the model).
"""

import json
import math

import pytest

from megadistill.engine.launch import run_distributed
from tests import sharded_workers as w

# Per rank, of the full model's bytes. A rank that ever held the whole model would grow by at
# least 1.0x; its own ZeRO-3 partition is 0.5x, and allocator slack under load adds up to ~0.3x.
BUDGET = 0.9


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    run_distributed(w.save_teacher, 1, str(root), timeout_s=300)
    run_distributed(w.convert_measured, 1, str(root), env=w.RANK_ENV, timeout_s=300)
    run_distributed(w.sharded_run, 2, str(root), env=w.RANK_ENV, timeout_s=600)
    model = json.loads((root / "model.json").read_text())
    ranks = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]
    conv = json.loads((root / "convert.json").read_text())
    for r in ranks:
        print(
            f"rank {r['rank']}: student build +{r['student_build'] / 2**20:.0f} MiB, engine "
            f"+{r['student_engine_rss'] / 2**20:.0f} MiB; teacher build "
            f"+{r['teacher_build'] / 2**20:.0f} MiB; model {model['bytes'] / 2**20:.0f} MiB"
        )
    print(f"conversion peak +{conv['peak_delta_bytes'] / 2**20:.0f} MiB")
    return root, model, ranks, conv


def test_teacher_is_sharded_on_disk_and_big(sharded):
    root, model, _, _ = sharded
    assert model["params"] > 170e6
    shards = sorted((root / "teacher").glob("model-*.safetensors"))
    assert len(shards) >= 8
    assert max(f.stat().st_size for f in shards) < model["bytes"] / 4


def test_streaming_conversion_peak_memory_is_far_below_the_model(sharded):
    _, model, _, conv = sharded
    assert conv["peak_delta_bytes"] < 0.25 * model["bytes"]


def test_no_rank_ever_holds_the_whole_model(sharded):
    _, model, ranks, _ = sharded
    for r in ranks:
        assert r["student_build"] < BUDGET * model["bytes"], r
        assert r["teacher_build"] < BUDGET * model["bytes"], r


def test_zero3_partitions_are_halves(sharded):
    _, model, ranks, _ = sharded
    for r in ranks:
        for key in ("student_partition", "teacher_partition"):
            total, local = r[key]
            assert total >= model["params"]
            assert local <= math.ceil(total / 2) + 2 * len(r["local_shards"]), (key, total, local)
        for name, numel, local in r["local_shards"]:
            assert local == math.ceil(numel / 2), name


def test_sharded_weights_are_the_files_and_student_equals_teacher(sharded):
    _, _, ranks, _ = sharded
    for r in ranks:
        assert r["student_weight_err"] == 0.0
        assert r["teacher_weight_err"] == 0.0
        # gate 'swa' + a window over the whole sequence: the converted student is the teacher.
        assert r["logits_max_diff"] < 1e-4 * max(1.0, r["logits_scale"]), r["logits_max_diff"]


# ----------------------------------------------------------------------------- activation checkpointing
SEQ_AC = 4096


def _saved_activation_bytes(model, ids, position_ids):
    """Loss, gradients, and the bytes of activations autograd keeps for backward (unique
    storages, parameters excluded): what activation checkpointing is meant to shrink."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, position_ids=position_ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, sum(seen.values())


def test_activation_checkpointing_same_gradients_less_activation_memory():
    """Stage configs' ``activation_checkpointing`` calls this same HF switch on the student."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPUs are shared: more threads only oversubscribe them
    try:
        _check_activation_checkpointing()
    finally:
        torch.set_num_threads(threads)


def _check_activation_checkpointing() -> None:
    import torch

    from megadistill.teachers import convert
    from megadistill.teachers.tiny import tiny_teacher

    torch.manual_seed(0)
    student, _ = convert(tiny_teacher("llama", max_position_embeddings=SEQ_AC), seed=0, window=512)
    student.train()
    ids = torch.randint(3, 256, (1, SEQ_AC))
    # two packed documents: the second starts at 3000 (mLSTM reset, SWA masked across)
    pos = torch.cat([torch.arange(3000), torch.arange(SEQ_AC - 3000)])[None]
    loss0, grads0, saved0 = _saved_activation_bytes(student, ids, pos)
    student.activation_checkpointing_enable({"use_reentrant": False})
    assert student.model.gradient_checkpointing
    loss1, grads1, saved1 = _saved_activation_bytes(student, ids, pos)
    print(f"saved activations at {SEQ_AC} tokens: {saved0 / 2**20:.1f} MiB -> {saved1 / 2**20:.1f}")
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for name, g in grads0.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert saved1 < saved0 / 4
