"""Start a function in N local ranks (spawned processes, gloo on CPU): ``run_distributed``.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes (spawn), sets the
usual torch.distributed environment for each, calls ``fn(*args)`` in every rank and raises if any
rank failed, with that rank's traceback. ``fn`` must be importable (a module-level function). The
multi-process tests and the benchmarks use it; :func:`free_port` also gives the pipeline's local
launcher its ``MASTER_PORT``.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on localhost that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


DEFAULT_TIMEOUT_S = 600.0


def cpu_distributed_env() -> None:
    """Settings every CPU rank needs before DeepSpeed is imported (see notes/deepspeed-on-cpu)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")


def _entry(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    err_dir: str,
    args: tuple,
    env: dict[str, str],
) -> None:
    os.environ.update(env)
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )
    cpu_distributed_env()
    import faulthandler

    import torch

    torch.set_num_threads(1)
    # a rank killed by a signal (abort, segfault) leaves no traceback: dump every thread's stack
    fault_log = open(Path(err_dir, f"rank{rank}.fault"), "w")  # noqa: SIM115 (open until exit)
    faulthandler.enable(fault_log, all_threads=True)
    from megadistill.engine.distributed import finish_distributed

    try:
        fn(*args)
    except BaseException:
        Path(err_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()  # no barrier: the other ranks may be dead or elsewhere
        raise
    finish_distributed()


def run_distributed(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    env: dict[str, str] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Run ``fn(*args)`` in ``world_size`` spawned processes; raise if any rank fails.

    Args:
        fn: a module-level function (it is pickled by reference).
        world_size: number of ranks.
        *args: picklable arguments passed to every rank.
        env: extra environment variables for the ranks.
        timeout_s: wall-clock limit for the whole group.
    """
    import torch.multiprocessing as mp  # here: importing this module must stay light

    with tempfile.TemporaryDirectory(prefix="md-dist-") as err_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), err_dir, args, dict(env or {})),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed test {fn.__name__} exceeded {timeout_s:.0f} s")
        except mp.ProcessRaisedException as exc:
            errs = sorted(Path(err_dir).glob("rank*.err"))
            detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in errs)
            raise RuntimeError(f"distributed test {fn.__name__} failed:\n{detail or exc}") from None
        except mp.ProcessExitedException as exc:
            faults = sorted(p for p in Path(err_dir).glob("rank*.fault") if p.stat().st_size)
            detail = "\n".join(f"--- {p.stem} ---\n{p.read_text()}" for p in faults)
            raise RuntimeError(
                f"distributed test {fn.__name__}: a rank died: {exc}\n{detail}".rstrip()
            ) from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
