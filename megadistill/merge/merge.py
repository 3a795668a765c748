"""Stage III: merge K experts' ZeRO-3 checkpoints into one Hugging Face model, streaming.

For every tensor name the experts' slices are read from their shards, combined, converted to
the output dtype and appended to the output file; then they are freed. Peak memory is a few
chunks (``chunk_numel`` elements) for the average and task arithmetic, and one tensor per expert
for TIES (its magnitude trimming needs the whole tensor), never a whole model.

Methods (``lambda_i >= 0``, ``sum lambda_i = 1``; ``theta_0`` = the initial weights):

- ``average``: ``theta = sum_i lambda_i theta_i`` (the paper's merge).
- ``task_arithmetic``: ``theta = theta_0 + scaling * sum_i lambda_i (theta_i - theta_0)``.
- ``ties``: task vectors trimmed to their top ``density`` fraction by magnitude, a sign elected
  per element from ``sum_i lambda_i tau_i``, and the lambda-weighted mean of the agreeing
  entries added to ``theta_0`` (Yadav et al., 2023).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch

from megadistill.config import ConfigError
from megadistill.errors import CheckpointError
from megadistill.integrity import atomic_dir, atomic_write_json
from megadistill.merge.hf_reader import HFWeights
from megadistill.merge.hf_writer import (
    OutputTensor,
    ShardedSafetensorsWriter,
    copy_tokenizer,
    write_config,
)
from megadistill.merge.zero_reader import TensorSpec, ZeroCheckpoint, resolve_tag_dir

log = logging.getLogger(__name__)

Method = Literal["average", "task_arithmetic", "ties"]
OutDType = Literal["float32", "bfloat16", "float16"]
MERGE_INFO_FILE = "merge.json"
_WEIGHT_TOL = 1e-6


class TensorSource(Protocol):
    """What the merge reads from: a ZeRO-3 checkpoint or a Hugging Face folder."""

    specs: dict[str, TensorSpec]
    meta: dict[str, Any] | None

    @property
    def name(self) -> str: ...

    @property
    def fingerprint(self) -> str | None: ...

    def read(self, name: str, start: int = 0, count: int | None = None) -> torch.Tensor: ...

    def close(self) -> None: ...


@dataclass(kw_only=True)
class MergeConfig:
    """How to merge experts into one Hugging Face model folder."""

    experts: list[str]
    """Expert checkpoints: checkpoint folders (their ``latest`` tag is used) or tag folders."""
    out: str
    """Output Hugging Face folder (must not exist unless ``overwrite``)."""
    weights: list[float] | None = None
    """Merge weights lambda_i, one per expert, >= 0 and summing to 1; None = uniform."""
    method: Method = "average"
    """average | task_arithmetic | ties."""
    base: str | None = None
    """Initial weights theta_0 (HF folder or checkpoint); required by task_arithmetic and ties."""
    scaling: float = 1.0
    """Scale of the merged task vector (task_arithmetic, ties)."""
    density: float = 0.2
    """TIES: fraction of each task vector's entries kept (largest magnitudes), in (0, 1]."""
    dtype: OutDType = "float32"
    """dtype of the written floating-point weights."""
    max_shard_bytes: int = 2 * 1024**3
    """Largest safetensors shard (a bigger single tensor gets a shard of its own)."""
    chunk_numel: int = 1 << 24
    """Elements processed at once for average / task_arithmetic (bounds peak memory)."""
    tokenizer: str | None = None
    """Tokenizer folder to copy; None = the one the first expert's megadistill.json names."""
    verify: bool = True
    """Check every checkpoint's checksums.json before reading it."""
    overwrite: bool = False
    """Replace an existing output folder (only once the new one is complete)."""
    tags: list[str | None] = field(default_factory=list)
    """Optional explicit tag per expert (empty = each checkpoint's ``latest``)."""

    def __post_init__(self) -> None:
        if not self.experts:
            raise ConfigError("merge.experts is empty: name at least one expert checkpoint")
        if self.weights is None:
            self.weights = [1.0 / len(self.experts)] * len(self.experts)
        _check_weights(self.weights, len(self.experts))
        if self.method != "average" and self.base is None:
            raise ConfigError(
                f"merge.base is required for method={self.method}: pass the initial weights "
                "theta_0 (a Hugging Face folder or a checkpoint)"
            )
        if not 0.0 < self.density <= 1.0:
            raise ConfigError(f"merge.density={self.density} must be in (0, 1]")
        if self.max_shard_bytes <= 0 or self.chunk_numel <= 0:
            raise ConfigError("merge.max_shard_bytes and merge.chunk_numel must be positive")
        if self.tags and len(self.tags) != len(self.experts):
            raise ConfigError(
                f"merge.tags has {len(self.tags)} entries for {len(self.experts)} experts"
            )


