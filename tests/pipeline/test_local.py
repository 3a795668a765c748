"""`megadistill pipeline run RECIPE --local`: the same DAG on one machine, without SLURM."""

from __future__ import annotations

import json

import pytest
import yaml

from megadistill.cli import main as cli_main
from megadistill.config import to_dict
from megadistill.pipeline.dag import PipelineError
from megadistill.pipeline.local import run_local
from tests.pipeline.conftest import dag_recipe


def test_local_run_executes_the_dag_in_order(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_CONF", raising=False)  # no cluster involved
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(to_dict(dag_recipe("local", ["math", "code"]))))
    run_dir = tmp_path / "run"
    assert (
        cli_main(["pipeline", "run", str(recipe_path), "--local", "--run-dir", str(run_dir)]) == 0
    )

    out = {p.stem: json.loads(p.read_text()) for p in (run_dir / "out").glob("*.json")}
    assert (out["math"]["value"], out["code"]["value"]) == (3.0, 6.0)
    assert out["math"]["world_size"] == out["final"]["world_size"] == 2  # 2 local ranks each
    assert out["math"]["job"] is None  # not a SLURM job
    assert out["merged"]["value"] == 4.5 and out["eval"]["value"] == 9.0
    assert out["math"]["start"] >= out["student"]["end"]
    assert out["code"]["start"] >= out["math"]["end"]  # experts one after the other locally
    assert out["merged"]["start"] >= out["code"]["end"]
    assert out["final"]["start"] >= out["merged"]["end"] >= out["merged"]["start"]
    assert out["eval"]["start"] >= out["final"]["end"]


def test_local_failure_stops_the_run(tmp_path):
    recipe = dag_recipe("local-fail", ["bad", "never"], fail="bad")
    with pytest.raises(PipelineError, match=r"expert\[0\] exited with 3 .*local_0.out"):
        run_local(recipe, tmp_path / "run")
    assert "failing on purpose" in (tmp_path / "run/logs/expert/local_0.out").read_text()
    assert not (tmp_path / "run" / "out" / "never.json").exists()  # later tasks never ran
    assert not (tmp_path / "run" / "out" / "merged.json").exists()


def test_rerunning_the_same_recipe_resumes_and_a_different_one_is_refused(tmp_path):
    run = tmp_path / "run"
    recipe = dag_recipe("resume", ["math", "bad"], fail="bad")
    with pytest.raises(PipelineError, match=r"expert\[1\] exited with 3"):
        run_local(recipe, run)
    before = {n: (run / "out" / f"{n}.json").read_text() for n in ("student", "math")}

    (run / "out" / "bad.fixed").touch()  # the user fixes the cause and runs the same command
    results = run_local(recipe, run)
    assert [(r.step, r.index) for r in results] == [("expert", 1), ("merge", 0), ("final", 0),
                                                    ("eval", 0)]  # fmt: skip
    # Finished tasks did not run again (their outputs hold the first run's timestamps).
    assert {n: (run / "out" / f"{n}.json").read_text() for n in before} == before
    assert json.loads((run / "out" / "eval.json").read_text())["value"] == 9.0
    assert run_local(recipe, run) == []  # everything finished: nothing runs

    plan = (run / "plan.json").read_text()
    with pytest.raises(
        PipelineError, match=r"different recipe \(plan.json, recipe.yaml.*new --run-dir"
    ):
        run_local(dag_recipe("resume", ["math", "bad"], fail="bad", seed=1), run)
    assert (run / "plan.json").read_text() == plan  # nothing was changed
