"""The "lossless" metrics of METHOD.md: per-task recovery, C_alpha and alpha*.

recovery = student / teacher per benchmark (teacher / student for lower-is-better metrics such as
perplexity, so that 1.0 is parity and higher is better either way). C_alpha is the fraction of
benchmarks with student >= (1 - alpha) * teacher, i.e. recovery >= 1 - alpha. Lossless means
C_0 >= 0.5; alpha* is the smallest alpha >= 0 with C_alpha >= 0.5.

Comparisons use exact rational arithmetic (``fractions.Fraction`` of the float scores), so alpha*
is exact, not read off a grid, and ``c_alpha(alpha_star(...)) >= 0.5`` always holds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

from megadistill.errors import MegadistillError

LOSSLESS_SHARE = Fraction(1, 2)


def _check(teacher: Mapping[str, float], student: Mapping[str, float]) -> list[str]:
    if set(teacher) != set(student):
        raise MegadistillError(
            f"teacher and student were scored on different tasks: "
            f"only teacher {sorted(set(teacher) - set(student))}, "
            f"only student {sorted(set(student) - set(teacher))}; evaluate both on one task set"
        )
    if not teacher:
        raise MegadistillError("no benchmark scores: evaluate at least one task")
    for name, value in [*teacher.items(), *student.items()]:
        if not math.isfinite(value) or value < 0:
            raise MegadistillError(f"score of {name!r} is {value}; scores must be finite and >= 0")
    return sorted(teacher)


def _ratio(teacher: float, student: float, higher_is_better: bool = True) -> Fraction | None:
    """Exact recovery; None means 'infinitely good' (the reference score is 0, the other not)."""
    num, den = (Fraction(student), Fraction(teacher))
    if not higher_is_better:
        num, den = den, num
    if den == 0:
        return Fraction(1) if num == 0 else None
    return num / den


def recovery(teacher: float, student: float, higher_is_better: bool = True) -> float:
    """student / teacher (teacher / student when lower is better); 1.0 means parity.

    A zero reference score gives 1.0 when both are 0 and ``inf`` otherwise.
    """
    r = _ratio(teacher, student, higher_is_better)
    return math.inf if r is None else float(r)


def _ratios(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    lower_is_better: frozenset[str] = frozenset(),
) -> list[Fraction | None]:
    names = _check(teacher, student)
    return [_ratio(teacher[n], student[n], n not in lower_is_better) for n in names]


def c_alpha(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    alpha: float,
    lower_is_better: frozenset[str] = frozenset(),
) -> float:
    """Fraction of benchmarks with student >= (1 - alpha) * teacher.

    Args:
        teacher: task -> teacher score.
        student: task -> student score (same tasks).
        alpha: tolerated relative drop, >= 0.
        lower_is_better: tasks whose metric is better when lower (compared as teacher/student).
    """
    if alpha < 0:
        raise MegadistillError(f"alpha must be >= 0, got {alpha}")
    threshold = 1 - Fraction(alpha)
    ratios = _ratios(teacher, student, lower_is_better)
    return sum(1 for r in ratios if r is None or r >= threshold) / len(ratios)


def alpha_star(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    lower_is_better: frozenset[str] = frozenset(),
) -> float:
    """Smallest alpha >= 0 with C_alpha >= 0.5 (lower is better; 0.0 means lossless).

    With n benchmarks, C_alpha >= 0.5 needs k = ceil(n / 2) of them at recovery >= 1 - alpha, so
    alpha* = max(0, 1 - r_k) with r_k the k-th largest recovery. The float returned is rounded up
    when needed so that ``c_alpha(teacher, student, alpha_star(...)) >= 0.5`` holds exactly.
    """
    ratios = _ratios(teacher, student, lower_is_better)
    k = math.ceil(len(ratios) * LOSSLESS_SHARE)
    ordered = sorted(ratios, key=lambda r: (r is None, r if r is not None else 0), reverse=True)
    r_k = ordered[k - 1]
    if r_k is None or r_k >= 1:
        return 0.0
    exact = 1 - r_k
    value = float(exact)
    if Fraction(value) < exact:
        value = math.nextafter(value, math.inf)
    return value


def is_lossless(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    lower_is_better: frozenset[str] = frozenset(),
) -> bool:
    """C_0 >= 0.5: the student matches or beats the teacher on at least half the benchmarks."""
    return c_alpha(teacher, student, 0.0, lower_is_better) >= LOSSLESS_SHARE


def summary(
    teacher: Mapping[str, float],
    student: Mapping[str, float],
    lower_is_better: frozenset[str] = frozenset(),
) -> dict[str, float | bool | int]:
    """The report's summary: C_0, C_0.01, C_0.05, alpha*, lossless and the number of tasks."""
    return {
        "num_tasks": len(teacher),
        "C_0": c_alpha(teacher, student, 0.0, lower_is_better),
        "C_0.01": c_alpha(teacher, student, 0.01, lower_is_better),
        "C_0.05": c_alpha(teacher, student, 0.05, lower_is_better),
        "alpha_star": alpha_star(teacher, student, lower_is_better),
        "lossless": is_lossless(teacher, student, lower_is_better),
    }


