"""Test helpers: tiny configs and the multi-process (gloo) test runner.

``run_distributed(fn, world_size, *args)`` starts ``world_size`` fresh processes (spawn), sets the
usual torch.distributed environment for each, calls ``fn(*args)`` in every rank and raises if any
rank failed, with that rank's traceback. ``fn`` must be importable (a module-level function).
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from megadistill.pipeline.local import free_port  # noqa: F401 - the test helpers' home of it

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
    import torch

    torch.set_num_threads(1)
    try:
        fn(*args)
    except BaseException:
        Path(err_dir, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


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
    with tempfile.TemporaryDirectory(prefix="md-dist-") as err_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, free_port(), err_dir, args, dict(env or {})),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        import time

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
            raise RuntimeError(f"distributed test {fn.__name__}: a rank died: {exc}") from None
        finally:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()


# ----------------------------------------------------------------------------- tiny models
TINY_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "phi3", "qwen3_moe", "gemma3_text",
)  # fmt: skip


def tiny_teacher_config(family: str = "llama", **overrides: Any):
    """A 2-layer, hidden-64 config of a teacher family (GQA: 4 query heads, 2 KV heads)."""
    from transformers import AutoConfig

    base: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        base["attention_bias"] = True  # exercise every bias path
    if family == "qwen3":
        base["head_dim"] = 16
    if family == "olmo3":
        base["sliding_window"] = 4096
        base["layer_types"] = ["sliding_attention", "full_attention"]
    if family == "phi3":
        base["partial_rotary_factor"] = 0.5  # as Phi-3.5/Phi-4-mini: RoPE on part of head_dim
    if family == "qwen3_moe":
        # Layer 0 dense (mlp_only_layers), layer 1 a 4-expert top-2 MoE, as real configs mix.
        base.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=True)  # fmt: skip
    if family == "gemma3_text":
        # As the real configs: explicit head_dim, a query_pre_attn_scalar that is not head_dim
        # (the 27B's 168 vs 128), local/global layers with their own RoPE (linear scaling on the
        # global ones, as the 4B+), tied embeddings.
        base.update(head_dim=16, query_pre_attn_scalar=24, sliding_window=4096,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6,
                    rope_local_base_freq=1e4, tie_word_embeddings=True)  # fmt: skip
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def tiny_teacher(family: str = "llama", seed: int = 0, **overrides: Any):
    """A tiny random teacher of ``family`` in fp32, eval mode, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_teacher_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random (not zero) biases and norm weights so parity tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- fresh processes
_FRESH_LOAD = r"""
import json, sys
folder, ids_file, out_file = sys.argv[1:4]
assert not any(m == "megadistill" or m.startswith("megadistill.") for m in sys.modules)
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
torch.save({"logits": logits, "config": type(config).__module__ + "." + type(config).__name__,
            "model": type(model).__module__ + "." + type(model).__name__,
            "vocab": len(tokenizer)}, out_file)
"""


def load_in_fresh_process(folder: str | Path, ids: Any, timeout_s: float = 300.0) -> dict[str, Any]:
    """Load ``folder`` with the Auto classes and ``trust_remote_code=True`` in a new Python process
    that imports nothing of megadistill first (as a Hugging Face user or lm-eval would).

    Returns:
        ``logits`` of ``ids`` (B, T), the loaded ``config`` and ``model`` class paths, and the
        tokenizer's ``vocab`` size. Raises ``RuntimeError`` with the child's stderr on failure.
    """
    import subprocess
    import sys

    import torch

    with tempfile.TemporaryDirectory(prefix="md-fresh-") as tmp:
        torch.save(ids, Path(tmp, "ids.pt"))
        # Dynamic modules are copied under HF_MODULES_CACHE: keep them out of the user's cache.
        env = {**os.environ, "HF_MODULES_CACHE": str(Path(tmp, "modules"))}
        proc = subprocess.run(
            [sys.executable, "-c", _FRESH_LOAD, str(folder), f"{tmp}/ids.pt", f"{tmp}/out.pt"],
            env=env,
            stdin=subprocess.DEVNULL,  # a trust_remote_code prompt must fail, not wait
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"loading {folder} in a fresh process failed:\n{proc.stderr[-4000:]}"
            )
        return torch.load(Path(tmp, "out.pt"))
