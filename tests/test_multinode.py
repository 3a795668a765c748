"""Multi-node launch and failure handling on one machine, through the real CLI.

- Two "nodes" (node ranks 0 and 1, one rank each, hosts ``localhost`` and ``127.0.0.1`` in a
  hostfile) started by the deepspeed launcher with ``--no_ssh`` train a real stage I run.
- A rank that dies (SIGKILL) or hangs (SIGSTOP) mid-run makes the other rank exit with a clear
  error naming it, within the configured collective timeout instead of hanging.

The SLURM entrypoint's multi-node path is covered by tests/pipeline.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megadistill.engine.launch import free_port
from tests.stages.stage_workers import make_models, overrides

TIMEOUT_S = 20  # the runs' collective timeout (timeout_s)
WAIT_S = 300  # limit of every subprocess wait in this file


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    env.update(WANDB_MODE="disabled", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def _stage_args(root: Path, name: str, steps: int, *extra: str) -> list[str]:
    args = [a for a in overrides(root, name, steps) if not a.startswith("data.cache_dir=")]
    return ["align", *args, f"data.cache_dir={root / name / 'data-cache'}", "optim.lr=1e-2", *extra]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.is_file() else "(no log)"


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("multinode")
    make_models(path)
    return path


def test_deepspeed_launcher_hostfile_two_nodes_train(root: Path) -> None:
    hostfile = root / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    procs, logs = [], []
    for node in (0, 1):
        cmd = [
            sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile),
            "--no_ssh", "--node_rank", str(node), "--master_addr", "127.0.0.1",
            "--master_port", port, "--no_local_rank", "--module", "megadistill.cli",
            *_stage_args(root, "two-nodes", 2),
        ]  # fmt: skip
        logs.append(root / f"node{node}.log")
        with open(logs[-1], "w") as out:
            procs.append(subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(WAIT_S) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert codes == [0, 0], "\n".join(_tail(f) for f in logs)
    for node, log in enumerate(logs):
        text = log.read_text()
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in text, _tail(log)
        assert "{'localhost': [0], '127.0.0.1': [1]}" in text, _tail(log)
    run = root / "two-nodes"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2], rows
    tag = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert json.loads((tag / "megadistill.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in tag.glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    assert (run / "final" / "config.json").is_file()


def _start_pair(root: Path, name: str) -> tuple[list[subprocess.Popen], list[Path]]:
    """Two ranks of a long align run (plain processes, torchrun-style environment)."""
    port = str(free_port())
    args = _stage_args(
        root, name, 10_000, f"timeout_s={TIMEOUT_S}", "export_final=false",
        "trainer.checkpoint_every=0",
    )  # fmt: skip
    procs, logs = [], []
    for rank in (0, 1):
        env = _env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
        )  # fmt: skip
        logs.append(root / f"{name}-rank{rank}.log")
        with open(logs[-1], "w") as out:
            cmd = [sys.executable, "-m", "megadistill.cli", *args]
            procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs, logs


def _wait_for_steps(root: Path, name: str, procs, logs, steps: int) -> None:
    metrics = root / name / "metrics.jsonl"
    deadline = time.monotonic() + WAIT_S
    while not (metrics.is_file() and metrics.read_text().count("\n") >= steps):
        assert all(p.poll() is None for p in procs), _tail(logs[0]) + _tail(logs[1])
        assert time.monotonic() < deadline, "the run never logged a step"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def failures(root: Path) -> dict[str, tuple[int | None, str]]:
    """Rank 1 killed (SIGKILL) in one run and frozen (SIGSTOP) in another, both mid-run; the
    runs go side by side. Returns rank 0's exit code and log per case."""
    cases = {"killed": signal.SIGKILL, "frozen": signal.SIGSTOP}
    started = {name: _start_pair(root, name) for name in cases}
    out: dict[str, tuple[int | None, str]] = {}
    try:
        for name, sig in cases.items():
            procs, logs = started[name]
            _wait_for_steps(root, name, procs, logs, steps=2)
            os.kill(procs[1].pid, sig)
        for name, (procs, logs) in started.items():
            try:
                # Exits within the timeout (+ the survivor's report window and teardown).
                code: int | None = procs[0].wait(TIMEOUT_S + 90)
            except subprocess.TimeoutExpired:
                code = None
            out[name] = (code, logs[0].read_text(errors="replace"))
    finally:
        for procs, _ in started.values():
            for p in procs:
                p.kill()
                p.wait(WAIT_S)
    return out


def test_dead_rank_makes_the_other_exit_with_a_clear_error(failures) -> None:
    code, log = failures["killed"]
    assert code is not None, "rank 0 hung after rank 1 died:\n" + log[-4000:]
    assert code != 0
    last = [x for x in log.splitlines() if x.startswith("megadistill align: error:")]
    assert last, log[-4000:]
    assert "rank 0 of 2" in last[-1] and "rank(s) [1] died or hung" in last[-1], last[-1]
    assert f"timeout_s={TIMEOUT_S}" in last[-1]


def test_hung_rank_times_out_with_a_clear_error(failures) -> None:
    code, log = failures["frozen"]
    assert code is not None, "rank 0 hung although timeout_s is finite:\n" + log[-4000:]
    assert code != 0
    last = [x for x in log.splitlines() if x.startswith("megadistill align: error:")]
    assert last, log[-4000:]
    assert "rank(s) [1] died or hung" in last[-1], last[-1]
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in last[-1], last[-1]
