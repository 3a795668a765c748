"""``megadistill selftest [--gpu]``: kernel correctness, and on a GPU training MFU and inference.

Correctness (CPU and GPU): every fast path against a float64 CPU reference, forward and
gradients: the mLSTM backends against the step-by-step recurrence, the SWA backends against the
dense-mask reference, the whole student on the device against float64, and the student under bf16
autocast against fp32.

GPU only: stage II tokens/s and MFU of a ~1.2B-parameter student (Llama-3.2-1B-like config,
random weights) on a one-rank DeepSpeed ZeRO-3 bf16 engine over NCCL; and teacher vs student
prefill/decode throughput at 8K-64K context.

Each check is isolated: an exception is recorded (``fail`` for a wrong number, ``unavailable`` for
a missing piece such as Triton, ``error`` otherwise) and the next check runs. With ``--gpu`` each
group runs in its own process with a timeout (a CUDA fault or hang cannot take the others down)
inside one overall time budget. Results go to one JSON file (rewritten after every group, so a
killed run keeps what it measured) and a printed table.

``--dry-run`` rehearses the ``--gpu`` run on a CPU: the same groups, checks and child processes at
small shapes; the Triton kernels run under Triton's interpreter (``TRITON_INTERPRET=1`` in the
child, which also refuses a ``tl.dot`` a GPU would refuse, see :func:`interpret_like_a_gpu`), the
compiled FlexAttention forward runs on CPU and only FlexAttention's backward (no CPU
implementation) is left to the GPU.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch

from megadistill.bench.timing import Clock, measure

log = logging.getLogger(__name__)


class CheckUnavailable(Exception):
    """A piece this check needs is missing here (e.g. Triton, a GPU): not a failure."""


class CheckFailed(AssertionError):
    """A measured error is above its tolerance."""


@dataclass
class CheckResult:
    """The outcome of one check."""

    name: str
    status: str  # pass | fail | unavailable | error | timeout
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 on the CPU."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


def _expect(metrics: dict[str, Any], key: str, value: float, tol: float) -> None:
    metrics[key] = value
    if not value <= tol:  # also catches NaN
        raise CheckFailed(f"{key}={value:.3g} exceeds tolerance {tol:g}")


# ----------------------------------------------------------------------------- mLSTM
def _require_mlstm(backend: str, device: str = "cuda") -> None:
    if backend == "triton":
        from megadistill.model.backends import triton_backend_status

        why = triton_backend_status(torch.device(device).type)
        if why is not None:
            raise CheckUnavailable(why)
    if backend in ("triton", "native"):
        from megadistill.model.mlstm import _kernel_fn

        try:
            _kernel_fn(backend)
        except (RuntimeError, ImportError) as exc:
            raise CheckUnavailable(str(exc)) from exc


def interpret_like_a_gpu() -> None:
    """Make Triton's interpreter refuse a ``tl.dot`` whose reduced dimension is below 16 (32 for
    8-bit inputs), as triton's NVIDIA backend does (the interpreter itself accepts any size): a
    chunk size or head size too small for a GPU then fails on CPU too. Uses the interpreter's
    private ``interpreter_builder.codegen_fns`` (triton 3.7.1; tests/model/test_triton_kernels.py
    fails if it changes)."""
    from triton.runtime import interpreter

    def min_dot_size(lhs_type, rhs_type) -> tuple[int, int, int]:
        del rhs_type
        return (1, 1, 32) if lhs_type.scalar.primitive_bitwidth == 8 else (1, 1, 16)

    interpreter.interpreter_builder.codegen_fns["min_dot_size"] = min_dot_size


def _mlstm_inputs(seed: int = 0, b: int = 2, h: int = 2, t: int = 200, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    q = torch.softmax(torch.randn(b, h, t, d, generator=g, dtype=torch.float64), -1)
    k = torch.softmax(torch.randn(b, h, t, d, generator=g, dtype=torch.float64), -1)
    v = torch.randn(b, h, t, d, generator=g, dtype=torch.float64)
    # Row 1's input gates 2 higher: there |n.q'| outgrows exp(-m) in the normaliser (as hundreds
    # of keys in the state do at a real context length), so both of its branches are checked.
    i_pre = torch.randn(b, h, t, generator=g, dtype=torch.float64)
    i_pre[1:] += 2.0
    f_pre = torch.randn(b, h, t, generator=g, dtype=torch.float64) + 3.0
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[:, 0] = True
    reset[0, t * 2 // 5] = True  # two packed documents in row 0
    return (q, k, v, i_pre, f_pre), reset


def _mlstm_run(inputs, reset, backend: str, device: str, dtype: torch.dtype, chunk: int):
    from megadistill.model.mlstm import mlstm_forward

    xs = [x.detach().to(device, dtype).requires_grad_(True) for x in inputs]
    h, _ = mlstm_forward(*xs, reset=reset.to(device), backend=backend, chunk_size=chunk)
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (h.double() * w.to(h.device)).sum().backward()
    return h, [x.grad for x in xs]


def check_mlstm(backend: str, device: str, tol: float, t: int = 200) -> dict[str, Any]:
    """One mLSTM backend on ``device`` in fp32 vs the float64 CPU recurrence, with resets."""
    _require_mlstm(backend, device)
    inputs, reset = _mlstm_inputs(t=t)
    h_ref, g_ref = _mlstm_run(inputs, reset, "recurrent", "cpu", torch.float64, 64)
    h, grads = _mlstm_run(inputs, reset, backend, device, torch.float32, 64)
    m: dict[str, Any] = {}
    _expect(m, "fwd_rel_err", rel_err(h, h_ref), tol)
    for name, g, r in zip(("q", "k", "v", "i", "f"), grads, g_ref):
        m[f"grad_{name}_rel_err"] = rel_err(g, r)
    _expect(m, "grad_max_rel_err", max(m[f"grad_{n}_rel_err"] for n in "qkvif"), tol)
    return m


# ----------------------------------------------------------------------------- SWA
GRADS_GPU_ONLY = "not compared here: FlexAttention has no CPU backward (the GPU run compares them)"


def _grads_here(swa_backend: str, device: str) -> bool:
    """Whether gradients can be compared: not with Flex off CUDA (no CPU backward)."""
    return swa_backend != "flex" or torch.device(device).type == "cuda"


def check_swa(backend: str, device: str, tol: float, t: int = 300) -> dict[str, Any]:
    """One SWA + sinks backend on ``device`` in fp32 vs float64 CPU ``reference``. Flex off CUDA:
    its compiled forward only (FlexAttention has no CPU backward)."""
    from megadistill.model.swa import swa_attention, swa_flex

    with_grads = _grads_here(backend, device)
    g = torch.Generator().manual_seed(0)
    b, d = 2, 32
    q, k, v = (torch.randn(b, n, t, d, generator=g, dtype=torch.float64) for n in (4, 2, 2))
    reset = torch.zeros(b, t, dtype=torch.bool)
    reset[:, 0] = True
    reset[1, t // 2] = True
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[0, -10:] = False  # padding at the end of row 0
    keep = valid[:, None, :, None]

    def run(dev, dtype, be):
        xs = [x.detach().to(dev, dtype).requires_grad_(with_grads) for x in (q, k, v)]
        args = (*xs, reset.to(dev), valid.to(dev), 64, 4, d**-0.5)
        if not with_grads:
            with torch.no_grad():  # Flex off CUDA: the compiled kernel the GPU runs, forward only
                out = swa_flex(*args, compiled=True) if be == "flex" else swa_attention(*args, be)
            return out * keep.to(out.device), []
        out = swa_attention(*args, be)
        w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        (out.double() * w.to(out.device) * keep.to(out.device)).sum().backward()
        return out * keep.to(out.device), [x.grad for x in xs]

    ref, g_ref = run("cpu", torch.float64, "reference")
    out, grads = run(device, torch.float32, backend)
    m: dict[str, Any] = {}
    _expect(m, "fwd_rel_err", rel_err(out, ref), tol)
    if not with_grads:
        m["grads"] = GRADS_GPU_ONLY
        return m
    _expect(m, "grad_max_rel_err", max(rel_err(a, r) for a, r in zip(grads, g_ref)), tol)
    return m


# ----------------------------------------------------------------------------- whole student
def _tiny_student():
    from megadistill.teachers import convert
    from megadistill.teachers.tiny import tiny_teacher

    student, _ = convert(
        tiny_teacher("llama", seed=0), seed=0, window=32, num_sinks=4, chunk_size=16
    )
    with torch.no_grad():  # a gate away from 0/1 so both branches carry gradient
        for layer in student.model.layers:
            layer.self_attn.ogate.bias.fill_(0.3)
            layer.self_attn.ogate_scale.weight.fill_(1.0)
    return student


def _student_loss(model, device: str, autocast: bool = False, grads: bool = True):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (2, 100), generator=g).to(device)
    pos = torch.cat([torch.arange(60), torch.arange(40)]).expand(2, -1).to(device)
    model.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        with torch.set_grad_enabled(grads):
            out = model(input_ids=ids, position_ids=pos, labels=ids)
    if not grads:
        return out.logits.detach(), out.loss.detach(), {}
    out.loss.backward()
    grads_ = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()}
    return out.logits.detach(), out.loss.detach(), grads_


def check_student(mlstm_backend: str, swa_backend: str, device: str, tol: float) -> dict[str, Any]:
    """The student with the device backends in fp32 vs float64 CPU (chunkwise + reference)."""
    _require_mlstm(mlstm_backend, device)
    grads = _grads_here(swa_backend, device)
    student = _tiny_student().train()
    ref = copy.deepcopy(student).double()
    ref.config.mlstm_backend, ref.config.swa_backend = "chunkwise", "reference"
    dev = copy.deepcopy(student).float().to(device)
    dev.config.mlstm_backend, dev.config.swa_backend = mlstm_backend, swa_backend
    logits_ref, _, g_ref = _student_loss(ref, "cpu", grads=grads)
    logits, _, got = _student_loss(dev, device, grads=grads)
    m: dict[str, Any] = {}
    _expect(m, "logits_rel_err", rel_err(logits, logits_ref), tol)
    if not grads:
        m["grads"] = GRADS_GPU_ONLY
        return m
    worst = max(got, key=lambda n: rel_err(got[n], g_ref[n]))
    m["worst_grad"] = worst
    _expect(m, "grad_max_rel_err", rel_err(got[worst], g_ref[worst]), tol)
    return m


def check_bf16_autocast(mlstm_backend: str, swa_backend: str, device: str) -> dict[str, Any]:
    """The student under bf16 autocast vs fp32 on the same device (bf16-sized tolerances)."""
    grads = _grads_here(swa_backend, device)
    model = _tiny_student().train().to(device)
    model.config.mlstm_backend, model.config.swa_backend = mlstm_backend, swa_backend
    logits32, loss32, g32 = _student_loss(model, device, grads=grads)
    logits16, loss16, g16 = _student_loss(model, device, autocast=True, grads=grads)
    m: dict[str, Any] = {"loss_fp32": float(loss32), "loss_bf16": float(loss16)}
    _expect(m, "logits_rel_err", rel_err(logits16.float(), logits32), 5e-2)
    _expect(m, "loss_abs_diff", abs(float(loss16) - float(loss32)), 2e-2)
    if not grads:
        m["grads"] = GRADS_GPU_ONLY
        return m
    flat16 = torch.cat([g.flatten() for g in g16.values()])
    flat32 = torch.cat([g.flatten() for g in g32.values()])
    cos = float(torch.nn.functional.cosine_similarity(flat16, flat32, dim=0))
    _expect(m, "grad_cosine_distance", 1.0 - cos, 2e-2)
    return m


def _decoded_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of a prefill, then one token per step through the model's cache."""
    cache, parts = model.new_cache(), []
    with torch.no_grad():
        for a, b in zip([0, *range(prefill, ids.shape[1])], range(prefill, ids.shape[1] + 1)):
            parts.append(model(ids[:, a:b], cache=cache).logits)
    return torch.cat(parts, 1)