# ----------------------------------------------------------------------------- uncertainty
CHANCE_SE = 2.0
"""A task whose teacher is less than this many standard errors above chance is left out."""


def ratio_se(num: Sequence[float], den: Sequence[float]) -> tuple[float, float]:
    """``R = mean(num) / mean(den)`` over paired values and its delta-method standard error,
    ``sqrt(var(num - R * den) / n) / |mean(den)|`` (sample variance, n - 1; NaN when n < 2 or
    ``mean(den)`` is 0).

    Pairing matters: two models scored on the same items (or two gaps sharing the teacher's loss)
    are correlated, and treating them as independent would misstate the error.
    """
    n = len(num)
    if n != len(den) or n == 0:
        raise MegadistillError(f"ratio_se needs paired values, got {n} and {len(den)}")
    mean_den = sum(den) / n
    if mean_den == 0:
        return (math.inf if sum(num) else 1.0), math.nan
    ratio = (sum(num) / n) / mean_den
    if n < 2:
        return ratio, math.nan
    resid = [a - ratio * b for a, b in zip(num, den)]
    mean_r = sum(resid) / n
    var = sum((r - mean_r) ** 2 for r in resid) / (n - 1)
    return ratio, math.sqrt(var / n) / abs(mean_den)


def recovery_se(
    teacher: float,
    student: float,
    teacher_se: float | None,
    student_se: float | None,
    *,
    teacher_items: Sequence[float] | None = None,
    student_items: Sequence[float] | None = None,
    higher_is_better: bool = True,
) -> tuple[float, str]:
    """Standard error of :func:`recovery` and how it was computed.

    ``paired``: with per-item scores of both models on the same items, the delta method for the
    ratio of paired means (:func:`ratio_se`); teacher and student err on the same hard items, so
    this is the honest (usually smaller) error. ``independent``: otherwise, from the two standard
    errors as if the scores were independent, ``r * sqrt((se_s / s)^2 + (se_t / t)^2)``
    (conservative when the scores are positively correlated). NaN when neither is available.
    """
    if (
        higher_is_better
        and teacher_items is not None
        and student_items is not None
        and len(teacher_items) == len(student_items) > 1
    ):
        return ratio_se(student_items, teacher_items)[1], "paired"
    r = recovery(teacher, student, higher_is_better)
    if teacher_se is None or student_se is None or not teacher or not student or math.isinf(r):
        return math.nan, "none"
    return r * math.sqrt((student_se / student) ** 2 + (teacher_se / teacher) ** 2), "independent"


def near_chance(teacher: float, teacher_se: float | None, chance: float | None) -> bool:
    """True when the teacher's score is within ``CHANCE_SE`` standard errors of chance (or at
    or below it): its recovery would measure noise, not what the student kept."""
    if chance is None:
        return False
    if teacher <= chance:
        return True
    return (
        teacher_se is not None
        and math.isfinite(teacher_se)
        and (teacher - chance < CHANCE_SE * teacher_se)
    )
