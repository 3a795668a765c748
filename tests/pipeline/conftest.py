"""Fixtures for the pipeline tests: a real local SLURM cluster and tiny recipes of real programs."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from megadistill.pipeline import PipelineRecipe, recipe_from_dict
from tests.slurm_cluster import LocalSlurmCluster, local_slurm_cluster

JOBS = ["{python}", "-m", "tests.pipeline.jobs"]


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