def _check_weights(weights: list[float], num: int) -> None:
    if len(weights) != num:
        raise ConfigError(
            f"merge.weights has {len(weights)} values for {num} experts; give one each"
        )
    if any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError(f"merge.weights={weights}: every weight must be finite and >= 0")
    if abs(sum(weights) - 1.0) > _WEIGHT_TOL:
        raise ConfigError(f"merge.weights={weights} sum to {sum(weights):.6g}; they must sum to 1")


def open_source(path: str | Path, tag: str | None = None, *, verify: bool = True) -> TensorSource:
    """A ZeRO-3 checkpoint (folder or tag folder) or a Hugging Face safetensors folder."""
    path = Path(path)
    try:
        resolve_tag_dir(path, tag)
    except CheckpointError:
        if tag is None and path.is_dir() and any(path.glob("*.safetensors*")):
            return HFWeights(path)
        raise
    return ZeroCheckpoint(path, tag, verify=verify)


def check_compatible(experts: list[TensorSource], base: TensorSource | None = None) -> None:
    """Refuse experts from different initial students, or with different tensors.

    Raises:
        CheckpointError: naming the expert and the fingerprint or tensor that differs.
    """
    ref = experts[0]
    if ref.meta is not None and ref.fingerprint is None:
        raise CheckpointError(f"{ref.name}: megadistill.json has no fingerprint")
    for other in [*experts[1:], *([base] if base is not None else [])]:
        _check_architecture(ref, other)
        if other.fingerprint is not None and other.fingerprint != ref.fingerprint:
            raise CheckpointError(
                f"{other.name} started from a different initial student than {ref.name} "
                f"(fingerprint {str(other.fingerprint)[:12]} != {str(ref.fingerprint)[:12]}); "
                "merge only experts trained from the same theta_0"
            )
        _check_specs(ref, other, compare_dtype=other is not base)


def _model_config(src: TensorSource) -> dict[str, Any] | None:
    """The model config a source was saved with (checkpoint metadata or ``config.json``)."""
    if src.meta is not None:
        return src.meta.get("model_config")
    config = Path(src.name) / "config.json"
    return json.loads(config.read_text()) if config.is_file() else None


def _check_architecture(ref: TensorSource, other: TensorSource) -> None:
    """Refuse hybrid students whose settings differ (window, sinks, ...), naming the field: their
    tensors can have the same shapes while the models compute different functions."""
    a, b = _model_config(ref), _model_config(other)
    if not a or not b or "megadistill_hybrid" not in (a.get("model_type"), b.get("model_type")):
        return
    if a.get("model_type") != b.get("model_type"):
        diff = f"model_type={a.get('model_type')!r} vs {b.get('model_type')!r}"
    else:
        from megadistill.teachers.conversion import architecture_difference

        diff = architecture_difference(a, b)
    if diff:
        raise CheckpointError(
            f"{other.name} is a different architecture than {ref.name} ({diff}); merge only "
            "experts converted with the same teacher and hybrid settings"
        )


def _check_specs(ref: TensorSource, other: TensorSource, *, compare_dtype: bool) -> None:
    missing = [n for n in ref.specs if n not in other.specs]
    extra = [n for n in other.specs if n not in ref.specs]
    if missing or extra:
        name, what = (missing[0], "lacks") if missing else (extra[0], "has an extra")
        raise CheckpointError(
            f"{other.name} {what} tensor {name} compared with {ref.name} "
            f"({len(missing)} missing, {len(extra)} extra): not the same model"
        )
    for name, spec in ref.specs.items():
        o = other.specs[name]
        if o.shape != spec.shape or (compare_dtype and o.dtype != spec.dtype):
            raise CheckpointError(
                f"{other.name}: tensor {name} is {tuple(o.shape)} {o.dtype}, but "
                f"{tuple(spec.shape)} {spec.dtype} in {ref.name}: not the same model"
            )


def merge_experts(cfg: MergeConfig) -> Path:
    """Merge ``cfg.experts`` into the Hugging Face folder ``cfg.out`` (written atomically).

    Returns:
        The output folder.

    Raises:
        CheckpointError: a checkpoint is incomplete, corrupt or incompatible; nothing is written.
    """
    start = time.perf_counter()
    if Path(cfg.out).exists() and not cfg.overwrite:
        raise CheckpointError(f"output {cfg.out} already exists; remove it or pass --overwrite")
    tags = cfg.tags or [None] * len(cfg.experts)
    sources: list[TensorSource] = []
    try:
        for path, tag in zip(cfg.experts, tags):
            sources.append(open_source(path, tag, verify=cfg.verify))
        base = open_source(cfg.base, verify=cfg.verify) if cfg.method != "average" else None
        if base is not None:
            sources.append(base)
        experts = sources[: len(cfg.experts)]
        check_compatible(experts, base)
        out = _write(cfg, experts, base)
    finally:
        for s in sources:
            s.close()
    log.info(
        "merged %d expert(s) into %s in %.1f s", len(cfg.experts), out, time.perf_counter() - start
    )
    return out


