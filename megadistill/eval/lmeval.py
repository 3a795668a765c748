"""Run the real lm-eval harness on teacher and student with identical tasks, settings and seeds.

The teacher's results are cached on disk, keyed by the teacher's content fingerprint, the task set
(including the generated task files and held-out documents), the settings and the lm-eval version,
so a teacher is evaluated once per task set however many students are compared against it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError
from megadistill.eval.tasks import TaskSet, build_task_set, parse_task_spec, primary_metric
from megadistill.integrity import atomic_write_json, sha256_file

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # 2: standard errors, per-document scores and chance levels are kept
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")


@dataclass(frozen=True, kw_only=True)
class EvalSettings:
    """Everything besides the model that decides an lm-eval score (all part of the cache key)."""

    tasks: str
    """Task spec, e.g. ``offline:arc_easy@5,piqa`` (see :mod:`megadistill.eval.tasks`)."""
    limit: int | None = None
    """Documents per task (None: all)."""
    num_fewshot: int = 0
    """Few-shot examples per prompt of the tasks without their own ``@k``."""
    batch_size: int = 8
    """lm-eval batch size."""
    max_length: int = 2048
    """Longest sequence fed to the model; longer requests are truncated from the left."""
    seed: int = 1234
    """Seed for lm-eval's python/numpy/torch/few-shot sampling."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise MegadistillError(f"limit must be >= 1 or None, got {self.limit}")
        if self.max_length < 2:
            raise MegadistillError(f"max_length must be >= 2, got {self.max_length}")
        if self.num_fewshot < 0:
            raise MegadistillError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        parse_task_spec(self.tasks)  # a bad spec fails here, before any model is loaded


def offline_env() -> None:
    """No Hub access: lm-eval and datasets read only local files."""
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")


def model_fingerprint(path: str | Path) -> str:
    """sha256 over a model folder's weight, config and tokenizer files (names and contents)."""
    path = Path(path)
    if not path.is_dir():
        raise MegadistillError(f"model folder {path} does not exist")
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    for p in files:
        if p.name == "checksums.json":
            continue
        digest.update(f"{p.relative_to(path)}\0{sha256_file(p)}\n".encode())
    return digest.hexdigest()


def load_model(path: str | Path) -> tuple[Any, Any]:
    """Load a causal LM (teacher or hybrid student) and its tokenizer from a folder, fp32, eval."""
    import torch
    from transformers import AutoModelForCausalLM

    from megadistill.model import load_tokenizer

    path = Path(path)
    config = (
        json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    )
    if config.get("model_type") == "megadistill_hybrid":
        import megadistill.model  # noqa: F401 - registers the hybrid with AutoModelForCausalLM
    if not (path / "config.json").exists():
        raise MegadistillError(f"{path} has no config.json: pass a Hugging Face model folder")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    tokenizer = load_tokenizer(str(path))
    return model, tokenizer


def _task_files_digest(task_set: TaskSet) -> str:
    digest = hashlib.sha256(json.dumps(task_set.names).encode())
    if task_set.include_path is not None:
        for p in sorted(task_set.include_path.iterdir()):
            # Paths inside the YAML differ per temp dir; hash the data, and YAML minus paths.
            text = p.read_bytes().replace(str(task_set.include_path).encode(), b"<dir>")
            digest.update(p.name.encode() + b"\0" + hashlib.sha256(text).digest())
    return digest.hexdigest()


