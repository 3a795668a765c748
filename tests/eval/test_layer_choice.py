"""choose-layers: each layer's measured gain when it alone gets its full attention back."""

import json

import pytest
import torch

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.eval.layer_choice import combine_rankings, rank_softmax_layers
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
        (c, k) for c in ("nll", "retrieval", "both") for k in (0, 1, n)
    ]
    both = combine_rankings(retrieval["ranking"], result["rankings"]["nll"]["ranking"])
    assert result["ranking"] == both and [r["layers"] for r in curve["rows"][-2:]] == [
        both[:1],
        list(range(n)),
    ]
    floor = result["rankings"]["nll"]["floor"]
    for r in curve["rows"]:
        if r["k"] == 0:
            assert r["nll"] == floor and r["layers"] == []
        if r["k"] == n:  # every layer full: the teacher
            assert r["nll"] == curve["teacher"]["nll"]
            assert r["needle"] == curve["teacher"]["needle"]
    assert "| retrieval | 1 |" in capsys.readouterr().out


def _sharp_teacher(path):
    """A tiny Llama teacher with sharp attention (what lies beyond W = 8 tokens matters), saved
    with a byte tokenizer at ``path``."""
    teacher = tiny_teacher("llama", seed=0)
    with torch.no_grad():
        for layer in teacher.model.layers:
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.o_proj.weight.mul_(20.0)
    teacher.save_pretrained(path)
    byte_tokenizer(path)
    return teacher


def test_kl_criterion_ranks_the_layers_a_trained_student_does_not_keep(tmp_path, capsys):
    """--criterion kl --student: each layer the student does not keep, given full attention
    inside the student, lowers its beyond-W KL to the teacher by its gain; kept layers get none.
    With every other layer kept, the last one's gain is the student's whole KL."""
    from megadistill.eval.layer_choice import rank_by_kl
    from megadistill.teachers import convert

    teacher = _sharp_teacher(tmp_path / "t")
    n = teacher.config.num_hidden_layers
    student, _ = convert(teacher, window=8, num_sinks=2, softmax_layers=[0], gate_init="half")
    student.save_pretrained(tmp_path / "s")
    byte_tokenizer(tmp_path / "s")
    result = rank_by_kl(tmp_path / "t", tmp_path / "s", [DOC, DOC[9:]])
    assert result["kept"] == [0] and result["gains"][0] == 0.0
    assert sorted(result["ranking"]) == list(range(1, n)) and result["floor"] > 0
    assert [result["gains"][i] for i in result["ranking"]] == sorted(result["gains"][1:])[::-1]
    last, _ = convert(teacher, window=8, num_sinks=2, softmax_layers=list(range(n - 1)))
    last.save_pretrained(tmp_path / "l")
    byte_tokenizer(tmp_path / "l")
    alone = rank_by_kl(tmp_path / "t", tmp_path / "l", [DOC, DOC[9:]])
    assert alone["ranking"] == [n - 1] and alone["floor"] > 5e-5
    assert alone["gains"][n - 1] == pytest.approx(alone["floor"], rel=1e-2)  # KL -> 0
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": DOC}) + "\n")
    args = ["choose-layers", "--teacher", str(tmp_path / "t"), "--text", str(tmp_path / "d.jsonl"),
            "--window", "8", "--criterion", "kl", "--student", str(tmp_path / "s"), "--k", "1"]  # fmt: skip
    assert main(args) == 0
    assert "(the student's [0] and 1 more)" in capsys.readouterr().out
    assert main([*args[:-4], "--k", "1"]) == 2  # kl without --student
    # Greedy on a student that keeps no layer: the first pick is the one-pass best, the second
    # is measured beside it; each pick's KL is the student's with the picks full (measured again
    # here: with every layer full it is the teacher, KL 0); the picks lead the ranking.
    none, _ = convert(teacher, window=8, num_sinks=2, gate_init="half")
    none.save_pretrained(tmp_path / "g")
    byte_tokenizer(tmp_path / "g")
    alone = rank_by_kl(tmp_path / "t", tmp_path / "g", [DOC, DOC[9:]])
    greedy = rank_by_kl(tmp_path / "t", tmp_path / "g", [DOC, DOC[9:]], greedy=2)
    first, second = greedy["greedy"]
    assert first["layer"] == alone["ranking"][0] and greedy["gains"] == alone["gains"]
    assert first["kl"] == pytest.approx(alone["floor"] - alone["gains"][first["layer"]])
    assert greedy["ranking"] == [first["layer"], second["layer"]] and first["kl"] > 1e-4
    assert second["kl"] == pytest.approx(0.0, abs=1e-6)
    assert main([*args[:-3], str(tmp_path / "g"), "--k", "2", "--greedy"]) == 0
    assert "greedy picks" in capsys.readouterr().out


