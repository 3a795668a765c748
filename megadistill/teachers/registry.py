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


ADAPTERS: dict[str, TeacherAdapter] = {
    a.model_type: a
    for a in (
        TeacherAdapter("llama", "Llama", "pre", "none", "attention_bias", "attention_bias"),
        TeacherAdapter("mistral", "Mistral", "pre", "none", "never", "never"),
        TeacherAdapter("qwen2", "Qwen2", "pre", "none", "always", "never"),
        TeacherAdapter("qwen3", "Qwen3", "pre", "head", "attention_bias", "attention_bias"),
        TeacherAdapter("olmo2", "Olmo2", "post", "full", "attention_bias", "attention_bias"),
        TeacherAdapter("olmo3", "Olmo3", "post", "full", "attention_bias", "attention_bias", True),
    )
}


def supported_families() -> list[str]:
    """Model types that can be converted."""
    return sorted(ADAPTERS)


def adapter_for(model_type: str) -> TeacherAdapter:
    """The adapter for a teacher ``model_type``; a clear error lists the supported ones."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedTeacherError(
            f"teacher architecture '{model_type}' is not supported; supported model types: "
            f"{', '.join(supported_families())}. Adding one is an adapter in "
            "megadistill/teachers/registry.py plus a parity test."
        ) from None
