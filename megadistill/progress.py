"""One progress bar for long passes over data (tokens/s and ETA), on rank 0 only."""

from __future__ import annotations

import os
import sys
from typing import Any


def progress_bar(total: float | None, desc: str, unit: str = "tok", disable: bool = False) -> Any:
    """A tqdm bar that also works in batch logs: redrawn at most every 30 s when stderr is not a
    terminal (a SLURM log then gets a line every 30 s, not thousands)."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=tty,
        mininterval=0.5 if tty else 30.0,
        disable=disable or int(os.environ.get("RANK", "0")) != 0,
    )
