"""Benchmark: streaming merge vs DeepSpeed's zero_to_fp32 + in-memory average (peak RSS, wall).

Builds K synthetic experts of a ~0.5B-parameter model (Qwen2-0.5B shape, random weights): one
real 2-rank ZeRO-3 ``save_checkpoint`` (torch SGD as optimizer, so the shards hold only the fp32
master weights; the merge never reads optimizer moments anyway), then K-1 perturbed copies of its
fp32 partitions. Each measurement runs in its own subprocess, which reports its own peak RSS
(``VmHWM``) and wall time. Before measuring, every shard is read once so that all runs see a
warm page cache.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from megadistill.integrity import atomic_write_json, atomic_write_text, write_manifest

log = logging.getLogger(__name__)

TAG = "step_00000000"
QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
"""Qwen2-0.5B's shape: 494M parameters, tied embeddings."""
MEASURE_TIMEOUT_S = 3600.0


def save_random_expert(out: str, model_config: dict[str, Any]) -> None:
    """Rank entry point: a random model of ``model_config`` saved by a real ZeRO-3 engine."""
    import deepspeed
    import torch.distributed as dist
    from transformers import Qwen2Config, Qwen2ForCausalLM

    # The benchmark's stdout carries its JSON result: DeepSpeed's chatter goes to stderr.
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**model_config))
    ds = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1_000_000,
    }
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    engine.save_checkpoint(out, tag=TAG, save_latest=False)
    dist.barrier()
    if dist.get_rank() == 0:
        meta = {
            "format": 1,
            "tag": TAG,
            "step": 0,
            "world_size": dist.get_world_size(),
            "fingerprint": "bench-" + "0" * 58,
            "model_config": model.config.to_dict(),
            "config": {},
            "version": "bench",
            "git_revision": None,
            "tokenizer": None,
        }
        atomic_write_json(Path(out, TAG, "megadistill.json"), meta)
    dist.barrier()  # ranks leave together: a rank torn down mid-collective can abort its peer


def _perturbed_copy(src: Path, dst: Path, k: int) -> None:
    """Copy of expert ``src`` whose fp32 master weights are shifted by ``k * 1e-3``."""
    (dst / TAG).mkdir(parents=True)
    for f in (src / TAG).iterdir():
        if f.name.endswith("_optim_states.pt"):
            state = torch.load(f, map_location="cpu", mmap=True, weights_only=False)
            groups = state["optimizer_state_dict"]["fp32_flat_groups"]
            state["optimizer_state_dict"]["fp32_flat_groups"] = [g + k * 1e-3 for g in groups]
            torch.save(state, dst / TAG / f.name)
            del state, groups
        elif f.is_file():
            shutil.copyfile(f, dst / TAG / f.name)


def make_experts(workdir: Path, num_experts: int, model_config: dict[str, Any]) -> list[Path]:
    """K synthetic ZeRO-3 experts under ``workdir`` (reused when already there)."""
    from megadistill.engine.launch import run_distributed

    experts = [workdir / f"expert_{k}" for k in range(num_experts)]
    for k, path in enumerate(experts):
        if (path / "latest").is_file():
            continue
        shutil.rmtree(path, ignore_errors=True)
        t0 = time.perf_counter()
        if k == 0:
            run_distributed(save_random_expert, 2, str(path), model_config, timeout_s=1800)
        else:
            _perturbed_copy(experts[0], path, k)
        write_manifest(path / TAG)
        atomic_write_text(path / "latest", TAG)
        log.info("built %s in %.0f s", path, time.perf_counter() - t0)
    return experts


def _warm(experts: list[Path]) -> None:
    for path in experts:
        for f in (path / TAG).iterdir():
            with open(f, "rb") as fh:
                while fh.read(1 << 24):
                    pass


def _streaming(experts: list[str], out: str, verify: bool) -> None:
    from megadistill.merge.merge import MergeConfig, merge_experts

    merge_experts(MergeConfig(experts=experts, out=out, verify=verify))


def _baseline(experts: list[str], out: str) -> None:
    """What one would write without the tool: consolidate each, average in memory, save."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from huggingface_hub import save_torch_state_dict

    states = [get_fp32_state_dict_from_zero_checkpoint(e) for e in experts]
    w = 1.0 / len(states)
    merged = {}
    seen: set[int] = set()
    for name in states[0]:
        if id(states[0][name]) in seen:  # a tied alias: written once, as the tool does
            continue
        seen.add(id(states[0][name]))
        acc = states[0][name] * w
        for sd in states[1:]:
            acc += sd[name] * w
        merged[name] = acc
    Path(out).mkdir(parents=True)
    save_torch_state_dict(merged, out, max_shard_size="2GB")


def _vm_hwm_mib() -> float:
    """Peak resident set size of this process image (``VmHWM``: reset at exec, unlike
    ``ru_maxrss``, which a child inherits from the parent it was forked from)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_main(argv: list[str]) -> None:
    """Subprocess entry: ``bench.py MODE OUT EXPERT...``; prints one JSON line."""
    mode, out, *experts = argv
    rss_start = _vm_hwm_mib()
    t0 = time.perf_counter()
    if mode == "baseline":
        _baseline(experts, out)
    else:
        _streaming(experts, out, verify=mode == "streaming")
    wall = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "wall_s": wall, "peak_rss_mib": _vm_hwm_mib(),
                      "rss_after_imports_mib": rss_start}))  # fmt: skip


def _measure(mode: str, experts: list[Path], out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "megadistill.merge.bench", mode, str(out), *map(str, experts)]
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=MEASURE_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} run failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out, ignore_errors=True)
    log.info("%s", result)
    return result


MODES = ("baseline", "streaming_noverify", "streaming")


def run_benchmark(
    workdir: str | Path,
    num_experts: int = 4,
    keep: bool = False,
    model_config: dict | None = None,
    modes: tuple[str, ...] = MODES,
) -> dict[str, Any]:
    """Build the experts, measure baseline and streaming merges, return the numbers.

    Args:
        workdir: scratch folder (about 2 GB per expert plus 2 GB of output).
        num_experts: K.
        keep: keep the experts for another run (else the folder is removed).
        model_config: Qwen2 config overrides (default: Qwen2-0.5B's shape).
        modes: which runs: baseline, streaming_noverify (no checksum pass), streaming.
    """
    workdir = Path(workdir)
    try:
        experts = make_experts(workdir, num_experts, {**QWEN2_05B, **(model_config or {})})
        _warm(experts)
        results = {mode: _measure(mode, experts, workdir / f"out_{mode}") for mode in modes}
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if "baseline" in results:
        base = results["baseline"]
        results["summary"] = {
            f"{m}_vs_baseline": {
                "peak": results[m]["peak_rss_mib"] / base["peak_rss_mib"],
                "wall": results[m]["wall_s"] / base["wall_s"],
            }
            for m in results
            if m != "baseline"
        }
    return results


if __name__ == "__main__":
    measure_main(sys.argv[1:])
