"""choose-layers: each layer's measured gain when it alone gets its full attention back."""

import json

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.eval.layer_choice import rank_softmax_layers
from megadistill.teachers.tiny import tiny_teacher

DOC = "Call me Ishmael. Some years ago, never mind how long precisely, having little money. " * 3


def test_gains_rank_layers_and_the_cli_prints_the_choice(tmp_path, capsys):
    teacher = tiny_teacher("llama", seed=0)
    teacher.save_pretrained(tmp_path / "t")
    byte_tokenizer(tmp_path / "t")
    result = rank_softmax_layers(tmp_path / "t", [DOC, DOC[9:]], window=8, num_sinks=2)
    n = teacher.config.num_hidden_layers
    assert len(result["gains"]) == n and sorted(result["ranking"]) == list(range(n))
    gains = result["gains"]
    assert [gains[i] for i in result["ranking"]] == sorted(gains, reverse=True)
    assert result["floor"] != result["teacher"]  # cutting attention to 8 tokens changes the loss
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": DOC}) + "\n")
    out = tmp_path / "choice.json"
    args = ["choose-layers", "--teacher", str(tmp_path / "t"), "--text", str(tmp_path / "d.jsonl"),
            "--window", "8", "--num-sinks", "2", "--k", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    best = json.loads(out.read_text())["ranking"][0]
    assert f"softmax_layers for k = 1: [{best}]" in capsys.readouterr().out


def test_documents_shorter_than_the_window_are_refused(tmp_path):
    import pytest

    from megadistill.errors import MegadistillError

    tiny_teacher("llama", seed=0).save_pretrained(tmp_path / "t")
    byte_tokenizer(tmp_path / "t")
    with pytest.raises(MegadistillError, match="longer than the window"):
        rank_softmax_layers(tmp_path / "t", ["short"], window=64)


def test_retrieval_criterion_and_the_k_curve_from_floor_to_teacher(tmp_path, capsys):
    """The needle criterion ranks every layer; the curve's k = 0 row is the floor and keeping
    every layer gives the teacher's numbers exactly."""
    teacher = tiny_teacher("llama", seed=0)
    teacher.save_pretrained(tmp_path / "t")
    byte_tokenizer(tmp_path / "t")
    n = teacher.config.num_hidden_layers
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": DOC}) + "\n")
    out = tmp_path / "choice.json"
    args = ["choose-layers", "--teacher", str(tmp_path / "t"), "--text", str(tmp_path / "d.jsonl"),
            "--window", "8", "--num-sinks", "2", "--k", "1", "--criterion", "both",
            "--needle-length", "96", "--curve", f"0,1,{n}", "--niah", "96", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    retrieval = result["rankings"]["retrieval"]
    assert retrieval["criterion"] == "retrieval" and sorted(retrieval["ranking"]) == list(range(n))
    assert retrieval["floor"] != retrieval["teacher"]  # a needle 80 tokens back, W = 8
    curve = result["curve"]
    assert [(r["criterion"], r["k"]) for r in curve["rows"]] == [
        (c, k) for c in ("nll", "retrieval") for k in (0, 1, n)
    ]
    floor = result["floor"]
    for r in curve["rows"]:
        if r["k"] == 0:
            assert r["nll"] == floor and r["layers"] == []
        if r["k"] == n:  # every layer full: the teacher
            assert r["nll"] == curve["teacher"]["nll"]
            assert r["needle"] == curve["teacher"]["needle"]
    assert "| retrieval | 1 |" in capsys.readouterr().out
