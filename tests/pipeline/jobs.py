"""Small real programs the pipeline tests plug into the DAG (``python -m tests.pipeline.jobs``).

Each is started in every rank by ``slurm/entrypoint.sh`` (srun or local launcher) through
``megadistill pipeline step``; the multi-rank ones form a gloo process group from the environment
the entrypoint exports and all-reduce, so a wrong RANK/WORLD_SIZE/MASTER_* fails them.

    convert OUT SEED                       writes OUT/student.json
    expert  OUT NAME INDEX [--fail NAME]   2-rank all-reduce of (rank+1)*(INDEX+1) -> OUT/NAME.json
                                           (expert NAME exits 3 until OUT/NAME.fixed exists)
    merge   OUT CONFIG                     weighted sum of the experts' values -> OUT/merged.json
    final   OUT                            2-rank all-reduce of the merged value -> OUT/final.json
    eval    OUT                            copies the final value -> OUT/eval.json
    preemptible OUT TOTAL                  counts to TOTAL (a first run holds at step 3); on
                                           SIGUSR1 or SIGTERM checkpoints and exits 143
    cache-hit OUT NAME TOK CONFIG...       records whether the data cache of each stage CONFIG
                                           (its data, tokenizer TOK) is built -> OUT/NAME.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

PREEMPTED_EXIT = 143


def _write(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _group():
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    return torch, dist


def _allreduce(value: float) -> tuple[float, int, int]:
    torch, dist = _group()
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    rank, world = dist.get_rank(), dist.get_world_size()
    dist.destroy_process_group()
    return float(t.item()), rank, world


def convert(out: Path, seed: str) -> None:
    start = time.time()
    _write(out / "student.json", {"start": start, "end": time.time(), "seed": int(seed)})


def expert(out: Path, name: str, index: int, fail: str | None) -> None:
    if name == fail and not (out / f"{name}.fixed").exists():
        print(f"expert {name}: failing on purpose", file=sys.stderr)
        sys.exit(3)
    start = time.time()
    assert json.loads((out / "student.json").read_text())["seed"] == 0  # convert ran first
    rank = int(os.environ["RANK"])
    value, rank, world = _allreduce((rank + 1) * (index + 1))
    time.sleep(0.3)
    if rank == 0:
        _write(out / f"{name}.json", {"start": start, "end": time.time(), "value": value,
                                      "world_size": world, "port": os.environ["MASTER_PORT"],
                                      "job": os.environ.get("SLURM_JOB_ID")})  # fmt: skip


def merge(out: Path, config: Path) -> None:
    import yaml

    start = time.time()
    cfg = yaml.safe_load(config.read_text())
    value = 0.0
    for e in cfg["experts"]:
        value += e["weight"] * json.loads((out / f"{e['name']}.json").read_text())["value"]
    _write(out / "merged.json", {"start": start, "end": time.time(), "value": value})


def final(out: Path) -> None:
    start = time.time()
    merged = json.loads((out / "merged.json").read_text())["value"]
    value, rank, world = _allreduce(merged)
    if rank == 0:
        _write(out / "final.json",
               {"start": start, "end": time.time(), "value": value, "world_size": world})  # fmt: skip


def evaluate(out: Path) -> None:
    start = time.time()
    value = json.loads((out / "final.json").read_text())["value"]
    _write(out / "eval.json", {"start": start, "end": time.time(), "value": value})


def preemptible(out: Path, total: int) -> None:
    """Count to ``total``; on SIGUSR1 all ranks agree, rank 0 checkpoints, all exit 143."""
    got = {"signal": False}
    for sig in (signal.SIGUSR1, signal.SIGTERM):  # as the trainer: both mean checkpoint and stop
        signal.signal(sig, lambda *_: got.update(signal=True))
    torch, dist = _group()
    rank = dist.get_rank()
    ckpt = out / "ckpt.json"
    step = json.loads(ckpt.read_text())["step"] if ckpt.exists() else 0
    if rank == 0:
        with open(out / "attempts.jsonl", "a") as fh:
            restart = os.environ.get("SLURM_RESTART_COUNT", "0")
            fh.write(json.dumps({"start_step": step, "restart": int(restart)}) + "\n")
    # The first attempt holds at step 3 until preempted, so the test never races the job's end.
    hold, held_since = not ckpt.exists(), None
    while step < total:
        if hold and step >= 3:
            held_since = held_since or time.monotonic()
            if time.monotonic() - held_since > 3600:  # only ends a test that has gone wrong
                sys.exit("preemptible: no SIGUSR1 or SIGTERM within 3600 s")
        else:
            step += 1
        time.sleep(0.1)
        if rank == 0 and step == 3:
            (out / "running").touch()
        stop = torch.tensor([1.0 if got["signal"] else 0.0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        if stop.item() > 0:
            if rank == 0:
                _write(ckpt, {"step": step})
            dist.barrier()
            dist.destroy_process_group()
            sys.exit(PREEMPTED_EXIT)
    if rank == 0:
        _write(out / "done.json", {"step": step})
    dist.destroy_process_group()


def cache_hit(out: Path, name: str, tokenizer: str, configs: list[str]) -> None:
    import yaml
    from transformers import AutoTokenizer

    from megadistill.config import from_dict
    from megadistill.data.config import DataConfig
    from megadistill.data.packing import cache_path
    from megadistill.integrity import MANIFEST

    start, built = time.time(), {}
    for config in configs:
        raw = yaml.safe_load(Path(config).read_text())
        tok = AutoTokenizer.from_pretrained(tokenizer)
        path = cache_path(from_dict(DataConfig, raw["data"]), tok)
        manifest = path / MANIFEST
        built[config] = manifest.stat().st_mtime if manifest.is_file() else None
    _write(out / f"{name}.json", {"start": start, "built": built})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("program")
    p.add_argument("out", type=Path)
    p.add_argument("args", nargs="*")
    p.add_argument("--fail")
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.program == "convert":
        convert(a.out, a.args[0])
    elif a.program == "expert":
        expert(a.out, a.args[0], int(a.args[1]), a.fail)
    elif a.program == "merge":
        merge(a.out, Path(a.args[0]))
    elif a.program == "final":
        final(a.out)
    elif a.program == "eval":
        evaluate(a.out)
    elif a.program == "cache-hit":
        cache_hit(a.out, a.args[0], a.args[1], a.args[2:])
    elif a.program == "preemptible":
        preemptible(a.out, int(a.args[0]))
    else:
        sys.exit(f"unknown program {a.program}")


if __name__ == "__main__":
    main()
