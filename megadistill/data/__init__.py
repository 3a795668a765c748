"""Data: sources and mixes, tokenise + pack with document boundaries, cache, rank sharding,
and the per-document attention mask a packed Hugging Face teacher needs.

Entry point: :func:`build_loader` (see :mod:`megadistill.data.packing` for the exact layout of
samples, labels and position ids, and :mod:`megadistill.data.sampler` for the sharding rule).
"""

from megadistill.data.config import DataConfig, SourceConfig
from megadistill.data.errors import DataError
from megadistill.data.loader import DistillLoader, build_loader
from megadistill.data.masks import document_causal_mask, document_ids
from megadistill.data.packing import (
    IGNORE_INDEX,
    PackedDataset,
    load_packed,
    prepare_packed,
    tokenizer_fingerprint,
)
from megadistill.data.sampler import PAD_SAMPLE, ShardedSampler

__all__ = [
    "IGNORE_INDEX",
    "PAD_SAMPLE",
    "DataConfig",
    "DataError",
    "DistillLoader",
    "PackedDataset",
    "ShardedSampler",
    "SourceConfig",
    "build_loader",
    "document_causal_mask",
    "document_ids",
    "load_packed",
    "prepare_packed",
    "tokenizer_fingerprint",
]