def check_cpu_step(tol: float) -> dict[str, Any]:
    """Decoding with the compiled CPU paths (fp32: the prefill's mLSTM scan, then the step) vs
    their eager ops in float64."""
    from megadistill.model import cpu_step

    if cpu_step.library() is None:
        raise RuntimeError(
            "the compiled CPU step and scan are unavailable (see the warning above; "
            f"{cpu_step.ENV}=0 turns it off on purpose)"
        )
    student = _tiny_student().eval()
    ref = copy.deepcopy(student).double()
    cpu_step.set_enabled(ref, False)
    ids = torch.randint(
        3, student.config.vocab_size, (2, 80), generator=torch.Generator().manual_seed(3)
    )
    m: dict[str, Any] = {"library": str(cpu_step.library_path())}
    got, want = _decoded_logits(student, ids, 40), _decoded_logits(ref, ids, 40)
    _expect(m, "logits_rel_err", rel_err(got, want), tol)
    return m


def correctness_checks(
    gpu: bool, rehearse: bool = False
) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """The correctness checks for the CPU (``gpu=False``) or the GPU paths; ``rehearse``: the GPU
    paths' checks on the CPU at small shapes (Triton under its interpreter)."""
    if rehearse:
        return _gpu_checks("cpu", mlstm_t=48, swa_t=150)
    if not gpu:
        return [
            ("mlstm chunkwise (cpu fp32) vs fp64", lambda: check_mlstm("chunkwise", "cpu", 1e-5)),
            ("mlstm native (cpu fp32) vs fp64", lambda: check_mlstm("native", "cpu", 1e-5)),
            ("swa blocked (cpu fp32) vs fp64", lambda: check_swa("blocked", "cpu", 1e-5)),
            (
                "student cpu fp32 vs fp64",
                lambda: check_student("chunkwise", "blocked", "cpu", 1e-4),
            ),
            ("student bf16 autocast vs fp32 (cpu)", lambda: check_bf16_autocast(
                "chunkwise", "blocked", "cpu")),
            ("prefill scan + decoding step compiled (cpu fp32) vs eager fp64", lambda: check_cpu_step(1e-4)),
        ]  # fmt: skip
    return _gpu_checks("cuda")


