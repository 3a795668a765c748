"""The student's Hugging Face config: the teacher's config plus the hybrid settings."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from megadistill.model.mlstm import MLSTM_BACKENDS
from megadistill.model.swa import SWA_BACKENDS

GATE_MODES = ("learned", "swa", "mlstm")
ROPE_ON = ("input", "features")
FEATURE_MAPS = ("hedgehog", "hedgehog_pm")
MIXES = ("gate", "shared_norm")
LOCAL_LAYERS = ("hybrid", "swa")
DEFAULT_LOCAL_LAYERS = "swa"
HYBRID_KEYS = (
    "window",
    "num_sinks",
    "gate_mode",
    "mlstm_backend",
    "swa_backend",
    "chunk_size",
    "feature_dim",
    "rope_on",
    "feature_map",
    "fgate_bias",
    "softmax_layers",
    "mix",
    "local_layers",
)
# Teacher attributes mirrored at top level so generation, lm-eval and DeepSpeed see a normal LM.
_MIRRORED = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "initializer_range",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)


class HybridConfig(PretrainedConfig):
    """Config of a hybrid mLSTM + SWA student.

    Args:
        teacher_config: the teacher's full config dict (``model_type`` included); the student
            reuses its norms, MLP and RoPE settings.
        window: sliding-window length W of the softmax branch.
        num_sinks: number of sink tokens (first tokens of each document) every query sees.
        gate_mode: ``learned`` (per-head sigmoid gate), ``swa`` (gate fixed to the softmax branch;
            with W >= length the student equals the teacher) or ``mlstm``.
        mlstm_backend: one of ``chunkwise`` (default), ``recurrent``, ``native``, ``triton``.
        swa_backend: one of ``auto``, ``reference``, ``blocked``, ``flex``.
        chunk_size: chunk length of the chunkwise mLSTM.
        feature_dim: output size of the Hedgehog feature maps (default: head_dim).
        rope_on: ``input`` applies the feature map to RoPE'd q/k; ``features`` applies RoPE to
            the feature-mapped q/k (then feature_dim must equal head_dim; allows folding the
            feature map into W_q/W_k when the teacher has no q/k norm).
        feature_map: ``hedgehog`` (softmax(xW), feature_dim features) or ``hedgehog_pm``
            ([softmax(xW), softmax(-xW)], 2 * feature_dim features; Hedgehog/LoLCATs' form).
        fgate_bias: (low, high) of the forget-gate biases at initialisation, spread linearly over
            the heads; sigmoid(b) = 1 - 1/(1 + e^b), so memory spans ~e^b tokens.
        softmax_layers: layers kept as the teacher's full softmax attention (no mLSTM, no window;
            their decoding cache grows with the context). Empty by default (the paper's setting).
        mix: how the branches combine with ``gate_mode='learned'``: ``gate`` (the paper's
            per-head sigmoid gate between the two normalised outputs) or ``shared_norm`` (exact
            softmax inside the window, the mLSTM's keys beyond it, one normaliser; see
            ``model/shared_norm.py``).
        local_layers: what a layer becomes where the teacher attends to a sliding window of W_t
            tokens (Mistral, Olmo3's and Gemma 3's local layers, ...): ``swa`` (default) keeps
            the teacher's own sliding-window attention (exact, no new parameters, a W_t-slot
            cache) or ``hybrid`` makes it a hybrid layer whose softmax branch has window
            min(W, W_t) and no sinks and whose stage I target is the teacher's windowed
            attention (README: "Sliding-window teachers"). A config saved before this setting
            existed loads as ``hybrid``, as it was converted.
    """

    model_type = "megadistill_hybrid"

    def __init__(
        self,
        teacher_config: dict[str, Any] | None = None,
        window: int = 512,
        num_sinks: int = 4,
        gate_mode: str = "learned",
        mlstm_backend: str = "chunkwise",
        swa_backend: str = "auto",
        chunk_size: int = 64,
        feature_dim: int | None = None,
        rope_on: str = "input",
        feature_map: str = "hedgehog",
        fgate_bias: tuple[float, float] | list[float] = (3.0, 6.0),
        softmax_layers: tuple[int, ...] | list[int] = (),
        mix: str = "gate",
        local_layers: str | None = None,
        **kwargs: Any,
    ) -> None:
        teacher_config = dict(teacher_config or {})
        self.teacher_config = teacher_config
        self.window = int(window)
        self.num_sinks = int(num_sinks)
        self.gate_mode = gate_mode
        self.mlstm_backend = mlstm_backend
        self.swa_backend = swa_backend
        self.chunk_size = int(chunk_size)
        self.rope_on = rope_on
        self.feature_map = feature_map
        self.fgate_bias = [float(b) for b in fgate_bias]
        self.softmax_layers = sorted(int(i) for i in softmax_layers)
        self.mix = mix
        if local_layers is None:
            # A config saved before this setting existed (it has a transformers_version but no
            # local_layers) was converted with hybrid local layers: load it as it was made.
            saved = "transformers_version" in kwargs
            local_layers = "hybrid" if saved else DEFAULT_LOCAL_LAYERS
        self.local_layers = local_layers
        for key in _MIRRORED:
            if key in teacher_config and key not in kwargs:
                kwargs[key] = teacher_config[key]
        kwargs.setdefault("tie_word_embeddings", teacher_config.get("tie_word_embeddings", False))
        super().__init__(**kwargs)
        for key in _MIRRORED:
            if key in teacher_config and not hasattr(self, key):
                setattr(self, key, teacher_config[key])
        head_dim = teacher_config.get("head_dim") or (
            teacher_config["hidden_size"] // teacher_config["num_attention_heads"]
            if teacher_config
            else 0
        )
        self.head_dim = head_dim
        self.feature_dim = int(feature_dim) if feature_dim else head_dim
        self.validate_hybrid()

    def validate_hybrid(self) -> None:
        """Raise ValueError naming the bad hybrid setting and its valid values."""
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.num_sinks < 0:
            raise ValueError(f"num_sinks must be >= 0, got {self.num_sinks}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")
        for key, choices in (
            ("gate_mode", GATE_MODES),
            ("mlstm_backend", MLSTM_BACKENDS),
            ("swa_backend", SWA_BACKENDS),
            ("rope_on", ROPE_ON),
            ("feature_map", FEATURE_MAPS),
            ("mix", MIXES),
            ("local_layers", LOCAL_LAYERS),
        ):
            if getattr(self, key) not in choices:
                raise ValueError(f"{key}={getattr(self, key)!r} is not one of {choices}")
        if self.rope_on == "features" and self.feature_dim != self.head_dim:
            raise ValueError(
                f"rope_on='features' needs feature_dim == head_dim ({self.head_dim}), "
                f"got {self.feature_dim}"
            )
        if self.mix == "shared_norm" and self.rope_on != "input":
            raise ValueError("mix='shared_norm' needs rope_on='input'")
        if self.rope_on == "features" and self.feature_map != "hedgehog":
            raise ValueError("rope_on='features' needs feature_map='hedgehog'")
        if len(self.fgate_bias) != 2 or self.fgate_bias[0] > self.fgate_bias[1]:
            raise ValueError(
                f"fgate_bias must be [low, high] with low <= high, got {self.fgate_bias}"
            )
        num_layers = self.teacher_config.get("num_hidden_layers")
        bad = [i for i in self.softmax_layers if i < 0 or (num_layers and i >= num_layers)]
        if bad or len(set(self.softmax_layers)) != len(self.softmax_layers):
            raise ValueError(
                f"softmax_layers={self.softmax_layers}: each must be a distinct layer index in "
                f"[0, {num_layers})"
            )

    @property
    def mlstm_feature_dim(self) -> int:
        """Size of the feature-mapped q/k that the mLSTM sees."""
        return self.feature_dim * (2 if self.feature_map == "hedgehog_pm" else 1)

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoConfig") -> None:
        """No-op: a student folder ships the shims of :mod:`megadistill.model.remote_code`, never
        a copy of this module (transformers calls this after a ``trust_remote_code`` load)."""
        del auto_class

    def teacher(self) -> PretrainedConfig:
        """The teacher's config object (for its norm/MLP/rotary classes)."""
        if not self.teacher_config:
            raise ValueError("HybridConfig has no teacher_config; build it with from_teacher()")
        data = dict(self.teacher_config)
        return AutoConfig.for_model(data.pop("model_type"), **data)

    @classmethod
    def from_teacher(cls, teacher: PretrainedConfig, **hybrid: Any) -> HybridConfig:
        """Student config for a teacher config, with hybrid settings (see class docstring)."""
        unknown = sorted(set(hybrid) - set(HYBRID_KEYS))
        if unknown:
            raise ValueError(
                f"unknown hybrid setting '{unknown[0]}'; valid settings: {', '.join(HYBRID_KEYS)}"
            )
        data = teacher.to_dict()
        data["model_type"] = teacher.model_type
        for drop in ("architectures", "auto_map", "quantization_config", "transformers_version"):
            data.pop(drop, None)
        return cls(teacher_config=data, **hybrid)
