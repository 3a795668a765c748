"""Bad command-line input gets one clear line naming the input (exit 2), not a traceback."""

from __future__ import annotations

import pytest

from megadistill.cli import main
from megadistill.config import ConfigError, parse_csv

EVAL = ["eval", "--teacher", "t", "--student", "s", "--tasks", "offline:piqa", "--out", "{tmp}/e"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merge", "a", "b", "--weights", "0.5,x", "--out", "{tmp}/m"], "--weights: 'x' is not"),
        (["merge", "--config", "{tmp}/none.yaml", "--out", "{tmp}/m"], "none.yaml does not exist"),
        ([*EVAL, "--niah", "256,a"], "--niah: 'a' is not an integer"),
        ([*EVAL, "--ppl-text", "{tmp}/bad.jsonl"], "bad.jsonl: line 1 is not JSON"),
        ([*EVAL, "--heldout", "kjv:{tmp}/a.jsonl"], "--heldout 'kjv:"),
        ([*EVAL, "--tasks", "offline:piqa@x"], "'piqa@x' needs a number of few-shot examples"),
    ],
    ids=["merge-weights", "merge-config", "eval-niah", "eval-ppl-text", "eval-heldout", "eval-@k"],
)
def test_bad_input_is_one_clear_line(argv, message, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "e").exists()


def test_parse_csv():
    assert parse_csv("256, 512,", int, "--niah") == [256, 512]
    assert parse_csv("0.25,0.75", float, "--weights") == [0.25, 0.75]
    with pytest.raises(ConfigError, match="--weights: 'x' is not a number; give e.g. 0.5,0.5"):
        parse_csv("0.5,x", float, "--weights")
