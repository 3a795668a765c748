"""Streaming expert merge vs zero_to_fp32 + in-memory averaging: peak RSS and wall (thin wrapper).

Usage: python tools/bench_merge.py work_dir=/tmp/bm [num_experts=4 repeats=1 keep=true smoke=true]
Same as `megadistill bench merge`. K synthetic experts of a ~0.5B-parameter model from a real
2-rank ZeRO-3 save; needs about 2 GB of disk per expert plus 4 GB, and ~(K+1) x 2 GB of RAM for
the baseline.
"""

import sys

from megadistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "merge", *sys.argv[1:]]))
