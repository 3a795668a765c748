"""C_alpha / alpha* / recovery against hand-worked cases (METHOD.md, "Measuring lossless")."""

from __future__ import annotations

import math
import random

import pytest

from megadistill.errors import MegadistillError
from megadistill.eval.metrics import alpha_star, c_alpha, is_lossless, recovery, summary

# Paper, Llama-3.1-8B base: MMLU 65.9 -> 66.1 and GSM8K 48.4 -> 57.8 (student better); the other
# two rows are illustrative tasks where the student is slightly lower, as in the paper's table.
LLAMA_TEACHER = {"mmlu": 65.9, "gsm8k": 48.4, "arc_challenge": 79.7, "hellaswag": 82.1}
LLAMA_STUDENT = {"mmlu": 66.1, "gsm8k": 57.8, "arc_challenge": 79.0, "hellaswag": 81.5}


def test_paper_llama31_8b_base_is_lossless() -> None:
    assert recovery(65.9, 66.1) == pytest.approx(66.1 / 65.9)
    assert recovery(48.4, 57.8) == pytest.approx(1.194, abs=1e-3)
    assert c_alpha(LLAMA_TEACHER, LLAMA_STUDENT, 0.0) == 0.5
    assert is_lossless(LLAMA_TEACHER, LLAMA_STUDENT)
    assert alpha_star(LLAMA_TEACHER, LLAMA_STUDENT) == 0.0
    # 79.0 / 79.7 = 0.9912 and 81.5 / 82.1 = 0.9927: both within 1 %
    assert c_alpha(LLAMA_TEACHER, LLAMA_STUDENT, 0.01) == 1.0
    assert c_alpha(LLAMA_TEACHER, LLAMA_STUDENT, 0.005) == 0.5


def test_hand_worked_alpha_star_is_exact() -> None:
    teacher = {"a": 50.0, "b": 50.0, "c": 50.0}
    student = {"a": 50.0, "b": 49.0, "c": 45.0}  # recoveries 1.0, 0.98, 0.90
    assert c_alpha(teacher, student, 0.0) == pytest.approx(1 / 3)
    assert not is_lossless(teacher, student)
    a = alpha_star(teacher, student)  # two of three tasks needed: 1 - 0.98
    assert a == pytest.approx(0.02, abs=1e-15)
    assert c_alpha(teacher, student, a) == pytest.approx(2 / 3)
    assert c_alpha(teacher, student, 0.0199) == pytest.approx(1 / 3)  # a grid point below misses
    s = summary(teacher, student)
    assert s["num_tasks"] == 3 and s["C_0.01"] == pytest.approx(1 / 3)
    assert s["C_0.05"] == pytest.approx(2 / 3) and s["lossless"] is False


def test_collapsed_student_gets_alpha_star_one() -> None:
    # A student at zero on every task (LoLCATs / QRWKV6 territory in the paper) -> alpha* = 1.0.
    assert alpha_star({"a": 60.0, "b": 70.0}, {"a": 0.0, "b": 0.0}) == 1.0
    # Even number of tasks: the better half decides (ceil(n/2) = 2 of 4 tasks).
    t = {"a": 1.0, "b": 1.0, "c": 1.0, "d": 1.0}
    assert alpha_star(t, {"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6}) == pytest.approx(0.2)


def test_lower_is_better_metrics_invert_the_ratio() -> None:
    assert recovery(10.0, 10.5, higher_is_better=False) == pytest.approx(10 / 10.5)
    lower = frozenset({"ppl"})
    teacher, student = {"ppl": 10.0}, {"ppl": 10.5}
    assert c_alpha(teacher, student, 0.04, lower) == 0.0
    assert c_alpha(teacher, student, 0.05, lower) == 1.0
    assert alpha_star(teacher, student, lower) == pytest.approx(1 - 10 / 10.5)
    assert recovery(0.0, 0.0) == 1.0 and recovery(0.0, 0.3) == math.inf


def test_alpha_star_is_the_smallest_alpha_on_random_cases() -> None:
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 9)
        teacher = {f"t{i}": rng.uniform(0.05, 1.0) for i in range(n)}
        student = {k: v * rng.uniform(0.7, 1.1) for k, v in teacher.items()}
        a = alpha_star(teacher, student)
        assert c_alpha(teacher, student, a) >= 0.5
        if a > 0:
            assert c_alpha(teacher, student, math.nextafter(a, 0.0)) < 0.5


def test_bad_inputs_are_named() -> None:
    with pytest.raises(MegadistillError, match="different tasks"):
        c_alpha({"a": 1.0}, {"b": 1.0}, 0.0)
    with pytest.raises(MegadistillError, match="finite"):
        alpha_star({"a": float("nan")}, {"a": 1.0})
    with pytest.raises(MegadistillError, match="alpha must be"):
        c_alpha({"a": 1.0}, {"a": 1.0}, -0.1)