def _gpu_checks(dev: str, mlstm_t: int = 200, swa_t: int = 300):
    # Triton and TF32 matmuls: ~1e-3 relative is expected; 2e-2 flags a wrong kernel.
    return [
        (f"mlstm triton ({dev} fp32) vs fp64",
         lambda: check_mlstm("triton", dev, 2e-2, t=mlstm_t)),
        (f"mlstm chunkwise ({dev} fp32) vs fp64",
         lambda: check_mlstm("chunkwise", dev, 1e-3, t=mlstm_t)),
        (f"swa flex ({dev} fp32) vs fp64", lambda: check_swa("flex", dev, 1e-3, t=swa_t)),
        (f"swa blocked ({dev} fp32) vs fp64", lambda: check_swa("blocked", dev, 1e-3, t=swa_t)),
        (f"student {dev} triton+flex vs fp64", lambda: check_student("triton", "flex", dev, 2e-2)),
        (f"student {dev} chunkwise+flex vs fp64",
         lambda: check_student("chunkwise", "flex", dev, 2e-3)),
        (f"student bf16 autocast vs fp32 ({dev})",
         lambda: check_bf16_autocast("chunkwise", "flex", dev)),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- GPU throughput
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12}


def peak_bf16_flops(name: str) -> float | None:
    """Dense bf16 peak of a GPU by its name (None if unknown): H100/H200 SXM 989 TFLOP/s."""
    for key, flops in PEAK_BF16_FLOPS.items():
        if all(part in name for part in key.split()):
            return flops
    return None


