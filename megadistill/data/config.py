"""Typed config of the training data: sources, their mix weights, packing and the cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megadistill.config import ConfigError

TxtDocuments = Literal["file", "paragraph", "line"]
TokenDtype = Literal["uint16", "uint32"]


@dataclass(kw_only=True)
class SourceConfig:
    """One source of documents: a local file/folder or a Hugging Face dataset name."""

    path: str | None = None
    """Local .txt, .jsonl/.json (one JSON object per line), .parquet (.txt/.jsonl may end in .gz),
    flat token files (.npy/.bin: EOS-separated documents, the OLMo/Dolma layout), a folder of
    such files or a ``datasets.save_to_disk`` folder (text, or ``input_ids`` already tokenised)."""
    hf_name: str | None = None
    """Hugging Face dataset name (needs a reachable hub or the local datasets cache); not with path."""
    hf_config: str | None = None
    """Configuration name of ``hf_name`` (e.g. 'wikitext-2-raw-v1'), or null."""
    weight: float = 1.0
    """Relative share of this source in the mix, counted in tokens (> 0)."""
    text_field: str = "text"
    """Field (jsonl) or column (parquet / datasets) holding the document text."""
    split: str = "train"
    """Split of a Hugging Face dataset or of a saved DatasetDict."""
    txt_documents: TxtDocuments = "paragraph"
    """How a .txt file is cut into documents: the whole 'file', blank-line separated 'paragraph's,
    or one per 'line'."""
    token_dtype: TokenDtype | None = None
    """dtype of headerless token files (OLMo/Dolma write raw uint16/uint32 arrays); a .npy with a
    numpy header carries its own dtype."""

    def __post_init__(self) -> None:
        if (self.path is None) == (self.hf_name is None):
            raise ConfigError(
                "data source needs exactly one of 'path' (a local file or folder) or 'hf_name' "
                f"(a Hugging Face dataset); got path={self.path!r}, hf_name={self.hf_name!r}"
            )
        if not self.weight > 0:
            raise ConfigError(f"data source weight must be > 0, got {self.weight!r}")
        if not self.text_field:
            raise ConfigError("data source text_field must name the text column, e.g. 'text'")

    def describe(self) -> str:
        """Short human name for messages: the path or ``hf:<name>[/<config>]:<split>``."""
        if self.path is not None:
            return self.path
        cfg = f"/{self.hf_config}" if self.hf_config else ""
        return f"hf:{self.hf_name}{cfg}:{self.split}"


@dataclass(kw_only=True)
class DataConfig:
    """Sources, mix, tokenisation/packing and cache settings of one training run."""

    sources: list[SourceConfig]
    """The mix: one or more sources with weights."""
    seq_len: int
    """Tokens per packed training sequence (the model input length)."""
    seed: int = 0
    """Seed of the held-out split, the mix sampling and the per-epoch shuffle."""
    cache_dir: str | None = None
    """Folder of tokenised+packed caches; null means ``$MEGADISTILL_CACHE/data``."""
    heldout_fraction: float = 0.0
    """Fraction of each source's documents kept out of training for evaluation (0 <= f < 1)."""
    num_tokens: int | None = None
    """Tokens in the training mix; null means the smallest mix that uses every document once."""
    add_special_tokens: bool = True
    """Let the tokenizer add its own special tokens per document (e.g. Llama's BOS)."""
    shuffle: bool = True
    """Shuffle packed sequences every epoch (seeded by seed and epoch)."""
    verify_cache: bool = True
    """Check the sha256 manifest of a cache before using it (split across the ranks of a job)."""
    num_proc: int = 1
    """Tokenizer worker processes when building the cache (the output is the same for any
    value; ``megadistill prepare-data`` defaults to the job's CPUs)."""
    shuffle_buffer: int = 8192
    """Documents in each source's seeded shuffle buffer while streaming (see data.sources)."""

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("data.sources is empty: list at least one source (path or hf_name)")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be >= 2, got {self.seq_len}")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ConfigError(
                f"data.heldout_fraction must be in [0, 1), got {self.heldout_fraction}"
            )
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc must be >= 1, got {self.num_proc}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        if self.num_tokens is not None and self.num_tokens < self.seq_len + 1:
            raise ConfigError(
                f"data.num_tokens={self.num_tokens} is less than one sequence "
                f"(seq_len + 1 = {self.seq_len + 1}); raise it or set null"
            )
