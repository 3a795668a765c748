"""The pipeline recipe: teacher, experts, stage settings and cluster resources, typed and checked.

A recipe is one YAML file (plus dotted overrides) describing a whole run::

    name: olmo3_7b
    teacher: allenai/Olmo-3-1025-7B
    seed: 0
    hybrid: {window: 512, num_sinks: 4}  # student architecture, passed to `megadistill convert`
    experts:
      - {name: math, data: {...}}          # merge weight: uniform unless every expert sets one
      - {name: code, data: {...}, weight: 0.5}
    align: {...}      # stage I config of every expert (a stage YAML; the stage validates it)
    distill: {...}    # stage II settings for every expert
    merge: {...}      # merge tool options
    final: {...}      # final full-model distillation (a stage II config)
    eval: {...}       # `megadistill eval` options (tasks, limit, ...)
    resources:
      expert: {nodes: 4, gpus_per_node: 8, time: "2-00:00:00", partition: gpu}
      ...

The stage sections stay plain dicts: each stage validates its own config when it runs, so the
pipeline does not need to import (or duplicate) any stage's dataclass.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megadistill.config import ConfigError, from_dict, load_config
from megadistill.hybrid import HybridSettings

STEP_NAMES = ("convert", "prepare", "expert", "merge", "final", "eval")
"""The pipeline's steps in dependency order (``prepare`` only where a stage reads data, see
:func:`megadistill.pipeline.dag.has_prepare`)."""

TEMPLATE_FIELDS = (
    "python", "run_dir", "repo", "teacher", "seed", "expert", "index", "weight", "step_dir", "config",
)  # fmt: skip
"""Placeholders a command template may use (``{run_dir}``, ``{expert}``, ...)."""

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+):(\d{2}):(\d{2})$")
_MEM_RE = re.compile(r"^\d+[KMGT]?$")


def parse_time_s(text: str) -> int:
    """Seconds in a SLURM time limit written ``[D-]HH:MM:SS`` (e.g. ``2-00:00:00``)."""
    match = _TIME_RE.match(text)
    if not match:
        raise ConfigError(f"time {text!r} must look like 'HH:MM:SS' or 'D-HH:MM:SS'")
    days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(kw_only=True)
class Resources:
    """Cluster resources of one step (one array task for the expert step)."""

    nodes: int = 1
    """Nodes per job; ranks = nodes * tasks_per_node."""
    gpus_per_node: int = 0
    """GPUs per node (``--gres=gpu:N``); 0 on CPU clusters and in tests."""
    tasks_per_node: int | None = None
    """Ranks per node; None means one per GPU (or 1 without GPUs)."""
    cpus_per_task: int = 1
    """CPU cores per rank (``--cpus-per-task``)."""
    time: str = "01:00:00"
    """Wall-clock limit, ``[D-]HH:MM:SS``."""
    partition: str | None = None
    """SLURM partition; None uses the cluster default."""
    account: str | None = None
    """SLURM account to charge; None uses the user's default."""
    mem: str | None = None
    """Memory per node (``--mem``, e.g. ``512G``; ``0`` means all); None uses the default."""
    signal_before_s: int = 300
    """Seconds before the time limit at which the job gets SIGUSR1 to checkpoint."""
    requeue: bool = True
    """Submit with ``--requeue`` so a preempted or checkpointed job runs again."""
    launcher: Literal["srun", "deepspeed"] = "srun"
    """How ``slurm/entrypoint.sh`` starts the ranks under SLURM (local runs use local ranks)."""

    def __post_init__(self) -> None:
        for name in ("nodes", "cpus_per_task"):
            if getattr(self, name) < 1:
                raise ConfigError(f"resources.{name} = {getattr(self, name)} must be >= 1")
        if self.gpus_per_node < 0:
            raise ConfigError(f"resources.gpus_per_node = {self.gpus_per_node} must be >= 0")
        if self.tasks_per_node is not None and self.tasks_per_node < 1:
            raise ConfigError(
                f"resources.tasks_per_node = {self.tasks_per_node} must be >= 1 "
                "(or null for one rank per GPU)"
            )
        limit = parse_time_s(self.time)
        if not 0 <= self.signal_before_s < limit:
            raise ConfigError(
                f"resources.signal_before_s = {self.signal_before_s} must be >= 0 and below "
                f"the time limit ({self.time} = {limit} s)"
            )
        if self.mem is not None and not _MEM_RE.match(self.mem):
            raise ConfigError(f"resources.mem = {self.mem!r} must look like '512G' or '0'")

    @property
    def ranks_per_node(self) -> int:
        """Ranks started on each node."""
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def num_ranks(self) -> int:
        """Ranks in one job (world size)."""
        return self.nodes * self.ranks_per_node


@dataclass(kw_only=True)
class StepResources:
    """Resources for each step of the DAG."""

    convert: Resources = field(default_factory=Resources)
    """Teacher -> initial student conversion (one rank; needs memory for the model)."""
    prepare: Resources = field(default_factory=Resources)
    """One data-preparation array task (one CPU rank; its ``cpus_per_task`` tokenizer workers)."""
    expert: Resources = field(default_factory=Resources)
    """One expert array task (stage I + II of one expert)."""
    merge: Resources = field(default_factory=Resources)
    """The merge job (reads files; one CPU rank is enough)."""
    final: Resources = field(default_factory=Resources)
    """The final full-model distillation."""
    eval: Resources = field(default_factory=Resources)
    """The evaluation job."""


@dataclass(kw_only=True)
class Expert:
    """One expert: a data mix it is distilled on and its weight in the merge."""

    name: str
    """Unique name, used in paths and job names (letters, digits, ``_.-``)."""
    data: dict[str, Any] = field(default_factory=dict)
    """The expert's data config (sources and mix), passed to its stages."""
    weight: float | None = None
    """Merge weight lambda_i; leave unset on every expert for uniform weights."""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(
                f"experts: name {self.name!r} must start with a letter or digit and use only "
                "letters, digits, '_', '.', '-'"
            )


