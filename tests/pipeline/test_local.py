"""`megadistill pipeline run RECIPE --local`: the same DAG on one machine, without SLURM."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from megadistill.cli import main as cli_main
from megadistill.config import to_dict
from megadistill.pipeline import recipe_from_dict
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


def test_prepare_step_builds_every_stage_cache_before_the_experts(tmp_path, monkeypatch):
    """The real `prepare-data` runs as the DAG's prepare array (one task per expert, one for the
    final stage); the expert and final jobs then find their caches built."""
    from megadistill.assets import byte_tokenizer
    from tests.pipeline.conftest import JOBS, TEXT

    monkeypatch.delenv("SLURM_CONF", raising=False)
    tok = tmp_path / "tok"
    byte_tokenizer(tok)
    text = Path(TEXT).read_text()
    for i, part in enumerate(("a", "b", "c")):
        (tmp_path / f"{part}.txt").write_text(text[i * 8000 : (i + 1) * 8000])
    cache = str(tmp_path / "cache")
    noop = [["/bin/true"]]
    hit = [*JOBS, "cache-hit", "{run_dir}/out", "{expert}", "{run_dir}/student"]
    configs = "{run_dir}/configs/expert_{expert}"
    recipe = recipe_from_dict({
        "name": "prep", "teacher": str(tok),
        "experts": [{"name": n, "data": {"sources": [{"path": str(tmp_path / f"{n}.txt")}]}}
                    for n in ("a", "b")],
        "align": {"data": {"seq_len": 32, "cache_dir": cache, "num_proc": 1}},
        "distill": {"data": {"seq_len": 64, "num_tokens": 2000, "cache_dir": cache,
                             "num_proc": 1}},
        "final": {"data": {"sources": [{"path": str(tmp_path / "c.txt")}], "seq_len": 32,
                           "cache_dir": cache}},
        "commands": {
            "convert": [["cp", "-r", str(tok), "{run_dir}/student"]],
            "expert": [[*hit, f"{configs}.align.yaml", f"{configs}.distill.yaml"]],
            "merge": noop,
            "final": [[*hit[:5], "final", "{run_dir}/student", "{run_dir}/configs/final.yaml"]],
            "eval": noop,
        },
    })  # fmt: skip
    run = tmp_path / "run"
    results = run_local(recipe, run)
    assert [(r.step, r.index) for r in results][:5] == [
        ("convert", 0), ("prepare", 0), ("prepare", 1), ("prepare", 2), ("expert", 0),
    ]  # fmt: skip
    for name, stages in (("a", 2), ("b", 2), ("final", 1)):
        record = json.loads((run / "out" / f"{name}.json").read_text())
        built = list(record["built"].values())
        assert len(built) == stages and all(t is not None for t in built), record
        assert max(built) <= record["start"]  # built by the prepare step, before this job
    assert len(list(Path(cache).glob("*/checksums.json"))) == 5
    log = (run / "logs" / "prepare" / "local_2.out").read_text()
    summary = json.loads(log[log.index("{") : log.rindex("}") + 1])
    assert summary["num_proc"] == len(os.sched_getaffinity(0))  # one tokenizer per CPU
