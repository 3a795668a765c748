"""The recurrent branch of a CPU decoding step in one compiled call (for the ``shared_norm`` mix,
the layer's whole attention: :class:`SharedNormStep`), and the mLSTM, or the ``shared_norm``
mix, of a prefill as one compiled scan (``cpu_step.cpp``).

Eagerly, the branch of one layer's decoding step (feature maps, the mLSTM state update and
read-out, the output gate, the mix) is ~46 aten ops: on one CPU thread ~300 us per layer and
token, almost all of it per-op overhead, since the arithmetic is ~0.1 MFLOP. This module builds
the branch as one C++ function with the system's compiler on first use (no torch headers: ~1 s),
caches the library under ``<asset cache>/kernels`` (``$MEGADISTILL_CACHE``, else
``~/.cache/megadistill``) keyed by its source, and binds it to a layer's weights
(:class:`RecurrentStep`); ``HybridAttention._step`` calls it where it applies (CPU, float32 or
float64, no padding in the step; RoPE'd or plain q/k, not ``rope_on: features``).

The same library holds :func:`mlstm_scan`: the mLSTM over a whole sequence without autograd (a
prefill, an evaluation), step by step with the state in cache, over the (row, head) pairs split
among torch's threads. On one CPU thread it replaces the chunkwise form's many small products
with one pass over the state per token: 19-23 ms per SmolLM2 layer at 4K tokens in the model,
against 53-70 ms (:func:`~megadistill.model.mlstm.mlstm_forward` uses it for ``chunkwise`` on
CPU without autograd). :func:`shared_norm_scan` is the same for the ``shared_norm`` mix: each
query reads its window exactly and the keys that have left it through a state that the leaving
key joins, one pass over the tokens (19-24 ms per SmolLM2 layer at 1K tokens, W = 64, against
the blocked form's 69-75 ms; 86-101 against 270-330 at 4K; one thread).

Where no compiler is found or the build fails, one warning says why and CPU inference stays on
the eager ops (same functions). ``MEGADISTILL_CPU_STEP=0`` turns every compiled path off.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from megadistill.integrity import new_temp_file

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_step.cpp")
ENV = "MEGADISTILL_CPU_STEP"
# No -march=native: a library cached in a home folder shared by a cluster's nodes must run on
# every node (the scan is also built for AVX2, picked at load time on x86-64 Linux).
# -ffp-contract=off: no fused multiply-adds the eager ops do not make. -pthread: the scan's threads.
FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-pthread")
_FUNCTIONS = {torch.float32: "megadistill_step_f32", torch.float64: "megadistill_step_f64"}
_SCANS = {torch.float32: "megadistill_scan_f32", torch.float64: "megadistill_scan_f64"}
_SN_STEPS = {torch.float32: "megadistill_sn_step_f32", torch.float64: "megadistill_sn_step_f64"}
_SN_SCANS = {torch.float32: "megadistill_sn_scan_f32", torch.float64: "megadistill_sn_scan_f64"}
_loaded: dict[str, ctypes.CDLL | None] = {}


def enabled() -> bool:
    """Whether the compiled step and scan may be used (``$MEGADISTILL_CPU_STEP`` is not ``0``)."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(model, on: bool) -> None:
    """Turn the compiled step on (the default) or off in every layer of a student ``model``."""
    for layer in model.model.layers:
        layer.self_attn.step_kernel = on


def library_path(cache_dir: str | Path | None = None) -> Path:
    """Where the library built from this source lies (or will)."""
    from megadistill.assets import cache_root

    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:16]
    name = f"cpu_step-{digest}-{platform.system().lower()}-{platform.machine()}.so"
    return cache_root(cache_dir) / "kernels" / name


