"""Teacher families: one small adapter each, behind one registry.

An adapter says where the family differs: which transformers modeling module provides its RMSNorm,
MLP and rotary embedding (the student reuses those classes, so RoPE variants, norm numerics and
activations are the teacher's own), where the norms sit, whether q/k are normalised, and which
projections carry a bias. Adding a family is one entry here plus one parity test.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from megadistill.errors import UnsupportedTeacherError


@dataclass(frozen=True)
class TeacherAdapter:
    """How one teacher family is laid out."""

    model_type: str
    """transformers ``model_type`` of the teacher config."""
    prefix: str
    """Class-name prefix in the modeling module (``Llama`` -> ``LlamaRMSNorm``)."""
    norm_placement: Literal["pre", "post"]
    """``pre``: norm before attention/MLP (Llama); ``post``: norm after, before the residual (Olmo2/3)."""
    qk_norm: Literal["none", "head", "full"]
    """RMSNorm on q/k: none, per head over head_dim (Qwen3), or over the whole projection (Olmo2/3)."""
    qkv_bias: Literal["attention_bias", "always", "never"]
    """Bias on q/k/v projections: follow ``config.attention_bias``, always (Qwen2) or never."""
    o_bias: Literal["attention_bias", "never"]
    """Bias on o_proj."""
    rope_per_layer_type: bool = False
    """The rotary embedding takes the layer type (Olmo3: different RoPE for sliding layers)."""
    fused_qkv: bool = False
    """q/k/v come from one ``qkv_proj`` (Phi-3), split as [q | k | v]; the student keeps it."""
    moe: Literal["none", "qwen3_moe"] = "none"
    """The MLP is a mixture of experts in the layers the family's rule picks (Qwen3-MoE: not in
    ``mlp_only_layers``, every ``decoder_sparse_step``-th); the student keeps it untouched."""
    sliding: Literal["none", "all_layers", "layer_types"] = "none"
    """Where the teacher's attention is a sliding window of ``config.sliding_window`` tokens: in
    no layer (Llama, Olmo2), in every layer when the config sets it (Mistral), or in the layers
    that ``config.layer_types`` marks ``sliding_attention`` (Qwen2/3, Olmo3), as its mask does."""

    def modeling(self) -> Any:
        return importlib.import_module(
            f"transformers.models.{self.model_type}.modeling_{self.model_type}"
        )

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling(), f"{self.prefix}{suffix}")

    def has_qkv_bias(self, cfg: Any) -> bool:
        if self.qkv_bias == "attention_bias":
            return bool(getattr(cfg, "attention_bias", False))
        return self.qkv_bias == "always"

    def has_o_bias(self, cfg: Any) -> bool:
        return self.o_bias == "attention_bias" and bool(getattr(cfg, "attention_bias", False))

    def build_mlp(self, cfg: Any, layer_idx: int) -> Any:
        """The teacher's own MLP module of layer ``layer_idx`` (dense or mixture of experts)."""
        if self.moe == "qwen3_moe":
            sparse = (
                layer_idx not in (cfg.mlp_only_layers or [])
                and cfg.num_experts > 0
                and (layer_idx + 1) % cfg.decoder_sparse_step == 0
            )
            if sparse:
                return self.cls("SparseMoeBlock")(cfg)
            return self.cls("MLP")(cfg, intermediate_size=cfg.intermediate_size)
        return self.cls("MLP")(cfg)

    def teacher_window(self, cfg: Any, layer_idx: int) -> int | None:
        """The teacher's attention window in layer ``layer_idx`` (query i sees keys j with
        ``i - j < window``, as transformers' sliding-window mask); None for full causal."""
        window = getattr(cfg, "sliding_window", None)
        if self.sliding == "none" or window is None:
            return None
        if self.sliding == "layer_types":
            types = getattr(cfg, "layer_types", None)
            if not types or types[layer_idx] != "sliding_attention":
                return None
        return int(window)


# fmt: off
ADAPTERS: dict[str, TeacherAdapter] = {
    a.model_type: a
    for a in (
        TeacherAdapter("llama", "Llama", "pre", "none", "attention_bias", "attention_bias"),
        TeacherAdapter("mistral", "Mistral", "pre", "none", "never", "never", sliding="all_layers"),
        TeacherAdapter("qwen2", "Qwen2", "pre", "none", "always", "never", sliding="layer_types"),
        TeacherAdapter("qwen3", "Qwen3", "pre", "head", "attention_bias", "attention_bias",
                       sliding="layer_types"),
        TeacherAdapter("olmo2", "Olmo2", "post", "full", "attention_bias", "attention_bias"),
        TeacherAdapter("olmo3", "Olmo3", "post", "full", "attention_bias", "attention_bias",
                       rope_per_layer_type=True, sliding="layer_types"),
        TeacherAdapter("phi3", "Phi3", "pre", "none", "never", "never", fused_qkv=True,
                       sliding="all_layers"),
        TeacherAdapter("qwen3_moe", "Qwen3Moe", "pre", "head", "attention_bias",
                       "attention_bias", moe="qwen3_moe", sliding="all_layers"),
    )
}
# Families the student cannot reproduce exactly yet, with the reason (named in the error).
REFUSED: dict[str, str] = {
    "gemma3_text": (
        "Gemma 3 needs query_pre_attn_scalar scaling, sandwich norms (pre/post attention and MLP), "
        "(1 + weight) RMSNorm and sqrt(hidden)-scaled embeddings in the student's layer code, "
        "which it does not have yet"
    ),
}
REFUSED["gemma3"] = REFUSED["gemma3_text"]
# fmt: on


def supported_families() -> list[str]:
    """Model types that can be converted."""
    return sorted(ADAPTERS)


def adapter_for(model_type: str) -> TeacherAdapter:
    """The adapter for a teacher ``model_type``; a clear error lists the supported ones."""
    if model_type in REFUSED:
        raise UnsupportedTeacherError(
            f"teacher architecture '{model_type}' is not supported: {REFUSED[model_type]}; "
            f"supported model types: {', '.join(supported_families())}"
        )
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedTeacherError(
            f"teacher architecture '{model_type}' is not supported; supported model types: "
            f"{', '.join(supported_families())}. Adding one is an adapter in "
            "megadistill/teachers/registry.py plus a parity test."
        ) from None
