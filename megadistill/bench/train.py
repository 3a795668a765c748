"""Stage II (and stage I) training steps of the hybrid student vs a plain step of its teacher.

``megadistill bench train`` takes a random teacher of a given size or a real one
(``teacher=PATH`` or ``teacher=smollm2``) and its converted student (same shared weights), then,
for every world size asked for, runs one process group that builds one engine per kind under the
same ZeRO-3 engine config (``ds_configs/student_zero3.json`` by default) and times their steps
interleaved (teacher, student, align, teacher, ...), so a busy machine slows all kinds alike:

- teacher: a plain causal-LM step, full-vocabulary cross-entropy, ``engine.backward`` +
  ``engine.step``;
- student: a stage II step, :class:`~megadistill.stages.distill.DistillLoss` (the chunked
  ``gamma * CE + beta * top-k KL`` head loss) against random precomputed top-k targets, so only
  the student step is timed (no teacher forward);
- align (with ``kinds=[teacher,student,align]``): a stage I step, only the new parameters
  trainable, the summed per-layer MSE to the teacher's attention (the stage I probe).

Each rank reports wall and CPU time per step (CPU time is the process's own compute: on a
machine shared with other jobs it moves less than wall time), the bytes of its ZeRO-3 model
states (partitioned parameters, persistent parameters, gradient partitions, optimizer states;
DeepSpeed's communication buckets are reported apart) and its peak RSS. The summary prints the
two goals of the issue: hybrid step time / teacher step time (<= 1.15) and per-rank model-state
memory at 2 ranks / at 1 rank (<= 0.6).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import statistics
import tempfile
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from megadistill.bench.synthetic import SyntheticModelConfig
from megadistill.bench.timing import Stopwatch, measure
from megadistill.config import ConfigError

log = logging.getLogger(__name__)

ModelKind = Literal["teacher", "student", "align"]
KINDS: tuple[ModelKind, ...] = ("teacher", "student", "align")
PRECISION = {"float32": "fp32", "bfloat16": "bf16"}
GOAL_STEP_RATIO = 1.15
GOAL_MEMORY_RATIO = 0.6


@dataclass(kw_only=True)
class TrainBenchConfig(SyntheticModelConfig):
    """Settings of ``megadistill bench train``."""

    # A larger model than the inference benchmark's, so a step is mostly compute.
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_heads: int = 8
    num_kv_heads: int = 4
    vocab_size: int = 8192

    seq_len: int = 1024
    """Tokens per sequence."""
    micro_batch_size: int = 1
    """Sequences per rank per step."""
    num_steps: int = 4
    """Timed optimizer steps (the median is reported)."""
    num_warmup_steps: int = 1
    """Untimed steps before the timed ones."""
    top_k: int = 256
    """Teacher top-k of the random stage II targets."""
    loss_chunk_size: int = 1024
    """Tokens per chunk of full-vocabulary logits in the student's head loss."""
    window: int = 512
    """Student SWA window."""
    num_sinks: int = 4
    """Student sink tokens."""
    mlstm_chunk_size: int = 64
    """Chunk length of the student's chunkwise mLSTM."""
    world_sizes: tuple[int, ...] = (1, 2)
    """Process-group sizes to run (the memory ratio needs 1 and 2)."""
    ds_config: str = "student_zero3"
    """Base DeepSpeed JSON of both engines (a name in ds_configs/ or a path)."""
    param_persistence_threshold: int | None = None
    """If set, replaces stage3_param_persistence_threshold (None keeps the JSON's value)."""
    work_dir: str | None = None
    """Folder for the models and per-rank results (default: a temporary folder)."""
    timeout_s: float = 1200.0
    """Limit of each process group (and of its collectives)."""
    kinds: tuple[str, ...] = ("teacher", "student")
    """Steps to time: ``teacher`` (CE), ``student`` (stage II), ``align`` (stage I)."""
    interleave: bool = True
    """All kinds in one process group, steps interleaved; False: one process group per kind,
    one after the other (one engine in memory at a time; compare the CPU-time ratios then)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"kinds={list(self.kinds)}: each must be one of {KINDS}")
        if self.dtype not in PRECISION:
            raise ConfigError(f"dtype={self.dtype!r}: training runs in one of {tuple(PRECISION)}")
        if self.num_steps < 1 or self.num_warmup_steps < 0:
            raise ConfigError("num_steps must be >= 1 and num_warmup_steps >= 0")
        if not self.world_sizes or any(w < 1 for w in self.world_sizes):
            raise ConfigError(f"world_sizes must be positive, got {self.world_sizes}")
        if self.top_k > self.vocab_size:
            raise ConfigError(f"top_k={self.top_k} exceeds vocab_size={self.vocab_size}")


# ----------------------------------------------------------------------------- models
def teacher_folder(cfg: TrainBenchConfig, root: Path) -> Path:
    """The teacher's folder: the real one, or the random one written to ``root/teacher``."""
    path = cfg.teacher_path()
    return path if path is not None and path.is_dir() else root / "teacher"


