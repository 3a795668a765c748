"""Rank sharding: same global batches for any world size; exact resume; full coverage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megadistill.data import (
    PAD_SAMPLE,
    DataConfig,
    DataError,
    ShardedSampler,
    SourceConfig,
    build_loader,
)


@pytest.fixture()
def cfg(corpus, tmp_path) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(path=str(corpus["txt"])), SourceConfig(path=str(corpus["parquet"]))],
        seq_len=8,
        seed=5,
        cache_dir=str(tmp_path / "cache"),
        num_tokens=900,
    )


def _steps(loaders: list, grad_accum: int) -> list[torch.Tensor]:
    """Per optimizer step, all ranks' micro-batches stacked in (micro, rank) order."""
    iters = [iter(ld) for ld in loaders]
    steps = []
    for _ in range(len(loaders[0]) // grad_accum):
        micro = [next(it) for _ in range(grad_accum) for it in iters]
        steps.append(torch.cat([b["input_ids"] for b in micro]))
    return steps


def test_global_batches_identical_for_one_and_two_ranks(cfg, byte_tok):
    one = build_loader(cfg, byte_tok, rank=0, world_size=1, micro_batch=2, grad_accum=2)
    two = [
        build_loader(cfg, byte_tok, rank=r, world_size=2, micro_batch=2, grad_accum=1)
        for r in (0, 1)
    ]
    assert len(one) == 2 * len(two[0])
    for epoch in range(2):  # the second epoch is reshuffled identically on both layouts
        a, b = _steps([one], 2), _steps(two, 1)
        assert len(a) == len(b) == len(one.dataset) // 4
        for x, y in zip(a, b):
            # same samples, and even grouped into the same micro-batches (so per-micro-batch
            # token-mean losses average to the same step loss)
            assert torch.equal(x, y)
        assert one.sampler.epoch == epoch + 1
    ids = [b["sample_ids"] for b in build_loader(cfg, byte_tok, 0, 1, micro_batch=4)]
    assert len(set(torch.cat(ids).tolist())) == 4 * len(ids)  # no sample twice in an epoch


def test_resume_mid_epoch_gives_exact_continuation(cfg, byte_tok):
    ref = build_loader(cfg, byte_tok, rank=1, world_size=2, micro_batch=2, grad_accum=3)
    full = [b for b in ref] + [b for b in ref]  # two epochs
    run = build_loader(cfg, byte_tok, rank=1, world_size=2, micro_batch=2, grad_accum=3)
    it = iter(run)
    for _ in range(len(run) + 4):  # into the second epoch, mid optimizer step
        if next(it, None) is None:  # end of the first epoch: start the next one
            it = iter(run)
            next(it)
    state = run.state_dict()
    resumed = build_loader(cfg, byte_tok, rank=1, world_size=2, micro_batch=2, grad_accum=3)
    resumed.load_state_dict(state)
    rest = list(resumed)
    expected = full[len(run) + 4 :]
    assert len(rest) == len(expected) > 0
    for x, y in zip(rest, expected):
        for key in ("input_ids", "labels", "position_ids", "sample_ids"):
            assert torch.equal(x[key], y[key])
    # mid-step state cannot move to another layout, a step boundary can
    other = build_loader(cfg, byte_tok, rank=0, world_size=1, micro_batch=2, grad_accum=6)
    with pytest.raises(DataError, match="inside an optimizer step"):
        other.load_state_dict(state)
    state["sampler"]["micro"] = 0
    other.load_state_dict(state)
    bad = build_loader(cfg, byte_tok, rank=0, world_size=1, micro_batch=2, grad_accum=3)
    with pytest.raises(DataError, match="global_batch=12 but this loader has 6"):
        bad.load_state_dict(state)
    state["data_fingerprint"] = "0" * 64
    with pytest.raises(DataError, match="saved on data 000000000000"):
        other.load_state_dict(state)


def test_no_drop_last_covers_every_sample_once_with_padding():
    seen = []
    for rank in range(3):
        s = ShardedSampler(
            10, rank=rank, world_size=3, micro_batch=2, shuffle=False, drop_last=False
        )
        assert len(s) == 2
        seen += np.concatenate(list(s)).tolist()
    assert sorted(i for i in seen if i != PAD_SAMPLE) == list(range(10))
    assert seen.count(PAD_SAMPLE) == 2
    with pytest.raises(DataError, match="do not fill one global batch"):
        ShardedSampler(5, rank=0, world_size=2, micro_batch=3)
