"""The pipeline DAG: expert array -> merge -> final distillation -> evaluation.

:func:`build_dag` turns a recipe into :class:`Step` objects, each with the resolved argv lists it
runs (one list of commands per array task). :func:`step_commands` is the single place where the
``megadistill <stage>`` command lines are built; the SLURM submitter and the local runner both run
what it returns, through ``megadistill pipeline step`` and ``slurm/entrypoint.sh``.

Run directory layout::

    RUN_DIR/recipe.yaml              the resolved recipe
    RUN_DIR/plan.json                the steps, their dependencies, resources and commands
    RUN_DIR/configs/<step>.yaml      the stage settings each command reads
    RUN_DIR/experts/<name>/          each expert's output (stage I, stage II checkpoints)
    RUN_DIR/merged/  final/  eval/   later steps' outputs
    RUN_DIR/logs/<step>/             job logs
    RUN_DIR/jobs.json                SLURM job ids (written by ``pipeline submit``)
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megadistill.config import to_dict
from megadistill.errors import MegadistillError
from megadistill.integrity import atomic_write_json, atomic_write_text
from megadistill.pipeline.recipe import PipelineRecipe, Resources

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1
REPO_ROOT = Path(__file__).resolve().parents[2]


class PipelineError(MegadistillError):
    """A pipeline run directory, plan or step is invalid or failed."""


@dataclass(frozen=True)
class Step:
    """One node of the DAG.

    Attributes:
        name: step name (``expert``, ``merge``, ``final``, ``eval``).
        after: names of the steps that must succeed first.
        resources: cluster resources of one job (one array task).
        commands: per array task, the argv lists run one after the other in every rank.
    """

    name: str
    after: tuple[str, ...]
    resources: Resources
    commands: tuple[tuple[tuple[str, ...], ...], ...]

    @property
    def num_tasks(self) -> int:
        """Number of array tasks (1 for a plain job)."""
        return len(self.commands)

    @property
    def is_array(self) -> bool:
        """Whether the step is submitted as a SLURM job array."""
        return self.name == "expert"


def _megadistill() -> list[str]:
    # The same interpreter that built the plan runs the jobs (shared filesystem on clusters).
    return [sys.executable, "-m", "megadistill.cli"]


def default_commands(step: str) -> list[list[str]]:
    """The ``megadistill`` stage commands of ``step`` as templates (see ``TEMPLATE_FIELDS``).

    This is the wiring point to the stage CLIs: each stage reads its settings from
    ``{run_dir}/configs/<step>.yaml`` and writes under ``{step_dir}``.
    """
    md = ["{python}", "-m", "megadistill.cli"]
    if step == "expert":
        return [
            [*md, "align", "--config", "{config}", "--out", "{step_dir}/align"],
            [*md, "distill", "--config", "{config}", "--init", "{step_dir}/align",
             "--out", "{step_dir}/distill"],
        ]  # fmt: skip
    if step == "merge":
        return [[*md, "merge", "--config", "{config}", "--out", "{step_dir}"]]
    if step == "final":
        return [[*md, "distill", "--config", "{config}", "--init", "{run_dir}/merged",
                 "--out", "{step_dir}"]]  # fmt: skip
    if step == "eval":
        return [[*md, "eval", "--config", "{config}", "--student", "{run_dir}/final",
                 "--out", "{step_dir}"]]  # fmt: skip
    raise PipelineError(f"unknown step {step!r}; steps are expert, merge, final, eval")


def _step_config(recipe: PipelineRecipe, step: str, run_dir: Path) -> dict[str, Any]:
    """The settings file a step's commands read (``{config}``)."""
    base = {"teacher": recipe.teacher, "seed": recipe.seed, "run_dir": str(run_dir)}
    if step == "expert":
        return {**base, "align": recipe.align, "distill": recipe.distill}
    if step == "merge":
        experts = [
            {"name": e.name, "weight": w, "checkpoint": str(run_dir / "experts" / e.name)}
            for e, w in zip(recipe.experts, recipe.weights)
        ]
        return {**base, "experts": experts, "merge": recipe.merge}
    return {**base, step: getattr(recipe, step)}


