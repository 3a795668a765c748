"""Everything megadistill writes gets the modes a plain ``open()``/``mkdir()`` gives (issue 22).

A team shares run folders: a student, checkpoint or merge that only its writer can read breaks
the next person's job. Under umasks 022, 027 and 002 (a group-writable team folder) the real
writers run (atomic-write helpers, ``convert_pretrained``, the data cache, teacher targets, a
pipeline run directory, a one-rank ZeRO-3 checkpoint and a merge of it), then every file must be
``0o666 & ~umask`` and every folder ``0o777 & ~umask``: not ``tempfile``'s 0o600/0o700, nor a mode
copied from the inputs.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

UMASKS = (0o022, 0o027, 0o002)
PRIVATE = 0o077
"""The umask inputs are written under: files 0o600, folders 0o700, so copied modes show."""
ids = [f"umask{m:03o}" for m in UMASKS]


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Set the process umask for the block (process-wide: nothing else here creates files)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def wrong_modes(root: Path, mask: int, other: dict[str, int] | None = None) -> list[str]:
    """Entries under ``root`` (itself included) whose permission bits are not those that
    ``open()``/``mkdir()`` give under ``mask``, as 'path 0o600 (want 0o640)'; ``other`` names
    (relative to ``root``) the files that must have another mode, and that mode."""
    want_file, want_dir = 0o666 & ~mask, 0o777 & ~mask
    other = other or {}
    wrong = []
    for path in [root, *sorted(root.rglob("*"))]:
        mode = path.lstat().st_mode
        want = want_dir if stat.S_ISDIR(mode) else want_file
        want = other.get(str(path.relative_to(root)), want)
        if stat.S_IMODE(mode) != want:
            got = oct(stat.S_IMODE(mode))
            wrong.append(f"{path.relative_to(root.parent)} {got} (want {oct(want)})")
    return wrong


def assert_modes(
    root: Path, mask: int, must_hold: tuple[str, ...], other: dict[str, int] | None = None
) -> None:
    """``root`` holds the files ``must_hold`` and those of ``other`` (so the walk saw the
    writer's output) and every entry has the umask's mode (see :func:`wrong_modes`)."""
    missing = [name for name in (*must_hold, *(other or {})) if not (root / name).exists()]
    assert not missing, f"{root} lacks {missing}: the writer did not run as expected"
    wrong = wrong_modes(root, mask, other)
    assert not wrong, f"{len(wrong)} modes are not the umask's:\n" + "\n".join(wrong)


def test_wrong_modes_sees_a_private_file(tmp_path: Path) -> None:
    """The checker itself can fail: a 0o600 file under umask 022 is reported."""
    (tmp_path / "d").mkdir(mode=0o755)
    (tmp_path / "d" / "f").write_text("x")
    (tmp_path / "d" / "f").chmod(0o600)
    assert wrong_modes(tmp_path / "d", 0o022) == ["d/f 0o600 (want 0o644)"]
    assert wrong_modes(tmp_path / "d", 0o022, {"f": 0o755}) == ["d/f 0o600 (want 0o755)"]


@pytest.mark.parametrize("mask", UMASKS, ids=ids)
def test_atomic_writes(tmp_path: Path, mask: int) -> None:
    from safetensors.torch import save_file

    from megadistill.integrity import (
        atomic_dir,
        atomic_write_bytes,
        atomic_write_json,
        atomic_write_text,
    )

    out = tmp_path / "out"
    with umask(mask):
        atomic_write_bytes(out / "new" / "a.bin", b"\0")
        atomic_write_text(out / "b.txt", "b")
        atomic_write_json(out / "c.json", {"c": 1})
        atomic_write_json(out / "c.json", {"c": 2})  # replaces an existing file
        for overwrite in (False, True):  # a new folder, then one that replaces it
            with atomic_dir(out / "folder", overwrite=overwrite) as tmp:
                (tmp / "sub").mkdir()
                (tmp / "sub" / "x.txt").write_text("x")
                atomic_write_text(tmp / "y.txt", "y")
                # safetensors >= 0.8 writes through a 0o600 temporary file, whatever the umask
                save_file({"w": torch.zeros(2)}, tmp / "sub" / "w.safetensors")
    assert_modes(out, mask, ("new/a.bin", "b.txt", "c.json", "folder/checksums.json",
                             "folder/sub/w.safetensors"))  # fmt: skip
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_follow_umask_leaves_hard_linked_files_alone(tmp_path: Path) -> None:
    """A file linked into a folder shares its mode with the other path: it is not changed."""
    from megadistill.integrity import follow_umask

    outside = tmp_path / "teacher.bin"
    outside.write_bytes(b"t")
    outside.chmod(0o600)
    folder = tmp_path / "folder"
    folder.mkdir()
    os.link(outside, folder / "linked.bin")
    (folder / "own.bin").write_bytes(b"o")
    (folder / "own.bin").chmod(0o600)
    with umask(0o022):
        assert follow_umask(folder) == [folder / "own.bin"]
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert stat.S_IMODE((folder / "own.bin").stat().st_mode) == 0o644


@pytest.mark.parametrize("mask", UMASKS, ids=ids)
def test_debian_package_cache(tmp_path: Path, mask: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unpacked Debian package in the asset cache (apt-get and dpkg-deb stubbed: offline)."""
    from megadistill import assets

    def run(cmd: list[str], cwd: Path) -> None:
        if cmd[0] == "apt-get":
            (cwd / f"{cmd[-1]}_1.0_all.deb").write_bytes(b"")
            return
        # dpkg-deb -x: the package's own modes (here private ones)
        (cwd / "root" / "usr" / "bin").mkdir(parents=True)
        (cwd / "root" / "usr" / "data.txt").write_text("text")
        (cwd / "root" / "usr" / "bin" / "prog").write_text("#!/bin/sh\n")
        for path, mode in (("usr/bin/prog", 0o700), ("usr/data.txt", 0o600), ("usr/bin", 0o700),
                           ("usr", 0o700), ("", 0o700)):  # fmt: skip
            (cwd / "root" / path).chmod(mode)

    monkeypatch.setattr(assets, "_run", run)
    with umask(mask):
        folder = assets.debian_package_dir("pkg", tmp_path / "cache")
    # an executable stays one, with the mode a new folder gets (as `chmod +x` under the umask)
    assert_modes(folder, mask, ("usr/data.txt",), {"usr/bin/prog": 0o777 & ~mask})


def _private_teacher(folder: Path) -> None:
    """A tiny Llama teacher and byte tokenizer written under umask 077 (all files 0o600)."""
    from megadistill.assets import byte_tokenizer
    from megadistill.teachers.tiny import tiny_teacher

    with umask(PRIVATE):
        tiny_teacher("llama", seed=0).save_pretrained(folder)
        byte_tokenizer(folder)
    assert stat.S_IMODE((folder / "model.safetensors").stat().st_mode) == 0o600


@pytest.mark.parametrize("mask", UMASKS, ids=ids)
def test_convert(tmp_path: Path, mask: int) -> None:
    """A student converted from a private teacher has the umask's modes (its linked or copied
    teacher shards and tokenizer files included), and the teacher's own modes are untouched."""
    from megadistill.teachers.conversion import convert_pretrained

    teacher = tmp_path / "teacher"
    _private_teacher(teacher)
    with umask(mask):
        student = convert_pretrained(teacher, tmp_path / "student", ["window=16"])
    assert_modes(
        student,
        mask,
        ("config.json", "checksums.json", "tokenizer.json", "model-teacher.safetensors"),
    )
    assert wrong_modes(teacher, PRIVATE) == []


def test_convert_still_links_a_shard_that_has_the_right_mode(tmp_path: Path) -> None:
    """Same umask for teacher and student: the teacher's shard is linked, not copied."""
    from megadistill.assets import byte_tokenizer
    from megadistill.teachers.conversion import convert_pretrained
    from megadistill.teachers.tiny import tiny_teacher

    teacher = tmp_path / "teacher"
    with umask(0o022):
        tiny_teacher("llama", seed=0).save_pretrained(teacher)
        byte_tokenizer(teacher)
        # the mode a Hub download gets (safetensors >= 0.8 itself writes 0o600)
        (teacher / "model.safetensors").chmod(0o644)
        student = convert_pretrained(teacher, tmp_path / "student")
    shard = (student / "model-teacher.safetensors").stat()
    assert shard.st_ino == (teacher / "model.safetensors").stat().st_ino
    assert wrong_modes(student, 0o022) == []


def _targets(root: Path, out: Path) -> None:
    """Data cache and teacher targets (one rank, no process group) from a byte tokenizer."""
    from megadistill.assets import byte_tokenizer
    from megadistill.data import DataConfig, SourceConfig, build_loader
    from megadistill.stages.teacher_targets import write_teacher_targets

    tok = byte_tokenizer(root / "tok")
    (root / "a.txt").write_text("\n\n".join(f"document {i} " * (i + 3) for i in range(12)))
    cfg = DataConfig(
        sources=[SourceConfig(path=str(root / "a.txt"))],
        seq_len=16,
        seed=0,
        cache_dir=str(out / "cache"),
    )
    loader = build_loader(cfg, tok, 0, 1, micro_batch=4, shuffle=False, drop_last=False)
    k = 4

    def top_k(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*batch["input_ids"].shape, k)  # uniform targets: only the files matter here
        return torch.full(shape, -np.log(k)), torch.arange(k).expand(shape)

    write_teacher_targets(top_k, loader, out / "targets", k, teacher_fingerprint="0" * 64)


@pytest.mark.parametrize("mask", UMASKS, ids=ids)
def test_data_cache_teacher_targets_and_run_dir(tmp_path: Path, mask: int) -> None:
    from megadistill.pipeline import recipe_from_dict, write_plan
    from megadistill.pipeline.lock import LOCK_FILE, run_lock

    out = tmp_path / "out"
    noop = [["/bin/true"]]
    recipe = recipe_from_dict({
        "name": "modes", "teacher": "tiny-llama", "experts": [{"name": "a"}],
        "commands": {s: noop for s in ("convert", "expert", "merge", "final", "eval")},
    })  # fmt: skip
    with umask(mask):
        _targets(tmp_path, out)
        with run_lock(out / "run", "write the plan"):
            write_plan(recipe, out / "run")
    assert any((out / "cache").rglob("checksums.json")), "no data cache was written"
    assert_modes(out, mask, ("targets/index.json", "targets/checksums.json", f"run/{LOCK_FILE}",
                             "run/plan.json", "run/recipe.yaml"))  # fmt: skip


# ----------------------------------------------------------------- checkpoint and merge (1 rank)
def run_checkpoints_and_merges(model_dir: str, fingerprint: str, out_dir: str) -> None:
    """Rank body: one ZeRO-3 step, then under each umask of UMASKS a checkpoint and a merge of
    it (in ``out_dir/umask<mask>/``); the umask is set here, in the rank."""
    from megadistill.engine import CheckpointMeta, init_distributed
    from megadistill.engine.checkpoint import save_checkpoint
    from megadistill.merge import MergeConfig, merge_experts
    from tests.engine import workers

    init_distributed(timeout_s=300)
    engine = workers.student_engine(model_dir, 1)
    batch = workers.IndexedBatches(0, 1, 1).batch(0)
    engine.backward(engine(input_ids=batch, labels=batch).loss)
    engine.step()
    meta = CheckpointMeta(
        fingerprint=fingerprint,
        model_config=workers.student_config(model_dir),
        tokenizer=str(Path(model_dir) / "tok"),
    )
    for mask, name in zip(UMASKS, ids):
        out = Path(out_dir) / name
        with umask(mask):
            save_checkpoint(engine, out / "checkpoints", 1, meta)
            ckpt = str(out / "checkpoints")
            merge_experts(MergeConfig(experts=[ckpt, ckpt], out=str(out / "merged")))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from megadistill.assets import byte_tokenizer
    from megadistill.engine.launch import run_distributed
    from tests.engine import workers

    models = tmp_path_factory.mktemp("models")
    fingerprint = workers.write_models(str(models))
    byte_tokenizer(models / "tok")  # the merge copies the tokenizer a checkpoint records
    out = tmp_path_factory.mktemp("checkpoints")
    run_distributed(
        run_checkpoints_and_merges, 1, str(models), fingerprint, str(out), timeout_s=300
    )
    return out


@pytest.mark.parametrize("mask", UMASKS, ids=ids)
def test_checkpoint(checkpoints: Path, mask: int) -> None:
    tag = "step_00000001"
    assert_modes(
        checkpoints / f"umask{mask:03o}" / "checkpoints",
        mask,
        (
            "latest",
            f"{tag}/megadistill.json",
            f"{tag}/checksums.json",
            f"{tag}/rank_state_00000.pt",
        ),
        # DeepSpeed copies its recovery scripts next to the tags and adds the owner's execute bit
        # (engine._copy_recovery_script): the umask's mode plus u+x, readable as the rest.
        {
            script: (0o666 & ~mask) | stat.S_IXUSR
            for script in ("zero_to_fp32.py", "zero_to_torch.py")
        },
    )


@pytest.mark.parametrize("mask", UMASKS, ids=ids)
def test_merge(checkpoints: Path, mask: int) -> None:
    merged = checkpoints / f"umask{mask:03o}" / "merged"
    assert json.loads((merged / "checksums.json").read_text())["files"]
    assert_modes(merged, mask, ("config.json", "merge.json", "tokenizer.json"))
