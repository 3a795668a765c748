"""The hybrid attention block: mLSTM branch + SWA/sink branch, mixed by a per-head gate.

    h_t = o_t * mLSTM_t + (1 - o_t) * SWA_t        (per head, then the teacher's o_proj)

q/k/v/o projections, q/k norms, biases and RoPE are the teacher's. New parameters: the Hedgehog
feature maps on q and k (a linear map per head, then softmax over the feature dimension), the
input/forget gate projections (one scalar per head each) and the output gate from concat[q, k, v].
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megadistill.model import cpu_step
from megadistill.model import shared_norm as sn
from megadistill.model.cache import HybridCache, LayerCache
from megadistill.model.configuration import HybridConfig
from megadistill.model.mlstm import (
    EPS,
    PAD_F,
    PAD_I,
    _reset_rows,
    joint_state,
    mlstm_forward,
    mlstm_step_,
    mlstm_step_joint_,
)
from megadistill.model.rows import row_linear
from megadistill.model.swa import Tokens, _sdpa, swa_attention, token_mask

NEW_PARAMETER_MODULES = ("q_feature", "k_feature", "igate", "fgate", "ogate", "ogate_scale")
# shared_norm beyond 2W tokens runs in its blocked form (O(T W) memory, exact); False forces the
# quadratic reference form at every length (`megadistill bench memory` compares the two).
BLOCKED_SHARED_NORM = True
# In training, the blocked form keeps only its inputs and recomputes its blocks in backward: the
# blocks' gathered window keys, values and scores are ~150 MB per layer at 2K tokens (SmolLM2),
# more than the rest of the layer. False keeps them (`megadistill bench memory`).
RECOMPUTE_SHARED_NORM = True
# Likewise the gated mix's branch kernels (the chunkwise mLSTM's per-chunk scores and states, the
# blocked SWA's gathered windows), pure functions of their inputs. Off: for SmolLM2's W = 512
# student at 2K tokens it saves only 0.3-0.6 GB of an 8 GB plain step, and under the ZeRO-3
# engine the step took 46.9 CPU s instead of 35.3 (README: "Speed against a real teacher").
RECOMPUTE_BRANCHES = False


def _kernel(recompute: bool, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; with ``recompute`` and in training, through a non-reentrant
    checkpoint that keeps only the inputs (only for pure functions of their tensors: no
    parameters, safe under ZeRO-3)."""
    if recompute and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return fn(*args, **kwargs)


@dataclass
class SeqInfo:
    """Per-forward facts every layer shares (built once by the model)."""

    reset: torch.Tensor  # (B,T) a document starts here
    valid: torch.Tensor  # (B,T) real token (not padding)
    pos: torch.Tensor  # (B,T) RoPE position (position_ids; a 0 starts a document)
    abs_idx: torch.Tensor  # (T,) index of each new token in the row's stream
    # The new tokens as the visibility rule sees them (B,T): stream index, document id in the
    # stream, position in the document, real token. Documents continue across a cache.
    tokens: Tokens
    cache: HybridCache | None = None
    all_valid: bool = False  # no padding anywhere (decided once per forward: no per-layer sync)
    one_doc: bool = False  # no document starts after a row's first token
    any_reset: bool = True  # some row starts a document in this forward
    sink_tokens: bool = True  # some real token is among its document's first ``num_sinks``
    next_pos: torch.Tensor | None = None  # (B,) RoPE position of each row's next token
    # Structures every layer with the same window/sinks shares (masks, block layouts), built by
    # the first layer that needs them, once per forward.
    memo: dict[Any, Any] = field(default_factory=dict)


class FeatureMap(nn.Module):
    """Hedgehog feature map: per-head linear map, then softmax over the feature dimension.

    With ``both_signs`` the output is ``[softmax(xW), softmax(-xW)]`` (twice the features), the
    form of the Hedgehog and LoLCATs papers: the kernel then also grows where ``q.k`` is large and
    negative in some direction, which one softmax cannot express.
    """

    def __init__(
        self, num_heads: int, head_dim: int, feature_dim: int, both_signs: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_heads, head_dim, feature_dim))
        self.both_signs = both_signs
        self.reset_parameters()  # never torch.empty, whichever path builds the model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, H, T, head_dim)
        z = x @ self.weight  # (B,H,T,d) @ (H,d,f): one batched product per head
        if self.both_signs:
            return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
        return torch.softmax(z, dim=-1)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Identity plus small noise: the features start as softmax(q), close to the teacher's
        # exp(q.k) kernel, so training begins from a sensible linear-attention approximation.
        h, d, f = self.weight.shape
        eye = torch.eye(d, f, dtype=torch.float32)
        noise = torch.randn(h, d, f, generator=generator, dtype=torch.float32) / math.sqrt(d)
        self.weight.copy_((eye + 0.1 * noise).to(self.weight.dtype))


class GateScale(nn.Module):
    """One learned factor per head on the output gate (``gate_init: floor``; 0 at conversion)."""

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_heads))

    def forward(self, gate: torch.Tensor) -> torch.Tensor:  # (B, T, H), in the gate's dtype
        # Applied through forward (not by reading .weight from outside) so that ZeRO-3's module
        # hooks gather the partitioned weight in the forward and again in the backward.
        return (gate * self.weight).to(gate.dtype)


def rotation_matrix(cos: torch.Tensor, sin: torch.Tensor, head_dim: int) -> torch.Tensor:
    """RoPE at one position as a matrix: R (B, d, d) such that ``x @ R`` is transformers'
    ``apply_rotary_pos_emb`` of heads x (B, N, d) with ``cos``/``sin`` (B, 1, r) in every
    supported family (the first r dims rotated, the rest passed through, as Phi-3's partial
    RoPE), to rounding: each output is ``x_i cos_i -+ x_j sin_i``, summed in one product.
    Built once per decoding step and shared by every layer of the same RoPE: rotating a layer's
    q and k heads is then one product (``tests/model/test_cache.py`` checks every family)."""
    c, s = cos[:, 0], sin[:, 0]  # (B, r)
    r, h = c.shape[-1], c.shape[-1] // 2
    idx = torch.arange(r, device=c.device)
    rot = torch.cat([idx[h:], idx[:h]])  # output i reads x[rot[i]] for its sin term
    mat = c.new_zeros(c.shape[0], head_dim, head_dim)
    mat[:, idx, idx] = c
    mat[:, rot, idx] = torch.cat([-s[:, :h], s[:, h:]], dim=-1)
    if r < head_dim:  # partial RoPE: the other dims pass through
        rest = torch.arange(r, head_dim, device=c.device)
        mat[:, rest, rest] = 1.0
    return mat


