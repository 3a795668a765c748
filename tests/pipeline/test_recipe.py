"""Recipe validation, the DAG's commands and the sbatch command lines (no cluster needed)."""

from __future__ import annotations

import json
import re
import sys

import pytest
import yaml

from megadistill.config import ConfigError, missing_local_path
from megadistill.pipeline import build_dag, load_recipe, recipe_from_dict, slurm, write_plan
from megadistill.pipeline.dag import check_inputs
from megadistill.pipeline.local import run_local
from megadistill.pipeline.slurm import _task_indices, sbatch_args
from megadistill.pipeline.step import REQUEUE_EXIT_CODE, step_task_commands


def _recipe(**kw):
    experts = [{"name": "a", "data": {"source": "a"}}, {"name": "b", "data": {"source": "b"}}]
    return {"name": "r", "teacher": "t", "experts": experts, **kw}


def test_weights_are_uniform_by_default_and_explicit_weights_are_kept():
    assert recipe_from_dict(_recipe()).weights == [0.5, 0.5]
    experts = [{"name": "a", "weight": 0.25}, {"name": "b", "weight": 0.75}]
    assert recipe_from_dict(_recipe(experts=experts)).weights == [0.25, 0.75]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"experts": [{"name": "a"}, {"name": "a"}]}, "'a' is used twice"),
        ({"experts": []}, "at least one expert"),
        ({"experts": [{"name": "a", "weight": 0.5}, {"name": "b"}]}, "'b' has no weight"),
        ({"experts": [{"name": "a", "weight": 0.6}, {"name": "b", "weight": 0.6}]}, "sum to 1.2"),
        ({"experts": [{"name": "a", "weight": -0.5}, {"name": "b", "weight": 1.5}]}, ">= 0"),
        ({"experts": [{"name": "a/b"}]}, "name 'a/b'"),
        ({"resources": {"expert": {"time": "2 hours"}}}, "'HH:MM:SS'"),
        ({"resources": {"expert": {"time": "00:05:00", "signal_before_s": 300}}}, "below"),
        ({"resources": {"merge": {"nodes": 0}}}, "resources.nodes = 0"),
        ({"resources": {"merge": {"mem": "lots"}}}, "resources.mem"),
        ({"resources": {"gpu": {}}}, "unknown config key 'resources.gpu'"),
        ({"commands": {"merge": [["x", "{nope}"]]}}, "placeholder {nope}"),
        ({"commands": {"eval": [[]]}}, "must not be empty"),
        ({"seed": "one"}, "'seed' must be int"),
        ({"hybrid": {"windw": 8}}, "unknown config key 'hybrid.windw' for HybridSettings"),
        ({"hybrid": {"gate_mode": "soft"}}, "'hybrid.gate_mode' = 'soft' is not one of"),
        ({"hybrid": {"fgate_bias": [5, 1]}}, "fgate_bias must be [low, high]"),
    ],
)
def test_invalid_recipes_name_the_field(changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        recipe_from_dict(_recipe(**changes))


def test_yaml_recipe_with_overrides(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(resources={"expert": {"gpus_per_node": 8}})))
    recipe = load_recipe(path, ["seed=7", "resources.expert.nodes=4"])
    assert recipe.seed == 7 and recipe.resources.expert.num_ranks == 32
    with pytest.raises(ConfigError, match="unknown config key 'sed'"):
        load_recipe(path, ["sed=1"])


def test_the_recipes_hybrid_settings_reach_the_converted_students_config():
    # One typed object from the recipe, through `megadistill convert key=value ...` (the plan's
    # command), to the student's config.
    from megadistill.model import HybridConfig
    from megadistill.pipeline.dag import default_commands
    from megadistill.teachers.conversion import hybrid_overrides
    from megadistill.teachers.tiny import tiny_teacher_config

    hybrid = {"window": 8, "mix": "shared_norm", "fgate_bias": [2, 4], "softmax_layers": [1]}
    recipe = recipe_from_dict(_recipe(hybrid=hybrid))
    argv = default_commands(recipe, "convert")[0]
    given = hybrid_overrides([a for a in argv if "=" in a and "{" not in a])
    cfg = HybridConfig.from_teacher(tiny_teacher_config("llama"), **given)
    assert cfg.hybrid_settings == recipe.hybrid.__class__(**{**recipe.hybrid.to_dict(),
                                                            "feature_dim": cfg.head_dim})  # fmt: skip
    assert recipe.hybrid.fgate_bias == [2.0, 4.0] and cfg.softmax_layers == [1]


