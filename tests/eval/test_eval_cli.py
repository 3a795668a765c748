"""`megadistill eval` / `report` end to end on tiny models and local tasks (real lm-eval runs).

The student is a perturbed copy of a tiny random Llama teacher. The scores in the report are
checked against a direct re-computation with the model (log-likelihoods by hand), the teacher cache
is shown to be read on the second run, and `report` rebuilds the same text from results.json.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.errors import MegadistillError
from megadistill.eval.metrics import near_chance
from megadistill.eval.report import run_labels, task_rows, window_fidelity
from megadistill.eval.tasks import TINY_MC_ITEMS

MAX_LEN = 64
DOCS = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be.",
    "In the beginning God created the heaven and the earth.",
]


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=256,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    teacher = _tiny_llama(0)
    teacher.save_pretrained(root / "teacher")
    byte_tokenizer(root / "teacher")
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.save_pretrained(root / "student")
    byte_tokenizer(root / "student")
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    return {"teacher": root / "teacher", "student": root / "student", "ppl": root / "heldout.jsonl"}


def _sum_logp(model: LlamaForCausalLM, inputs: list[int], targets: list[int]) -> float:
    """Sum of log p(targets) where targets are the last len(targets) next tokens of inputs."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([inputs])).logits[0, -len(targets) :]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return float(logp[torch.arange(len(targets)), torch.tensor(targets)].sum())


def _direct_scores(path: Path) -> dict[str, float]:
    """tiny_mc accuracy and held-out word perplexity, computed without lm-eval."""
    model = LlamaForCausalLM.from_pretrained(str(path)).eval()
    hits = 0
    for question, choices, gold in TINY_MC_ITEMS:
        ctx = list(question.encode())
        lls = [
            _sum_logp(model, ctx + list(f" {c}".encode())[:-1], list(f" {c}".encode()))
            for c in choices
        ]
        hits += int(max(range(len(lls)), key=lls.__getitem__) == gold)
    total_ll, words = 0.0, 0
    for doc in DOCS:
        toks = list(doc.encode())
        # Disjoint windows of MAX_LEN predicted tokens; the first is prefixed with bos (id 1, lm-eval's prefix token);
        # a short last window still gets a full MAX_LEN input (more context), as in lm-eval.
        for start in range(0, len(toks), MAX_LEN):
            pred = toks[start : start + MAX_LEN]
            end = start + len(pred)
            inputs = ([1] + toks)[max(0, end - MAX_LEN) : end]
            total_ll += _sum_logp(model, inputs, pred)
        words += len(re.split(r"\s+", doc))
    return {"tiny_mc": hits / len(TINY_MC_ITEMS), "heldout_ppl": math.exp(-total_ll / words)}


