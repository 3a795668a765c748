"""The pipeline DAG: convert -> prepare array -> expert array -> merge -> final -> evaluation.

:func:`build_dag` turns a recipe into :class:`Step` objects, each with the resolved argv lists it
runs (one list of commands per array task). :func:`step_commands` is the single place where the
``megadistill <stage>`` command lines are built; the SLURM submitter and the local runner both run
what it returns, through ``megadistill pipeline step`` and ``slurm/entrypoint.sh``.

Run directory layout::

    RUN_DIR/recipe.yaml              the resolved recipe
    RUN_DIR/plan.json                the steps, their dependencies, resources and commands
    RUN_DIR/configs/*.yaml           the stage configs the commands read
    RUN_DIR/student/                 the initial student (converted once, shared by all experts)
    RUN_DIR/experts/<name>/          each expert's output: align/ (stage I), distill/ (stage II)
                                     (the data caches live in each data config's cache_dir)
    RUN_DIR/merged/  final/  eval/   later steps' outputs
    RUN_DIR/logs/<step>/             job logs
    RUN_DIR/jobs.json                SLURM job ids (written by ``pipeline submit``)
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megadistill.config import to_dict
from megadistill.errors import MegadistillError
from megadistill.integrity import atomic_write_json, atomic_write_text
from megadistill.pipeline.recipe import STEP_NAMES, PipelineRecipe, Resources

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1
STATE_DIR = "state"
"""Folder of the run directory where ranks mark the commands they finished."""
REPO_ROOT = Path(__file__).resolve().parents[2]


class PipelineError(MegadistillError):
    """A pipeline run directory, plan or step is invalid or failed."""


@dataclass(frozen=True)
class Step:
    """One node of the DAG.

    Attributes:
        name: step name (``convert``, ``prepare``, ``expert``, ``merge``, ``final``, ``eval``).
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
        return self.name in ARRAY_STEPS


ARRAY_STEPS = ("prepare", "expert")
"""Steps submitted as job arrays: one task per expert (prepare: plus one for the final stage)."""
FINAL_TASK = "final"
"""The ``{expert}`` name of the prepare task of the final stage (the last task)."""


def has_prepare(recipe: PipelineRecipe) -> bool:
    """Whether the DAG has a prepare step: when ``commands.prepare`` is given, or when a stage
    section or an expert names data ``sources`` (a recipe without any has nothing to prepare)."""
    sections = [recipe.align or {}, recipe.distill, recipe.final, *(e.data for e in recipe.experts)]
    named = any("sources" in (s.get("data") or {}) for s in sections[:3])
    return recipe.commands.prepare is not None or named or any("sources" in d for d in sections[3:])


def task_names(step: str, experts: list[str]) -> list[str]:
    """The task names of a step's array (``['']`` for a plain job)."""
    if step == "expert":
        return list(experts)
    if step == "prepare":
        return [*experts, FINAL_TASK]
    return [""]


def expert_stages(recipe: PipelineRecipe) -> tuple[str, ...]:
    """The stages each expert runs: stage I then II, or II alone (``align: null``)."""
    return ("distill",) if recipe.align is None else ("align", "distill")


def _literal(text: str) -> str:
    """Escape braces so a literal value survives ``str.format`` in a template."""
    return text.replace("{", "{{").replace("}", "}}")


def _override(key: str, value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)  # JSON is YAML flow syntax
    return _literal(f"{key}={text}")