def build(path: Path, compiler: str | None = None) -> Path:
    """Compile ``cpu_step.cpp`` into ``path`` (written to a temporary file, then renamed: ranks
    that build at once each rename a whole library). Raises ``RuntimeError`` naming the compiler
    and its output on failure."""
    cxx = compiler or os.environ.get("CXX") or "c++"
    exe = shutil.which(cxx)
    if exe is None:
        raise RuntimeError(f"no C++ compiler '{cxx}' on PATH (install g++, or set CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The linker keeps the mode of the file it writes over and adds execute bits: a file made
    # with the umask's mode gives a library a team sharing the cache can load.
    fd, tmp = new_temp_file(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run(
            [exe, *FLAGS, str(SOURCE), "-o", str(tmp)], capture_output=True, text=True, timeout=300
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for name in _FUNCTIONS.values():
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 7 + [ptr] * 10 + [ctypes.c_double, i64]
        fn.restype = ctypes.c_int
    for name in _SCANS.values():
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 5 + [ptr] * 9 + [ctypes.c_double, i64]
        fn.restype = ctypes.c_int
    for name in _SN_STEPS.values():
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 9 + [ptr] * 15 + [ctypes.c_double]
        fn.restype = ctypes.c_int
    for name in _SN_SCANS.values():
        fn = getattr(lib, name)
        fn.argtypes = [i64] * 8 + [ptr] * 11 + [ctypes.c_double, i64]
        fn.restype = ctypes.c_int
    return lib


def library(cache_dir: str | Path | None = None) -> ctypes.CDLL | None:
    """The compiled step (built on first use, once per process), or None where it is turned off
    or cannot be built (one warning says why)."""
    if not enabled():
        return None
    key = str(cache_dir)
    if key in _loaded:
        return _loaded[key]
    lib = None
    try:
        path = library_path(cache_dir)
        if path.exists():
            try:
                lib = _open(path)
            except OSError:  # a truncated or foreign file: build it again
                log.warning("cpu_step: %s does not load; building it again", path)
        if lib is None:
            lib = _open(build(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning(
            "cpu_step: the compiled decoding step and prefill scan are unavailable (%s); CPU "
            "inference uses the eager ops (same results, slower)", err,
        )  # fmt: skip
    _loaded[key] = lib
    return lib


def _check_layout(tensors, dtype: torch.dtype, what: str) -> None:
    """Refuse a tensor the C++ would misread: each of ``tensors`` ((tensor, shape or None)) must
    be contiguous, of ``dtype`` and (where given) of that shape."""
    for t, shape in tensors:
        if (
            t.dtype != dtype
            or not t.is_contiguous()
            or (shape is not None and tuple(t.shape) != tuple(shape))
        ):
            want = f"contiguous {dtype}" + ("" if shape is None else f" {tuple(shape)}")
            raise ValueError(
                f"cpu_step: a {what} tensor of shape {tuple(t.shape)} is {t.dtype}, "
                f"contiguous={t.is_contiguous()}; expected {want}"
            )


class RecurrentStep:
    """The compiled branch bound to one layer's weights: ``step(y, qk, swa, cn, m, out)``.

    The weights are kept referenced (their memory must outlive the binding); the per-step
    tensors are checked for the layout the C++ function reads.
    """

    def __init__(
        self,
        lib: ctypes.CDLL,
        *,
        num_heads: int,
        num_kv: int,
        head_dim: int,
        features: torch.Tensor,
        both_signs: bool,
        ogate: torch.Tensor | None,
        ogate_bias: torch.Tensor | None,
        ogate_scale: torch.Tensor | None,
        eps: float,
    ) -> None:
        dtype = features.dtype
        self.fn = getattr(lib, _FUNCTIONS[dtype])
        self.dtype = dtype
        self.dims = (num_heads, num_kv, head_dim, features.shape[-1], int(both_signs))
        self.weights = (features, ogate, ogate_bias, ogate_scale)  # kept: the C++ reads them
        for t in self.weights:
            if t is not None and (
                t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu"
            ):
                raise ValueError("cpu_step: weights must be contiguous CPU tensors of one dtype")
        self.ptrs = tuple(None if t is None else t.data_ptr() for t in self.weights)
        self.mix = int(ogate is not None)
        self.eps = eps

    @classmethod
    def applies(cls, dtype: torch.dtype, device: torch.device) -> bool:
        return dtype in _FUNCTIONS and device.type == "cpu"

    def __call__(self, y, qk, swa, cn, m, out) -> torch.Tensor:
        """One step: ``y`` (B, Y) the layer's [q|k|v|i|f|...] product, ``qk`` (B, H+KV, 1, d)
        the q and k the feature maps read (RoPE'd; before RoPE with rope_on "none"), ``swa``
        (B, H, 1, d) or None, the state ``cn`` (B, H, F, d+1) and ``m`` (B, H) (updated),
        ``out`` (B, H, 1, d) (written and returned)."""
        tensors = (y, qk, cn, m, out) if swa is None else (y, qk, swa, cn, m, out)
        _check_layout(((t, None) for t in tensors), self.dtype, "step")
        feat, ogw, ogb, ogs = self.ptrs
        rc = self.fn(
            y.shape[0], *self.dims, y.shape[1], y.data_ptr(), qk.data_ptr(), feat, ogw, ogb, ogs,
            None if swa is None else swa.data_ptr(), cn.data_ptr(), m.data_ptr(),
            out.data_ptr(), self.eps, self.mix,
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"cpu_step: bad dimensions {self.dims} (rc {rc})")
        return out


class SharedNormStep:
    """The attention of one ``shared_norm`` layer's decoding step compiled, bound to the layer's
    feature maps: ``step(y, qk, leaves, mask, lc, slot, out)`` does what
    ``HybridAttention._shared_step`` does after the q/k/v/gate product ``y`` and RoPE ``qk``
    (the leaving key joins the state, the slot takes the new token's key, value, input gate and
    decay, and the query reads window and state under one normaliser), in place on the cache."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        *,
        num_heads: int,
        num_kv: int,
        head_dim: int,
        features: torch.Tensor,
        both_signs: bool,
        scaling: float,
    ) -> None:
        dtype = features.dtype
        if not (features.is_contiguous() and features.device.type == "cpu"):
            raise ValueError("cpu_step: feature maps must be one contiguous CPU tensor")
        self.fn = getattr(lib, _SN_STEPS[dtype])
        self.dtype = dtype
        self.features = features  # kept: the C++ reads it
        self.dims = (num_heads, num_kv, head_dim, features.shape[-1], int(both_signs))
        self.scaling = scaling

    @classmethod
    def applies(cls, dtype: torch.dtype, device: torch.device) -> bool:
        return dtype in _SN_STEPS and device.type == "cpu"

    def __call__(self, y, qk, leaves, mask, lc, slot: int, out, plain=None) -> torch.Tensor:
        """One step: ``y`` (B, Y), ``qk`` (B, H + KV, 1, d), ``leaves`` (B,) and ``mask``
        (B, N) booleans, ``lc`` the layer's cache (its buffer, ``gate_i``, ``decay`` and
        ``mlstm`` state are updated), ``slot`` the ring slot of this token, ``out``
        (B, H, 1, d) (written and returned); ``plain`` (B, H + KV, 1, d) q and k before RoPE
        (rope_on "none": the feature maps read them, and ``lc.k_plain`` keeps the keys)."""
        h, kv, d, f, both = self.dims
        c, n, m = lc.mlstm
        bsz, slots = mask.shape
        fx = f * (1 + both)
        want = ((y, None), (qk, (bsz, h + kv, 1, d)), (lc.k, (bsz, kv, slots, d)),
                (lc.v, (bsz, kv, slots, d)), (lc.gate_i, (bsz, h, slots)),
                (lc.decay, (bsz, h, slots)), (c, (bsz, h, fx, d)), (n, (bsz, h, fx)),
                (m, (bsz, h)), (out, (bsz, h, 1, d)))  # fmt: skip
        if plain is not None:
            if lc.k_plain is None:
                raise ValueError("cpu_step: a step on plain q/k needs the cache's k_plain")
            want += ((plain, (bsz, h + kv, 1, d)), (lc.k_plain, (bsz, kv, slots, d)))
        # the C++ reads by these shapes: refuse, never read past a tensor
        _check_layout(want, self.dtype, "shared_norm step")
        for t, shape in ((leaves, (bsz,)), (mask, (bsz, slots))):
            if t.dtype != torch.bool or not t.is_contiguous() or tuple(t.shape) != shape:
                raise ValueError(f"cpu_step: expected contiguous booleans {shape}")
        if y.shape[0] != bsz or y.shape[1] < (h + 2 * kv) * d + 2 * h or not 0 <= slot < slots:
            raise ValueError(f"cpu_step: bad shared_norm step y {tuple(y.shape)}, slot {slot}")
        rc = self.fn(
            bsz, *self.dims, y.shape[1], slots, slot, y.data_ptr(), qk.data_ptr(),
            None if plain is None else plain.data_ptr(), self.features.data_ptr(),
            leaves.data_ptr(), mask.data_ptr(), lc.k.data_ptr(),
            None if plain is None else lc.k_plain.data_ptr(), lc.v.data_ptr(),
            lc.gate_i.data_ptr(), lc.decay.data_ptr(), c.data_ptr(),
            n.data_ptr(), m.data_ptr(), out.data_ptr(), self.scaling,
        )  # fmt: skip
        if rc != 0:
            raise ValueError(f"cpu_step: bad shared_norm step dimensions {self.dims} (rc {rc})")
        return out


def scan_applies(x: torch.Tensor) -> bool:
    """Whether :func:`mlstm_scan` can run on inputs like ``x`` (CPU, no autograd, computed in
    float32 or float64), before any conversion is paid for."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return dtype in _SCANS and x.device.type == "cpu" and not torch.is_grad_enabled()


def mlstm_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    reset: torch.Tensor | None,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    eps: float,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None:
    """The mLSTM over a sequence in one compiled call (no autograd; the function of
    :func:`~megadistill.model.mlstm.mlstm_recurrent`), or None where it does not apply (not CPU
    float32/64, autograd on, turned off, no compiler): the caller then runs its own form.

    Args:
        q, k: (B, H, T, F) feature maps (as many k heads as q heads); v: (B, H, T, D);
            i_pre, f_pre: (B, H, T) gate pre-activations; reset: (B, T) document starts or None;
            state: (C, n, m) entering, in the compute dtype (``q``'s).

    Returns:
        h (B, H, T, D) and the state leaving, (C, n, m) with C and n views of one
        ``[C | n]`` buffer (:func:`~megadistill.model.mlstm.joint_state`'s layout).
    """
    dtype = q.dtype
    if (
        dtype not in _SCANS
        or not scan_applies(q)
        or any(x.dtype != dtype for x in (k, v, i_pre, f_pre, *state))
    ):
        return None
    lib = library()
    if lib is None:
        return None
    bsz, nh, t, fd = q.shape
    dv = v.shape[-1]
    c, n, m = state
    shapes = ((k, q.shape), (v, (bsz, nh, t, dv)), (i_pre, (bsz, nh, t)), (f_pre, (bsz, nh, t)),
              (c, (bsz, nh, fd, dv)), (n, (bsz, nh, fd)), (m, (bsz, nh)))  # fmt: skip
    if reset is not None:
        shapes += ((reset, (bsz, t)),)
    for x, want in shapes:  # the C++ reads by these shapes: refuse, never read past a tensor
        if tuple(x.shape) != tuple(want):
            raise ValueError(
                f"cpu_step: mlstm_scan got a tensor of shape {tuple(x.shape)} where "
                f"{tuple(want)} belongs (q is {tuple(q.shape)})"
            )
    cn = torch.cat([c, n[..., None]], dim=-1).contiguous()
    m = m.contiguous().clone()
    q, k, v, i_pre, f_pre = (x.contiguous() for x in (q, k, v, i_pre, f_pre))
    rs = None if reset is None else reset.to(torch.uint8).contiguous()
    h = q.new_empty(bsz, nh, t, dv)
    rc = getattr(lib, _SCANS[dtype])(
        bsz, nh, t, fd, dv, q.data_ptr(), k.data_ptr(), v.data_ptr(), i_pre.data_ptr(),
        f_pre.data_ptr(), None if rs is None else rs.data_ptr(), cn.data_ptr(), m.data_ptr(),
        h.data_ptr(), eps, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"cpu_step: mlstm_scan got bad dimensions {(bsz, nh, t, fd, dv)}")
    return h, (cn[..., :-1], cn[..., -1], m)


def shared_norm_scan(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fq: torch.Tensor,
    fk: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    tok,
    window: int,
    num_sinks: int,
    scaling: float,
) -> torch.Tensor | None:
    """The ``shared_norm`` mix over a sequence in one compiled call (no autograd; the function
    of :func:`~megadistill.model.shared_norm.shared_norm_parallel`, token by token with the
    state of the keys that left the window in cache), or None where it does not apply (not CPU,
    autograd on, turned off, no compiler): the caller then runs its own form.

    Args:
        q: (B, H, T, d) RoPE'd queries; k, v: (B, KV, T, d) RoPE'd keys and values.
        fq: (B, H, T, F) and fk: (B, KV, T, F) feature maps (the K/V heads' own, not repeated).
        i_pre, f_pre: (B, H, T) gate pre-activations (padding: PAD_I / PAD_F).
        tok: the row's :class:`~megadistill.model.swa.Tokens` (document, position, realness;
            ``idx`` is not read: keys are indexed 0..T-1 along the row).
        window, num_sinks, scaling: the SWA branch's settings.

    Returns:
        (B, H, T, d) in the compute dtype (float32 for half types).
    """
    if not scan_applies(q):
        return None
    dtype = torch.promote_types(q.dtype, torch.float32)
    lib = library()
    if lib is None:
        return None
    bsz, nh, t, d = q.shape
    nkv, fx = k.shape[1], fq.shape[-1]
    shapes = ((k, (bsz, nkv, t, d)), (v, (bsz, nkv, t, d)), (fq, (bsz, nh, t, fx)),
              (fk, (bsz, nkv, t, fx)), (i_pre, (bsz, nh, t)), (f_pre, (bsz, nh, t)),
              (tok.doc, (bsz, t)), (tok.pos, (bsz, t)), (tok.ok, (bsz, t)))  # fmt: skip
    for x, want in shapes:  # the C++ reads by these shapes: refuse, never read past a tensor
        if tuple(x.shape) != tuple(want):
            raise ValueError(
                f"cpu_step: shared_norm_scan got a tensor of shape {tuple(x.shape)} where "
                f"{tuple(want)} belongs (q is {tuple(q.shape)})"
            )
    if nkv < 1 or nh % nkv != 0:
        raise ValueError(f"cpu_step: shared_norm_scan got {nh} query heads over {nkv} K/V heads")
    q, k, v, fq, fk, i_pre, f_pre = (
        x.to(dtype).contiguous() for x in (q, k, v, fq, fk, i_pre, f_pre)
    )
    doc, pos = (x.to(torch.int64).contiguous() for x in (tok.doc, tok.pos))
    ok = tok.ok.to(torch.uint8).contiguous()
    out = q.new_empty(bsz, nh, t, d)
    rc = getattr(lib, _SN_SCANS[dtype])(
        bsz, nh, nkv, t, d, fx, window, num_sinks, q.data_ptr(), k.data_ptr(), v.data_ptr(),
        fq.data_ptr(), fk.data_ptr(), i_pre.data_ptr(), f_pre.data_ptr(), doc.data_ptr(),
        pos.data_ptr(), ok.data_ptr(), out.data_ptr(), scaling, torch.get_num_threads(),
    )  # fmt: skip
    if rc != 0:
        raise ValueError(f"cpu_step: shared_norm_scan got bad dimensions {(bsz, nh, nkv, t, d)}")
    return out
