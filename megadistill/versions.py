"""The dependency versions megadistill was tested with, the lock file, and a start-up check.

``constraints.txt`` (at the repository root) pins every package of the environment the test
suite passed in; ``.ci/setup`` installs it. :data:`TESTED` names, for the dependencies whose
releases have broken the product before, every version the suite or the demo ran on; the CLI
warns once, at start-up, when an installed one lies outside that range (instead of a crash deep
in a stage). No torch, no transformers import here: the check reads package metadata only.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

TESTED: dict[str, tuple[str, ...]] = {
    "transformers": ("4.57.6", "5.24.0", "5.25.0"),
    "torch": ("2.13.0",),
    "deepspeed": ("0.19.8",),
    "mlstm_kernels": ("2.0.6",),
    "lm_eval": ("0.4.13",),
}
"""Package -> the versions the suite ran on (oldest first). A version between the oldest and the
newest minor release listed is taken as covered; anything else gets a warning."""

LOCK_HEADER = """\
# The tested dependency set: every package of the environment in which `bash .ci/test` and
# `bash .ci/demo` passed. `bash .ci/setup` installs it (pip -c constraints.txt). Refresh it only
# after the drift canary passed on today's releases: `bash .ci/canary`, then `bash .ci/lock`.
# torch is pinned without its local tag (+cpu / +cu12x), so one lock serves CPU and GPU machines.
"""

# Never pinned: the project itself and the installer.
_UNLOCKED = {"megadistill", "pip"}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The numeric release of a version string (``2.13.0+cpu`` -> ``(2, 13, 0)``)."""
    nums = re.match(r"\d+(\.\d+)*", version)
    return tuple(int(x) for x in nums.group(0).split(".")) if nums else ()


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def untested(package: str, version: str) -> str | None:
    """Why ``version`` of ``package`` is outside :data:`TESTED` (None: inside the range)."""
    tested = TESTED[package]
    low, high = release(tested[0]), release(tested[-1])
    have = release(version)
    if have[:2] < low[:2] or have[:2] > high[:2]:
        return (
            f"{package} {version} is outside the versions megadistill was tested with "
            f"({', '.join(tested)}); if a stage fails, install the tested set: "
            "pip install -c constraints.txt -e . (or bash .ci/setup)"
        )
    return None


def check_environment() -> list[str]:
    """Warn once per installed dependency outside :data:`TESTED`; return the warnings."""
    found = []
    for package in TESTED:
        version = installed_version(package)
        if version is not None and (why := untested(package, version)):
            log.warning("%s", why)
            found.append(why)
    return found


def read_lock(path: str | Path) -> dict[str, str]:
    """Canonical name -> pinned version of a constraints file (``name==version`` lines)."""
    try:
        return read_lock_text(Path(path).read_text())
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_lock_text(text: str) -> dict[str, str]:
    """:func:`read_lock` of a constraints file's text."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"'{line}' is not a 'name==version' pin")
        pins[canonical(name.strip())] = version.strip()
    return pins


def environment() -> dict[str, str]:
    """Canonical name -> version of every distribution installed in this interpreter."""
    found: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        # The first one on sys.path is the one imported (as metadata.version reports): later
        # ones are shadowed copies, e.g. setuptools/_vendor once something imported setuptools.
        if name and canonical(name) not in _UNLOCKED:
            found.setdefault(canonical(name), dist.version)
    return found


def lock_text(env: dict[str, str]) -> str:
    """The constraints file pinning ``env`` (local version tags dropped)."""
    lines = [f"{name}=={version.split('+', 1)[0]}" for name, version in sorted(env.items())]
    return LOCK_HEADER + "\n".join(lines) + "\n"


def lock_mismatches(pins: dict[str, str], env: dict[str, str]) -> list[str]:
    """Installed packages whose version differs from the lock (missing ones are not listed: an
    optional extra's packages are pinned but need not be installed)."""
    bad = []
    for name, want in sorted(pins.items()):
        have = env.get(name)
        if have is not None and have.split("+", 1)[0] != want:
            bad.append(f"{name} {have} (locked: {want})")
    return bad
