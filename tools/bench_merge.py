#!/usr/bin/env python
"""Benchmark the streaming expert merge against zero_to_fp32 + in-memory averaging.

Thin wrapper over :func:`megadistill.merge.bench.run_benchmark`: K synthetic experts of a
~0.5B-parameter model from a real 2-rank ZeRO-3 save; prints peak RSS and wall time of each.
Needs about 2 GB of disk per expert plus 4 GB, and ~(K+1) x 2 GB of RAM for the baseline.
"""

import argparse
import json
import sys

from megadistill.logs import setup_logging
from megadistill.merge.bench import run_benchmark

SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000)  # fmt: skip

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="scratch folder (removed unless --keep)")
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the experts for another run")
    parser.add_argument("--modes", default="baseline,streaming_noverify,streaming",
                        help="comma-separated runs")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="a tiny model, to check the script")
    args = parser.parse_args()
    setup_logging()
    results = run_benchmark(
        args.workdir,
        args.num_experts,
        keep=args.keep,
        model_config=SMOKE if args.smoke else None,
        modes=tuple(args.modes.split(",")),
    )
    print(json.dumps(results, indent=2))
    sys.exit(0)