def test_the_k_curve_inside_a_trained_student(tmp_path, capsys):
    """--student with --curve: the rows give a ranking's top k layers full attention inside the
    student (k = 0 is the student itself), its own softmax layers stay full from row to row, and
    every layer full is the teacher; --ranking puts rankings measured before on the same curve."""
    from megadistill.errors import MegadistillError
    from megadistill.eval.layer_choice import _beyond_nll, _calibration, layer_curve
    from megadistill.eval.lmeval import load_model
    from megadistill.teachers import convert

    teacher = _sharp_teacher(tmp_path / "t")
    n = teacher.config.num_hidden_layers
    top = n - 1  # the student keeps its top layer: every row's forward runs through it
    student, _ = convert(teacher, window=8, num_sinks=2, softmax_layers=[top], gate_init="half")
    student.save_pretrained(tmp_path / "s")
    byte_tokenizer(tmp_path / "s")
    docs = [DOC, DOC[9:]]
    rest = list(range(top))
    curve = layer_curve(
        tmp_path / "t", docs, {"own": [top, 0], "rest": rest}, window=8, ks=(0, 1, top),
        needle_lengths=(96,), student_dir=tmp_path / "s",
    )  # fmt: skip
    rows = {(r["criterion"], r["k"]): r for r in curve["rows"]}
    assert curve["base"] == str(tmp_path / "s")
    model, _ = load_model(tmp_path / "s")
    _, _, windows = _calibration(tmp_path / "t", docs, 8, 1024)
    assert rows["own", 0]["nll"] == _beyond_nll(model, windows, 8) != curve["teacher"]["nll"]
    assert rows["own", 1]["layers"] == [top] and rows["own", 1]["nll"] == rows["own", 0]["nll"]
    # after the "own" rows flipped the kept layer and put it back, it is still full: with the
    # student's other layers full, the student is the teacher
    assert rows["rest", top]["layers"] == rest
    assert rows["rest", top]["nll"] == curve["teacher"]["nll"]
    assert rows["rest", top]["needle"] == curve["teacher"]["needle"]
    with pytest.raises(MegadistillError, match="pass --window 8"):
        layer_curve(tmp_path / "t", docs, {}, window=16, student_dir=tmp_path / "s")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": DOC}) + "\n")
    out = tmp_path / "curve.json"
    args = ["choose-layers", "--teacher", str(tmp_path / "t"), "--text", str(tmp_path / "d.jsonl"),
            "--window", "8", "--criterion", "kl", "--student", str(tmp_path / "s"), "--k", "1",
            "--curve", "0,1", "--niah", "96", "--ranking", "mine=1,0", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    result = json.loads(out.read_text())
    got = [(r["criterion"], r["k"], r["layers"]) for r in result["curve"]["rows"]]
    assert got == [("kl", 0, []), ("kl", 1, result["ranking"][:1]), ("mine", 0, []),
                   ("mine", 1, [1])]  # fmt: skip
    short = [*args[:-4], "--ranking", "short=0", "--curve", "0,1,2", "--out", str(out)]
    assert main(short) == 0  # k = 2: no row (n - 1 = 1 layer to rank, "short" gives 1)
    rows = json.loads(out.read_text())["curve"]["rows"]
    assert [(r["criterion"], r["k"]) for r in rows] == [("kl", 0), ("kl", 1), ("short", 0),
                                                         ("short", 1)]  # fmt: skip
    assert result["kept"] == [top] and "| mine | 1 | [1] |" in capsys.readouterr().out
    assert main(args[:-8] + ["--ranking", "mine=1,0"]) == 2  # --ranking without --curve
    assert main(args[:-4] + ["--ranking", "mine=one"]) == 2
    assert main(args[:-4] + ["--ranking", "kl=1"]) == 2  # would replace the measured ranking
    assert main(args[:-4] + ["--ranking", f"mine={n}"]) == 2  # no such layer
    assert f"layers [{n}] are not in 0..{n - 1}" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_a_forward_resumed_at_a_layer_is_the_whole_forward_to_the_bit(family):
    """LayerInputs: with layer i flipped to full attention, a forward that starts at layer i
    from the recorded inputs gives the logits of the whole forward exactly, runs only the
    layers from i up, and refuses ids it never recorded."""
    from megadistill.errors import MegadistillError
    from megadistill.eval.layer_choice import LayerInputs
    from megadistill.teachers import convert

    teacher = tiny_teacher(family, seed=0)
    floor, _ = convert(teacher, window=8, num_sinks=2, gate_mode="swa")
    layers = floor.model.layers
    ran = []
    for j, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda _m, _a, j=j: ran.append(j))
    docs = [
        torch.randint(3, 200, (1, 40), generator=torch.Generator().manual_seed(s)) for s in (0, 1)
    ]
    prefix = LayerInputs(floor)
    with torch.no_grad(), prefix.record():
        base = [floor(input_ids=x).logits for x in docs]
    changed = []
    for i in range(len(layers)):
        layers[i].self_attn.full = True
        with torch.no_grad():
            whole = [floor(input_ids=x).logits for x in docs]
            ran.clear()
            with prefix.from_layer(i):
                resumed = [floor(input_ids=x).logits for x in docs]
        assert ran == list(range(i, len(layers))) * 2
        assert all(torch.equal(w, r) for w, r in zip(whole, resumed, strict=True))
        changed.append(not torch.equal(whole[0], base[0]))
        layers[i].self_attn.full = False
    assert any(changed)  # (a local teacher layer's full attention may be its window already)
    assert len(list(floor.model.layers)) == len(layers)  # the layers are given back
    with pytest.raises(MegadistillError, match="no recorded input"), prefix.from_layer(1):
        floor(input_ids=docs[0][:, :30])
