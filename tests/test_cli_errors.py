"""Bad command-line input gets one clear line naming the input (exit 2), not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megadistill.cli import main
from megadistill.config import ConfigError, parse_csv
from megadistill.engine.distributed import LAUNCHER_VARIABLES, MPI_VARIABLES

EVAL = ["eval", "--teacher", "t", "--student", "s", "--tasks", "offline:piqa", "--out", "{tmp}/e"]
COMPARE = ["compare-positions", "--teacher", "t", "a=s", "--heldout", "x:in:{tmp}/x.jsonl",
           "--out", "{tmp}/c"]  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["merge", "a", "b", "--weights", "0.5,x", "--out", "{tmp}/m"], "--weights: 'x' is not"),
        (["merge", "--config", "{tmp}/none.yaml", "--out", "{tmp}/m"], "none.yaml does not exist"),
        ([*EVAL, "--niah", "256,a"], "--niah: 'a' is not an integer"),
        ([*EVAL, "--ppl-text", "{tmp}/bad.jsonl"], "bad.jsonl: line 1 is not JSON"),
        ([*EVAL, "--heldout", "kjv:{tmp}/a.jsonl"], "--heldout 'kjv:"),
        ([*EVAL, "--tasks", "offline:piqa@x"], "'piqa@x' needs a number of few-shot examples"),
        ([*COMPARE, "--niah", "1024,2k"], "--niah: '2k' is not an integer"),
    ],
    ids=[
        "merge-weights",
        "merge-config",
        "eval-niah",
        "eval-ppl-text",
        "eval-heldout",
        "eval-@k",
        "compare-niah",
    ],
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


_STAGE_ARGS = [
    "stage=distill", "student={tmp}/student", "out_dir={tmp}/out", "optim.lr=1e-3",
    "data.sources=[{path: /usr/share/common-licenses/GPL-3}]", "engine.ds_config=student_zero3",
    "engine.global_batch_size=2", "engine.micro_batch_size=1", "trainer.max_steps=1",
    "data.seq_len=64",
]  # fmt: skip


@pytest.mark.parametrize(
    ("teacher", "message"),
    [
        ("/no/such/teacher", "teacher /no/such/teacher: no such folder; fix 'teacher'"),
        (
            "{tmp}",
            "no launcher environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT unset): "
            "start every rank through a launcher, e.g. `torchrun --nproc_per_node N",
        ),
    ],
    ids=["missing-teacher", "no-launcher"],
)
def test_a_stage_run_by_hand_fails_in_one_line(tmp_path, teacher, message):
    """`megadistill distill` outside a launcher, or with a teacher folder that is not there: one
    line (not mpi4py's ModuleNotFoundError, not the hub's 'Repo id must be in the form'); the
    overrides after --resume are taken."""
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    argv = [
        a.replace("{tmp}", str(tmp_path)) for a in [*_STAGE_ARGS, "--resume", f"teacher={teacher}"]
    ]
    env = {k: v for k, v in os.environ.items()
           if k not in LAUNCHER_VARIABLES + MPI_VARIABLES}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "megadistill.cli", "distill", *argv], env=env,
                          capture_output=True, text=True, timeout=1800, check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("megadistill distill: error: ") and message in err[-1], err
    assert "Traceback" not in proc.stderr


def test_overrides_after_flags_are_taken_and_other_extras_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{name: r, teacher: t, experts: [{name: a}]}")
    argv = ["pipeline", "run", str(recipe), "--local", "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "teacher=/no/such/teacher"]) == 2  # taken: the check names it
    assert "teacher /no/such/teacher: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_a_stage_without_resume_keeps_another_runs_checkpoints(tmp_path, capsys):
    """Running a stage again into an out_dir holding checkpoints, without --resume, refuses before
    any weights load: the old run's checkpoints stay as they were (a fresh run would replace
    ``latest`` and prune them)."""
    (tmp_path / "student").mkdir()
    (tmp_path / "student" / "config.json").write_text("{}")
    ckpts = tmp_path / "out" / "checkpoints"
    (ckpts / "step_00000048").mkdir(parents=True)
    (ckpts / "latest").write_text("step_00000048")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in [*_STAGE_ARGS, f"teacher={tmp_path}"]]
    assert main(["distill", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{ckpts} already holds checkpoints (newest step_00000048)" in err, err
    assert "add --resume" in err
    assert (ckpts / "latest").read_text() == "step_00000048"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step_00000048"]
