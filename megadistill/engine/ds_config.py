"""Fill a base DeepSpeed JSON from ``ds_configs/`` with the values the run config owns.

The run config fixes the effective (global) batch, the micro batch, the precision, gradient
clipping and parameter offload. The base JSON may leave those keys out or set them to ``"auto"``;
a value written explicitly in the JSON must agree with the run config, otherwise
:class:`~megadistill.config.ConfigError` names both. Gradient accumulation follows from
``global = micro * world_size * grad_accum``, so the effective batch does not depend on the
number of ranks.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from megadistill.config import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
AUTO = "auto"

Precision = Literal["auto", "bf16", "fp32"]
Offload = Literal["none", "cpu", "nvme"]


@dataclass(kw_only=True)
class EngineConfig:
    """How one DeepSpeed engine is configured: a base JSON plus the values the run owns."""

    ds_config: str
    """Base DeepSpeed JSON: a file path or a name in ds_configs/ (e.g. 'student_zero3')."""
    global_batch_size: int
    """Sequences per optimizer step over all ranks (the effective batch)."""
    micro_batch_size: int
    """Sequences per rank per forward/backward pass."""
    precision: Precision = "auto"
    """'bf16', 'fp32', or 'auto' (bf16 on GPU, fp32 on CPU)."""
    gradient_clipping: float = 1.0
    """Global gradient-norm clip (0 disables)."""
    offload: Offload | None = None
    """Parameter offload: 'none', 'cpu', 'nvme'; None keeps what the base JSON says."""
    nvme_path: str | None = None
    """Folder for NVMe parameter offload; required when the offload is 'nvme'."""
    param_persistence_threshold: int | None = None
    """If set, replaces stage3_param_persistence_threshold (0 partitions every parameter)."""

    def __post_init__(self) -> None:
        if self.global_batch_size < 1:
            raise ConfigError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be >= 1, got {self.micro_batch_size}")
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"global_batch_size={self.global_batch_size} is not a multiple of "
                f"micro_batch_size={self.micro_batch_size}; change one of them"
            )
        if self.gradient_clipping < 0:
            raise ConfigError(f"gradient_clipping must be >= 0, got {self.gradient_clipping}")
        if self.offload == "nvme" and not self.nvme_path:
            raise ConfigError("offload='nvme' needs nvme_path: set it to a folder on a fast disk")


def resolve_ds_config_path(name_or_path: str) -> Path:
    """Path of a base JSON given as a file path or a bare name in ``ds_configs/``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = DS_CONFIG_DIR / (
        name_or_path if name_or_path.endswith(".json") else f"{name_or_path}.json"
    )
    if shipped.is_file():
        return shipped
    choices = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
    raise ConfigError(
        f"ds_config {name_or_path!r} is neither a file nor a shipped config; shipped: {choices}"
    )


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    """Read a base DeepSpeed JSON (a path or a name in ``ds_configs/``)."""
    path = resolve_ds_config_path(name_or_path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"ds_config {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"ds_config {path} must hold a JSON object")
    return data


def _fill(node: dict[str, Any], key: str, value: Any, where: str, source: str) -> None:
    """Set ``node[key] = value`` when absent or 'auto'; raise when an explicit value disagrees."""
    current = node.get(key, AUTO)
    if current == AUTO:
        node[key] = value
    elif current != value:
        raise ConfigError(
            f"ds_config sets {where}={current!r} but the run config gives {value!r} (from {source}); "
            f'remove {where} from the JSON (or set it to "auto") or change {source}'
        )


def _section(cfg: dict[str, Any], key: str) -> dict[str, Any]:
    node = cfg.setdefault(key, {})
    if not isinstance(node, dict):
        raise ConfigError(f"ds_config key '{key}' must be an object, got {node!r}")
    return node


def grad_accum_steps(global_batch: int, micro_batch: int, world_size: int) -> int:
    """Gradient accumulation that keeps the effective batch fixed; raise if it does not divide."""
    per_step = micro_batch * world_size
    if global_batch % per_step:
        raise ConfigError(
            f"global_batch_size={global_batch} is not divisible by micro_batch_size={micro_batch} "
            f"x world_size={world_size}; choose a global batch that is a multiple of {per_step}"
        )
    return global_batch // per_step


def resolve_precision(precision: Precision, device_type: str) -> Literal["bf16", "fp32"]:
    """'auto' means bf16 on GPU and fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def _fill_precision(cfg: dict[str, Any], precision: str) -> None:
    fp16 = cfg.get("fp16", {})
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, AUTO):
        raise ConfigError("ds_config enables fp16, which megadistill does not support; use bf16")
    if isinstance(fp16, dict) and fp16.get("enabled") == AUTO:
        fp16["enabled"] = False
    _fill(_section(cfg, "bf16"), "enabled", precision == "bf16", "bf16.enabled", "precision")


def _fill_offload(cfg: dict[str, Any], run: EngineConfig, device_type: str) -> None:
    zero = _section(cfg, "zero_optimization")
    node = zero.get("offload_param")
    if run.offload is not None:
        if run.offload == "none":
            if isinstance(node, dict) and node.get("device", "none") not in ("none", AUTO):
                raise ConfigError(
                    f"ds_config sets zero_optimization.offload_param.device={node['device']!r} "
                    "but the run config gives offload='none'; use a base JSON without offload"
                )
            zero.pop("offload_param", None)
            return
        node = _section(zero, "offload_param")
        _fill(node, "device", run.offload, "zero_optimization.offload_param.device", "offload")
    if not isinstance(node, dict):
        return
    if node.get("device") == "nvme":
        if node.get("nvme_path", AUTO) == AUTO and not run.nvme_path:
            raise ConfigError("the ds_config offloads to nvme: set nvme_path in the run config")
        if run.nvme_path:
            _fill(node, "nvme_path", run.nvme_path, "offload_param.nvme_path", "nvme_path")
    if node.get("pin_memory") == AUTO:
        node["pin_memory"] = device_type == "cuda"


def fill_ds_config(
    base: dict[str, Any], run: EngineConfig, *, world_size: int, device_type: str
) -> dict[str, Any]:
    """Return a copy of ``base`` with batch, precision, clipping and offload filled from ``run``.

    Args:
        base: the base DeepSpeed dict (from :func:`load_ds_config`).
        run: the typed run settings for this engine.
        world_size: number of data-parallel ranks.
        device_type: 'cuda' or 'cpu' (decides 'auto' precision and pinned memory).

    Raises:
        ConfigError: a value written in ``base`` disagrees with ``run``, the batch does not
            divide, or an 'auto' is left that nothing fills.
    """
    cfg = copy.deepcopy(base)
    accum = grad_accum_steps(run.global_batch_size, run.micro_batch_size, world_size)
    _fill(
        cfg,
        "train_micro_batch_size_per_gpu",
        run.micro_batch_size,
        "train_micro_batch_size_per_gpu",
        "micro_batch_size",
    )
    _fill(
        cfg,
        "gradient_accumulation_steps",
        accum,
        "gradient_accumulation_steps",
        "global_batch_size / (micro_batch_size * world_size)",
    )
    _fill(cfg, "train_batch_size", run.global_batch_size, "train_batch_size", "global_batch_size")
    _fill(cfg, "gradient_clipping", run.gradient_clipping, "gradient_clipping", "gradient_clipping")
    _fill_precision(cfg, resolve_precision(run.precision, device_type))
    _fill_offload(cfg, run, device_type)
    if run.param_persistence_threshold is not None:
        zero = _section(cfg, "zero_optimization")
        zero["stage3_param_persistence_threshold"] = run.param_persistence_threshold
    left = _find_auto(cfg)
    if left:
        raise ConfigError(
            f"ds_config key '{left}' is 'auto' but megadistill does not fill it; set a value"
        )
    return cfg


def _find_auto(node: Any, prefix: str = "") -> str | None:
    if isinstance(node, dict):
        for key, value in node.items():
            found = _find_auto(value, f"{prefix}{key}.")
            if found:
                return found
    elif node == AUTO:
        return prefix.rstrip(".")
    return None


def build_ds_config(run: EngineConfig, *, world_size: int, device_type: str) -> dict[str, Any]:
    """Load ``run.ds_config`` and fill it (see :func:`fill_ds_config`)."""
    return fill_ds_config(
        load_ds_config(run.ds_config), run, world_size=world_size, device_type=device_type
    )
