#!/usr/bin/env python
"""Consolidate one ZeRO-3 checkpoint into a Hugging Face folder (a merge of one expert).

Thin wrapper: the work is done by :mod:`megadistill.merge.merge`; run with `--help` for options.
"""

import functools
import sys

from megadistill.merge.commands import add_merge_args, run_merge, tool_main

if __name__ == "__main__":
    add_args = functools.partial(add_merge_args, single=True)
    sys.exit(tool_main(__doc__.splitlines()[0], add_args, run_merge))
