"""The teacher the benchmarks use: a random one of a given size, a real HF folder, or random
weights with a real model's config (``teacher=gemma3_270m``: the configs in ``bench/configs``,
or any config.json; speed does not depend on the weights' values, and no hub is needed)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megadistill.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BENCH_CONFIGS = Path(__file__).parent / "configs"


def bench_configs() -> dict[str, Path]:
    """Real small teachers' configs shipped for the benchmarks, by name (no weights)."""
    return {p.stem: p for p in sorted(BENCH_CONFIGS.glob("*.json"))}


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
    teacher: str = ""
    """A real teacher instead of the random one: a Hugging Face folder of a supported family,
    ``smollm2`` (the demo's cached SmolLM2-135M-Instruct), or a config with random weights (a
    config.json, or the name of one in ``bench/configs``: ``gemma3_270m``, ``qwen25_0p5b``).
    The size fields are then ignored."""
    dtype: str = "float32"
    """Weights and activations: float32, bfloat16 or float16."""
    threads: int = 0
    """torch threads per process (0: leave torch's default)."""

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                "hidden_size must divide by num_heads and num_heads by num_kv_heads; got "
                f"{self.hidden_size}, {self.num_heads}, {self.num_kv_heads}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not one of {tuple(DTYPES)}")
        if self.threads < 0:
            raise ConfigError(f"threads must be >= 0, got {self.threads}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def teacher_path(self) -> Path | None:
        """The real teacher's folder (None: the random teacher); ``smollm2`` is fetched/cached."""
        if not self.teacher:
            return None
        if self.teacher == "smollm2":
            from megadistill.assets import smollm2_teacher

            return smollm2_teacher()
        shipped = bench_configs()
        if self.teacher in shipped:
            return shipped[self.teacher]
        path = Path(self.teacher).expanduser()
        if path.is_file() and path.suffix == ".json":
            return path
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"teacher={self.teacher}: no config.json there; give a Hugging Face model folder, "
                f"a config.json, 'smollm2' or one of {', '.join(shipped)}"
            )
        return path

    def load_teacher(self, max_positions: int, **extra: Any):
        """The teacher model (eval mode, ``dtype``, SDPA attention): the real folder's weights, or
        random weights (seed 0) of a config.json or of the configured size (``extra`` overrides
        fields of the latter, as in :meth:`teacher_config`)."""
        from transformers import AutoModelForCausalLM

        path = self.teacher_path()
        if path is not None and path.is_dir():
            return AutoModelForCausalLM.from_pretrained(
                path, dtype=self.torch_dtype, attn_implementation="sdpa"
            ).eval()
        if path is not None:
            from megadistill.teachers.conversion import load_teacher_config

            tcfg = load_teacher_config(path)
        else:
            tcfg = self.teacher_config(max_positions, **extra)
        torch.manual_seed(0)
        teacher = AutoModelForCausalLM.from_config(tcfg, attn_implementation="sdpa")
        return teacher.to(self.torch_dtype).eval()

    def max_positions(self) -> int | None:
        """The real teacher's ``max_position_embeddings`` (None for the random teacher)."""
        path = self.teacher_path()
        if path is None:
            return None
        from megadistill.teachers.conversion import load_teacher_config

        return getattr(load_teacher_config(path), "max_position_embeddings", None)

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
