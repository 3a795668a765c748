"""Loss by position: the statistics on a hand-made example, and `megadistill eval --heldout` end to
end on a tiny teacher, its converted hybrid student and the SWA floor (real models, real lm-eval).
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.errors import MegadistillError
from megadistill.eval.heldout import parse_heldout
from megadistill.eval.positions import add_recovered, bucket_stats, ratio_se
from megadistill.eval.report import task_rows
from megadistill.teachers.tiny import tiny_teacher

W = 16
MAX_LEN = 128

# Three documents of 4 tokens and one of 1 token, per-token NLLs chosen by hand.
TEACHER = [[1.0, 2.0, 1.0, 1.0], [1.0, 1.0, 2.0, 2.0], [3.0, 1.0, 1.0, 3.0], [2.0]]
FLOOR = [[1.0, 2.0, 2.0, 2.0], [1.0, 1.0, 3.5, 3.5], [3.0, 1.0, 4.0, 4.0], [2.0]]
STUDENT = [[2.0, 2.0, 1.5, 1.5], [1.0, 2.0, 2.5, 2.5], [3.0, 1.0, 3.1, 3.1], [4.0]]


def test_bucket_stats_and_recovered_share_by_hand() -> None:
    nll = {"teacher": TEACHER, "student": STUDENT, "floor": FLOOR}
    rows = add_recovered(bucket_stats(nll, [0, 2, 4]))
    first, second = rows
    # Bucket [0, 2): 4 documents, 7 tokens; per-document gaps of the student: 0.5, 0.5, 0, 2.
    assert (first["num_docs"], first["num_tokens"]) == (4, 7)
    assert first["teacher"] == pytest.approx(11 / 7)
    assert first["student"] == pytest.approx(15 / 7)
    assert first["student_gap"] == pytest.approx(0.75)
    assert first["student_gap_se"] == pytest.approx(statistics.stdev([0.5, 0.5, 0, 2]) / 2)
    assert first["student_rel_gap"] == pytest.approx(0.75 / (11 / 7))
    # The floor equals the teacher inside [0, 2): no gap to win back, no share.
    assert first["floor_gap"] == 0 and first["recovered"] is None
    assert first["recovered_se"] is None
    # Bucket [2, 4): the 1-token document has no token there.
    assert (second["num_docs"], second["num_tokens"]) == (3, 6)
    floor_gaps, student_gaps = [1.0, 1.5, 2.0], [0.5, 0.5, 1.1]
    assert second["floor_gap"] == pytest.approx(1.5)
    assert second["floor_gap_se"] == pytest.approx(0.5 / math.sqrt(3))
    assert second["student_gap"] == pytest.approx(0.7)
    assert second["recovered"] == pytest.approx((1.5 - 0.7) / 1.5)
    # Delta method for R = mean(student gap) / mean(floor gap), paired over documents.
    r = 0.7 / 1.5
    resid = [a - r * b for a, b in zip(student_gaps, floor_gaps)]
    expected_se = math.sqrt(statistics.variance(resid) / 3) / 1.5
    assert second["recovered_se"] == pytest.approx(expected_se)
    assert ratio_se(student_gaps, floor_gaps) == pytest.approx((r, expected_se))


def test_parse_heldout_specs(tmp_path: Path) -> None:
    f = tmp_path / "a.jsonl"
    f.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    (hs,) = parse_heldout([f"verse:out:{f}"])
    assert (hs.name, hs.domain, hs.documents) == ("verse", "out", ("one", "two"))
    for bad in (f"verse:maybe:{f}", "verse:out", f":in:{f}"):
        with pytest.raises(MegadistillError, match="expected NAME:in\\|out:PATH"):
            parse_heldout([bad])
    with pytest.raises(MegadistillError, match="given twice"):
        parse_heldout([f"a:in:{f}", f"a:out:{f}"])


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from megadistill.teachers.conversion import convert_pretrained

    root = tmp_path_factory.mktemp("pos")
    tiny_teacher("llama", seed=0).save_pretrained(root / "teacher")
    byte_tokenizer(root / "teacher")
    convert_pretrained(root / "teacher", root / "student", [f"window={W}", "num_sinks=2"])
    text = "In the beginning God created the heaven and the earth. " * 4
    (root / "verse.jsonl").write_text(
        "".join(json.dumps({"text": f"{i} {text}"}) + "\n" for i in range(3))
    )
    (root / "prose.txt").write_text("It is a truth universally acknowledged, that a man. " * 3)
    return {"teacher": root / "teacher", "student": root / "student", "root": root}


def _eval(models: dict[str, Path], out: Path, cache: Path) -> dict:
    root = models["root"]
    argv = ["eval", "--teacher", str(models["teacher"]), "--student", str(models["student"])]
    argv += ["--tasks", "tiny_mc@2", "--max-length", str(MAX_LEN), "--cache-dir", str(cache)]
    argv += ["--heldout", f"verse:out:{root / 'verse.jsonl'}", f"prose:in:{root / 'prose.txt'}"]
    argv += ["--niah", "128", "--out", str(out)]
    assert main(argv) == 0
    return json.loads((out / "results.json").read_text())


def test_eval_positions_floor_cache_and_report(models: dict[str, Path], tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = _eval(models, tmp_path / "run1", cache)
    pos = first["positions"]
    assert pos["models"] == ["teacher", "floor", "student"]  # floor by default: hybrid student
    assert pos["floor"] == {"window": W, "num_sinks": 2, "gate_mode": "swa"}
    assert pos["cached"] == {"teacher": False, "floor": False, "student": False}
    verse = pos["sets"]["verse"]
    assert verse["domain"] == "out" and pos["sets"]["prose"]["domain"] == "in"
    assert [r["lo"] for r in verse["buckets"]] == [0, 16, 32, 64]  # [0, W), [W, 2W), ...
    assert verse["buckets"][-1]["hi"] == MAX_LEN
    assert verse["doc_tokens"] == [MAX_LEN] * 3
    # Inside the window, SWA sees the whole prefix: the floor is the teacher.
    inside = verse["buckets"][0]
    assert inside["floor"] == pytest.approx(inside["teacher"], abs=1e-5)
    # Beyond it the floor loses context: its loss differs, and the pooled >= 4W row exists.
    assert all(abs(r["floor"] - r["teacher"]) > 1e-5 for r in verse["buckets"][1:])
    beyond = verse["beyond"]  # positions 64..126 of each document (127 predicted tokens)
    assert beyond["from"] == 4 * W and beyond["num_tokens"] == 3 * (MAX_LEN - 1 - 4 * W)

    report = (tmp_path / "run1" / "report.md").read_text()
    sections = [line for line in report.splitlines() if line.startswith("## ")]
    assert sections[0] == "## Loss by position (headline)"
    assert "### verse (out-of-domain; 3 documents)" in report
    assert "### prose (in-domain; 1 documents)" in report
    assert "| **>= 64** |" in report and "floor gap ± SE" in report
    assert (tmp_path / "run1" / "positions.png").read_bytes()[:4] == b"\x89PNG"

    # The 2-shot task: its own num_fewshot, prompts past W, the share shown per task.
    assert first["tasks"] == ["tiny_mc_2shot"]
    assert first["student"]["num_fewshot"] == {"tiny_mc_2shot": 2}
    (row,) = task_rows(first)
    assert row["task"] == "tiny_mc@2" and row["input_beyond_window"] > 0.5
    assert min(total for total, _ in first["student"]["requests"]["tiny_mc_2shot"]) > 2 * W
    assert "| tiny_mc@2" in report
    # Needle: 21 identical probes for both models, with intervals.
    (niah,) = first["niah"]["rows"]
    assert niah["num_probes"] == 21 and len(first["niah"]["probes"]["128"]) == 21
    assert niah["student_acc_lo"] <= niah["student_acc"] <= niah["student_acc_hi"]

    # Second run: teacher and floor NLLs come from the cache, the numbers are the same.
    second = _eval(models, tmp_path / "run2", cache)
    assert second["positions"]["cached"] == {"teacher": True, "floor": True, "student": False}
    assert second["positions"]["sets"] == pos["sets"]

    runs = [str(tmp_path / "run1"), str(tmp_path / "run2")]
    assert main(["report", *runs, "--out", str(tmp_path)]) == 0
    assert (tmp_path / "run1" / "report.md").read_text() == report  # rebuilt from results.json
    comparison = (tmp_path / "comparison.md").read_text()
    assert "| verse (out-of-domain) rel. gap beyond 4W |" in comparison
    assert "| prose (in-domain) recovered beyond 4W |" in comparison
    assert (tmp_path / "comparison_positions.png").read_bytes()[:4] == b"\x89PNG"


def test_positions_need_a_window_for_a_plain_student(models: dict[str, Path], tmp_path, capsys):
    root = models["root"]
    argv = ["eval", "--teacher", str(models["teacher"]), "--student", str(models["teacher"])]
    argv += ["--tasks", "tiny_mc", "--max-length", str(MAX_LEN), "--no-cache"]
    argv += ["--heldout", f"verse:out:{root / 'verse.jsonl'}", "--out", str(tmp_path / "r")]
    assert main(argv) == 2  # before any lm-eval run
    assert "has no sliding window: pass --positions-window W" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_recipe_eval_heldout_list_reaches_the_eval_command(tmp_path: Path) -> None:
    """The recipe's ``eval: {heldout: [...], no_floor: true, ...}`` becomes eval's flags."""
    from megadistill.cli import build_parser
    from megadistill.pipeline import build_dag, load_recipe

    recipe_file = Path(__file__).parents[2] / "megadistill/recipes/tiny_cpu.yaml"
    sets = ["kjv:out:/data/kjv.jsonl", "austen:in:/data/austen.jsonl"]
    overrides = [f"eval.heldout={json.dumps(sets)}", "eval.no_floor=true"]
    overrides += ["eval.positions_max_length=1024", "eval.niah_trials=10"]
    recipe = load_recipe(recipe_file, overrides)
    (argv,) = next(s for s in build_dag(recipe, tmp_path) if s.name == "eval").commands[0]
    args = build_parser().parse_args(list(argv[3:]))
    assert args.heldout == sets and args.no_floor and not args.floor
    assert (args.positions_max_length, args.niah_trials) == (1024, 10)