def cache_key(fingerprint: str, task_set: TaskSet, settings: EvalSettings) -> str:
    """The teacher-cache key: model fingerprint + task files + settings + lm-eval version."""
    import lm_eval

    payload = {
        "format": CACHE_FORMAT,
        "model": fingerprint,
        "tasks": _task_files_digest(task_set),
        "settings": asdict(settings),
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _task_manager(task_set: TaskSet) -> Any:
    from lm_eval.tasks import TaskManager

    include = str(task_set.include_path) if task_set.include_path is not None else None
    # Generated task files include lm-eval's own by absolute path: no need to index (slowly)
    # the thousands of built-in task files unless hub tasks are run by name.
    return TaskManager(include_path=include, include_defaults=task_set.source == "hub")


def run_lm_eval(
    model: Any, tokenizer: Any, task_set: TaskSet, settings: EvalSettings, task_manager: Any = None
) -> dict[str, Any]:
    """One real ``lm_eval.simple_evaluate`` run of an in-memory model.

    Returns:
        ``{"scores": {task: {metric: value}}, "stderr": {task: {metric: se}}, "primary": {task:
        value}, "per_doc": {task: [primary metric per document, by doc_id]}, "chance": {task:
        expected accuracy of a uniform guess}, "num_fewshot": {task: k}, "requests": {task:
        [[context_tokens, scored_tokens], ...]}, "seconds": float}``; ``requests`` records the
        length of every scored request so a report can say how much lies beyond a window;
        ``per_doc`` lets a report pair teacher and student item by item; ``chance`` is given
        for multiple-choice tasks (1 / number of choices, averaged over the documents).
    """
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    offline_env()
    lm = HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        device="cpu",
        batch_size=settings.batch_size,
        max_length=settings.max_length,
    )
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(task_set.names),
        task_manager=task_manager or _task_manager(task_set),
        # Generated task files carry each task's own num_fewshot; a global value would override
        # them (lm-eval 0.4 applies simple_evaluate's num_fewshot to every task but those at 0).
        num_fewshot=None if task_set.source != "hub" else settings.num_fewshot,
        limit=settings.limit,
        log_samples=True,
        random_seed=settings.seed,
        numpy_random_seed=settings.seed,
        torch_random_seed=settings.seed,
        fewshot_random_seed=settings.seed,
    )
    seconds = time.perf_counter() - start
    scores: dict[str, dict[str, float]] = {}
    stderr: dict[str, dict[str, float]] = {}
    for task in task_set.names:
        raw = out["results"].get(task)
        if raw is None:
            raise MegadistillError(f"lm-eval returned no result for task {task!r}")
        numeric = {k: float(v) for k, v in raw.items() if "," in k and _is_number(v)}
        scores[task] = {k.split(",")[0]: v for k, v in numeric.items() if "_stderr" not in k}
        stderr[task] = {
            k.split(",")[0].removesuffix("_stderr"): v for k, v in numeric.items() if "_stderr" in k
        }
    primary = {t: scores[t][primary_metric(t)] for t in task_set.names}
    samples = {t: sorted(out["samples"][t], key=lambda s: s["doc_id"]) for t in task_set.names}
    per_doc = {t: _per_doc(samples[t], primary_metric(t)) for t in task_set.names}
    configs = out.get("configs", {})
    chance = {
        t: _chance(samples[t])
        for t in task_set.names
        if configs.get(t, {}).get("output_type") == "multiple_choice"
    }
    fewshot = {t: int(configs.get(t, {}).get("num_fewshot") or 0) for t in task_set.names}
    requests = {t: _request_lengths(out["samples"][t], lm) for t in task_set.names}
    return {
        "scores": scores,
        "stderr": stderr,
        "primary": primary,
        "per_doc": {t: v for t, v in per_doc.items() if v is not None},
        "chance": chance,
        "num_fewshot": fewshot,
        "requests": requests,
        "seconds": seconds,
    }


def _is_number(v: Any) -> bool:
    import math

    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _per_doc(samples: list[dict[str, Any]], metric: str) -> list[float] | None:
    """The metric of each document (None when it is not a per-document number, e.g. perplexity's
    (loglikelihood, words) pairs)."""
    values = [s.get(metric) for s in samples]
    if not values or not all(_is_number(v) for v in values):
        return None
    return [float(v) for v in values]


def _chance(samples: list[dict[str, Any]]) -> float:
    """Expected accuracy of a uniform guess: mean over documents of 1 / number of choices (one
    loglikelihood request per choice in a multiple-choice sample)."""
    return sum(1 / len(s["arguments"]) for s in samples) / len(samples)


