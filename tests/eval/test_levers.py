"""compare-positions: students vs teacher and SWA floor by position, on real (tiny) models."""

import json

import pytest

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be."
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("levers")
    teacher = tiny_teacher("llama", seed=0)
    teacher.save_pretrained(root / "teacher")
    byte_tokenizer(root / "teacher")
    n = teacher.config.num_hidden_layers
    students = {
        # the floor itself: nothing beyond the window is won back
        "swa": convert(teacher, window=8, num_sinks=2, gate_mode="swa")[0],
        # every layer kept as softmax attention: the teacher, everything won back
        "kept": convert(teacher, window=8, num_sinks=2, softmax_layers=list(range(n)))[0],
        # the paper's gate at 0.5: differs from the floor before any training
        "hybrid": convert(teacher, window=8, num_sinks=2, seed=1, gate_init="half")[0],
    }
    for name, model in students.items():
        model.save_pretrained(root / name)
        byte_tokenizer(root / name)
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": TEXT[i:] + TEXT}) + "\n" for i in (0, 7, 19)))
    return root, docs


def _compare_args(root, docs, out: str, *extra: str) -> list[str]:
    """compare-positions of the three students on the prose set, into ``root/out``."""
    return [
        "compare-positions", "--teacher", str(root / "teacher"),
        *(f"{n}={root / n}" for n in ("swa", "kept", "hybrid")), *extra,
        "--heldout", f"prose:out:{docs}", "--max-length", "128", "--out", str(root / out),
        "--cache-dir", str(root / "cache"),
    ]  # fmt: skip


def test_compare_positions_measures_recovered_share(models, capsys):
    root, docs = models
    args = _compare_args(root, docs, "cmp")
    assert main(args) == 0
    md = capsys.readouterr().out
    assert "prose (out-domain, 3)" in md
    result = json.loads((root / "cmp" / "positions.json").read_text())
    beyond = result["sets"]["prose"]["beyond"]
    assert beyond["from"] == 32 and beyond["num_docs"] == 3
    assert beyond["floor"]["rel_gap"] > 0  # cutting attention to 8 tokens costs something
    assert beyond["swa"]["recovered"] == pytest.approx(0.0, abs=1e-6)
    assert beyond["kept"]["recovered"] == pytest.approx(1.0, abs=1e-5)
    assert beyond["kept"]["rel_gap"] == pytest.approx(0.0, abs=1e-6)
    assert beyond["hybrid"]["recovered"] != pytest.approx(0.0, abs=1e-6)
    buckets = result["sets"]["prose"]["buckets"]
    assert [(b["lo"], b["hi"]) for b in buckets] == [(0, 8), (8, 16), (16, 32), (32, 64),
                                                     (64, 128)]  # fmt: skip
    assert buckets[0]["floor_gap"] == pytest.approx(0.0, abs=1e-6)  # inside W: exact
    # Teacher and floor losses are cached: a second run reads them back.
    assert len(list((root / "cache").glob("positions-*.json"))) == 2


def test_compare_positions_bad_heldout_spec_is_one_line(models, capsys):
    root, docs = models
    args = ["compare-positions", "--teacher", str(root / "teacher"), f"a={root / 'swa'}",
            "--heldout", f"prose:maybe:{docs}", "--out", str(root / "x")]  # fmt: skip
    assert main(args) == 2
    assert "NAME:in|out:PATH" in capsys.readouterr().err


def test_a_student_as_second_floor_gives_shares_of_its_gap(models, capsys):
    """--reference: a student (here the untrained floor itself, so the shares must agree with the
    floor's) serves as a second floor; the reference gets no share of its own gap."""
    root, docs = models
    args = _compare_args(root, docs, "ref", "--reference", "swa")
    assert main(args) == 0
    md = capsys.readouterr().out
    beyond = json.loads((root / "ref" / "positions.json").read_text())["sets"]["prose"]["beyond"]
    assert beyond["reference"] == "swa" and "recovered_ref" not in beyond["swa"]
    assert beyond["kept"]["recovered_ref"] == pytest.approx(1.0, abs=1e-5)
    assert beyond["hybrid"]["recovered_ref"] == pytest.approx(beyond["hybrid"]["recovered"])
    assert beyond["hybrid"]["recovered_ref_se"] == pytest.approx(beyond["hybrid"]["recovered_se"])
    assert "vs swa won" in md
    bad = [("nope" if a == "swa" and args[i - 1] == "--reference" else a)
           for i, a in enumerate(args)]  # fmt: skip
    assert main(bad) == 2
    assert "reference 'nope' is not one of the students" in capsys.readouterr().err


def test_needles_sit_beside_the_losses(models, capsys):
    """--niah: teacher, floor and every student get the same probes; a student with every layer
    kept retrieves exactly as the teacher, the SWA-only one as the floor; teacher and floor are
    read back from the cache on a second run; a length past the teacher's context is refused."""
    root, docs = models
    args = _compare_args(root, docs, "niah", "--niah", "128,96")
    assert main(args) == 0
    md = capsys.readouterr().out
    niah = json.loads((root / "niah" / "positions.json").read_text())["niah"]
    assert niah["lengths"] == [96, 128]
    models_ = niah["models"]
    assert set(models_) == {"teacher", "floor", "swa", "kept", "hybrid"}
    for n in ("96", "128"):
        assert models_["teacher"][n]["n"] == 21
        for a, b in (("kept", "teacher"), ("swa", "floor")):
            assert models_[a][n]["hits"] == models_[b][n]["hits"]
            assert models_[a][n]["digit_acc"] == pytest.approx(models_[b][n]["digit_acc"])
            assert models_[a][n]["logp"] == pytest.approx(models_[b][n]["logp"], abs=1e-4)
        assert models_["hybrid"][n]["logp"] != pytest.approx(models_["floor"][n]["logp"])
    assert "Needle (21 identical probes per length" in md and "| 96 tokens | 128 tokens |" in md
    rows = [line.split(" |")[0] for line in md.splitlines() if line.startswith("| ") and
            "/21 [" in line]  # fmt: skip
    assert rows == ["| teacher", "| floor", "| swa", "| kept", "| hybrid"]
    cached = sorted((root / "cache").glob("needles-*.json"))
    assert len(cached) == 2  # teacher and floor
    stamps = [p.stat().st_mtime_ns for p in cached]
    assert main(args) == 0
    capsys.readouterr()
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert json.loads((root / "niah" / "positions.json").read_text())["niah"] == niah
    too_long = [("96,5000" if a == "128,96" else a) for a in args]
    assert main(too_long) == 2
    assert "exceed the teacher's context (4096 tokens)" in capsys.readouterr().err
