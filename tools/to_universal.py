#!/usr/bin/env python
"""Convert a ZeRO checkpoint tag to DeepSpeed's universal checkpoint format.

Thin wrapper: the work is done by :mod:`megadistill.merge.tools`; run with `--help` for the options.
"""

import sys

from megadistill.merge.commands import add_universal_args, run_universal, tool_main

if __name__ == "__main__":
    sys.exit(tool_main(__doc__.splitlines()[0], add_universal_args, run_universal))
