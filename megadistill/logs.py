"""Logging set-up: one place that decides which rank prints."""

from __future__ import annotations

import logging
import os
import sys


class _StderrHandler(logging.StreamHandler):
    """Writes each record to ``sys.stderr`` as it is when the record comes, not as it was at
    set-up: a stream captured then (by pytest, or a caller's redirect) may be closed since."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        del value


class _RankZeroFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return int(os.environ.get("RANK", "0")) == 0 or record.levelno >= logging.WARNING


def setup_logging(debug: bool = False, all_ranks: bool = False) -> None:
    """Configure the root logger; non-zero ranks only show warnings unless ``all_ranks``."""
    rank = os.environ.get("RANK", "0")
    handler = _StderrHandler()
    handler.setFormatter(
        logging.Formatter(
            f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
    )
    if not all_ranks:
        handler.addFilter(_RankZeroFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("urllib3", "filelock", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