@dataclass
class StepWeights:
    """A layer's weights as one decoding step reads them: the q/k/v projections and the input
    and forget gates stacked into one matrix ([q | k | v | i | f | 0] columns of ``proj``,
    transposed for ``x @ proj``; zero bias where a projection has none; H zero columns that give
    the mLSTM step a scratch row of zeros), the q and k feature maps into one
    (H + KV, d, f) tensor, and (views) the output gate's and o_proj's transposed weights. The
    stacked ones are copies: a :class:`HybridCache` builds them at its first step and drops them
    with itself."""

    proj: torch.Tensor
    proj_bias: torch.Tensor | None
    o_proj: torch.Tensor
    o_bias: torch.Tensor | None
    ogate: torch.Tensor | None = None
    ogate_bias: torch.Tensor | None = None
    ogate_scale: torch.Tensor | None = None
    features: torch.Tensor | None = None
    both_signs: bool = False
    kernel: cpu_step.RecurrentStep | None = None
    """The recurrent branch compiled (:mod:`~megadistill.model.cpu_step`), where it applies."""
    shared: cpu_step.SharedNormStep | None = None
    """A ``shared_norm`` layer's attention step compiled, where it applies."""

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """:class:`FeatureMap` of q and k heads at once: x (B, H + KV, 1, d) -> (B, H + KV, 1, f)."""
        b, n, _, d = x.shape
        if b == 1:
            z = torch.bmm(x.view(n, 1, d), self.features).view(1, n, 1, -1)
        else:
            z = torch.bmm(x.view(b, n, d).transpose(0, 1), self.features).transpose(0, 1)[
                :, :, None
            ]
        if self.both_signs:
            return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)
        return torch.softmax(z, dim=-1)

    @classmethod
    @torch.no_grad()
    def of(cls, attn: HybridAttention) -> StepWeights:
        """The step weights of ``attn`` (a hybrid layer or one kept as a local window)."""
        if attn.adapter.fused_qkv:
            mods = [attn.qkv_proj]
        else:
            mods = [attn.q_proj, attn.k_proj, attn.v_proj]
        hybrid = not attn.kept and attn.config.gate_mode != "swa"
        weights = [m.weight for m in mods]
        biases = [
            m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in mods
        ]
        if hybrid:  # the gates, and H zeros (the mLSTM step's scratch row, mlstm_step_joint_)
            zeros = attn.igate.weight.new_zeros(attn.igate.weight.shape)
            weights += [attn.igate.weight, attn.fgate.weight, zeros]
            biases += [attn.igate.bias, attn.fgate.bias, zeros[:, 0]]
        proj = torch.cat(weights).t()
        bias = None
        if hybrid or any(m.bias is not None for m in mods):
            bias = torch.cat(biases)
        out = cls(proj, bias, attn.o_proj.weight.t(), attn.o_proj.bias)
        if hybrid:
            out.features = torch.cat([attn.q_feature.weight, attn.k_feature.weight])
            out.both_signs = attn.q_feature.both_signs
            if attn.config.gate_mode == "learned" and attn.shared:
                out.shared = _shared_norm_step(attn, out.features)
                return out
            if attn.config.gate_mode == "learned":
                out.ogate, out.ogate_bias = attn.ogate.weight.t(), attn.ogate.bias
                if hasattr(attn, "ogate_scale"):  # gate_init: floor
                    out.ogate_scale = attn.ogate_scale.weight
            out.kernel = _recurrent_step(attn, out.features)
        return out


def _recurrent_step(attn: HybridAttention, features: torch.Tensor) -> cpu_step.RecurrentStep | None:
    """The compiled recurrent branch bound to ``attn``'s weights, or None (turned off on the
    layer or by ``$MEGADISTILL_CPU_STEP``, not a CPU float32/64 layer, RoPE on the features, or
    no compiler)."""
    if not (
        attn.step_kernel
        and attn.config.rope_on != "features"
        and cpu_step.RecurrentStep.applies(features.dtype, features.device)
    ):
        return None
    lib = cpu_step.library()
    if lib is None:
        return None
    learned = attn.config.gate_mode == "learned"
    scale = getattr(attn, "ogate_scale", None) if learned else None
    return cpu_step.RecurrentStep(
        lib, num_heads=attn.num_heads, num_kv=attn.num_kv, head_dim=attn.head_dim,
        features=features, both_signs=attn.q_feature.both_signs,
        ogate=attn.ogate.weight if learned else None, ogate_bias=attn.ogate.bias if learned else None,
        ogate_scale=scale.weight if scale is not None else None, eps=EPS,
    )  # fmt: skip


def _shared_norm_step(
    attn: HybridAttention, features: torch.Tensor
) -> cpu_step.SharedNormStep | None:
    """The compiled ``shared_norm`` step bound to ``attn``'s feature maps, or None (turned off on
    the layer or by ``$MEGADISTILL_CPU_STEP``, not a CPU float32/64 layer, or no compiler)."""
    if not (attn.step_kernel and cpu_step.SharedNormStep.applies(features.dtype, features.device)):
        return None
    lib = cpu_step.library()
    if lib is None:
        return None
    return cpu_step.SharedNormStep(
        lib, num_heads=attn.num_heads, num_kv=attn.num_kv, head_dim=attn.head_dim,
        features=features, both_signs=attn.q_feature.both_signs, scaling=attn.scaling,
    )  # fmt: skip