def default_commands(recipe: PipelineRecipe | None, step: str) -> list[list[str]]:
    """The ``megadistill`` commands of ``step`` as templates (see ``TEMPLATE_FIELDS``).

    The single place where the pipeline meets the stage CLIs: ``convert`` writes the initial
    student once, ``prepare`` tokenises and packs the data of each expert's stages (and, in its
    last task, called with ``recipe`` None, of the final stage) on CPU nodes, each expert runs
    stage I then stage II (stage II alone with ``align: null``) from its own stage YAMLs
    (``--resume``: a requeued job continues from its newest checkpoint), ``merge`` reads the
    experts' ZeRO-3 checkpoints, ``final`` is a stage II run from the merged model, ``eval``
    compares it with the teacher.
    """
    md = ["{python}", "-m", "megadistill.cli"]
    configs = "{run_dir}/configs"
    if step == "prepare":  # the tokenizer of the initial student (the teacher's): merged/ is
        # written later, and every later student carries a copy of the same tokenizer files
        tok = "student={run_dir}/" + STEP_DIRS["convert"]
        if recipe is None:  # the final stage's task
            return [[*md, "prepare-data", f"{configs}/final.yaml", tok]]
        return [[*md, "prepare-data", f"{configs}/expert_{{expert}}.{stage}.yaml", tok]
                for stage in expert_stages(recipe)]  # fmt: skip
    if step == "convert":
        hybrid = [_override(k, v) for k, v in recipe.hybrid.changed().items()]
        return [[*md, "convert", "--teacher", "{teacher}", "--out", "{step_dir}",
                 "seed={seed}", *hybrid]]  # fmt: skip
    if step == "expert":
        return [[*md, stage, f"{configs}/expert_{{expert}}.{stage}.yaml", "--resume"]
                for stage in expert_stages(recipe)]  # fmt: skip
    if step == "merge":
        return [[*md, "merge", "--config", "{config}", "--out", "{step_dir}", "--overwrite"]]
    if step == "final":
        return [[*md, "distill", "{config}", "--resume"]]
    if step == "eval":
        flags = []
        for key, value in recipe.eval.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                flags.append(flag)
            elif isinstance(value, list):
                flags += [flag, *(_literal(str(v)) for v in value)]
            elif value is not False and value is not None:
                flags += [flag, _literal(str(value))]
        return [[*md, "eval", "--teacher", "{teacher}", "--student", "{run_dir}/final/final",
                 "--out", "{step_dir}", *flags]]  # fmt: skip
    raise PipelineError(f"unknown step {step!r}; steps are {', '.join(STEP_NAMES)}")


STEP_DIRS = {"convert": "student", "prepare": "final", "merge": "merged", "final": "final",
             "eval": "eval"}  # fmt: skip
"""Output folder of each single-job step inside the run directory (experts: experts/<name>)."""


