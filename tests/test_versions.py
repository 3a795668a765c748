"""The tested dependency set: the lock, the tested versions, and the start-up warning."""

from __future__ import annotations

from pathlib import Path

import pytest

from megadistill import versions
from megadistill.cli import main

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "constraints.txt"


def test_the_lock_pins_what_this_suite_runs_on():
    """The environment running the suite is the locked one (a drifted .venv is caught here)."""
    pins = versions.read_lock(LOCK)
    assert versions.lock_mismatches(pins, versions.environment()) == []
    for package in ("torch", "transformers", "deepspeed", "mlstm-kernels", "xlstm", "triton"):
        assert package in pins, f"{package} is not pinned in constraints.txt"


def test_every_locked_version_of_a_watched_package_is_listed_as_tested():
    pins = versions.read_lock(LOCK)
    for package, tested in versions.TESTED.items():
        assert pins[versions.canonical(package)] in tested, (package, tested)


def test_the_lock_round_trips_and_drops_local_version_tags():
    env = {"torch": "2.13.0+cpu", "transformers": "5.25.0"}
    text = versions.lock_text(env)
    assert "torch==2.13.0\n" in text
    assert versions.read_lock_text(text) == {"torch": "2.13.0", "transformers": "5.25.0"}
    assert versions.lock_mismatches({"torch": "2.13.0"}, env) == []
    assert versions.lock_mismatches({"torch": "2.12.0"}, env) == [
        "torch 2.13.0+cpu (locked: 2.12.0)"
    ]


def test_a_lock_line_that_is_no_pin_is_refused_by_name():
    with pytest.raises(ValueError, match="'transformers>=5' is not a 'name==version' pin"):
        versions.read_lock_text("transformers>=5\n")


@pytest.mark.parametrize(
    ("version", "warns"),
    [("5.25.0", False), ("5.25.3", False), ("5.0.1", False), ("4.57.6", False),
     ("5.26.0", True), ("6.0.0", True), ("4.56.2", True)],
)  # fmt: skip
def test_transformers_outside_the_tested_range_is_named_with_the_tested_versions(version, warns):
    why = versions.untested("transformers", version)
    assert (why is not None) == warns
    if warns:
        assert f"transformers {version} is outside" in why and "5.25.0" in why
        assert "constraints.txt" in why


def test_the_cli_warns_once_at_start_up(monkeypatch, capsys, tmp_path):
    real = versions.installed_version
    monkeypatch.setattr(
        versions,
        "installed_version",
        lambda p: "5.99.0" if p == "transformers" else real(p),
    )
    # the warning comes before any work: the command itself then fails on its missing teacher
    out = tmp_path / "student"
    assert main(["convert", "--teacher", str(tmp_path / "none"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("transformers 5.99.0 is outside") == 1, err
    assert err.index("transformers 5.99.0") < err.index("megadistill convert: error")


def test_a_shadowed_copy_later_on_sys_path_is_not_what_the_environment_has(monkeypatch):
    """setuptools puts its vendored packages (older more-itertools, wheel, ...) on sys.path once
    something imports it; the installed copy, found first, is what counts."""
    import sys

    import setuptools

    vendored = f"{setuptools.__path__[0]}/_vendor"
    monkeypatch.setattr(sys, "path", [*sys.path, vendored])
    pins = versions.read_lock(LOCK)
    assert versions.lock_mismatches(pins, versions.environment()) == []