def _linear(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` of rows x (B, in) with a transposed weight (in, out), over torch's threads
    (:func:`~megadistill.model.rows.row_linear`)."""
    return row_linear(x, weight_t.t(), bias)


class HybridAttention(nn.Module):
    """Drop-in replacement for a teacher attention block."""

    def __init__(self, config: HybridConfig, layer_idx: int, adapter, teacher_cfg) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.adapter = adapter
        hidden = teacher_cfg.hidden_size
        self.num_heads = teacher_cfg.num_attention_heads
        self.num_kv = getattr(teacher_cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = config.head_dim
        self.scaling = adapter.attention_scaling(teacher_cfg, self.head_dim)
        # The teacher's own span in this layer (None: full causal; see teacher_attention). A local
        # teacher layer is kept as the teacher's sliding-window attention (local_layers "swa",
        # or listed in softmax_layers), or becomes a hybrid whose softmax branch sees what the
        # teacher's sees: window min(W, the teacher's), no sinks (the teacher has none), so gate
        # "swa" reproduces it at any length.
        self.teacher_window = adapter.teacher_window(teacher_cfg, layer_idx)
        local = self.teacher_window is not None
        kept = layer_idx in config.softmax_layers
        self.keep_local = local and (kept or config.local_layers == "swa")
        self.window = min(config.window, self.teacher_window) if local else config.window
        if self.keep_local:
            self.window = self.teacher_window
        self.num_sinks = 0 if local else config.num_sinks
        qkv_bias = adapter.has_qkv_bias(teacher_cfg)
        self.qkv_sizes = [self.num_heads * self.head_dim] + [self.num_kv * self.head_dim] * 2
        if adapter.fused_qkv:  # the teacher's own layout (Phi-3), so its weights load as they are
            self.qkv_proj = nn.Linear(hidden, sum(self.qkv_sizes), bias=qkv_bias)
        else:
            self.q_proj = nn.Linear(hidden, self.qkv_sizes[0], bias=qkv_bias)
            self.k_proj = nn.Linear(hidden, self.qkv_sizes[1], bias=qkv_bias)
            self.v_proj = nn.Linear(hidden, self.qkv_sizes[2], bias=qkv_bias)
        self.o_proj = nn.Linear(
            self.num_heads * self.head_dim, hidden, bias=adapter.has_o_bias(teacher_cfg)
        )
        if adapter.qk_norm != "none":
            norm_cls = adapter.cls("RMSNorm")
            q_size = self.head_dim if adapter.qk_norm == "head" else self.num_heads * self.head_dim
            k_size = self.head_dim if adapter.qk_norm == "head" else self.num_kv * self.head_dim
            self.q_norm = norm_cls(q_size, eps=teacher_cfg.rms_norm_eps)
            self.k_norm = norm_cls(k_size, eps=teacher_cfg.rms_norm_eps)
        # transformers >= 5.25 makes apply_rotary_pos_emb an nn.Module (a hub-kernel dispatcher)
        # shared by the whole model. Registered as a submodule of every layer, ZeRO-3 hooked the
        # one instance once per layer at each of its calls: 30x the hooks and 3,600 autograd
        # nodes per SmolLM2 step. In a tuple it stays out of the module tree (apply_rotary).
        self._rotary = (adapter.modeling().apply_rotary_pos_emb,)
        # A layer kept as the teacher's attention (full, or its sliding window: a ring buffer of
        # W_t slots) has no new parameters at all.
        self.full = kept and not local
        self.kept = self.full or self.keep_local
        # KV heads of a hybrid layer kept as the teacher's full attention (softmax_heads), and
        # their query heads; the hybrid path still runs on every head (their output replaced)
        self.full_kv = [h for i, h in config.softmax_heads if i == layer_idx]
        if self.full_kv and (self.kept or local):
            what = "keeps the whole layer" if self.kept else "has a local (sliding-window) teacher"
            raise ValueError(
                f"softmax_heads name heads of layer {layer_idx}, which {what}: drop them"
            )
        group = self.num_heads // self.num_kv
        self.full_q = [h * group + j for h in self.full_kv for j in range(group)]
        self._head_index: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        # An observer installed from outside (None: none) sees the hybrid path's projections and
        # output, called as observer(self, out, q_r, k_r, v, info); what it returns is the output.
        self.observer = None
        # Decoding steps without autograd take the fused path (:meth:`_step`); False: the step
        # through the modules (:meth:`_decode`), the reference it is tested against.
        self.fused_step = True
        # ... and in it, the recurrent branch compiled where it applies (cpu_step), as is the
        # mLSTM of a CPU prefill (cpu_step.mlstm_scan); False: their eager ops, the references
        # they are tested against.
        self.step_kernel = True
        # rope_on "none": the feature maps read q and k before RoPE (a shared_norm layer's cache
        # then keeps the window's keys before RoPE too, for the key that leaves it)
        self.plain_features = config.rope_on == "none"
        if self.kept:
            return
        fdim, pm = config.feature_dim, config.feature_map == "hedgehog_pm"
        self.q_feature = FeatureMap(self.num_heads, self.head_dim, fdim, both_signs=pm)
        self.k_feature = FeatureMap(self.num_kv, self.head_dim, fdim, both_signs=pm)
        self.igate = nn.Linear(hidden, self.num_heads)
        self.fgate = nn.Linear(hidden, self.num_heads)
        self.shared = config.mix == "shared_norm"
        if not self.shared:  # the shared normaliser needs no output gate
            qkv_dim = (self.num_heads + 2 * self.num_kv) * self.head_dim
            self.ogate = nn.Linear(qkv_dim, self.num_heads)
            if config.gate_init == "floor":
                self.ogate_scale = GateScale(self.num_heads)

    def apply_rotary(self, q, k, cos, sin):
        """The teacher family's ``apply_rotary_pos_emb`` (its numerics, its kernels)."""
        return self._rotary[0](q, k, cos, sin)

    @torch.no_grad()
    def init_new_parameters(self, generator: torch.Generator | None = None) -> None:
        """Initialise only the new parameters (seeded by ``generator``)."""
        if self.kept:
            return
        self.q_feature.reset_parameters(generator)
        self.k_feature.reset_parameters(generator)
        for lin in (self.igate, self.fgate) + (() if self.shared else (self.ogate,)):
            std = 1.0 / math.sqrt(lin.in_features)
            w = torch.randn(lin.weight.shape, generator=generator, dtype=torch.float32) * std * 0.1
            lin.weight.copy_(w.to(lin.weight.dtype))
        self.igate.bias.fill_(self.config.igate_bias)
        # Forget-gate biases spread over heads: sigmoid(3..6) keeps memory over ~20..400 tokens.
        low, high = self.config.fgate_bias
        self.fgate.bias.copy_(torch.linspace(low, high, self.num_heads, dtype=torch.float32))
        if not self.shared:
            self.ogate.bias.fill_(0.0)
            if hasattr(self, "ogate_scale"):
                self.ogate_scale.weight.zero_()  # a fresh student is the SWA floor

    def _output_gate(self, gate_in: torch.Tensor) -> torch.Tensor:
        """The mLSTM branch's share per head and token, (B,H,T,1): sigmoid(W [q,k,v] + b), times
        the learned per-head factor that starts at 0 (``gate_init: floor``)."""
        o = torch.sigmoid(self.ogate(gate_in))
        if hasattr(self, "ogate_scale"):
            o = self.ogate_scale(o)
        return o.transpose(1, 2)[..., None]

    def _project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q, k (normed), q_r, k_r (RoPE), v (B,H,T,d) and the output gate's input
        [q | k | v] (B,T,.) of a hybrid layer (None for a kept one)."""
        bsz, t, _ = x.shape
        if self.adapter.fused_qkv:
            q_raw, k_raw, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q_raw, k_raw, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k = q_raw, k_raw
        if self.adapter.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(bsz, t, self.num_heads, self.head_dim)
        k = k.view(bsz, t, self.num_kv, self.head_dim)
        if self.adapter.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v4 = v.view(bsz, t, self.num_kv, self.head_dim).transpose(1, 2)
        q_r, k_r = self.apply_rotary(q, k, cos, sin)
        gate_in = None if self.kept or self.shared else torch.cat([q_raw, k_raw, v], dim=-1)
        return q, k, q_r, k_r, v4, gate_in

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, info: SeqInfo
    ) -> torch.Tensor:
        bsz, t, _ = x.shape
        lc = info.cache.layers[self.layer_idx] if info.cache is not None else None
        if t == 1 and lc is not None and lc.k is not None and self._fused_step_applies():
            return self._step(x, cos, sin, info, lc)
        q, k, q_r, k_r, v, gate_in = self._project(x, cos, sin)
        # ``full`` first: eval/layer_choice flips it on a layer to measure keeping that layer.
        if self.full:
            full = self._full(q_r, k_r, v, info, lc)
            return self.o_proj(full.transpose(1, 2).reshape(bsz, t, -1))
        if self.keep_local:
            local = self._swa(q_r, k_r, v, info, lc)
            if lc is not None and lc.k is None:
                self._write_kv(k_r, v, info, lc)  # prefill into an empty cache
            return self.o_proj(local.transpose(1, 2).reshape(bsz, t, -1))
        mode = self.config.gate_mode
        if mode == "learned" and self.shared:
            mixed = self._shared_norm(x, q, k, q_r, k_r, v, info, lc)
            mixed = self._heads(mixed, q_r, k_r, v, info, lc)
            out = self.o_proj(mixed.transpose(1, 2).reshape(bsz, t, -1))
            return self._observed(out, q_r, k_r, v, info)
        if lc is not None and lc.k is not None and t == 1:
            mixed = self._decode(x, q, k, q_r, k_r, v, cos, sin, gate_in, info, lc)
            mixed = self._heads(mixed, q_r, k_r, v, info, lc)
            return self.o_proj(mixed.transpose(1, 2).reshape(bsz, t, -1))
        swa = self._swa(q_r, k_r, v, info, lc) if mode != "mlstm" else None
        if mode == "swa":
            mixed = swa
        else:
            mem = self._mlstm(x, q, k, q_r, k_r, v, cos, sin, info, lc)
            if mode == "mlstm":
                mixed = mem
            else:
                o = self._output_gate(gate_in)  # (B,H,T,1)
                mixed = torch.lerp(swa, mem, o.to(swa.dtype))  # o * mem + (1 - o) * swa
        if lc is not None and (lc.k is None or mode == "mlstm"):
            self._write_kv(k_r, v, info, lc)  # prefill into an empty cache
        mixed = self._heads(mixed, q_r, k_r, v, info, lc)
        out = self.o_proj(mixed.transpose(1, 2).reshape(bsz, t, -1))
        return self._observed(out, q_r, k_r, v, info)

    def _heads(self, mixed, q_r, k_r, v, info: SeqInfo, lc: LayerCache | None) -> torch.Tensor:
        """``mixed`` (B,H,T,d) with the heads of ``softmax_heads`` replaced by the teacher's full
        causal attention (their own growing cache, ``lc.full``); as it is where there are none."""
        if not self.full_kv:
            return mixed
        index = self._head_index.get(mixed.device)
        if index is None:
            index = self._head_index[mixed.device] = (
                torch.tensor(self.full_q, device=mixed.device),
                torch.tensor(self.full_kv, device=mixed.device),
            )
        qi, ki = index
        sub = None
        if lc is not None:
            sub = lc.full = lc.full if lc.full is not None else LayerCache()
        full = self._full(
            q_r.index_select(1, qi), k_r.index_select(1, ki), v.index_select(1, ki), info, sub
        )
        return mixed.index_copy(1, qi, full.to(mixed.dtype))

    def _observed(self, out, q_r, k_r, v, info: SeqInfo) -> torch.Tensor:
        return out if self.observer is None else self.observer(self, out, q_r, k_r, v, info)

    def teacher_attention(self, q_r, k_r, v, info: SeqInfo) -> torch.Tensor:
        """The teacher's attention output of this layer (its own span, no sinks, ``o_proj``
        applied) from the layer's projections ``q_r, k_r, v`` (B, H, T, head_dim): the cheapest
        exact path (SDPA's causal kernel when every row is one document without padding)."""
        bsz, t = q_r.shape[0], q_r.shape[2]
        plain = info.one_doc and info.all_valid
        full = swa_attention(
            q_r, k_r, v, info.reset, info.valid, self.teacher_window, 0, self.scaling,
            "auto", plain=plain, memo=info.memo,
        )  # fmt: skip
        return self.o_proj(full.transpose(1, 2).reshape(bsz, t, -1))

    def _gates(self, x: torch.Tensor, info: SeqInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """Input and forget gate pre-activations (B,H,T); padding steps are exact no-ops."""
        i_pre = self.igate(x).transpose(1, 2)
        f_pre = self.fgate(x).transpose(1, 2)
        if not info.all_valid:
            pad = ~info.valid[:, None, :]
            i_pre = i_pre.masked_fill(pad, PAD_I)
            f_pre = f_pre.masked_fill(pad, PAD_F)
        return i_pre, f_pre

    def _shared_norm(self, x, q, k, q_r, k_r, v, info: SeqInfo, lc: LayerCache | None):
        k_p = k if self.plain_features else None  # the keys the cache keeps before RoPE
        if lc is not None and lc.k is not None and q_r.shape[2] == 1:
            # one decoding step (generate()'s case): the step reads q's features only (the key
            # that enters the state is the one leaving the window, featured from the buffer)
            i_pre, f_pre = self._gates(x, info)
            fq = self.q_feature(q if self.plain_features else q_r)
            out = self._shared_step(
                q_r[:, :, 0], k_r, v, fq[:, :, 0], i_pre[:, :, 0], f_pre[:, :, 0], info, lc,
                info.cache.seen, k_p,
            )  # fmt: skip
            return out[:, :, None].to(v.dtype)
        fq, fk_kv = self._features(q, k, q_r, k_r, None, None)
        i_pre, f_pre = self._gates(x, info)
        out = None
        if (lc is None or lc.k is None) and self.step_kernel:  # one compiled scan (CPU, no grad)
            out = cpu_step.shared_norm_scan(
                q_r, k_r, v, fq, fk_kv, i_pre, f_pre, info.tokens, self.window, self.num_sinks,
                self.scaling,
            )  # fmt: skip
            if out is not None:
                out = out.to(v.dtype)
                if lc is None:
                    return out
        fk = fk_kv.repeat_interleave(self.num_heads // self.num_kv, dim=1)
        if BLOCKED_SHARED_NORM and q_r.shape[2] > 2 * self.window:  # O(T W), not O(T^2)
            args = (info.tokens, self.window, self.num_sinks, self.scaling)
            kernel = sn.shared_norm_blocked
        else:
            args = (info.reset, info.valid, self.window, self.num_sinks, self.scaling)
            kernel = sn.shared_norm_parallel
        if lc is None:
            recompute = RECOMPUTE_SHARED_NORM and kernel is sn.shared_norm_blocked
            return _kernel(recompute, kernel, q_r, k_r, v, fq, fk, i_pre, f_pre, *args)
        if lc.k is None:  # prefill into an empty cache: the sequence, then the state it leaves
            if out is None:
                out = kernel(q_r, k_r, v, fq, fk, i_pre, f_pre, *args)
            lc.mlstm, gate_i, decay = sn.prefill_state(
                fk, v, i_pre, f_pre, info.tokens, self.window, self.num_sinks
            )
            self._write_kv(k_r, v, info, lc, k_p)
            n = lc.k.shape[2]
            lc.gate_i = gate_i.new_zeros(*gate_i.shape[:2], n)
            lc.decay = decay.new_zeros(*decay.shape[:2], n)
            t = k_r.shape[2]
            keep = slice(max(0, t - self.window), t)
            slots = self.num_sinks + info.abs_idx[keep] % self.window
            lc.gate_i.index_copy_(2, slots, gate_i[..., keep])
            lc.decay.index_copy_(2, slots, decay[..., keep])
            return out
        outs = []  # tokens after a cache: one step each (exact; prefill is the fast path)
        for j in range(q_r.shape[2]):
            one = SeqInfo(
                reset=info.reset[:, j : j + 1], valid=info.valid[:, j : j + 1],
                pos=info.pos[:, j : j + 1], abs_idx=info.abs_idx[j : j + 1],
                tokens=Tokens(*(f[:, j : j + 1] for f in info.tokens)), cache=info.cache,
                any_reset=info.any_reset, sink_tokens=info.sink_tokens,
            )  # fmt: skip
            outs.append(
                self._shared_step(
                    q_r[:, :, j],
                    k_r[:, :, j : j + 1],
                    v[:, :, j : j + 1],
                    fq[:, :, j],
                    i_pre[:, :, j],
                    f_pre[:, :, j],
                    one,
                    lc,
                    info.cache.seen + j,
                    None if k_p is None else k_p[:, :, j : j + 1],
                )  # fmt: skip
            )
        return torch.stack(outs, dim=2).to(v.dtype)

    def _shared_step(
        self, q1, k1, v1, fq1, i1, f1, info: SeqInfo, lc: LayerCache, t: int, kp1=None
    ):
        """One decoding step of the shared_norm mix (see model/shared_norm.py) for the token of
        stream index ``t`` (known on the host: no sync); ``kp1`` the token's key before RoPE
        (rope_on "none": the key leaving the window is featured from ``lc.k_plain``)."""
        slot = self.num_sinks + t % self.window
        up = lc.decay.dtype  # the state's dtype (float32 for half types)
        logf = torch.nn.functional.logsigmoid(f1.to(up))
        if info.any_reset:  # a new document: none of the old one's keys stays in the state
            lc.mlstm = sn.reset_rows(lc.mlstm, info.reset[:, 0])
        leaves = self._shared_leaves(info, lc, t, slot)
        log_w = (lc.gate_i[:, :, slot] + lc.decay[:, :, slot] + logf).masked_fill(
            ~leaves[:, None], sn.NEG
        )
        rep = self.num_heads // self.num_kv
        keys = lc.k_plain if self.plain_features else lc.k
        fk_s = self.k_feature(keys[:, :, slot, None])[:, :, 0].repeat_interleave(rep, dim=1)
        v_s = lc.v[:, :, slot].repeat_interleave(rep, dim=1)
        lc.mlstm = sn.absorb(lc.mlstm, fk_s.to(up), v_s.to(up), log_w, logf)
        lc.decay += logf[..., None]
        self._write_kv_step(k1, v1, info, lc, kp1)
        lc.gate_i[:, :, slot] = i1.to(up)
        lc.decay[:, :, slot] = 0.0
        mask = self._shared_mask(info, lc, t)
        return sn.shared_norm_step(q1, lc.k, lc.v, mask, fq1, lc.mlstm, self.scaling)

    def _shared_leaves(self, info: SeqInfo, lc: LayerCache, t: int, slot: int) -> torch.Tensor:
        """(B,) whether the token leaving the window at step ``t`` joins the state. It sits in
        the ring slot of this token (a sink never sits in the ring, so never leaves) and joins
        if it is of this document. The same in every layer of this window and sinks (their slots
        hold the same tokens), so built once per step, before any layer writes the step."""
        key = ("shared_leaves", self.window, self.num_sinks, t)
        leaves = info.memo.get(key)
        if leaves is None:
            idx, doc, _ = lc.held[:, :, slot].unbind(1)
            leaves = info.memo[key] = (
                (idx == t - self.window) & lc.ok[:, slot] & (doc == info.tokens.doc[:, 0])
            )
        return leaves

    def _shared_mask(self, info: SeqInfo, lc: LayerCache, t: int) -> torch.Tensor:
        """(B, S + W) the slots this step's query sees, after the step's write (likewise built
        once per step for the layers of this window and sinks)."""
        w, s = self.window, self.num_sinks
        key = ("shared_mask", w, s, t)
        mask = info.memo.get(key)
        if mask is None:
            mask = info.memo[key] = token_mask(info.tokens, lc.keys(), w, s)[:, 0].contiguous()
        return mask

    def _shared_fused(self, y, feat_in, qk_r, v, info: SeqInfo, lc: LayerCache, fw: StepWeights):
        """The ``shared_norm`` attention of :meth:`_step` ((B, H, 1, d), before o_proj): one
        compiled call where it applies (a real token that starts no document and is no sink,
        float32/64 on CPU), else :meth:`_shared_step` on the step's fused products. ``feat_in``:
        the q and k heads the feature maps read (``qk_r`` itself unless rope_on is "none")."""
        bsz, nh, d = y.shape[0], self.num_heads, self.head_dim
        t = info.cache.seen
        slot = self.num_sinks + t % self.window
        kern = fw.shared
        if (
            kern is not None
            and info.all_valid
            and not info.any_reset
            and not (self.num_sinks and info.sink_tokens)
            and y.dtype == kern.dtype == lc.decay.dtype
            and all(x.is_contiguous() for x in lc.mlstm)
        ):
            leaves = self._shared_leaves(info, lc, t, slot)
            at, held = self._step_slot(info)  # keys and values are the kernel's to write
            lc.held.index_copy_(2, at, held)
            lc.ok.index_copy_(1, at, info.valid)
            out = qk_r.new_empty(bsz, nh, 1, d)
            plain = feat_in if self.plain_features else None
            return kern(y, qk_r, leaves, self._shared_mask(info, lc, t), lc, slot, out, plain)
        nq, nk = self.qkv_sizes[0], self.qkv_sizes[1]
        gates = y[:, nq + 2 * nk : nq + 2 * nk + 2 * nh].view(bsz, 2, nh)  # input, forget
        if not info.all_valid:  # padding steps are exact no-ops (as _gates)
            pads = gates.new_tensor([[PAD_I], [PAD_F]])
            gates = torch.where(info.valid.view(bsz, 1, 1), gates, pads)
        fq = fw.feature_map(feat_in)[:, :nh, 0]
        kp = feat_in[:, nh:] if self.plain_features else None
        out = self._shared_step(
            qk_r[:, :nh, 0], qk_r[:, nh:], v, fq, gates[:, 0], gates[:, 1], info, lc, t, kp
        )
        return out[:, :, None].to(v.dtype)

    def _features(self, q, k, q_r, k_r, cos, sin):
        """Feature-mapped q and k of the recurrent branch (RoPE before the map, after it, or
        none: ``rope_on``)."""
        if self.config.rope_on == "input":
            return self.q_feature(q_r), self.k_feature(k_r)
        if self.plain_features:
            return self.q_feature(q), self.k_feature(k)
        return self.apply_rotary(self.q_feature(q), self.k_feature(k), cos, sin)

    def _decode(self, x, q, k, q_r, k_r, v, cos, sin, gate_in, info: SeqInfo, lc: LayerCache):
        """One decoding step (T = 1) after a prefill: the token goes into the buffer, the SWA
        branch attends over it in place (:meth:`_swa_step`), the mLSTM state is updated in place;
        only the branches the gate mode uses are computed."""
        mode = self.config.gate_mode
        swa = mem = None
        if mode != "mlstm":
            swa = self._swa_step(q_r, k_r, v, info, lc)
        else:
            self._write_kv_step(k_r, v, info, lc)
        if mode != "swa":
            fq, fk = self._features(q, k, q_r, k_r, cos, sin)
            i_pre, f_pre = self._gates(x, info)
            if info.any_reset:
                lc.mlstm = _reset_rows(lc.mlstm, info.reset[:, 0])
            h, lc.mlstm = mlstm_step_(
                fq[:, :, 0], fk[:, :, 0], v[:, :, 0], i_pre[..., 0], f_pre[..., 0], lc.mlstm
            )
            mem = h[:, :, None].to(v.dtype)
        if mode == "swa":
            return swa
        if mode == "mlstm":
            return mem
        return torch.lerp(swa, mem, self._output_gate(gate_in).to(swa.dtype))

    def _fused_step_applies(self) -> bool:
        """Whether a decoding step takes :meth:`_step` (else :meth:`_decode`, the reference):
        inference only (the cache is updated in place), ``fused_step`` on, a hybrid layer (no
        observer on a ``shared_norm`` one) or a layer kept as the teacher's sliding window."""
        return (
            self.fused_step
            and not torch.is_grad_enabled()
            and not self.full
            and (self.keep_local or not self.shared or self.observer is None)
        )

    def _step_weights(self, cache: HybridCache) -> StepWeights | None:
        """This layer's :class:`StepWeights` for decoding with ``cache`` (built at the first step
        and kept by the cache; None where parameters are partitioned by ZeRO-3, whose hooks
        gather a weight only inside its own module's forward)."""
        if self.layer_idx in cache.step_weights:
            return cache.step_weights[self.layer_idx]
        fused = None
        if not any(hasattr(p, "ds_id") for p in self.parameters()):
            fused = StepWeights.of(self)
        cache.step_weights[self.layer_idx] = fused
        return fused

    def _step(self, x, cos, sin, info: SeqInfo, lc: LayerCache) -> torch.Tensor:
        """One decoding step (T = 1, no autograd) in few ops; the same function as
        :meth:`_decode` (``tests/model/test_cache.py`` compares them). q, k, v and the input and
        forget gates come from one product with the layer's :class:`StepWeights`; RoPE (one
        product with the step's :func:`rotation_matrix`) and the feature maps run once on q and
        k together ([q heads | k heads]); the SWA branch attends over the buffer's filled slots
        only; the mLSTM state is updated in place (:func:`mlstm_step_joint_`); o_proj included."""
        fw = self._step_weights(info.cache)
        if fw is None:
            return self._step_reference(x, cos, sin, info, lc)
        bsz = x.shape[0]
        nh, nkv, d = self.num_heads, self.num_kv, self.head_dim
        nq, nk = self.qkv_sizes[0], self.qkv_sizes[1]
        y = _linear(x.view(bsz, -1), fw.proj, fw.proj_bias)  # (B, [q | k | v | i | f])
        if self.adapter.qk_norm == "none":
            qk = y[:, : nq + nk].view(bsz, nh + nkv, 1, d)  # T = 1: heads lie as (B,H,1,d)
        else:
            q, k = y[:, :nq], y[:, nq : nq + nk]
            if self.adapter.qk_norm == "full":
                q, k = self.q_norm(q), self.k_norm(k)
            else:
                q, k = self.q_norm(q.view(bsz, nh, d)), self.k_norm(k.view(bsz, nkv, d))
            qk = torch.cat([q.reshape(bsz, nh, 1, d), k.reshape(bsz, nkv, 1, d)], 1)
        v = y[:, nq + nk : nq + 2 * nk].view(bsz, nkv, 1, d)
        qk_r = self._rotate(qk, cos, sin, info)
        q_r, k_r = qk_r[:, :nh], qk_r[:, nh:]
        mode = "swa" if self.keep_local else self.config.gate_mode
        # what the feature maps read: q and k before RoPE (rope_on "none") or after it
        feat_in = qk.contiguous() if self.plain_features and mode != "swa" else qk_r
        if mode == "learned" and self.shared:
            mixed = self._heads(
                self._shared_fused(y, feat_in, qk_r, v, info, lc, fw), q_r, k_r, v, info, lc
            )
            return _linear(mixed.reshape(bsz, nh * d), fw.o_proj, fw.o_bias).view(bsz, 1, -1)
        swa = mem = None
        if mode != "mlstm":
            swa = self._swa_step(q_r, k_r, v, info, lc)
        else:
            self._write_kv_step(k_r, v, info, lc)
        if mode != "swa":
            if info.any_reset:
                lc.mlstm = _reset_rows(lc.mlstm, info.reset[:, 0])
            # C is a view at the start of the joint [C | n] buffer until a prefill or a reset
            # replaces it: then the buffer is built again, once
            if lc.mlstm_joint is None or lc.mlstm[0].data_ptr() != lc.mlstm_joint.data_ptr():
                lc.mlstm, lc.mlstm_joint = joint_state(lc.mlstm)  # once after a prefill
            if fw.kernel is not None and info.all_valid and lc.mlstm_joint.dtype == y.dtype:
                # feature maps, mLSTM step, output gate and mix in one call
                mixed = qk_r.new_empty(bsz, nh, 1, d)
                fw.kernel(y, feat_in, swa, lc.mlstm_joint, lc.mlstm[2], mixed)
                mixed = self._heads(mixed, q_r, k_r, v, info, lc)
                return _linear(mixed.reshape(bsz, nh * d), fw.o_proj, fw.o_bias).view(bsz, 1, -1)
            if self.config.rope_on == "features":
                fqk = self._rotate(fw.feature_map(qk), cos, sin, info)
            else:
                fqk = fw.feature_map(feat_in)
            gates = y[:, nq + 2 * nk :].view(bsz, 3, nh)  # input, forget, zeros
            if not info.all_valid:  # padding steps are exact no-ops (as _gates)
                pads = gates.new_tensor([[PAD_I], [PAD_F], [0.0]])
                gates = torch.where(info.valid.view(bsz, 1, 1), gates, pads)
            mem = mlstm_step_joint_(
                fqk[:, :nh], fqk[:, nh:], v, gates, lc.mlstm_joint, lc.mlstm[2]
            ).to(v.dtype)
        if mode == "swa":
            mixed = swa
        elif mode == "mlstm":
            mixed = mem
        else:
            o = torch.sigmoid(_linear(y[:, : nq + 2 * nk], fw.ogate, fw.ogate_bias))
            if fw.ogate_scale is not None:  # gate_init: floor
                o = o * fw.ogate_scale
            mixed = torch.lerp(swa, mem, o.view(bsz, nh, 1, 1).to(swa.dtype))
        mixed = self._heads(mixed, q_r, k_r, v, info, lc)
        # (B,H,1,d) is (B,1,H*d) at T = 1
        return _linear(mixed.reshape(bsz, nh * d), fw.o_proj, fw.o_bias).view(bsz, 1, -1)

    def _rotate(self, x: torch.Tensor, cos, sin, info: SeqInfo) -> torch.Tensor:
        """RoPE of heads x (B, N, 1, d) at a decoding step: one product with the step's
        :func:`rotation_matrix`, built once per RoPE (``cos``) and shared by its layers."""
        key = ("rotation", id(cos))
        rot = info.memo.get(key)
        if rot is None:
            rot = info.memo[key] = rotation_matrix(cos, sin, self.head_dim)
        b, n, _, d = x.shape
        return torch.bmm(x.reshape(b, n, d), rot).view(b, n, 1, d)

    def _step_reference(self, x, cos, sin, info: SeqInfo, lc: LayerCache) -> torch.Tensor:
        """A decoding step through the modules (the reference of :meth:`_step`)."""
        bsz = x.shape[0]
        q, k, q_r, k_r, v, gate_in = self._project(x, cos, sin)
        if self.keep_local:
            out = self._swa_step(q_r, k_r, v, info, lc)
        elif self.config.gate_mode == "learned" and self.shared:
            out = self._shared_norm(x, q, k, q_r, k_r, v, info, lc)
            out = self._heads(out, q_r, k_r, v, info, lc)
        else:
            out = self._decode(x, q, k, q_r, k_r, v, cos, sin, gate_in, info, lc)
            out = self._heads(out, q_r, k_r, v, info, lc)
        return self.o_proj(out.transpose(1, 2).reshape(bsz, 1, -1))

    def _mlstm(self, x, q, k, q_r, k_r, v, cos, sin, info: SeqInfo, lc: LayerCache | None):
        fq, fk = self._features(q, k, q_r, k_r, cos, sin)
        rep = self.num_heads // self.num_kv
        if rep > 1:
            fk = fk.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        i_pre, f_pre = self._gates(x, info)
        state = lc.mlstm if lc is not None else None
        h, state = _kernel(
            RECOMPUTE_BRANCHES and lc is None, mlstm_forward, fq, fk, v, i_pre, f_pre,
            info.reset, state, backend=self.config.mlstm_backend,
            chunk_size=self.config.chunk_size, compiled=self.step_kernel,
        )  # fmt: skip
        if lc is not None:
            lc.mlstm = state
        return h

    def _full(self, q_r, k_r, v, info: SeqInfo, lc: LayerCache | None) -> torch.Tensor:
        """The teacher's full causal attention; with a cache, every past key is kept (the cache
        of this layer grows with the context, like the teacher's)."""
        if lc is None:  # the teacher's own span (its window, where layer_choice flips a local one)
            plain = info.one_doc and info.all_valid
            return swa_attention(
                q_r, k_r, v, info.reset, info.valid, self.teacher_window, 0, self.scaling,
                "auto", plain=plain,
            )  # fmt: skip
        # The cache holds every key in stream order (key j is token j), so per key it records
        # only the document (int32) and whether it is real: a few bytes beside its K/V.
        doc = info.tokens.doc.int()
        if lc.k is None:
            lc.k, lc.v, lc.doc, lc.ok = k_r, v, doc, info.valid
            if info.cache.seen == 0:
                # A prefill: the function of the mask below without building it (T x T, which
                # keeps SDPA from skipping the masked half: 4x the time of the causal path at 4K).
                return swa_attention(
                    q_r, k_r, v, info.reset, info.valid, None, 0, self.scaling, "auto",
                    plain=info.one_doc and info.all_valid, memo=info.memo,
                )  # fmt: skip
        else:
            lc.append_full(k_r, v, doc, info.valid)
        # Every kept layer and head holds the same tokens: one mask per forward serves them all.
        key = ("full_mask", lc.k.shape[2])
        mask = info.memo.get(key)
        if mask is None:
            idx = torch.arange(lc.k.shape[2], device=k_r.device)
            mask = token_mask(info.tokens, Tokens(idx, lc.doc, None, lc.ok), None, 0)
            info.memo[key] = mask
        return _sdpa(q_r, lc.k, lc.v, mask, self.scaling)

    def _swa(self, q_r, k_r, v, info: SeqInfo, lc: LayerCache | None) -> torch.Tensor:
        if lc is None or lc.k is None:
            return _kernel(
                RECOMPUTE_BRANCHES and lc is None, swa_attention, q_r, k_r, v, info.reset,
                info.valid, self.window, self.num_sinks, self.scaling, self.config.swa_backend,
                plain=info.one_doc and info.all_valid, memo=info.memo,
            )  # fmt: skip
        if q_r.shape[2] == 1:
            return self._swa_step(q_r, k_r, v, info, lc)
        # Several new tokens after a cache: keys = the buffer's + the new ones, one mask for all.
        keys = Tokens(
            *(torch.cat([old, n], dim=1) for old, n in zip(lc.keys(), info.tokens, strict=True))
        )
        mask = token_mask(info.tokens, keys, self.window, self.num_sinks)
        out = _sdpa(
            q_r, torch.cat([lc.k, k_r], dim=2), torch.cat([lc.v, v], dim=2), mask, self.scaling
        )
        self._write_kv(k_r, v, info, lc)
        return out

    def _swa_step(self, q_r, k_r, v, info: SeqInfo, lc: LayerCache) -> torch.Tensor:
        """The SWA branch of one decoding step: the token goes into the buffer, then attends over
        the buffer in place. The step's mask (GQA-folded) is built by the first layer and shared
        by every layer of the same window and sinks (their slots hold the same tokens)."""
        self._write_kv_step(k_r, v, info, lc)
        rep = self.num_heads // self.num_kv
        # The ring fills in stream order: while the stream is shorter than the window, the slots
        # after this token's have never held one (empty, masked out), so they are not read.
        n = self.num_sinks + min(info.cache.seen + 1, self.window)
        key = ("step_mask", self.window, self.num_sinks, rep)
        mask = info.memo.get(key)
        if mask is None:
            keys = lc.keys()
            if n < lc.k.shape[2]:
                keys = Tokens(*(f[..., :n] for f in keys))
            seen = token_mask(info.tokens, keys, self.window, self.num_sinks)  # (B,1,n)
            # Additive, as SDPA turns a boolean mask (in every layer); GQA: the rep query heads
            # of a K/V head are folded into the query length.
            mask = torch.zeros(seen.shape, dtype=q_r.dtype, device=q_r.device)
            mask.masked_fill_(~seen, float("-inf"))
            info.memo[key] = mask = mask[:, None].expand(-1, -1, rep, -1)
        k, v = (lc.k, lc.v) if n == lc.k.shape[2] else (lc.k[:, :, :n], lc.v[:, :, :n])
        bsz, _, _, d = q_r.shape
        return F.scaled_dot_product_attention(
            q_r.reshape(bsz, self.num_kv, rep, d), k, v, attn_mask=mask, scale=self.scaling
        ).reshape(bsz, self.num_heads, 1, -1)

    @torch.no_grad()
    def _write_kv_step(self, k_r, v, info: SeqInfo, lc: LayerCache, k_plain=None) -> None:
        """:meth:`_write_kv` for one decoding step (the slot is known on the host)."""
        assert info.cache is not None
        if self.num_sinks and info.sink_tokens:
            self._write_kv(k_r, v, info, lc, k_plain)
            return
        at, held = self._step_slot(info)
        lc.k.index_copy_(2, at, k_r)
        lc.v.index_copy_(2, at, v)
        if k_plain is not None:
            lc.k_plain.index_copy_(2, at, k_plain)
        lc.held.index_copy_(2, at, held)
        lc.ok.index_copy_(1, at, info.valid)

    def _step_slot(self, info: SeqInfo) -> tuple[torch.Tensor, torch.Tensor]:
        """A decoding step's ring slot (1,) and the token it takes, (B, 3, 1) [index, document,
        position]: the same in every layer of this window and sinks, so built once per step (the
        slot on the device from the step's index: no copy from the host, which would wait on a
        GPU)."""
        key = ("step_slot", self.window, self.num_sinks)
        at = info.memo.get(key)
        if at is None:
            at = info.memo[key] = self.num_sinks + info.abs_idx % self.window
        held = info.memo.get("step_held")
        if held is None:
            held = info.memo["step_held"] = torch.stack(info.tokens[:3], 1)
        return at, held

    @torch.no_grad()
    def _write_kv(self, k_r, v, info: SeqInfo, lc: LayerCache, k_plain=None) -> None:
        """Write the new tokens into the buffer, each once: a sink into its sink slot (the slot of
        its position in the document, overwriting an earlier document's), any other token into
        the ring (the ring slot of a sink reads as empty). ``k_plain``: the keys before RoPE,
        kept in ``lc.k_plain`` in the same slots (rope_on "none" with mix shared_norm)."""
        assert info.cache is not None
        w, s = self.window, self.num_sinks
        info.cache.kv_slots(lc, k_r, s + w, plain=k_plain is not None)
        pairs = [(lc.k, k_r), (lc.v, v)] + ([] if k_plain is None else [(lc.k_plain, k_plain)])
        tok = info.tokens
        t = k_r.shape[2]
        keep = slice(max(0, t - w), t)
        slots = s + info.abs_idx[keep] % w
        sink = tok.ok & (tok.pos < s)  # (B,T)
        for buf, x in pairs:
            buf.index_copy_(2, slots, x[:, :, keep])
        ring = torch.stack([tok.idx.masked_fill(sink, -1), tok.doc, tok.pos], 1)  # (B,3,T)
        lc.held.index_copy_(2, slots, ring[..., keep])
        lc.ok.index_copy_(1, slots, (tok.ok & ~sink)[:, keep])
        if s == 0 or not info.sink_tokens:
            return
        held = torch.stack(tok[:3], 1)
        if info.cache.seen == 0 and info.all_valid and info.one_doc:
            # A stream's first tokens, one document, no padding: the sinks are the first S
            # tokens of every row, in slots 0..S-1 (the host knows it: no per-sink sync).
            n = min(s, t)
            for buf, x in pairs:
                buf[:, :, :n] = x[:, :, :n]
            lc.held[:, :, :n] = held[..., :n]
            lc.ok[:, :n] = True
            return
        for col in sink.any(0).nonzero().flatten().tolist():
            rows = sink[:, col].nonzero().flatten()
            slot = tok.pos[rows, col]
            for buf, x in pairs:
                buf[rows, :, slot] = x[rows, :, col]
            lc.held[rows, :, slot] = held[rows, :, col]
            lc.ok[rows, slot] = True
