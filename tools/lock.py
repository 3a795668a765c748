"""The tested dependency set (constraints.txt): check an environment against it, or rewrite it.

    python tools/lock.py check [constraints.txt]   # exit 1 naming each installed package that
                                                   # differs from the lock
    python tools/lock.py write [constraints.txt]   # pin this interpreter's environment
    python tools/lock.py diff  [constraints.txt]   # what this environment has that the lock has not

Run each with the interpreter of the environment in question (``.venv/bin/python``,
``.venv-latest/bin/python``); ``bash .ci/lock`` writes the lock from the canary's environment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megadistill import versions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["check", "write", "diff"])
    parser.add_argument("lock", nargs="?", default="constraints.txt")
    args = parser.parse_args(argv)
    env = versions.environment()
    if args.action == "write":
        Path(args.lock).write_text(versions.lock_text(env))
        print(f"lock: wrote {len(env)} pins to {args.lock}")
        return 0
    pins = versions.read_lock(args.lock)
    if args.action == "diff":
        for name in sorted(set(pins) | set(env)):
            old, new = pins.get(name), env.get(name)
            if old != (new.split("+", 1)[0] if new else None):
                print(f"  {name}: {old or '-'} -> {new or '-'}")
        return 0
    bad = versions.lock_mismatches(pins, env)
    if bad:
        print(
            f"lock: {len(bad)} installed package(s) differ from {args.lock}: {'; '.join(bad)}. "
            "Recreate the environment: rm -rf .venv && bash .ci/setup",
            file=sys.stderr,
        )
        return 1
    print(f"lock: environment matches {args.lock} ({len(pins)} pins)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