def write_models(cfg: TrainBenchConfig, root: Path) -> None:
    """A random teacher (of the configured size or of a config.json) in ``root/teacher`` unless
    the teacher is a real folder, its student in ``root/student`` (every shared weight
    identical)."""
    from megadistill.integrity import follow_umask
    from megadistill.teachers.conversion import convert_pretrained

    if teacher_folder(cfg, root) == root / "teacher":  # random weights
        cfg.load_teacher(cfg.seq_len, attention_bias=False).save_pretrained(root / "teacher")
        follow_umask(root / "teacher")  # safetensors writes its shards 0o600
    hybrid = [
        f"window={cfg.window}",
        f"num_sinks={cfg.num_sinks}",
        f"chunk_size={cfg.mlstm_chunk_size}",
    ]
    convert_pretrained(teacher_folder(cfg, root), root / "student", hybrid, overwrite=True)


# ----------------------------------------------------------------------------- memory
def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def model_state_bytes(engine: Any) -> dict[str, int]:
    """Bytes of the ZeRO-3 model states this rank holds, by kind.

    Tensors are counted once per storage (a parameter partition that is a view of a flat group,
    or fp32 master weights that share the parameters' storage, count once): ``params`` (the
    rank's partitions plus the full copies of persistent parameters), ``grads`` (gradient
    partitions), ``optim`` (fp32 master copies and optimizer moments) and ``buffers``
    (communication buckets; not model states).
    """
    zero = engine.optimizer
    groups: dict[str, list[torch.Tensor]] = {"params": [], "grads": [], "optim": [], "buffers": []}
    for p in engine.module.parameters():
        groups["params"].append(p.data)
        if hasattr(p, "ds_tensor"):
            groups["params"].append(p.ds_tensor)
    groups["params"] += list(getattr(zero, "fp16_partitioned_groups_flat", []))
    flat_grads = getattr(zero, "grad_partitions_flat_buffer", None)
    if isinstance(flat_grads, torch.Tensor):
        groups["grads"].append(flat_grads)
    groups["optim"] += list(getattr(zero, "fp32_partitioned_groups_flat", []))
    for state in zero.optimizer.state.values():
        groups["optim"] += [v for v in state.values() if isinstance(v, torch.Tensor)]
    for bucket in getattr(zero, "ipg_buckets", {}).values():
        if isinstance(getattr(bucket, "buffer", None), torch.Tensor):
            groups["buffers"].append(bucket.buffer)
    seen: set[tuple[int, int]] = set()
    out = {}
    for kind, tensors in groups.items():
        total = 0
        for t in tensors:
            key = _storage_key(t)
            if key[1] and key not in seen:
                seen.add(key)
                total += key[1]
        out[kind] = total
    return out


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM; unlike ``ru_maxrss`` it is not inherited
    from the parent across the fork + exec of a spawned rank)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # not Linux: best effort


