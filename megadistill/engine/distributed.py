"""Process-group set-up and the few collectives the trainer needs.

``init_distributed`` picks nccl on GPU and gloo on CPU, applies a finite timeout to every
collective, and disables DeepSpeed's shm_comm op, whose JIT build takes minutes on CPU and is not
used with gloo (see notes/deepspeed-on-cpu.md).
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    """This rank's device (its GPU under LOCAL_RANK, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Initialise the default process group once, with a finite timeout.

    Reads RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT as set by torchrun, the deepspeed launcher or
    SLURM wrappers. Safe to call twice.

    Args:
        timeout_s: limit for every collective; a rank that waits longer raises instead of hanging.

    Returns:
        ``(rank, world_size)``.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    import deepspeed
    import deepspeed.ops

    # The shm_comm op is only used by the ccl backend; building it costs ~140 s on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info(
        "process group ready: backend=%s world_size=%d timeout=%.0fs", backend, world, timeout_s
    )
    return rank, world


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    """A barrier when a process group exists."""
    if world_size() > 1:
        dist.barrier()


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True on every rank when ``flag`` is true on at least one (a collective)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device or local_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def all_gather_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (a collective)."""
    if world_size() == 1:
        return [obj]
    out: list[object] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
