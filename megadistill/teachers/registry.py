"""Teacher families: one small adapter each, behind one registry.

An adapter says where the family differs: which transformers modeling module provides its RMSNorm,
MLP and rotary embedding (the student reuses those classes, so RoPE variants, norm numerics and
activations are the teacher's own), where the norms sit, whether q/k are normalised, and which
projections carry a bias. Adding a family is one entry here plus one parity test.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from typing import Any, Literal

import torch

from megadistill.errors import UnsupportedTeacherError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TeacherAdapter:
    """How one teacher family is laid out."""

    model_type: str
    """transformers ``model_type`` of the teacher config."""
    prefix: str
    """Class-name prefix in the modeling module (``Llama`` -> ``LlamaRMSNorm``)."""
    norm_placement: Literal["pre", "post", "sandwich"]
    """``pre``: norm before attention/MLP (Llama); ``post``: norm after, before the residual
    (Olmo2/3); ``sandwich``: both, four norms per layer (Gemma 3: input, post-attention,
    pre-feedforward and post-feedforward)."""
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
    scaled_embedding: bool = False
    """Token embeddings are multiplied by sqrt(hidden_size) in the weights' dtype (Gemma 3's
    ``TextScaledWordEmbedding``, used as it is)."""
    query_pre_attn_scalar: bool = False
    """Attention logits are scaled by ``config.query_pre_attn_scalar ** -0.5`` instead of
    ``head_dim ** -0.5`` (Gemma 3: 256 for head_dim 256, but 168 for the 27B's head_dim 128)."""

    module: str = ""
    """transformers.models package of the family when it is not ``model_type`` (``gemma3``)."""

    def modeling(self) -> Any:
        module = self.module or self.model_type
        return importlib.import_module(f"transformers.models.{module}.modeling_{module}")

    def cls(self, suffix: str) -> type:
        return getattr(self.modeling(), f"{self.prefix}{suffix}")

    def attention_scaling(self, cfg: Any, head_dim: int) -> float:
        """The factor on q.k before the softmax, as the teacher's attention applies it."""
        if self.query_pre_attn_scalar:
            return float(cfg.query_pre_attn_scalar) ** -0.5
        return head_dim**-0.5

    def build_embedding(self, cfg: Any) -> Any:
        """The teacher's token embedding module (weight ``embed_tokens.weight`` either way)."""
        pad = getattr(cfg, "pad_token_id", None)
        if self.scaled_embedding:
            cls = self.cls("TextScaledWordEmbedding")
            return cls(cfg.vocab_size, cfg.hidden_size, pad, embed_scale=cfg.hidden_size**0.5)
        return torch.nn.Embedding(cfg.vocab_size, cfg.hidden_size, pad)

    def refusal(self, cfg: Any) -> str | None:
        """Why this config of the family cannot be reproduced exactly (None: it can)."""
        for field, why in _REFUSED_FIELDS.get(self.model_type, ()):
            if getattr(cfg, field, None):
                return f"{field}={getattr(cfg, field)!r}: {why}"
        return None

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
        TeacherAdapter("gemma3_text", "Gemma3", "sandwich", "head", "attention_bias",
                       "attention_bias", rope_per_layer_type=True, sliding="layer_types",
                       scaled_embedding=True, query_pre_attn_scalar=True, module="gemma3"),
    )
}
# Config fields that, when set (truthy), change what a family computes in a way the student does
# not reproduce: the config is refused naming the field. Released Gemma 3 checkpoints set none.
_REFUSED_FIELDS: dict[str, tuple[tuple[str, str], ...]] = {
    "gemma3_text": (
        ("attn_logit_softcapping", "tanh soft-capping of the attention logits is not in the "
         "student's attention kernels (SDPA, FlexAttention, shared_norm, the mLSTM); Gemma 3 "
         "checkpoints ship it as null (Gemma 2 used 50.0)"),
        ("final_logit_softcapping", "tanh soft-capping of the output logits is not in the "
         "student's LM head nor in the chunked distillation losses; Gemma 3 checkpoints ship "
         "it as null"),
        ("use_bidirectional_attention", "bidirectional attention (EmbeddingGemma) is not a "
         "causal language model; the student is causal"),
    ),
}
# Families the student cannot reproduce exactly yet, with the reason (named in the error).
REFUSED: dict[str, str] = {
    "gemma3": (
        "this is a multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration: vision tower + "
        "language model, whose weights are nested under the language model); convert a text-only Gemma 3 "
        "(model_type gemma3_text, e.g. google/gemma-3-1b-pt), or save the language model of "
        "this one as a Gemma3ForCausalLM folder (its text_config) and convert that"
    ),
}
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
        adapter = ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedTeacherError(
            f"teacher architecture '{model_type}' is not supported; supported model types: "
            f"{', '.join(supported_families())}. Adding one is an adapter in "
            "megadistill/teachers/registry.py plus a parity test."
        ) from None
    if adapter.rope_per_layer_type and _transformers_major() < 5:
        import transformers

        raise UnsupportedTeacherError(
            f"teacher architecture '{model_type}' needs transformers >= 5 (RoPE per layer type); "
            f"found {transformers.__version__}: pip install -U 'transformers>=5'"
        )
    return adapter


def import_modeling(model_type: str) -> None:
    """Import the family's transformers modeling module now, outside any ``deepspeed.zero.Init``.

    A module first imported *inside* ``zero.Init`` defines its classes while DeepSpeed wraps
    every new ``nn.Module`` subclass's ``__init__``; on exit DeepSpeed restores the ``__init__`` it
    saved at class creation, undoing any class decorator that wrapped ``__init__`` afterwards.
    transformers >= 5.25 decorates the attention classes of Llama, Qwen2/3, Mistral and Gemma 3
    with ``kernels.use_kernelized_func``, whose wrapped ``__init__`` sets ``_kernel_funcs``: a
    teacher built after such an import fails at its first forward (``'LlamaAttention' object has
    no attribute '_kernel_funcs'``). Unknown families are left to :func:`adapter_for`'s error.
    """
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        return
    try:
        adapter.modeling()
    except ImportError:  # an older transformers without the family: refused at conversion/load
        log.debug("no modeling module for %s in this transformers", model_type)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])
