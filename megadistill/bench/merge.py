"""Benchmark: streaming merge vs DeepSpeed's zero_to_fp32 + in-memory average (peak RSS, wall).

``megadistill bench merge work_dir=DIR`` (or ``tools/bench_merge.py``) builds K synthetic
experts of a ~0.5B-parameter model (Qwen2-0.5B shape, random weights): one real 2-rank ZeRO-3
``save_checkpoint`` (torch SGD as optimizer, so the shards hold only the fp32 master weights; the
merge never reads optimizer moments anyway), then K-1 perturbed copies of its fp32 partitions.
Each measurement runs in its own subprocess, which reports its own peak RSS (``VmHWM``) and wall
time. Before measuring, every shard is read once so that all runs see a warm page cache; with
``repeats`` > 1 the modes run interleaved (A, B, C, C, B, A, ...) and each number is the median
over the repeats.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadistill.bench.timing import Stopwatch, measure, median_by_key
from megadistill.config import ConfigError
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
        with Stopwatch() as sw:
            if k == 0:
                run_distributed(save_random_expert, 2, str(path), model_config, timeout_s=1800)
            else:
                _perturbed_copy(experts[0], path, k)
            write_manifest(path / TAG)
            atomic_write_text(path / "latest", TAG)
        log.info("built %s in %.0f s", path, sw.wall)
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
    """Subprocess entry: ``python -m megadistill.bench.merge MODE OUT EXPERT...``; prints one JSON line."""
    mode, out, *experts = argv
    rss_start = _vm_hwm_mib()
    with Stopwatch() as sw:
        if mode == "baseline":
            _baseline(experts, out)
        else:
            _streaming(experts, out, verify=mode == "streaming")
    print(json.dumps({"mode": mode, "wall_s": sw.wall, "peak_rss_mib": _vm_hwm_mib(),
                      "rss_after_imports_mib": rss_start}))  # fmt: skip


def _measure(mode: str, experts: list[Path], out: Path) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "megadistill.bench.merge", mode, str(out), *map(str, experts)]
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
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=1000)  # fmt: skip
"""A tiny model, to check the benchmark itself."""


@dataclass(kw_only=True)
class MergeBenchConfig:
    """Settings of ``megadistill bench merge``."""

    work_dir: str
    """Scratch folder (about 2 GB per expert plus 2 GB of output; removed unless ``keep``)."""
    num_experts: int = 4
    """K, the experts merged."""
    keep: bool = False
    """Keep the experts for another run."""
    modes: tuple[str, ...] = MODES
    """Runs: baseline (zero_to_fp32 + average), streaming_noverify (no checksum pass), streaming."""
    repeats: int = 1
    """Interleaved runs of every mode (medians reported)."""
    smoke: bool = False
    """A tiny model instead of Qwen2-0.5B's shape, to check the benchmark."""

    def __post_init__(self) -> None:
        bad = [m for m in self.modes if m not in MODES]
        if bad or not self.modes:
            raise ConfigError(f"modes={list(self.modes)}: each must be one of {MODES}")
        if self.num_experts < 1 or self.repeats < 1:
            raise ConfigError("num_experts and repeats must be >= 1")


def run_benchmark(
    workdir: str | Path,
    num_experts: int = 4,
    keep: bool = False,
    model_config: dict | None = None,
    modes: tuple[str, ...] = MODES,
    repeats: int = 1,
) -> dict[str, Any]:
    """Build the experts, measure baseline and streaming merges, return the numbers.

    Args:
        workdir: scratch folder (about 2 GB per expert plus 2 GB of output).
        num_experts: K.
        keep: keep the experts for another run (else the folder is removed).
        model_config: Qwen2 config overrides (default: Qwen2-0.5B's shape).
        modes: which runs: baseline, streaming_noverify (no checksum pass), streaming.
        repeats: interleaved runs of every mode; each number is the median over them.
    """
    workdir = Path(workdir)
    try:
        experts = make_experts(workdir, num_experts, {**QWEN2_05B, **(model_config or {})})
        _warm(experts)
        calls = {m: lambda m=m: _measure(m, experts, workdir / f"out_{m}") for m in modes}
        samples = measure(calls, repeats=repeats)  # each run reports its own wall time
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results: dict[str, Any] = {}
    for mode, s in samples.items():
        numbers = [{k: v for k, v in r.items() if k != "mode"} for r in s.values]
        results[mode] = {"mode": mode, **median_by_key(numbers)}
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


def run_merge_bench(cfg: MergeBenchConfig) -> dict[str, Any]:
    """:func:`run_benchmark` with the settings of ``megadistill bench merge``."""
    return run_benchmark(
        cfg.work_dir, cfg.num_experts, keep=cfg.keep, model_config=SMOKE if cfg.smoke else None,
        modes=tuple(cfg.modes), repeats=cfg.repeats,
    )  # fmt: skip


def format_results(results: dict[str, Any]) -> str:
    """A plain-text table: wall time and peak RSS per mode, then the ratios to the baseline."""
    lines = [f"{'mode':<20}{'wall s':>10}{'peak RSS MiB':>14}"]
    for mode in MODES:
        if mode in results:
            r = results[mode]
            lines.append(f"{mode:<20}{r['wall_s']:>10.2f}{r['peak_rss_mib']:>14.0f}")
    for name, ratio in results.get("summary", {}).items():
        lines.append(f"{name}: peak {ratio['peak']:.3f}, wall {ratio['wall']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    measure_main(sys.argv[1:])
