"""Process-group set-up and the few collectives the trainer needs.

``init_distributed`` picks nccl on GPU and gloo on CPU, applies a finite timeout to every
collective, and disables DeepSpeed's shm_comm op, whose JIT build takes minutes on CPU and is not
used with gloo (see notes/deepspeed-on-cpu.md).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
import warnings
from collections.abc import Iterator

import torch
import torch.distributed as dist

from megadistill.errors import MegadistillError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 1800.0
FAILURE_KEY = "megadistill/collective_failure/"
# Texts of the errors gloo and NCCL raise when a peer died or did not answer in time.
_COLLECTIVE_ERROR_MARKERS = ("gloo", "nccl", "connection reset", "connection closed", "timed out")
_timeout_s = DEFAULT_TIMEOUT_S


def device_type() -> str:
    """'cuda' when a GPU is visible, else 'cpu'."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def local_device() -> torch.device:
    """This rank's device (its GPU under LOCAL_RANK, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
MPI_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")
"""Set by mpirun-style launchers, whose ranks DeepSpeed discovers through mpi4py."""


def check_launcher_environment() -> None:
    """Refuse, with how to launch, a rank started without a launcher (DeepSpeed would go looking
    for mpi4py and fail with ``ModuleNotFoundError``)."""
    missing = [v for v in LAUNCHER_VARIABLES if v not in os.environ]
    if missing and not any(v in os.environ for v in MPI_VARIABLES):
        raise MegadistillError(
            f"no launcher environment ({', '.join(missing)} unset): start every rank through a "
            "launcher, e.g. `torchrun --nproc_per_node N -m megadistill.cli distill CFG.yaml`, "
            "`deepspeed --module megadistill.cli distill CFG.yaml`, or "
            "`MEGADISTILL_LAUNCHER=local MEGADISTILL_NPROC=N bash slurm/entrypoint.sh "
            "megadistill distill CFG.yaml`"
        )


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
    check_launcher_environment()
    import deepspeed
    import deepspeed.ops

    # The shm_comm op is only used by the ccl backend; building it costs ~140 s on CPU.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed's ZeRO-3 calls collectives that torch >= 2.10 deprecates, hundreds of times a run;
    # nothing a user can act on, and it buries the progress bar in the job logs.
    warnings.filterwarnings(
        "ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning
    )
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(local_device())
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    global _timeout_s
    _timeout_s = timeout_s
    rank, world = dist.get_rank(), dist.get_world_size()
    log.info(
        "process group ready: backend=%s world_size=%d timeout=%.0fs", backend, world, timeout_s
    )
    return rank, world


def finish_distributed() -> None:
    """End a run that every rank completed: wait for every rank's collectives, then tear down.

    Call it on every rank once its work is done (the CLI does, after a stage returns). Without
    it a rank can abort *after* a successful run (SIGABRT, "terminate called without an active
    exception", exit 134 instead of 0 or the requeue code): ZeRO-3 issues asynchronous
    all-gathers whose handles it may drop, and gloo's worker thread then frees such a request when
    the peer's half arrives. If that happens while this interpreter is shutting down (the
    process group is kept alive by DeepSpeed's objects until the last garbage collection), the
    thread cannot take the GIL and C++ terminates the process. The barrier waits for every
    earlier collective of every rank first. A barrier that fails (a peer already died) is logged
    and the teardown goes on.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_world_size() > 1:
            dist.barrier()
    except Exception as exc:  # a peer that died: nothing left to wait for
        if not is_collective_error(exc):
            raise
        log.warning("final barrier failed (%s); exiting without it", str(exc).splitlines()[0])
    # a request that completed just before the barrier may still be being freed: leave the
    # GIL to gloo's worker threads for a moment (they need it to free the request's tensors)
    time.sleep(0.05)
    dist.destroy_process_group()


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


# ----------------------------------------------------------------------------- failures
def is_collective_error(exc: BaseException) -> bool:
    """True for the errors a collective raises when a peer rank died or timed out."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _COLLECTIVE_ERROR_MARKERS)


def _store() -> dist.TCPStore:
    """A fresh client of the rendezvous store (the process group's own may be broken)."""
    return dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=datetime.timedelta(seconds=10),
        wait_for_workers=False,
    )


def missing_ranks(wait_s: float) -> list[int] | None:
    """After a failed collective: report this rank to the store and wait up to ``wait_s`` for
    the other survivors; return the ranks that never reported (dead or hung), or None when the
    store itself cannot be reached (its host, usually rank 0's node, is down)."""
    me, world = rank(), world_size()
    try:
        store = _store()
        store.set(f"{FAILURE_KEY}{me}", socket.gethostname())
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(world) if not store.check([f"{FAILURE_KEY}{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except (RuntimeError, KeyError, ValueError) as exc:  # DistStoreError is a RuntimeError
        log.debug("rendezvous store unreachable: %s", exc)
        return None


def describe_collective_failure(exc: BaseException, wait_s: float | None = None) -> str:
    """A message naming this rank, the ranks that stopped answering and the timeout in force."""
    me, world = rank(), world_size()
    wait = min(10.0, _timeout_s / 2) if wait_s is None else wait_s
    missing = missing_ranks(wait)
    where = f"rank {me} of {world} on {socket.gethostname()}"
    if missing is None:
        culprit = (
            f"the rendezvous store at {os.environ.get('MASTER_ADDR')}:"
            f"{os.environ.get('MASTER_PORT')} is unreachable, so its host (rank 0's node) is down"
        )
    elif missing:
        culprit = f"rank(s) {missing} died or hung (they did not report within {wait:.0f} s)"
    else:
        culprit = "every rank is alive but the collective failed (a network error?)"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"{where}: a collective failed: {culprit}; collective timeout_s={_timeout_s:g}. "
        f"Look for the first error in the log of the rank(s) named. Cause: {first}"
    )


@contextlib.contextmanager
def collective_guard() -> Iterator[None]:
    """Turn a collective's failure (a peer died, or did not answer within ``timeout_s``) into a
    :class:`MegadistillError` that names the ranks that stopped answering."""
    try:
        yield
    except Exception as exc:
        if world_size() > 1 and is_collective_error(exc):
            raise MegadistillError(describe_collective_failure(exc)) from exc
        raise
