"""Single-process checks: schedules, preemption flag, checkpoint bookkeeping, callbacks, configs."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch

from megadistill.callbacks import JsonlLogger, ThroughputMonitor, WandbLogger
from megadistill.config import ConfigError, from_dict
from megadistill.engine.checkpoint import (
    CheckpointMeta,
    check_compatible,
    complete_tags,
    latest_tag,
    prune_checkpoints,
    rng_state,
    set_rng_state,
    tag_for_step,
)
from megadistill.engine.optim import (
    OptimizerConfig,
    SchedulerConfig,
    build_optimizer,
    build_scheduler,
)
from megadistill.engine.signals import EXIT_PREEMPTED, PreemptionHandler
from megadistill.errors import CheckpointError
from megadistill.trainer import TrainerConfig, TrainResult


def _lrs(cfg: SchedulerConfig, steps: int, peak: float = 1e-2) -> list[float]:
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, OptimizerConfig(lr=peak))
    sched = build_scheduler(opt, cfg, peak)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_warms_up_linearly_then_decays_to_the_floor():
    lrs = _lrs(
        SchedulerConfig(name="cosine", num_warmup_steps=4, num_decay_steps=10, min_lr=1e-5), 20
    )
    assert lrs[:4] == pytest.approx([2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert lrs[4] == pytest.approx(1e-2)
    assert lrs[9] == pytest.approx(1e-5 + (1e-2 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[14:] == pytest.approx([1e-5] * 6)


def test_constant_schedule_and_scheduler_state_round_trips():
    assert _lrs(SchedulerConfig(num_warmup_steps=2), 5) == pytest.approx([5e-3] + [1e-2] * 4)
    model = torch.nn.Linear(2, 2)
    cfg = SchedulerConfig(name="cosine", num_warmup_steps=1, num_decay_steps=5)
    opt = build_optimizer(model, OptimizerConfig(lr=1.0))
    sched = build_scheduler(opt, cfg, 1.0)
    for _ in range(3):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = build_optimizer(model, OptimizerConfig(lr=1.0))
    sched2 = build_scheduler(opt2, cfg, 1.0)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == 3


def test_only_trainable_parameters_are_optimised_and_matrices_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
    model[0].weight.requires_grad_(False)
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, weight_decay=0.1))
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == 3 and all(p is not model[0].weight for p in params)
    assert all(g["weight_decay"] == 0.0 for g in opt.param_groups)  # no matrix left to decay
    with pytest.raises(ConfigError, match="no parameter with requires_grad"):
        build_optimizer(torch.nn.Linear(1, 1).requires_grad_(False), OptimizerConfig(lr=1e-3))


def test_optimizer_and_scheduler_configs_validate():
    with pytest.raises(ConfigError, match="num_decay_steps"):
        SchedulerConfig(name="cosine")
    with pytest.raises(ConfigError, match="optim.lr"):
        OptimizerConfig(lr=0.0)
    with pytest.raises(ConfigError, match="'linear' is not one of"):
        from_dict(SchedulerConfig, {"name": "linear"})
    with pytest.raises(ConfigError, match="checkpoint_dir"):
        TrainerConfig(max_steps=10, resume=True)


def test_signal_sets_the_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionHandler() as handler:
        assert not handler.should_stop()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop() and handler.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is before
    assert TrainResult(step=3, preempted=True, last_checkpoint=None).exit_code == EXIT_PREEMPTED
    assert TrainResult(step=3, preempted=False, last_checkpoint=None).exit_code == 0


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(1))
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1)) == first


def _fake_tag(root: Path, step: int, complete: bool = True) -> None:
    folder = root / tag_for_step(step)
    folder.mkdir(parents=True)
    if complete:
        (folder / "checksums.json").write_text("{}")


def test_prune_keeps_the_newest_complete_tags_and_latest(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_tag(tmp_path, step)
    _fake_tag(tmp_path, 10, complete=False)
    (tmp_path / ".step_00000012.partial").mkdir()
    (tmp_path / "latest").write_text("step_00000004")
    (tmp_path / ".latest.x1y2z3.tmp").write_text("step_000")  # a write of `latest` cut short
    removed = prune_checkpoints(tmp_path, keep_last=2)
    assert removed == ["step_00000002"]  # latest (step 4) is never removed
    assert complete_tags(tmp_path) == ["step_00000004", "step_00000006", "step_00000008"]
    assert latest_tag(tmp_path) == "step_00000004"
    assert not (tmp_path / ".step_00000012.partial").exists()
    assert not (tmp_path / ".latest.x1y2z3.tmp").exists()


def test_incompatible_checkpoints_are_refused_with_the_fix(tmp_path):
    meta = CheckpointMeta(
        fingerprint="a" * 64,
        model_config={"hidden_size": 64, "id2label": {0: "x"}, "transformers_version": "5"},
        config={"data": {"global_batch_size": 8}},
        config_keys_must_match=("data.global_batch_size",),
    )
    saved = {
        "format": 1,
        "fingerprint": "a" * 64,
        "world_size": 1,
        "model_config": {"hidden_size": 64, "id2label": {"0": "x"}, "transformers_version": "4"},
        "config": {"data": {"global_batch_size": 8}},
    }
    check_compatible(saved, meta, tmp_path)  # JSON-normalised, volatile keys ignored
    bad = [
        ({"fingerprint": "b" * 64}, "started from weights bbbbbbbbbbbb"),
        ({"world_size": 2}, "resume with 2 ranks"),
        ({"model_config": {"hidden_size": 128}}, "hidden_size"),
        ({"config": {"data": {"global_batch_size": 16}}}, "set data.global_batch_size=16"),
        ({"format": 0}, "format 0"),
    ]
    for change, message in bad:
        with pytest.raises(CheckpointError, match=message):
            check_compatible({**saved, **change}, meta, tmp_path)


def test_jsonl_and_throughput_callbacks(tmp_path):
    class _T:
        step = 0

    monitor, jsonl = ThroughputMonitor(), JsonlLogger(tmp_path / "m" / "metrics.jsonl")
    monitor.on_train_start(_T())
    jsonl.on_train_start(_T())
    for step in (1, 2):
        metrics = {"loss": 1.0 / step, "tokens": 100.0 * step}
        monitor.on_log(_T(), step, metrics)
        jsonl.on_log(_T(), step, metrics)
    rows = [json.loads(x) for x in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 0.5
    assert rows[1]["tokens_per_s"] > 0 and "mem_rss_gib" in rows[1]


def test_wandb_offline_writes_a_run_and_disabled_does_nothing(tmp_path):
    class _T:
        step = 0

    result = TrainResult(step=1, preempted=False, last_checkpoint=None)
    off = WandbLogger("md-test", mode="disabled", directory=tmp_path / "none")
    off.on_train_start(_T())
    off.on_log(_T(), 1, {"loss": 1.0})
    off.on_train_end(_T(), result)
    assert not (tmp_path / "none").exists()
    with pytest.raises(ValueError, match="not one of"):
        WandbLogger("md-test", mode="cloud")  # type: ignore[arg-type]
    logger = WandbLogger("md-test", mode="offline", directory=tmp_path / "wb")
    logger.on_train_start(_T())
    logger.on_log(_T(), 1, {"loss": 1.0})
    logger.on_train_end(_T(), result)
    assert list((tmp_path / "wb" / "wandb").glob("offline-run-*/run-*.wandb"))


def test_log_records_go_to_the_current_stderr(monkeypatch):
    # The CLI's handler once kept the stderr of its set-up: after pytest closed that capture, a
    # later warning (torch's spawn) printed "--- Logging error --- I/O operation on closed file".
    import io
    import logging
    import sys

    from megadistill.logs import setup_logging

    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    at_setup = io.StringIO()
    monkeypatch.setattr(sys, "stderr", at_setup)
    setup_logging()
    at_setup.close()
    now = io.StringIO()
    monkeypatch.setattr(sys, "stderr", now)
    logging.getLogger("megadistill.test").warning("still printed")
    assert "WARNING megadistill.test: still printed" in now.getvalue()
    assert "Logging error" not in now.getvalue()
