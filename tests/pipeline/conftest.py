"""Fixtures for the pipeline tests: a real local SLURM cluster and tiny recipes of real programs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from megadistill.pipeline import PipelineRecipe, recipe_from_dict
from tests.slurm_cluster import LocalSlurmCluster, local_slurm_cluster

JOBS = ["{python}", "-m", "tests.pipeline.jobs"]
TEXT = "/usr/share/common-licenses/GPL-3"  # real English prose, on every Debian machine


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[LocalSlurmCluster]:
    """munged + slurmctld + slurmd on localhost for the whole session (installed if missing)."""
    with local_slurm_cluster() as cluster:
        yield cluster


def dag_recipe(
    name: str, experts: list[str], fail: str | None = None, **extra: Any
) -> PipelineRecipe:
    """convert -> 2-rank all-reduce experts -> merge -> 2-rank final -> eval, into RUN_DIR/out."""
    fail_args = ["--fail", fail] if fail else []
    two_ranks = {"nodes": 1, "tasks_per_node": 2, "time": "00:05:00", "signal_before_s": 60}
    one_rank = {"nodes": 1, "tasks_per_node": 1, "time": "00:05:00", "signal_before_s": 60}
    data = {
        "name": name,
        "teacher": "tiny-llama",
        "experts": [{"name": e, "data": {"source": e}} for e in experts],
        "resources": {"expert": two_ranks, "merge": one_rank, "final": two_ranks, "eval": one_rank},
        "commands": {
            "convert": [[*JOBS, "convert", "{run_dir}/out", "{seed}"]],
            "expert": [[*JOBS, "expert", "{run_dir}/out", "{expert}", "{index}", *fail_args]],
            "merge": [[*JOBS, "merge", "{run_dir}/out", "{config}"]],
            "final": [[*JOBS, "final", "{run_dir}/out"]],
            "eval": [[*JOBS, "eval", "{run_dir}/out"]],
        },
        **extra,
    }
    return recipe_from_dict(data)


def preempt_recipe(name: str = "preempt", **expert_resources: Any) -> PipelineRecipe:
    """One 2-rank expert: a first command, then ``preemptible`` counting to 30 (its first attempt
    holds at step 3 until SIGUSR1/SIGTERM, then checkpoints and exits 143); other steps no-ops."""
    noop = [["/bin/true"]]
    # a first command that finishes before the preemption: the requeued job must not redo it
    stage1 = ["/bin/sh", "-c", "mkdir -p {run_dir}/out && echo $RANK >> {run_dir}/out/stage1.log"]
    # a time limit no test reaches by accident on a loaded machine (one test sets its own)
    resources = {"tasks_per_node": 2, "time": "02:00:00", "signal_before_s": 60, **expert_resources}
    return recipe_from_dict({
        "name": name, "teacher": "tiny-llama", "experts": [{"name": "long"}],
        "resources": {"expert": resources},
        "commands": {"expert": [stage1, [*JOBS, "preemptible", "{run_dir}/out", "30"]],
                     "convert": noop, "merge": noop, "final": noop, "eval": noop},
    })  # fmt: skip


def shell_recipe(name: str, script: str, **expert_resources: Any) -> PipelineRecipe:
    """One 2-rank expert running ``sh -c SCRIPT`` (placeholders allowed); other steps no-ops."""
    noop = [["/bin/true"]]
    # a time limit no test reaches by accident on a loaded machine (one test sets its own)
    resources = {"tasks_per_node": 2, "time": "02:00:00", "signal_before_s": 60, **expert_resources}
    return recipe_from_dict({
        "name": name, "teacher": "tiny-llama", "experts": [{"name": "sh"}],
        "resources": {"expert": resources},
        "commands": {"expert": [["/bin/sh", "-c", script]], "convert": noop, "merge": noop,
                     "final": noop, "eval": noop},
    })  # fmt: skip


def real_tiny_recipe(root: Path, align_steps: int = 2) -> PipelineRecipe:
    """The real stages on a tiny Llama teacher: convert, 2 experts x (2-rank ZeRO-3 align for
    ``align_steps`` + distill for 2 steps), merge, 2-rank final distill, eval on 4 tiny_mc items."""
    from megadistill.assets import byte_tokenizer
    from megadistill.teachers.tiny import tiny_teacher

    root.mkdir(parents=True, exist_ok=True)
    text = root / "gpl3.txt"
    text.write_text(Path(TEXT).read_text())
    tiny_teacher("llama", seed=0).save_pretrained(root / "teacher")
    byte_tokenizer(root / "teacher")
    stage = {
        "data": {"sources": [{"path": str(text)}], "seq_len": 64,
                 "cache_dir": str(root / "data-cache")},
        "engine": {"ds_config": "student_zero3", "global_batch_size": 4, "micro_batch_size": 2,
                   "param_persistence_threshold": 0, "precision": "fp32"},
        "optim": {"lr": 1e-3},
        "trainer": {"max_steps": 2, "log_every": 1},
        "logging": {"wandb_mode": "disabled", "progress_bar": False},
        "distill": {"top_k": 16, "chunk_size": 32},
        "timeout_s": 300,
    }  # fmt: skip
    one = {"time": "00:10:00", "signal_before_s": 60}
    two = {**one, "tasks_per_node": 2}
    align = {**stage, "optim": {"lr": 1e-2}, "trainer": {"max_steps": align_steps, "log_every": 1}}
    return recipe_from_dict({
        "name": "tiny-real", "teacher": str(root / "teacher"), "seed": 0,
        "hybrid": {"window": 16, "num_sinks": 2, "chunk_size": 16},
        "experts": [{"name": "a", "data": {"seed": 0}}, {"name": "b", "data": {"seed": 1}}],
        "align": align, "distill": stage, "final": stage,
        "eval": {"tasks": "tiny_mc", "limit": 4, "batch_size": 2, "max_length": 64,
                 "no_cache": True},
        "resources": {"convert": one, "expert": two, "merge": one, "final": two, "eval": one},
        "env": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"},
    })  # fmt: skip
