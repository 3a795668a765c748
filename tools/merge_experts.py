#!/usr/bin/env python
"""Merge K expert ZeRO-3 checkpoints into one Hugging Face model (average, task arithmetic, TIES).

Thin wrapper: the work is done by :mod:`megadistill.merge.merge`; run with `--help` for the options.
"""

import sys

from megadistill.merge.commands import add_merge_args, run_merge, tool_main

if __name__ == "__main__":
    sys.exit(tool_main(__doc__.splitlines()[0], add_merge_args, run_merge))