def _write(cfg: MergeConfig, experts: list[TensorSource], base: TensorSource | None) -> Path:
    out_dtype = getattr(torch, cfg.dtype)
    plan = [
        OutputTensor(s.name, s.shape, out_dtype if s.dtype.is_floating_point else s.dtype)
        for s in experts[0].specs.values()
    ]
    meta = experts[0].meta
    if meta is None or "model_config" not in meta:
        raise CheckpointError(f"{experts[0].name} has no megadistill.json with a model_config")
    with atomic_dir(cfg.out, overwrite=cfg.overwrite) as tmp:
        writer = ShardedSafetensorsWriter(tmp, plan, cfg.max_shard_bytes)
        try:
            for spec in plan:
                for chunk in _merged_chunks(cfg, spec, experts, base):
                    writer.write(spec.name, chunk)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        write_config(tmp, meta["model_config"], out_dtype)
        if meta["model_config"].get("model_type") == "megadistill_hybrid":
            from megadistill.model.remote_code import write_remote_code

            write_remote_code(tmp)  # so the folder loads with trust_remote_code, nothing imported
        tokenizer = cfg.tokenizer or meta.get("tokenizer")
        if tokenizer:
            copy_tokenizer(tokenizer, tmp)
        atomic_write_json(tmp / MERGE_INFO_FILE, _provenance(cfg, experts))
    return Path(cfg.out)


def _provenance(cfg: MergeConfig, experts: list[TensorSource]) -> dict[str, Any]:
    info: dict[str, Any] = {"config": asdict(cfg), "experts": []}
    for src in experts:
        meta = src.meta or {}
        info["experts"].append(
            {k: meta.get(k) for k in ("tag", "step", "fingerprint", "version", "git_revision")}
            | {"path": src.name}
        )
    info["fingerprint"] = experts[0].fingerprint
    return info


def _merged_chunks(
    cfg: MergeConfig, spec: OutputTensor, experts: list[TensorSource], base: TensorSource | None
):
    """Yield the merged tensor ``spec.name`` as consecutive 1-D chunks in ``spec.dtype``."""
    numel = math.prod(spec.shape)
    if not spec.dtype.is_floating_point:
        yield experts[0].read(spec.name)  # integer buffers are not averaged
        return
    step = max(numel, 1) if cfg.method == "ties" else cfg.chunk_numel
    for begin in range(0, max(numel, 1), step):
        count = min(step, numel - begin)
        if cfg.method == "average":
            merged = _average(cfg.weights, experts, spec.name, begin, count)
        else:
            theta0 = base.read(spec.name, begin, count).float()
            merged = _task_merge(cfg, experts, spec.name, begin, count, theta0)
        yield merged.to(spec.dtype)
        del merged


def _average(
    weights: list[float], experts: list[TensorSource], name: str, begin: int, count: int
) -> torch.Tensor:
    # Multiply, then add, as two separately rounded fp32 ops (no fused multiply-add): the result
    # is bitwise reproducible whatever the chunking.
    acc = experts[0].read(name, begin, count).float().mul_(weights[0])
    for w, src in zip(weights[1:], experts[1:]):
        acc.add_(src.read(name, begin, count).float().mul_(w))
    return acc


def _task_merge(
    cfg: MergeConfig,
    experts: list[TensorSource],
    name: str,
    begin: int,
    count: int,
    theta0: torch.Tensor,
) -> torch.Tensor:
    if cfg.method == "task_arithmetic":
        tau = torch.zeros_like(theta0)
        for w, src in zip(cfg.weights, experts):
            tau.add_(src.read(name, begin, count).float().sub_(theta0).mul_(w))
        return theta0.add_(tau.mul_(cfg.scaling))
    taus = [src.read(name, begin, count).float().sub_(theta0) for src in experts]
    merged = ties_merge(taus, cfg.weights, cfg.density)
    return theta0.add_(merged.mul_(cfg.scaling))


def ties_merge(taus: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES: trim each task vector to its top ``density`` entries, elect signs, disjoint mean.

    Args:
        taus: task vectors ``theta_i - theta_0`` (same shape), modified in place.
        weights: lambda_i per task vector.
        density: fraction of entries kept per task vector.
    """
    for tau in taus:
        keep = max(1, math.ceil(density * tau.numel()))
        if keep < tau.numel():
            threshold = tau.abs().reshape(-1).kthvalue(tau.numel() - keep + 1).values
            tau.masked_fill_(tau.abs() < threshold, 0.0)
    sign = torch.zeros_like(taus[0])
    for w, tau in zip(weights, taus):
        sign.add_(tau, alpha=w)
    sign = sign.sign_()
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for w, tau in zip(weights, taus):
        agree = (tau.sign() == sign) & (tau != 0)
        num.add_(torch.where(agree, tau, 0.0), alpha=w)
        den.add_(agree.float(), alpha=w)
    return torch.where(den > 0, num / den.clamp_min(1e-12), 0.0)


def consolidate(checkpoint: str | Path, out: str | Path, **options: Any) -> Path:
    """One ZeRO-3 checkpoint -> Hugging Face folder (a merge of one expert with weight 1)."""
    return merge_experts(MergeConfig(experts=[str(checkpoint)], out=str(out), **options))