@dataclass(kw_only=True)
class Commands:
    """Command templates per step; unset steps run the ``megadistill`` stage commands.

    Each template is a list of argv lists run one after the other in every rank; strings may use
    the placeholders in ``TEMPLATE_FIELDS``. Used to plug other programs into the DAG (tests, or
    a site's own tooling).
    """

    convert: list[list[str]] | None = None
    """Commands of the conversion job."""
    prepare: list[list[str]] | None = None
    """Commands of one data-preparation task (``{expert}`` is 'final' for the final stage's)."""
    expert: list[list[str]] | None = None
    """Commands of one expert array task."""
    merge: list[list[str]] | None = None
    """Commands of the merge job."""
    final: list[list[str]] | None = None
    """Commands of the final distillation job."""
    eval: list[list[str]] | None = None
    """Commands of the evaluation job."""

    def __post_init__(self) -> None:
        for step in STEP_NAMES:
            for argv in getattr(self, step) or []:
                if not argv:
                    raise ConfigError(f"commands.{step}: a command must not be empty")
                for arg in argv:
                    _check_template(f"commands.{step}", arg)


def _check_template(where: str, text: str) -> None:
    for _, name, spec, conv in string.Formatter().parse(text):
        if name is None:
            continue
        if name not in TEMPLATE_FIELDS or spec or conv:
            raise ConfigError(
                f"{where}: placeholder {{{name}}} in {text!r} is not one of "
                f"{', '.join('{' + f + '}' for f in TEMPLATE_FIELDS)} (write {{{{ }}}} for braces)"
            )


@dataclass(kw_only=True)
class PipelineRecipe:
    """A whole run: convert -> K experts -> merge -> final distillation -> evaluation."""

    name: str
    """Run name, used for job names and the default run directory."""
    teacher: str
    """Teacher model: a Hugging Face id or local folder."""
    seed: int = 0
    """Seed of the new student parameters; every expert starts from the same initial student."""
    hybrid: HybridSettings = field(default_factory=HybridSettings)
    """Student architecture settings for ``megadistill convert`` (e.g. window, num_sinks)."""
    experts: list[Expert]
    """The experts, one SLURM array task each."""
    align: dict[str, Any] | None = field(default_factory=dict)
    """Stage I config shared by every expert; each expert's ``data`` overrides its ``data`` keys.
    None (``align: null``): no stage I, each expert's stage II starts from the converted student
    (a SWA-only student, ``hybrid.gate_mode: swa``, has nothing for stage I to train)."""
    distill: dict[str, Any] = field(default_factory=dict)
    """Stage II config shared by every expert (same ``data`` rule)."""
    merge: dict[str, Any] = field(default_factory=dict)
    """Merge options (method, dtype, ...)."""
    final: dict[str, Any] = field(default_factory=dict)
    """Stage II config of the final full-model distillation of the merged student."""
    eval: dict[str, Any] = field(default_factory=dict)
    """``megadistill eval`` options, e.g. ``{tasks: "arc_easy,piqa", limit: 500}``."""
    resources: StepResources = field(default_factory=StepResources)
    """Cluster resources per step."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment variables for every job (e.g. NCCL settings, HF_HUB_OFFLINE)."""
    commands: Commands = field(default_factory=Commands)
    """Optional command templates replacing the default stage commands."""

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ConfigError(f"name {self.name!r} must use only letters, digits, '_', '.', '-'")
        if not self.teacher:
            raise ConfigError("teacher must name a model (Hugging Face id or folder)")
        if not self.experts:
            raise ConfigError("experts must list at least one expert")
        names = [e.name for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"experts: name {dupes[0]!r} is used twice; names must be unique")
        _check_weights(self.experts)
        if self.align is not None and self.hybrid.gate_mode == "swa":
            raise ConfigError(
                "hybrid.gate_mode is 'swa': the student's new parameters are unused, so stage I "
                "has nothing to train; set 'align: null' (stage II starts from the converted "
                "student)"
            )
        bad = [k for k, v in self.env.items() if not isinstance(v, str) or not k.isidentifier()]
        if bad:
            raise ConfigError(f"env: {bad[0]!r} must be a variable name with a string value")

    @property
    def weights(self) -> list[float]:
        """Merge weights in expert order (uniform when none is set)."""
        if all(e.weight is None for e in self.experts):
            return [1.0 / len(self.experts)] * len(self.experts)
        return [float(e.weight) for e in self.experts]  # type: ignore[arg-type]


def _check_weights(experts: list[Expert]) -> None:
    given = [e for e in experts if e.weight is not None]
    if not given:
        return
    if len(given) != len(experts):
        missing = next(e.name for e in experts if e.weight is None)
        raise ConfigError(
            f"experts: expert {missing!r} has no weight while others do; set a weight on every "
            "expert or on none (uniform)"
        )
    for e in experts:
        if not (e.weight >= 0 and math.isfinite(e.weight)):  # type: ignore[operator]
            raise ConfigError(f"experts: weight of {e.name!r} is {e.weight}; weights must be >= 0")
    total = sum(e.weight for e in experts)  # type: ignore[misc]
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"experts: weights sum to {total:g}; they must sum to 1")


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineRecipe:
    """Load and validate a recipe YAML with dotted overrides (``experts`` is a list, as a whole)."""
    return load_config(PipelineRecipe, path, overrides)


def recipe_from_dict(data: dict[str, Any]) -> PipelineRecipe:
    """Validate a recipe given as a plain mapping."""
    return from_dict(PipelineRecipe, data)
