"""Teacher vs student prefill/decode throughput and cache memory (thin wrapper).

Usage: python tools/bench_inference.py [key=value ...]   e.g. contexts=[1024,4096] batch_size=8
Same as `megadistill bench inference`.
"""

import sys

from megadistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "inference", *sys.argv[1:]]))
