"""Build a Hugging Face model ZeRO-3-partitioned straight from its safetensors shards.

transformers' own ZeRO-3 ``from_pretrained`` (5.x) reads *every* checkpoint file into one state
dict on rank 0 before copying it into the partitioned parameters, so rank 0 briefly holds a full
copy of the model (a 7B teacher in fp32 is 28 GB of host memory). :func:`from_pretrained_zero3`
instead builds the model under ``deepspeed.zero.Init`` (HF's own init contexts, no random init),
then every rank reads, one tensor at a time, only the rows of each weight that fall into its own
ZeRO-3 partition and writes them into ``param.ds_tensor``: no collective, no full tensor, no rank
ever holds more than its partition plus a slice of one tensor.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any

import torch

from megadistill.errors import CheckpointError

log = logging.getLogger(__name__)


def weight_files(folder: str | Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of a Hugging Face folder (index or single files)."""
    from megadistill.teachers.conversion import weight_index

    folder = Path(folder)
    return {name: folder / f for name, f in weight_index(folder).items()}


def _model_class(config: Any, model_cls: type | None) -> type:
    if model_cls is not None and not hasattr(model_cls, "_model_mapping"):
        return model_cls
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    if type(config) not in mapping:
        raise CheckpointError(
            f"no causal-LM class is registered for model_type {config.model_type!r}"
        )
    return mapping[type(config)]


def _is_resident(p: torch.nn.Parameter) -> bool:
    """The parameter's partition is an ordinary in-memory tensor (not swapped to NVMe, no hpZ)."""
    part = getattr(p, "ds_tensor", None)
    if part is None or getattr(p, "ds_secondary_tensor", None) is not None:
        return False
    loc = getattr(part, "final_location", None)
    if str(getattr(loc, "value", loc)) == "nvme":
        return False
    return part.numel() == getattr(part, "ds_numel", part.numel())


def _load_partition(p: torch.nn.Parameter, tensor_slice: Any) -> None:
    """Copy this rank's ZeRO-3 partition of one weight from a safetensors slice.

    DeepSpeed stores rank ``r``'s partition as elements ``[r*s, (r+1)*s)`` of the flattened
    weight (``s = ds_tensor.ds_numel``, the last partition zero-padded); only the rows that cover
    that range are read from the file.
    """
    import torch.distributed as dist

    part = p.ds_tensor
    size = int(part.ds_numel)
    rank = dist.get_rank(group=p.ds_process_group)
    start, end = rank * size, min((rank + 1) * size, p.ds_numel)
    if start >= end:
        return
    shape = tuple(p.ds_shape)
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    r0, r1 = start // row, -(-end // row)
    rows = tensor_slice[r0:r1] if shape else tensor_slice[:]
    flat = rows.reshape(-1)[start - r0 * row : end - r0 * row]
    with torch.no_grad():
        part.narrow(0, 0, end - start).copy_(flat)


def _load_gathered(p: torch.nn.Parameter, tensor_slice: Any) -> None:
    """Fallback (NVMe-swapped or hpZ partitions): gather, let rank 0 write, re-partition."""
    import deepspeed
    import torch.distributed as dist

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
        if dist.get_rank() == 0:
            p.data.copy_(tensor_slice[:].reshape(p.shape))


def load_into_partitions(model: torch.nn.Module, folder: str | Path) -> None:
    """Fill a ZeRO-3-partitioned model's parameters and buffers from ``folder``'s safetensors.

    Files are opened one at a time and every tensor is read as a slice. All ranks walk the same
    names in the same order (the NVMe fallback is a collective).

    Raises:
        CheckpointError: a parameter of the model is in no weight file, or shapes differ.
    """
    from safetensors import safe_open

    files = weight_files(folder)
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    buffers = dict(model.named_buffers())
    missing = sorted(n for n in params if n not in files)
    if missing:
        raise CheckpointError(
            f"weight '{missing[0]}' of the model is in no file of {folder} ({len(missing)} in all)"
        )
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        if name in params or name in buffers:
            by_file.setdefault(f, []).append(name)
    for f in sorted(by_file):
        with safe_open(f, framework="pt") as fh:
            for name in sorted(by_file[f]):
                sl = fh.get_slice(name)
                if name in buffers:
                    buffers[name].data.copy_(sl[:])
                    continue
                p = params[name]
                shape = tuple(getattr(p, "ds_shape", p.shape))
                if tuple(sl.get_shape()) != shape:
                    raise CheckpointError(
                        f"weight '{name}' in {f} has shape {tuple(sl.get_shape())}, the model "
                        f"expects {shape}: config.json and the weights disagree"
                    )
                if not hasattr(p, "ds_tensor"):
                    with torch.no_grad():
                        p.data.copy_(sl[:])
                elif _is_resident(p):
                    _load_partition(p, sl)
                else:
                    _load_gathered(p, sl)
    for p in params.values():
        p._is_hf_initialized = True


def from_pretrained_zero3(
    folder: str | Path, model_cls: type | None = None, dtype: torch.dtype = torch.float32
) -> torch.nn.Module:
    """``Model.from_pretrained(folder, dtype=dtype)`` that never materialises the full model.

    Call it while an ``HfDeepSpeedConfig`` with ZeRO-3 is alive (as
    :func:`megadistill.engine.builders.build_student_engine` does); without one it simply calls
    ``from_pretrained``.

    Args:
        folder: a Hugging Face folder with safetensors weights (sharded or not).
        model_cls: the model class, or None / an Auto class to resolve it from config.json.
        dtype: parameter dtype (weights are cast while being copied in).

    Returns:
        The model in eval mode (as ``from_pretrained`` returns it), parameters partitioned.
    """
    from transformers import AutoConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    config = AutoConfig.from_pretrained(folder)
    cls = _model_class(config, model_cls)
    if not is_deepspeed_zero3_enabled():
        return cls.from_pretrained(folder, dtype=dtype)
    config.dtype = dtype
    # HF's own contexts: dtype, no random init, RoPE buffers kept fp32, deepspeed.zero.Init.
    # A private classmethod (megadistill/compat.py): by keyword, so a renamed parameter raises.
    contexts = cls.get_init_context(
        dtype=dtype, is_quantized=False, _is_ds_init_called=False, allow_all_kernels=None
    )
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        model = cls(config)
    model.tie_weights()  # before loading: a tied head is then no parameter of its own
    load_into_partitions(model, folder)
    model.eval()
    log.info("built %s from %s partitioned (ZeRO-3), shard by shard", cls.__name__, folder)
    return model
