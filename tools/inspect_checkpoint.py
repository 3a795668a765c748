#!/usr/bin/env python
"""Inspect a checkpoint: tags, steps, ranks, tensors, sizes, integrity.

Thin wrapper: the work is done by :mod:`megadistill.merge.tools`; run with `--help` for the options.
"""

import sys

from megadistill.merge.commands import add_inspect_args, run_inspect, tool_main

if __name__ == "__main__":
    sys.exit(tool_main(__doc__.splitlines()[0], add_inspect_args, run_inspect))