# ----------------------------------------------------------------------------- one rank
class RandomTopK:
    """Precomputed stand-in for teacher targets: random distinct top-k ids per token and
    descending log-probabilities (the interface of ``TeacherTargets.get``)."""

    def __init__(self, shape: tuple[int, int], vocab: int, k: int, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(shape[0] * shape[1], vocab, generator=gen)
        self.ids = scores.topk(k, dim=-1).indices.reshape(*shape, k)
        logits = torch.randn(*shape, k, generator=gen).sort(dim=-1, descending=True).values
        self.logprobs = torch.log_softmax(logits, dim=-1) - 0.1  # the top-k miss some mass

    def get(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        del sample_ids
        return self.logprobs, self.ids


def _batch(cfg: TrainBenchConfig, vocab: int, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (cfg.micro_batch_size, cfg.seq_len)
    ids = torch.randint(3, vocab, shape, generator=gen)
    labels = torch.cat([ids[:, 1:], torch.full((shape[0], 1), -100)], dim=1)
    pos = torch.arange(cfg.seq_len).expand(shape).contiguous()
    sample_ids = torch.arange(shape[0])
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "sample_ids": sample_ids}


def _loss_fn(kind: ModelKind, cfg: TrainBenchConfig, vocab: int, seed: int):
    """``engine, batch -> loss`` of a plain teacher step, a stage II or a stage I student step."""
    if kind == "align":
        from megadistill.stages.align import AttentionProbe

        probes: dict[int, AttentionProbe] = {}

        def align_loss(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            dev = engine.device
            if id(engine) not in probes:  # installed for the rest of the run, as stage I does
                probes[id(engine)] = AttentionProbe(engine.module).__enter__()
            return probes[id(engine)].loss(
                engine, batch["input_ids"].to(dev), batch["position_ids"].to(dev)
            )

        return align_loss
    if kind == "teacher":

        def teacher_loss(engine: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            ids = batch["input_ids"].to(engine.device)
            return engine(
                input_ids=ids,
                position_ids=batch["position_ids"].to(engine.device),
                labels=ids,
                use_cache=False,
            ).loss

        return teacher_loss
    from megadistill.stages.config import DistillLossConfig
    from megadistill.stages.distill import DistillLoss

    targets = RandomTopK((cfg.micro_batch_size, cfg.seq_len), vocab, cfg.top_k, seed)
    # DistillLoss reads only cfg.distill: the stage's own loss code, without a data config.
    loss_cfg = DistillLossConfig(top_k=cfg.top_k, chunk_size=cfg.loss_chunk_size)
    distill = DistillLoss(SimpleNamespace(distill=loss_cfg), targets=targets)  # type: ignore[arg-type]
    return lambda engine, batch: distill(engine, batch)[0]


def _build_engine(kind: ModelKind, cfg: TrainBenchConfig, root: Path, world: int) -> Any:
    from megadistill.engine import build_student_engine
    from megadistill.engine.distributed import device_type
    from megadistill.engine.ds_config import EngineConfig, build_ds_config
    from megadistill.engine.optim import OptimizerConfig, SchedulerConfig

    run = EngineConfig(
        ds_config=cfg.ds_config,
        global_batch_size=cfg.micro_batch_size * world,
        micro_batch_size=cfg.micro_batch_size,
        precision=PRECISION[cfg.dtype],  # type: ignore[arg-type]
        param_persistence_threshold=cfg.param_persistence_threshold,
    )
    ds_cfg = build_ds_config(run, world_size=world, device_type=device_type())

    def model_fn() -> torch.nn.Module:
        if kind == "teacher":
            from transformers import AutoModelForCausalLM

            return AutoModelForCausalLM.from_pretrained(
                teacher_folder(cfg, root), dtype=torch.float32
            )
        from megadistill.model import HybridForCausalLM

        model = HybridForCausalLM.from_pretrained(root / "student", dtype=torch.float32)
        if kind == "align":  # stage I trains only the new parameters
            new = set(model.new_parameter_names())
            for name, p in model.named_parameters():
                p.requires_grad_(name in new)
        return model

    return build_student_engine(model_fn, ds_cfg, OptimizerConfig(lr=1e-5), SchedulerConfig())


def bench_rank(kinds: list[ModelKind], cfg_dict: dict[str, Any], root_str: str) -> None:
    """Rank entry point: build one engine per kind, time their steps interleaved, write
    ``<kind>_w<W>_r<R>.json`` per kind."""
    import torch.distributed as dist

    from megadistill.config import from_dict
    from megadistill.engine.distributed import init_distributed

    cfg = from_dict(TrainBenchConfig, cfg_dict)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    root = Path(root_str)
    rank, world = init_distributed(cfg.timeout_s)
    engines, rss_built = {}, {}
    for kind in kinds:
        engines[kind] = _build_engine(kind, cfg, root, world)
        rss_built[kind] = peak_rss_bytes()
    vocab = engines[kinds[0]].module.config.vocab_size
    batch = _batch(cfg, vocab, seed=rank)
    loss_fns = {kind: _loss_fn(kind, cfg, vocab, seed=rank) for kind in kinds}
    losses: dict[str, list[float]] = {k: [] for k in kinds}  # warm-up steps included

    def step(kind: ModelKind) -> None:
        engine = engines[kind]
        loss = loss_fns[kind](engine, batch)
        engine.backward(loss)
        engine.step()
        losses[kind].append(float(loss.detach()))

    # Every rank starts a step together (the barrier, untimed): a step's time is the slowest's.
    times = measure(
        {kind: partial(step, kind) for kind in kinds},
        repeats=cfg.num_steps,
        warmup=cfg.num_warmup_steps,
        device=engines[kinds[0]].device,
        before=lambda _: dist.barrier(),
    )
    for kind in kinds:
        result = {
            "kind": kind,
            "world_size": world,
            "rank": rank,
            "step_wall_s": times[kind].wall,
            "step_cpu_s": times[kind].cpu,
            "losses": losses[kind],
            "tokens_per_step": cfg.micro_batch_size * cfg.seq_len * world,
            "model_state_bytes": model_state_bytes(engines[kind]),
            "peak_rss_after_build_bytes": rss_built[kind],
            "peak_rss_bytes": peak_rss_bytes(),
            "num_threads": torch.get_num_threads(),
        }
        out = root / "results" / f"{kind}_w{world}_r{rank}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
    dist.barrier()


# ----------------------------------------------------------------------------- driver
def _summarise_group(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """One (model, world size): per-step maxima over ranks, then the median over steps."""
    wall = statistics.median(max(steps) for steps in zip(*(r["step_wall_s"] for r in rows)))
    cpu = statistics.median(max(steps) for steps in zip(*(r["step_cpu_s"] for r in rows)))
    states = [sum(v for k, v in r["model_state_bytes"].items() if k != "buffers") for r in rows]
    rank0 = next(r for r in rows if r["rank"] == 0)
    return {
        "kind": rows[0]["kind"],
        "world_size": rows[0]["world_size"],
        "step_wall_s": wall,
        "step_cpu_s": cpu,
        "tokens_per_s": rows[0]["tokens_per_step"] / wall,
        "tokens_per_cpu_s": rows[0]["tokens_per_step"] / cpu,
        "model_states_mib_per_rank": max(states) / 2**20,
        "model_states_by_kind_mib": {k: v / 2**20 for k, v in rank0["model_state_bytes"].items()},
        "peak_rss_mib_per_rank": max(r["peak_rss_bytes"] for r in rows) / 2**20,
        "first_loss": rows[0]["losses"][0],
        "last_loss": rows[0]["losses"][-1],
    }


def summarise(results_dir: Path) -> dict[str, Any]:
    """Read every rank's JSON under ``results_dir``; return groups and the goal ratios."""
    files = sorted(results_dir.glob("*_w*_r*.json"))
    by_group: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for f in files:
        row = json.loads(f.read_text())
        by_group.setdefault((row["kind"], row["world_size"]), []).append(row)
    groups = {f"{k}_w{w}": _summarise_group(rows) for (k, w), rows in sorted(by_group.items())}
    ratios: dict[str, float] = {}
    for w in sorted({w for _, w in by_group}):
        t, s = groups.get(f"teacher_w{w}"), groups.get(f"student_w{w}")
        if t and s:
            ratios[f"step_time_student_over_teacher_w{w}"] = s["step_wall_s"] / t["step_wall_s"]
            ratios[f"step_cpu_student_over_teacher_w{w}"] = s["step_cpu_s"] / t["step_cpu_s"]
        a = groups.get(f"align_w{w}")
        if t and a:
            ratios[f"step_cpu_align_over_teacher_w{w}"] = a["step_cpu_s"] / t["step_cpu_s"]
    for kind in KINDS:
        one, two = groups.get(f"{kind}_w1"), groups.get(f"{kind}_w2")
        if one and two:
            ratios[f"model_states_w2_over_w1_{kind}"] = (
                two["model_states_mib_per_rank"] / one["model_states_mib_per_rank"]
            )
    return {"groups": groups, "ratios": ratios}


def run_train_bench(cfg: TrainBenchConfig) -> dict[str, Any]:
    """Build the models, run every (world size, model) process group, return the summary."""
    from megadistill.engine.launch import run_distributed

    with tempfile.TemporaryDirectory(prefix="md-bench-train-") as tmp:
        root = Path(cfg.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        if not (root / "student" / "config.json").is_file():
            write_models(cfg, root)
        results = root / "results"
        for f in results.glob("*.json") if results.is_dir() else ():
            f.unlink()
        groups = [list(cfg.kinds)] if cfg.interleave else [[k] for k in cfg.kinds]
        for world in cfg.world_sizes:
            for kinds in groups:
                with Stopwatch() as sw:
                    run_distributed(
                        bench_rank, world, kinds, asdict(cfg), str(root), timeout_s=cfg.timeout_s
                    )
                log.info("%s on %d rank(s): %.0f s", kinds, world, sw.wall)
        summary = summarise(results)
    summary["config"] = asdict(cfg)
    summary["threads_per_rank"] = cfg.threads or int(os.environ.get("OMP_NUM_THREADS", "1"))
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A plain-text table plus the goal ratios."""
    head = (
        f"{'run':<12}{'step s':>9}{'cpu s':>9}{'cpu/wall':>9}{'tok/s':>9}{'tok/cpu-s':>10}"
        f"{'states MiB/rank':>17}"
        f"{'peak RSS MiB':>14}{'loss first->last':>20}"
    )
    lines = [head]
    for name, g in summary["groups"].items():
        lines.append(
            f"{name:<12}{g['step_wall_s']:>9.3f}{g['step_cpu_s']:>9.3f}"
            f"{g['step_cpu_s'] / g['step_wall_s']:>9.2f}{g['tokens_per_s']:>9.0f}"
            f"{g['tokens_per_cpu_s']:>10.0f}"
            f"{g['model_states_mib_per_rank']:>17.1f}{g['peak_rss_mib_per_rank']:>14.0f}"
            f"{g['first_loss']:>10.4f}->{g['last_loss']:<9.4f}"
        )
    for key, value in summary["ratios"].items():
        if "align" in key:
            lines.append(f"{key}: {value:.3f}")
            continue
        goal = GOAL_STEP_RATIO if key.startswith("step") else GOAL_MEMORY_RATIO
        mark = "ok" if value <= goal else "ABOVE GOAL"
        lines.append(f"{key}: {value:.3f} (goal <= {goal}; {mark})")
    lines.append(
        "cpu/wall well below 1 means the ranks waited for a CPU (a shared machine): compare the "
        "cpu ratios then; each rank runs one thread."
    )
    return "\n".join(lines)