def step_commands(recipe: PipelineRecipe, step: str, run_dir: Path) -> list[list[list[str]]]:
    """Resolved commands of ``step``: one list of argv lists per array task.

    Args:
        recipe: the validated recipe.
        step: one of ``expert``, ``merge``, ``final``, ``eval``.
        run_dir: absolute run directory.
    """
    templates = getattr(recipe.commands, step) or default_commands(step)
    tasks = list(enumerate(recipe.experts)) if step == "expert" else [(0, None)]
    weights = recipe.weights
    out = []
    for index, expert in tasks:
        name = expert.name if expert is not None else ""
        fields = {
            "python": sys.executable,
            "run_dir": str(run_dir),
            "repo": str(REPO_ROOT),
            "expert": name,
            "index": str(index),
            "weight": repr(weights[index]) if expert is not None else "",
            "step_dir": str(run_dir / ("experts/" + name if expert is not None else _out(step))),
            "config": str(
                run_dir / "configs" / (f"expert_{name}.yaml" if name else f"{step}.yaml")
            ),
        }
        out.append([[arg.format(**fields) for arg in argv] for argv in templates])
    return out


def _out(step: str) -> str:
    return {"merge": "merged", "final": "final", "eval": "eval"}[step]


def build_dag(recipe: PipelineRecipe, run_dir: str | Path) -> list[Step]:
    """The recipe's steps in dependency order (each step's ``after`` precedes it)."""
    run_dir = Path(run_dir).resolve()
    after = {"expert": (), "merge": ("expert",), "final": ("merge",), "eval": ("final",)}
    return [
        Step(
            name=name,
            after=after[name],
            resources=getattr(recipe.resources, name),
            commands=tuple(
                tuple(tuple(argv) for argv in task) for task in step_commands(recipe, name, run_dir)
            ),
        )
        for name in ("expert", "merge", "final", "eval")
    ]


def write_plan(recipe: PipelineRecipe, run_dir: str | Path) -> list[Step]:
    """Create the run directory: recipe, per-step configs, log folders and ``plan.json``."""
    run_dir = Path(run_dir).resolve()
    steps = build_dag(recipe, run_dir)
    for sub in ("configs", "logs", "experts"):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "recipe.yaml", yaml.safe_dump(to_dict(recipe), sort_keys=False))
    for step in ("merge", "final", "eval"):
        cfg = _step_config(recipe, step, run_dir)
        atomic_write_text(run_dir / "configs" / f"{step}.yaml", yaml.safe_dump(cfg))
    for expert in recipe.experts:
        cfg = {**_step_config(recipe, "expert", run_dir), "expert": to_dict(expert)}
        atomic_write_text(run_dir / "configs" / f"expert_{expert.name}.yaml", yaml.safe_dump(cfg))
    for step in steps:
        (run_dir / "logs" / step.name).mkdir(parents=True, exist_ok=True)
    plan = {
        "format": PLAN_FORMAT,
        "name": recipe.name,
        "experts": [e.name for e in recipe.experts],
        "steps": [
            {
                "name": s.name,
                "after": list(s.after),
                "num_ranks": s.resources.num_ranks,
                "resources": to_dict(s.resources),
                "commands": [[list(a) for a in task] for task in s.commands],
            }
            for s in steps
        ],
    }
    atomic_write_json(run_dir / PLAN_FILE, plan)
    return steps


def read_plan(run_dir: str | Path) -> dict[str, Any]:
    """Read ``plan.json`` of a run directory with a clear error if it is missing or corrupt."""
    path = Path(run_dir) / PLAN_FILE
    if not path.is_file():
        raise PipelineError(
            f"{run_dir} has no {PLAN_FILE}: it is not a pipeline run directory "
            "(create one with `megadistill pipeline submit` or `pipeline run --local`)"
        )
    try:
        plan = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise PipelineError(f"{path} is corrupt: {exc}") from exc
    if plan.get("format") != PLAN_FORMAT:
        raise PipelineError(f"{path} has format {plan.get('format')}; expected {PLAN_FORMAT}")
    return plan


def plan_step(plan: dict[str, Any], step: str) -> dict[str, Any]:
    """The entry of ``step`` in a plan."""
    for entry in plan["steps"]:
        if entry["name"] == step:
            return entry
    names = ", ".join(e["name"] for e in plan["steps"])
    raise PipelineError(f"plan has no step {step!r}; steps: {names}")