_STAGE = {
    "data": {"seq_len": 64},
    "engine": {"ds_config": "student_zero3", "global_batch_size": 2, "micro_batch_size": 1},
    "optim": {"lr": 1e-3},
    "trainer": {"max_steps": 2},
}


def _stage(**changes):
    return {**_STAGE, **changes}


def _full_recipe(**kw):
    experts = [{"name": n, "data": {"sources": [{"path": f"{n}.txt"}]}} for n in ("a", "b")]
    stages = {"align": _stage(optim={"lr": 0.01}), "distill": _stage(),
              "final": _stage(data={"seq_len": 64, "sources": [{"path": "f.txt"}]})}  # fmt: skip
    return _recipe(**{**stages, "experts": experts, **kw})


def test_dag_default_commands_and_plan(tmp_path):
    recipe = recipe_from_dict(
        _full_recipe(hybrid={"window": 16}, seed=3,
                     eval={"tasks": "arc_easy", "limit": 10, "no_cache": True})
    )  # fmt: skip
    steps = build_dag(recipe, tmp_path)
    assert [(s.name, s.after, s.num_tasks) for s in steps] == [
        ("convert", (), 1), ("prepare", ("convert",), 3), ("expert", ("prepare",), 2),
        ("merge", ("expert",), 1), ("final", ("merge",), 1), ("eval", ("final",), 1),
    ]  # fmt: skip
    assert [s.is_array for s in steps] == [False, True, True, False, False, False]
    md = (sys.executable, "-m", "megadistill.cli")
    (convert,) = steps[0].commands[0]
    assert convert == (*md, "convert", "--teacher", "t", "--out", str(tmp_path / "student"),
                       "seed=3", "window=16")  # fmt: skip
    # prepare: expert b's two stage configs (task 1), the final stage's (last task), each with
    # the initial student's tokenizer (merged/ does not exist yet)
    tok = f"student={tmp_path / 'student'}"
    assert steps[1].commands[1] == tuple(
        (*md, "prepare-data", str(tmp_path / f"configs/expert_b.{s}.yaml"), tok)
        for s in ("align", "distill")
    )
    assert steps[1].commands[2] == ((*md, "prepare-data", str(tmp_path / "configs/final.yaml"),
                                     tok),)  # fmt: skip
    align, distill = steps[2].commands[1]
    assert align == (*md, "align", str(tmp_path / "configs/expert_b.align.yaml"), "--resume")
    assert distill[3:] == ("distill", str(tmp_path / "configs/expert_b.distill.yaml"), "--resume")
    (ev,) = steps[5].commands[0]
    assert ev[-5:] == ("--tasks", "arc_easy", "--limit", "10", "--no-cache")
    # a recipe whose stages name no data sources has nothing to prepare
    assert "prepare" not in [s.name for s in build_dag(recipe_from_dict(_recipe()), tmp_path)]

    write_plan(recipe, tmp_path)
    assert step_task_commands(tmp_path, "expert", 1) == [list(a) for a in steps[2].commands[1]]
    cfg = yaml.safe_load((tmp_path / "configs" / "expert_b.align.yaml").read_text())
    assert cfg["stage"] == "align" and cfg["optim"] == {"lr": 0.01} and cfg["teacher"] == "t"
    assert cfg["data"] == {"seq_len": 64, "sources": [{"path": "b.txt"}]}
    assert cfg["student"] == str(tmp_path / "student")
    assert cfg["out_dir"] == str(tmp_path / "experts/b/align")
    assert cfg["data"]["seq_len"] == 64  # the expert's data over the stage's
    cfg = yaml.safe_load((tmp_path / "configs" / "expert_b.distill.yaml").read_text())
    assert cfg["student"] == str(tmp_path / "experts/b/align/final")
    final = yaml.safe_load((tmp_path / "configs" / "final.yaml").read_text())
    assert (final["stage"], final["student"]) == ("distill", str(tmp_path / "merged"))
    merge = yaml.safe_load((tmp_path / "configs" / "merge.yaml").read_text())
    assert [(e["name"], e["weight"]) for e in merge["experts"]] == [("a", 0.5), ("b", 0.5)]
    assert json.loads((tmp_path / "plan.json").read_text())["experts"] == ["a", "b"]


