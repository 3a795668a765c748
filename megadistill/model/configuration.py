"""The student's Hugging Face config: the teacher's config plus the hybrid settings."""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, PretrainedConfig

from megadistill.config import from_dict
from megadistill.hybrid import HYBRID_KEYS, HybridSettings
from megadistill.teachers.registry import import_modeling

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
    """Config of a hybrid mLSTM + SWA student: the teacher's config plus the hybrid settings.

    Args:
        teacher_config: the teacher's full config dict (``model_type`` included); the student
            reuses its norms, MLP and RoPE settings.
        **kwargs: the hybrid settings (the fields of :class:`HybridSettings`, stored flat, as in
            ``config.json``) and ``PretrainedConfig``'s own keys. ``feature_dim`` None becomes
            the teacher's head_dim.
    """

    model_type = "megadistill_hybrid"

    def __init__(self, teacher_config: dict[str, Any] | None = None, **kwargs: Any) -> None:
        teacher_config = dict(teacher_config or {})
        self.teacher_config = teacher_config
        # Before any model of this config is built (perhaps inside deepspeed.zero.Init): see
        # import_modeling for what a first import inside zero.Init breaks.
        import_modeling(teacher_config.get("model_type", ""))
        given = {k: kwargs.pop(k) for k in HYBRID_KEYS if k in kwargs}
        if given.get("local_layers") is None and "transformers_version" in kwargs:
            # a config saved before `local_layers` existed (it has a transformers_version but no
            # local_layers) was converted with hybrid local layers: load it as it was made
            given["local_layers"] = "hybrid"
        if given.get("gate_init") is None and "transformers_version" in kwargs:
            given["gate_init"] = "half"  # likewise: saved before the floor-equal gate existed
        if given.get("rope_on") is None and "transformers_version" in kwargs:
            given["rope_on"] = "input"  # likewise: saved before position-free feature maps
        given = {k: v for k, v in given.items() if v is not None or k == "feature_dim"}
        settings = from_dict(HybridSettings, given)
        for key, value in settings.to_dict().items():
            setattr(self, key, value)
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
        self.feature_dim = settings.feature_dim or head_dim
        self.validate_hybrid()

    @property
    def hybrid_settings(self) -> HybridSettings:
        """The hybrid settings of this student (``feature_dim`` resolved)."""
        return HybridSettings(**{key: getattr(self, key) for key in HYBRID_KEYS})

    def validate_hybrid(self) -> None:
        """Raise ValueError naming the bad hybrid setting: the checks that need the teacher (the
        rest are :class:`HybridSettings`')."""
        if self.rope_on == "features" and self.feature_dim != self.head_dim:
            raise ValueError(
                f"rope_on='features' needs feature_dim == head_dim ({self.head_dim}), "
                f"got {self.feature_dim}"
            )
        dims = (self.mlstm_feature_dim, self.head_dim)
        if self.mlstm_backend == "triton" and self.head_dim and min(dims) < 16:
            raise ValueError(
                "mlstm_backend='triton' needs feature_dim and head_dim >= 16 (a GPU's tl.dot), "
                f"got {dims[0]} and {dims[1]}; use mlstm_backend='chunkwise'"
            )
        num_layers = self.teacher_config.get("num_hidden_layers")
        bad = [i for i in self.softmax_layers if i < 0 or (num_layers and i >= num_layers)]
        if bad or len(set(self.softmax_layers)) != len(self.softmax_layers):
            raise ValueError(
                f"softmax_layers={self.softmax_layers}: each must be a distinct layer index in "
                f"[0, {num_layers})"
            )
        num_kv = self.teacher_config.get("num_key_value_heads") or self.teacher_config.get(
            "num_attention_heads"
        )
        bad = [p for p in self.softmax_heads if (num_layers and p[0] >= num_layers)
               or (num_kv and p[1] >= num_kv)]  # fmt: skip
        if bad:
            raise ValueError(
                f"softmax_heads {bad}: each must be [layer, kv_head] with layer in "
                f"[0, {num_layers}) and kv_head in [0, {num_kv}) (the teacher's key/value heads)"
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
        """Student config for a teacher config, with hybrid settings (the fields of
        :class:`HybridSettings`; an unknown name is an error listing the valid ones)."""
        from_dict(HybridSettings, hybrid)
        data = teacher.to_dict()
        data["model_type"] = teacher.model_type
        for drop in ("architectures", "auto_map", "quantization_config", "transformers_version"):
            data.pop(drop, None)
        return cls(teacher_config=data, **hybrid)
