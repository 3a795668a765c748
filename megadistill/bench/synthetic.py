"""The random teacher both benchmarks build: its size fields and its transformers config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megadistill.config import ConfigError


@dataclass(kw_only=True)
class SyntheticModelConfig:
    """Size of a random teacher (throughput does not depend on the weights' values)."""

    family: str = "llama"
    """Teacher family of the synthetic model."""
    hidden_size: int = 256
    """Model width."""
    intermediate_size: int = 0
    """MLP width (0: 4 x hidden_size)."""
    num_layers: int = 4
    """Decoder layers."""
    num_heads: int = 4
    """Query heads (head_dim = hidden_size / num_heads)."""
    num_kv_heads: int = 2
    """Key/value heads."""
    vocab_size: int = 4096
    """Vocabulary size."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "hidden_size must divide by num_heads and num_heads by num_kv_heads; got "
                f"{self.hidden_size}, {self.num_heads}, {self.num_kv_heads}"
            )

    def teacher_config(self, max_positions: int, **extra: Any):
        """The transformers config of this size (``extra`` overrides any other field)."""
        from megadistill.teachers.tiny import tiny_teacher_config

        return tiny_teacher_config(
            self.family,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size or 4 * self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            vocab_size=self.vocab_size,
            max_position_embeddings=max_positions,
            head_dim=self.hidden_size // self.num_heads,
            **extra,
        )