def test_sbatch_lines_carry_array_dependency_requeue_and_signal(tmp_path):
    res = {"nodes": 2, "gpus_per_node": 8, "time": "1-00:00:00", "partition": "gpu",
           "account": "proj", "mem": "0", "signal_before_s": 600}  # fmt: skip
    recipe = recipe_from_dict(_recipe(resources={"expert": res}))
    expert, merge = build_dag(recipe, tmp_path)[1:3]  # no data sources: no prepare step
    argv = sbatch_args(expert, tmp_path, "r-expert")
    for flag in ("--parsable", "--array=0-1", "--nodes=2", "--ntasks-per-node=8", "--gres=gpu:8",
                 "--requeue", "--signal=B:USR1@600", "--partition=gpu", "--account=proj",
                 "--mem=0", "--time=1-00:00:00"):  # fmt: skip
        assert flag in argv, flag
    assert f"--output={tmp_path / 'logs' / 'expert' / '%A_%a.out'}" in argv
    assert not any(a.startswith("--dependency") for a in argv)
    argv = sbatch_args(merge, tmp_path, "r-merge", dependency="17")
    assert "--dependency=afterok:17" in argv and "--kill-on-invalid-dep=yes" in argv
    assert argv[-1].endswith("slurm/merge.sbatch") and not any("--array" in a for a in argv)


def test_requeue_exit_code_matches_the_trainer():
    from megadistill.engine.signals import EXIT_PREEMPTED

    assert REQUEUE_EXIT_CODE == EXIT_PREEMPTED


def test_array_task_ids_expand():
    assert _task_indices("3") == [3]
    assert _task_indices("0-3") == [0, 1, 2, 3]
    assert _task_indices("0,2-3%2") == [0, 2, 3]


def test_stage_sections_are_checked_when_the_plan_is_written(tmp_path):
    bad = _full_recipe(distill=_stage(optim={"lr": 1e-3, "lrr": 2}))
    with pytest.raises(ConfigError, match=r"recipe section 'distill' .*'optim.lrr'"):
        write_plan(recipe_from_dict(bad), tmp_path / "run")
    assert not (tmp_path / "run" / "plan.json").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"teacher": "/no/such/teacher"},
            r"teacher /no/such/teacher: no such folder; fix 'teacher'",
        ),
        (
            {"experts": [{"name": "a", "data": {"sources": [{"path": "/no/a.txt"}]}}]},
            r"expert_a.align.yaml: data.sources\[0\].path /no/a.txt does not exist",
        ),
        (
            {"final": _stage(data={"seq_len": 64, "sources": [{"path": "/no/f.txt"}]})},
            r"final.yaml: data.sources\[0\].path /no/f.txt does not exist",
        ),
    ],
    ids=["teacher", "expert-data", "final-data"],
)
def test_missing_inputs_are_refused_before_any_job_starts(tmp_path, change, message):
    for name in ("a", "b", "f"):
        (tmp_path / f"{name}.txt").write_text("text")
    experts = [{"name": n, "data": {"sources": [{"path": str(tmp_path / f"{n}.txt")}]}}
               for n in ("a", "b")]  # fmt: skip
    final = _stage(data={"seq_len": 64, "sources": [{"path": str(tmp_path / "f.txt")}]})
    good = recipe_from_dict(_full_recipe(teacher=str(tmp_path), experts=experts, final=final))
    check_inputs(good, tmp_path / "run")  # every path exists
    bad = recipe_from_dict(
        _full_recipe(**{"teacher": str(tmp_path), "experts": experts, "final": final, **change})
    )
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match=message):
        run_local(bad, run)
    with pytest.raises(ConfigError, match=message):
        slurm.submit(bad, run)  # refused before sbatch is called (none runs here)
    assert not run.exists()
    assert not missing_local_path("allenai/Olmo-3-1025-7B")  # a hub id is not a path