def llama_1b_config():
    """A Llama-3.2-1B-like teacher config (random weights are enough for throughput)."""
    from megadistill.teachers.tiny import tiny_teacher_config

    return tiny_teacher_config(
        "llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True,
        attention_bias=False,
    )  # fmt: skip


def _fast_mlstm_backend() -> str:
    try:
        _require_mlstm("triton", "cuda")
        return "triton"
    except CheckUnavailable:
        return "chunkwise"


def _single_rank_env() -> None:
    from megadistill.engine.launch import free_port

    for key, val in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                     ("LOCAL_WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):  # fmt: skip
        os.environ.setdefault(key, val)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _tiny_bench_config():
    from megadistill.teachers.tiny import tiny_teacher_config

    return tiny_teacher_config("llama", max_position_embeddings=8192, attention_bias=False)


def check_train_mfu(
    seq_len: int = 4096, micro_batch: int = 2, steps: int = 6, dry_run: bool = False
) -> dict[str, Any]:
    """Stage II step (CE + top-256 KL on random targets) of the ~1.2B student: tokens/s, MFU.

    ``dry_run`` runs the same code on the CPU with a tiny model (to test the script itself).
    """
    if not dry_run and not torch.cuda.is_available():
        raise CheckUnavailable("no CUDA GPU")
    cuda = not dry_run
    from transformers import AutoModelForCausalLM

    from megadistill.engine import build_student_engine
    from megadistill.engine.distributed import init_distributed
    from megadistill.engine.ds_config import EngineConfig, build_ds_config
    from megadistill.engine.optim import OptimizerConfig, SchedulerConfig
    from megadistill.model import HybridConfig  # (registers the student with the Auto classes)
    from megadistill.stages.losses import distill_loss

    _single_rank_env()
    init_distributed(600)
    backend = _fast_mlstm_backend() if cuda else "chunkwise"
    hcfg = HybridConfig.from_teacher(
        llama_1b_config() if cuda else _tiny_bench_config(), window=512, num_sinks=4,
        mlstm_backend=backend, swa_backend="flex" if cuda else "blocked", chunk_size=64,
    )  # fmt: skip
    run = EngineConfig(ds_config="student_zero3", global_batch_size=micro_batch,
                       micro_batch_size=micro_batch, precision="bf16" if cuda else "fp32")  # fmt: skip
    ds = build_ds_config(run, world_size=1, device_type="cuda" if cuda else "cpu")
    engine = build_student_engine(
        lambda: AutoModelForCausalLM.from_config(hcfg, dtype=torch.float32), ds,
        OptimizerConfig(lr=1e-5), SchedulerConfig(),
    )  # fmt: skip
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    dev, k = engine.device, 256
    g = torch.Generator(device=dev).manual_seed(0)
    ids = torch.randint(3, hcfg.vocab_size, (micro_batch, seq_len), device=dev, generator=g)
    pos = torch.arange(seq_len, device=dev).expand(micro_batch, -1)
    t_lp = torch.log_softmax(torch.randn(micro_batch, seq_len, k, device=dev, generator=g), -1)
    t_ids = torch.randint(0, hcfg.vocab_size, (micro_batch, seq_len, k), device=dev, generator=g)

    def step() -> float:
        def head_loss(hidden, head):
            out = distill_loss(hidden, head, ids, t_lp, t_ids, chunk_size=4096)
            return out.loss, out.ce, out.kl

        loss = engine(input_ids=ids, position_ids=pos, head_fn=head_loss).loss[0]
        engine.backward(loss)
        engine.step()
        return loss

    engine.train()
    # Warm-up: compilation, autotuning, allocator; the device is synchronised around each step.
    times = measure({"step": step}, repeats=steps, warmup=2, alternate=False, device=dev)
    loss = times["step"].values[-1]
    tok_s = steps * micro_batch * seq_len / times["step"].total()
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = peak_bf16_flops(name)
    return {
        "gpu": name, "params": n_params, "mlstm_backend": backend, "seq_len": seq_len,
        "micro_batch": micro_batch, "tokens_per_s": tok_s, "loss": float(loss),
        "mfu": 6 * n_params * tok_s / peak if peak else None, "peak_flops": peak,
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }  # fmt: skip


def _timed(model, ids: torch.Tensor, decode: int) -> dict[str, float]:
    """Prefill ``ids`` then greedy-decode ``decode`` tokens; tokens/s with device syncs."""
    from megadistill.bench.inference import prefill_decode

    r = prefill_decode(model, ids, decode, Clock("wall", ids.device), per_token=False)
    return {
        "prefill_tok_s": ids.numel() / r["prefill_s"],
        "decode_tok_s": ids.shape[0] / r["decode_s_per_token"],
    }


def _bench_one(model, ids, decode) -> dict[str, Any]:
    try:
        return _timed(model, ids, decode)
    except Exception as exc:  # noqa: BLE001 - recorded, e.g. out of memory at 64K
        return {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def check_inference(
    contexts: tuple[int, ...] = (8192, 32768, 65536),
    decode: int = 64,
    dry_run: bool = False,
    deadline: float | None = None,
) -> dict[str, Any]:
    """Teacher (HF Llama, SDPA) vs student prefill/decode tokens/s in bf16, batch 1."""
    from transformers import AutoModelForCausalLM

    from megadistill.model import HybridConfig  # (registers the student with the Auto classes)

    if not dry_run and not torch.cuda.is_available():
        raise CheckUnavailable("no CUDA GPU")
    dev, dtype = ("cpu", torch.float32) if dry_run else ("cuda", torch.bfloat16)
    tcfg = _tiny_bench_config() if dry_run else llama_1b_config()
    backend = "chunkwise" if dry_run else _fast_mlstm_backend()
    hcfg = HybridConfig.from_teacher(tcfg, window=512, num_sinks=4, mlstm_backend=backend,
                                     swa_backend="auto", chunk_size=64 if dry_run else 128)  # fmt: skip
    with torch.device(dev):
        teacher = AutoModelForCausalLM.from_config(tcfg, attn_implementation="sdpa", dtype=dtype)
        student = AutoModelForCausalLM.from_config(hcfg, dtype=dtype)
    teacher.eval(), student.eval()
    models = {"teacher": teacher, "student": student}

    def calls(ids: torch.Tensor, n: int):
        return {kind: partial(_bench_one, m, ids, n) for kind, m in models.items()}

    rows, warm = [], torch.randint(3, tcfg.vocab_size, (1, 256), device=dev)
    measure(calls(warm, 2))  # warm-up (kernels, compilation)
    for ctx in contexts:
        if deadline is not None and time.monotonic() > deadline:
            rows.append({"context": ctx, "skipped": "time budget"})
            continue
        ids = torch.randint(3, tcfg.vocab_size, (1, ctx), device=dev)
        row: dict[str, Any] = {"context": ctx}
        for kind, samples in measure(calls(ids, decode)).items():
            row.update({f"{kind}_{k}": v for k, v in samples.values[0].items()})
        for key in ("prefill", "decode"):
            t, s = row.get(f"teacher_{key}_tok_s"), row.get(f"student_{key}_tok_s")
            row[f"{key}_ratio"] = s / t if t and s else None
        log.info("inference %s", row)
        rows.append(row)
    return {"mlstm_backend": backend, "dtype": str(dtype), "rows": rows}


# ----------------------------------------------------------------------------- runner
GROUP_LIMIT_S = {"correctness": 150.0, "train": 200.0, "inference": 200.0}


def group_checks(
    group: str, gpu: bool, dry_run: bool = False, deadline: float | None = None
) -> list[tuple[str, Callable[[], dict[str, Any]]]]:
    """The checks of one group: 'correctness', 'train' or 'inference'."""
    if group == "correctness":
        return correctness_checks(gpu, rehearse=dry_run)
    if group == "train":
        return [("stage II tokens/s + MFU (1 rank, ZeRO-3 bf16)",
                 lambda: check_train_mfu(dry_run=dry_run, seq_len=256 if dry_run else 4096))]  # fmt: skip
    if group == "inference":
        ctx = (512, 1024) if dry_run else (8192, 32768, 65536)
        return [("teacher vs student prefill/decode",
                 lambda: check_inference(ctx, 8 if dry_run else 64, dry_run, deadline))]  # fmt: skip
    raise ValueError(f"unknown selftest group {group!r}; choose correctness, train or inference")


def run_checks(checks, deadline: float, sink: Callable[[CheckResult], None]) -> None:
    """Run each check in turn, recording its outcome; stop starting checks at the deadline."""
    for name, fn in checks:
        if time.monotonic() > deadline:
            sink(CheckResult(name, "timeout", message="overall time budget used up"))
            continue
        t0 = time.monotonic()
        try:
            res = CheckResult(name, "pass", metrics=fn())
        except CheckUnavailable as exc:
            res = CheckResult(name, "unavailable", message=str(exc))
        except CheckFailed as exc:
            res = CheckResult(name, "fail", message=str(exc))
        except Exception as exc:  # noqa: BLE001 - one broken check must not stop the others
            tb = traceback.format_exc(limit=4)
            res = CheckResult(name, "error", message=f"{type(exc).__name__}: {exc}\n{tb}")
        res.seconds = time.monotonic() - t0
        log.info("%s: %s (%.1f s) %s", name, res.status, res.seconds, res.message.split("\n")[0])
        sink(res)


def _run_group_isolated(group: str, budget_s: float, dry_run: bool) -> list[CheckResult]:
    """One group in a child process with a hard timeout; partial results survive a kill."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="md-selftest-") as tmp:
        out = Path(tmp) / "results.jsonl"
        cmd = [sys.executable, "-m", "megadistill.selftest", "--group", group, "--results",
               str(out), "--budget-s", str(budget_s)] + (["--dry-run"] if dry_run else ["--gpu"])  # fmt: skip
        env = dict(os.environ)
        if dry_run and group == "correctness":  # before the child imports triton
            env["TRITON_INTERPRET"] = "1"
        note = ""
        try:
            proc = subprocess.run(
                cmd, timeout=budget_s + 30, capture_output=True, text=True, env=env
            )
            if proc.returncode:
                note = f"exit {proc.returncode}: {proc.stderr[-1500:]}"
        except subprocess.TimeoutExpired:
            note = f"killed after {budget_s + 30:.0f} s"
        done = [CheckResult(**json.loads(line)) for line in out.read_text().splitlines()] if (
            out.is_file()) else []  # fmt: skip
    names = {r.name for r in done}
    for name, _ in group_checks(group, gpu=not dry_run, dry_run=dry_run):
        if name not in names:
            done.append(CheckResult(name, "timeout" if "killed" in note else "error", message=note))
    return done


def run_selftest(
    gpu: bool, out: str | Path | None = None, budget_s: float = 450.0, dry_run: bool = False
) -> list[CheckResult]:
    """All checks (GPU groups in child processes when ``gpu`` or ``dry_run``); write JSON.

    Returns:
        One result per check; ``ok(results)`` says whether any failed.
    """
    start = time.monotonic()
    results: list[CheckResult] = []
    if not gpu and not dry_run:
        run_checks(correctness_checks(False), start + budget_s, results.append)
    else:
        for group in ("correctness", "train", "inference"):
            left = budget_s - (time.monotonic() - start)
            if left < 30:
                results.append(CheckResult(group, "timeout", message="overall time budget used up"))
                continue
            results += _run_group_isolated(group, min(GROUP_LIMIT_S[group], left), dry_run)
            _write_report(out, gpu, dry_run, start, results)  # a killed run keeps these
    _write_report(out, gpu, dry_run, start, results)
    return results


def environment() -> dict[str, Any]:
    """What the figures were measured with: versions, the device, whether Triton can run."""
    from importlib import metadata

    from megadistill.model.backends import triton_backend_status

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        **{dist: version(dist) for dist in ("triton", "mlstm_kernels", "deepspeed")},
        # installed and with block pointers (the CPU rehearsal's children run it interpreted)
        "triton_backend": triton_backend_status("cuda") or "usable",
    }  # fmt: skip


def _write_report(out, gpu: bool, dry_run: bool, start: float, results) -> None:
    if out is None:
        return
    from megadistill.integrity import atomic_write_text

    report = {"gpu": gpu, "dry_run": dry_run, **environment(),
              "seconds": time.monotonic() - start, "results": [asdict(r) for r in results]}  # fmt: skip
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(out), json.dumps(report, indent=2, default=str) + "\n")


def ok(results: list[CheckResult]) -> bool:
    """True when no check failed or errored (unavailable pieces are allowed)."""
    return all(r.status in ("pass", "unavailable") for r in results)


def _short(metrics: dict[str, Any]) -> str:
    parts = []
    for k, v in metrics.items():
        if k == "rows":
            continue
        parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)[:150]


def format_table(results: list[CheckResult]) -> str:
    """A plain-text table: one line per check, then the inference rows if any."""
    lines = [f"{'check':<48} {'status':<12} {'s':>6}  details"]
    for r in results:
        detail = _short(r.metrics) if r.metrics else r.message.split("\n")[0][:150]
        lines.append(f"{r.name:<48} {r.status:<12} {r.seconds:>6.1f}  {detail}")
        for row in r.metrics.get("rows", []):
            lines.append("    " + " ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Child entry point: ``python -m megadistill.selftest --group G --results FILE``."""
    p = argparse.ArgumentParser(prog="python -m megadistill.selftest")
    p.add_argument("--group", required=True, choices=sorted(GROUP_LIMIT_S))
    p.add_argument("--results", required=True)
    p.add_argument("--budget-s", type=float, default=300.0)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--dry-run", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.dry_run:
        from megadistill.engine.launch import cpu_distributed_env

        cpu_distributed_env()
        torch.set_num_threads(1)
        if os.environ.get("TRITON_INTERPRET") == "1" and find_spec("triton") is not None:
            interpret_like_a_gpu()
    deadline = time.monotonic() + args.budget_s
    checks = group_checks(args.group, args.gpu, args.dry_run, deadline)

    def sink(res: CheckResult) -> None:
        with open(args.results, "a") as fh:
            fh.write(json.dumps(asdict(res), default=str) + "\n")

    run_checks(checks, deadline, sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