def _stage_yaml(
    section: dict[str, Any], stage: str, student: Path, out_dir: Path, teacher: str,
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A stage config: the recipe section plus the paths the DAG decides."""
    cfg = {**section, "stage": stage, "student": str(student), "teacher": teacher,
           "out_dir": str(out_dir)}  # fmt: skip
    if data:
        cfg["data"] = {**(section.get("data") or {}), **data}
    return cfg


def step_configs(recipe: PipelineRecipe, run_dir: Path) -> dict[str, dict[str, Any]]:
    """Every config file the steps read, by file name under ``RUN_DIR/configs``."""
    base = {"teacher": recipe.teacher, "seed": recipe.seed, "run_dir": str(run_dir)}
    student0 = run_dir / STEP_DIRS["convert"]
    out = {"convert.yaml": {**base, "hybrid": recipe.hybrid.to_dict()}}
    for e in recipe.experts:
        root = run_dir / "experts" / e.name
        align = None
        if recipe.align is not None:
            align = _stage_yaml(recipe.align, "align", student0, root / "align", recipe.teacher,
                                e.data)  # fmt: skip
            out[f"expert_{e.name}.align.yaml"] = align
        distill = _stage_yaml(recipe.distill, "distill",
                              student0 if align is None else root / "align" / "final",
                              root / "distill", recipe.teacher, e.data)  # fmt: skip
        out[f"expert_{e.name}.distill.yaml"] = distill
        out[f"expert_{e.name}.yaml"] = {**base, "expert": to_dict(e), "align": align,
                                        "distill": distill}  # fmt: skip
    experts = [
        {"name": e.name, "weight": w, "checkpoint": str(run_dir / "experts" / e.name)}
        for e, w in zip(recipe.experts, recipe.weights)
    ]
    out["merge.yaml"] = {**base, "experts": experts, "merge": recipe.merge}
    out["final.yaml"] = _stage_yaml(recipe.final, "distill", run_dir / STEP_DIRS["merge"],
                                    run_dir / STEP_DIRS["final"], recipe.teacher)  # fmt: skip
    out["eval.yaml"] = {**base, "eval": recipe.eval}
    return out


def step_commands(recipe: PipelineRecipe, step: str, run_dir: Path) -> list[list[list[str]]]:
    """Resolved commands of ``step``: one list of argv lists per array task.

    Args:
        recipe: the validated recipe.
        step: one of ``STEP_NAMES``.
        run_dir: absolute run directory.
    """
    templates = getattr(recipe.commands, step) or default_commands(recipe, step)
    tasks: list[Any] = list(recipe.experts) if step in ARRAY_STEPS else [None]
    out = [_fill(templates, recipe, run_dir, step, i, e) for i, e in enumerate(tasks)]
    if step == "prepare":  # a last task for the final stage's data
        final = getattr(recipe.commands, step) or default_commands(None, step)
        out.append(_fill(final, recipe, run_dir, step, len(tasks), None))
    return out


def _fill(
    templates: list[list[str]], recipe: PipelineRecipe, run_dir: Path, step: str, index: int,
    expert: Any,
) -> list[list[str]]:  # fmt: skip
    """One array task's commands: ``templates`` with the placeholders filled in."""
    name = expert.name if expert is not None else ""
    config = f"expert_{name}.yaml" if expert else f"{step}.yaml"
    if step == "prepare" and expert is None:  # the final stage's task
        name, config = FINAL_TASK, "final.yaml"
    fields = {
        "python": sys.executable,
        "run_dir": str(run_dir),
        "repo": str(REPO_ROOT),
        "teacher": recipe.teacher,
        "seed": str(recipe.seed),
        "expert": name,
        "index": str(index),
        "weight": repr(recipe.weights[index]) if expert is not None else "",
        "step_dir": str(run_dir / (f"experts/{name}" if expert else STEP_DIRS[step])),
        "config": str(run_dir / "configs" / config),
    }
    return [[arg.format(**fields) for arg in argv] for argv in templates]


def build_dag(recipe: PipelineRecipe, run_dir: str | Path) -> list[Step]:
    """The recipe's steps in dependency order (each step's ``after`` precedes it)."""
    run_dir = Path(run_dir).resolve()
    names = [n for n in STEP_NAMES if n != "prepare" or has_prepare(recipe)]
    return [
        Step(
            name=name,
            after=tuple(names[i - 1 : i]),
            resources=getattr(recipe.resources, name),
            commands=tuple(
                tuple(tuple(argv) for argv in task) for task in step_commands(recipe, name, run_dir)
            ),
        )
        for i, name in enumerate(names)
    ]


def validate_stage_configs(recipe: PipelineRecipe, configs: dict[str, dict[str, Any]]) -> None:
    """Check every stage config the run will use now, not hours later on the cluster.

    Only the default stage commands read these files; recipes with their own ``commands`` for a
    step are not checked for that step.
    """
    from megadistill.config import ConfigError
    from megadistill.stages.config import stage_config_from_dict

    stage_files = {"expert": [n for n in configs if n.endswith((".align.yaml", ".distill.yaml"))],
                   "final": ["final.yaml"]}  # fmt: skip
    for step, names in stage_files.items():
        if getattr(recipe.commands, step):
            continue
        for name in names:
            try:
                stage_config_from_dict(configs[name])
            except ConfigError as exc:
                section = "final" if name == "final.yaml" else name.split(".")[-2]
                raise ConfigError(f"recipe section '{section}' ({name}): {exc}") from exc


def check_inputs(recipe: PipelineRecipe, run_dir: str | Path) -> None:
    """Check that the teacher and every data path the stage commands will read exist.

    Called by ``pipeline submit`` and ``pipeline run`` before any job starts (a missing path
    would otherwise fail a job minutes or hours later). Steps with their own ``commands`` are not
    checked.

    Raises:
        ConfigError: naming the missing path and the recipe field to fix.
    """
    from megadistill.config import ConfigError, missing_local_path
    from megadistill.stages.config import stage_config_from_dict

    if not recipe.commands.convert and missing_local_path(recipe.teacher):
        raise ConfigError(f"teacher {recipe.teacher}: no such folder; fix 'teacher' (a Hugging "
                          "Face model folder or hub id)")  # fmt: skip
    configs = step_configs(recipe, Path(run_dir).resolve())
    validate_stage_configs(recipe, configs)
    stage_files = [n for n in configs if n.endswith((".align.yaml", ".distill.yaml"))]
    names = ([] if recipe.commands.expert else stage_files) + (
        [] if recipe.commands.final else ["final.yaml"]
    )
    for name in names:
        for i, source in enumerate(stage_config_from_dict(configs[name]).data.sources):
            if source.path and not Path(source.path).expanduser().exists():
                raise ConfigError(
                    f"{name}: data.sources[{i}].path {source.path} does not exist; fix the data "
                    "path in the recipe (its stage section or the expert's data)"
                )


def write_plan(recipe: PipelineRecipe, run_dir: str | Path) -> list[Step]:
    """Create the run directory: recipe, per-step configs, log folders and ``plan.json``.

    Writing the same recipe into a run directory that already holds it resumes that run: the
    record of finished commands is kept, so they are skipped, and the stages continue from their
    newest checkpoints. A different recipe over a run that has started is refused (nothing is
    changed), since its outputs would mix two plans.

    Raises:
        PipelineError: ``run_dir`` holds a started run of a different recipe.
    """
    run_dir = Path(run_dir).resolve()
    steps = build_dag(recipe, run_dir)
    configs = step_configs(recipe, run_dir)
    validate_stage_configs(recipe, configs)
    recipe_text = yaml.safe_dump(to_dict(recipe), sort_keys=False)
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
    files = {"recipe.yaml": recipe_text}
    files.update(
        {f"configs/{name}": yaml.safe_dump(cfg, sort_keys=False) for name, cfg in configs.items()}
    )
    changed = _changed_files(run_dir, plan, files)
    if not changed:
        return steps  # the same run: keep the record of finished commands
    started = sorted(str(p.relative_to(run_dir)) for p in (run_dir / STATE_DIR).glob("*/*.done"))
    if started:
        raise PipelineError(
            f"{run_dir} holds a started run of a different recipe ({', '.join(changed[:5])} "
            f"differ; {len(started)} command(s) finished, e.g. {started[0]}); run the same recipe "
            "and overrides to resume it, or choose a new --run-dir"
        )
    shutil.rmtree(run_dir / STATE_DIR, ignore_errors=True)
    for sub in ("configs", "experts", *(f"logs/{s.name}" for s in steps)):
        (run_dir / sub).mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        atomic_write_text(run_dir / name, text)
    atomic_write_json(run_dir / PLAN_FILE, plan)
    return steps


def _changed_files(run_dir: Path, plan: dict[str, Any], files: dict[str, str]) -> list[str]:
    """Which of the run directory's plan files differ from ``plan`` and ``files`` (all if new)."""
    changed = [name for name, text in files.items() if _read_text(run_dir / name) != text]
    old = _read_text(run_dir / PLAN_FILE)
    try:
        same_plan = old is not None and json.loads(old) == plan
    except json.JSONDecodeError:
        same_plan = False
    return changed if same_plan else [PLAN_FILE, *changed]


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


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