def _request_lengths(samples: list[dict[str, Any]], lm: Any) -> list[list[int]]:
    """[input length, scored tokens] of every model call lm-eval made for these samples.

    Mirrors lm-eval's own encoding (``_encode_pair``, rolling windows, left truncation), so the
    scored tokens sit at positions ``input_len - scored .. input_len - 1`` of the model input.
    """
    from lm_eval import utils

    lengths: list[list[int]] = []
    for sample in samples:
        for args in sample["arguments"]:
            if len(args) == 1:  # loglikelihood_rolling: disjoint windows of max_length
                windows = utils.get_rolling_token_windows(
                    token_list=lm.tok_encode(args[0]),
                    prefix_token=lm.prefix_token_id,
                    max_seq_len=lm.max_length,
                    context_len=1,
                )
                for ctx, pred in map(utils.make_disjoint_window, windows):
                    lengths.append([len(ctx) + len(pred) - 1, len(pred)])
            else:
                context, continuation = args[0], args[1]
                if context:
                    ctx, cont = lm._encode_pair(context, continuation)
                else:
                    ctx, cont = [lm.prefix_token_id], lm.tok_encode(continuation)
                total = min(len(ctx) + len(cont) - 1, lm.max_length)
                lengths.append([total, min(len(cont), total)])
    return lengths


def evaluate_model_cached(
    model_path: str | Path,
    task_set: TaskSet,
    settings: EvalSettings,
    cache_dir: Path | None,
    task_manager: Any = None,
) -> dict[str, Any]:
    """Evaluate the model at ``model_path``; with ``cache_dir``, reuse a stored result if present.

    The result carries ``fingerprint``, ``cache_key`` and ``cached`` (True when read from disk).
    """
    fingerprint = model_fingerprint(model_path)
    key = cache_key(fingerprint, task_set, settings)
    cache_file = cache_dir / f"{key}.json" if cache_dir is not None else None
    if cache_file is not None and cache_file.is_file():
        log.info("teacher results from cache %s", cache_file)
        result = json.loads(cache_file.read_text())
        return {**result, "cached": True}
    model, tokenizer = load_model(model_path)
    result = run_lm_eval(model, tokenizer, task_set, settings, task_manager)
    result.update({"path": str(model_path), "fingerprint": fingerprint, "cache_key": key})
    result["config"] = _model_summary(model)
    if cache_file is not None:
        atomic_write_json(cache_file, result)
        log.info("teacher results cached in %s", cache_file)
    return {**result, "cached": False}


def _model_summary(model: Any) -> dict[str, Any]:
    cfg = model.config
    return {
        "model_type": getattr(cfg, "model_type", None),
        "window": getattr(cfg, "window", None),
        "num_parameters": int(sum(p.numel() for p in model.parameters())),
    }


def evaluate_pair(
    teacher: str | Path,
    student: str | Path,
    settings: EvalSettings,
    *,
    cache_dir: Path | None,
    ppl_documents: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate teacher (cached) and student on the same task set; returns the raw results dict.

    Args:
        teacher: teacher model folder.
        student: student model folder (a hybrid or any causal LM).
        settings: tasks, limit, few-shot, batch, max length, seed.
        cache_dir: where teacher results are cached (None: no cache).
        ppl_documents: held-out documents for the perplexity task.
    """
    offline_env()
    with tempfile.TemporaryDirectory(prefix="megadistill-tasks-") as tmp:
        task_set = build_task_set(settings.tasks, Path(tmp), ppl_documents, settings.num_fewshot)
        manager = _task_manager(task_set)
        t = evaluate_model_cached(teacher, task_set, settings, cache_dir, manager)
        s = evaluate_model_cached(student, task_set, settings, None, manager)
    return {
        "format": 1,
        "settings": asdict(settings),
        "tasks": list(task_set.names),
        "source": task_set.source,
        "num_ppl_documents": len(ppl_documents or []),
        "teacher": t,
        "student": s,
    }
