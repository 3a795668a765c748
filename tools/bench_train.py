"""Stage II student step vs plain teacher step (tokens/s), ZeRO-3 memory at 1 and 2 ranks (thin).

Usage: python tools/bench_train.py [key=value ...]   e.g. seq_len=512 hidden_size=256 num_steps=3
Same as `megadistill bench train`.
"""

import sys

from megadistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "train", *sys.argv[1:]]))