def _eval(models: dict[str, Path], out: Path, cache: Path) -> dict:
    argv = ["eval", "--teacher", str(models["teacher"]), "--student", str(models["student"])]
    argv += ["--tasks", "tiny_mc", "--ppl-text", str(models["ppl"]), "--max-length", str(MAX_LEN)]
    argv += ["--niah", "128,256", "--cache-dir", str(cache), "--out", str(out)]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_eval_report_cache_and_rebuild(models: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _eval(models, tmp_path / "run1", cache)
    for name in ("results.json", "report.md", "recovery.png"):
        assert (tmp_path / "run1" / name).is_file()
    assert (tmp_path / "run1" / "recovery.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert first["teacher"]["cached"] is False
    # Two real lm-eval runs: each row equals a direct re-computation, and they differ.
    for role in ("teacher", "student"):
        direct = _direct_scores(models[role])
        assert first[role]["primary"]["tiny_mc"] == direct["tiny_mc"]
        assert first[role]["primary"]["heldout_ppl"] == pytest.approx(
            direct["heldout_ppl"], rel=1e-4
        )
    t_ppl, s_ppl = (
        first["teacher"]["primary"]["heldout_ppl"],
        first["student"]["primary"]["heldout_ppl"],
    )
    assert t_ppl != s_ppl
    report = (tmp_path / "run1" / "report.md").read_text()
    assert "| heldout_ppl (not in C_alpha) | word_perplexity |" in report
    assert f"{t_ppl / s_ppl:.4f}" in report  # perplexity recovery = teacher / student
    assert "SWA window W: n/a" in report
    # Standard errors and per-item scores kept; lm-eval's SE of a mean is stdev / sqrt(n).
    for role in ("teacher", "student"):
        items = first[role]["per_doc"]["tiny_mc"]
        assert statistics.mean(items) == pytest.approx(first[role]["primary"]["tiny_mc"])
        assert first[role]["stderr"]["tiny_mc"]["acc"] == pytest.approx(
            statistics.stdev(items) / math.sqrt(len(TINY_MC_ITEMS))
        )
    assert first["teacher"]["chance"]["tiny_mc"] == pytest.approx(1 / 3)  # 3 choices per item
    (row,) = [r for r in task_rows(first) if r["task"] == "tiny_mc"]
    t = first["teacher"]["primary"]["tiny_mc"]
    at_chance = near_chance(t, first["teacher"]["stderr"]["tiny_mc"]["acc"], 1 / 3)
    assert row["at_chance"] is at_chance and row["recovery_se_method"] == "paired"
    assert ("alpha* =" in report) is not at_chance  # a random teacher may well be at chance
    assert "Needle in a haystack" in report and len(first["niah"]["rows"]) == 2
    assert [r["num_probes"] for r in first["niah"]["rows"]] == [21, 21]
    lo, hi = first["niah"]["rows"][0]["teacher_acc_lo"], first["niah"]["rows"][0]["teacher_acc_hi"]
    assert lo <= first["niah"]["rows"][0]["teacher_acc"] <= hi and f"[{lo:.2f}, {hi:.2f}]" in report

    # Second run: the teacher comes from the cache. Plant a marker in the cache file to prove it.
    (entry,) = cache.glob("*.json")
    cached = json.loads(entry.read_text())
    cached["primary"]["tiny_mc"] = 0.123
    entry.write_text(json.dumps(cached))
    second = _eval(models, tmp_path / "run2", cache)
    assert second["teacher"]["cached"] is True
    assert second["teacher"]["primary"]["tiny_mc"] == 0.123
    assert second["student"]["primary"] == first["student"]["primary"]  # same seeds, same numbers

    # `report` rebuilds the same text from results.json, and compares runs side by side.
    (tmp_path / "run1" / "report.md").unlink()
    (tmp_path / "run1" / "recovery.png").unlink()
    assert main(["report", str(tmp_path / "run1")]) == 0
    assert (tmp_path / "run1" / "report.md").read_text() == report
    assert (tmp_path / "run1" / "recovery.png").is_file()
    assert (
        main(["report", str(tmp_path / "run1"), str(tmp_path / "run2"), "--out", str(tmp_path)])
        == 0
    )
    comparison = (tmp_path / "comparison.md").read_text()
    assert "| run1 | run2 |" in comparison and "recovery tiny_mc" in comparison
    assert (tmp_path / "comparison.png").is_file()


def test_window_fidelity_counts_tokens_beyond_w() -> None:
    # Input of 64 tokens, all scored: positions 0..63, beyond W=16 are 16..63 -> 48.
    # Input of 20 tokens, last 5 scored: positions 15..19, beyond W=16 are 16..19 -> 4.
    results = {
        "settings": {"max_length": 64},
        "student": {"config": {"window": 16}, "requests": {"a": [[64, 64]], "b": [[20, 5]]}},
    }
    w = window_fidelity(results)
    assert (w["scored_tokens"], w["scored_beyond_window"]) == (69, 52)
    assert w["share_beyond_window"] == pytest.approx(52 / 69)
    assert (w["input_len_min"], w["input_len_max"]) == (20, 64)


def test_run_labels_are_the_shortest_distinct_path_tails(tmp_path) -> None:
    a, b = tmp_path / "q64" / "pipeline" / "eval", tmp_path / "q512" / "pipeline" / "eval"
    assert run_labels([a, b]) == ["q64/pipeline/eval", "q512/pipeline/eval"]
    assert run_labels([tmp_path / "run1", tmp_path / "run2"]) == ["run1", "run2"]
    with pytest.raises(MegadistillError, match="same run folder is given twice"):
        run_labels([a, tmp_path / "q64" / "pipeline" / ".." / "pipeline" / "eval"])
