"""Packing keeps document boundaries; the mix follows its weights; the cache is keyed right."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from megadistill.data import (
    IGNORE_INDEX,
    DataConfig,
    DataError,
    PackedDataset,
    SourceConfig,
    load_packed,
    prepare_packed,
)
from megadistill.errors import CheckpointError


def _cfg(corpus: dict, tmp_path: Path, **kw) -> DataConfig:
    sources = [
        SourceConfig(path=str(corpus["txt"]), weight=1.0),
        SourceConfig(path=str(corpus["jsonl"]), text_field="content", weight=2.0),
        SourceConfig(path=str(corpus["parquet"]), weight=1.0),
    ]
    return DataConfig(
        **{"sources": sources, "seq_len": 32, "seed": 3, "cache_dir": str(tmp_path / "cache"), **kw}
    )


def _naive_sample(stream: np.ndarray, starts: set[int], i: int, length: int, pad: int) -> tuple:
    """Independent, loop-based statement of the packing rule for sample ``i``."""
    ids, labels, pos = [], [], []
    seg = i * length
    for p in range(i * length, i * length + length):
        if p >= len(stream):
            ids.append(pad)
            labels.append(IGNORE_INDEX)
            pos.append(p - max(seg, len(stream)))
            continue
        if p in starts:
            seg = p
        ids.append(int(stream[p]))
        nxt = p + 1
        labels.append(int(stream[nxt]) if nxt < len(stream) and nxt not in starts else IGNORE_INDEX)
        pos.append(p - seg)
    return ids, labels, pos


def test_packing_keeps_document_boundaries(corpus, tmp_path, byte_tok):
    ds = load_packed(_cfg(corpus, tmp_path), byte_tok)
    stream = np.asarray(ds.tokens)
    starts = ds.doc_starts.tolist()
    eos = byte_tok.eos_token_id
    # every document is its text followed by exactly one EOS, and is one of the sources' documents
    bounds = [*starts, len(stream)]
    all_docs = {d for docs in corpus["docs"].values() for d in docs}
    seen = set()
    for a, b in zip(bounds[:-1], bounds[1:]):
        assert stream[b - 1] == eos and eos not in stream[a : b - 1]
        text = byte_tok.decode(stream[a : b - 1].tolist())
        assert text in all_docs
        seen.add(text)
    assert seen == all_docs  # every document used at least once (num_tokens is null)
    assert len(ds) == -(-(len(stream) - 1) // ds.seq_len)
    for i in range(len(ds)):
        sample = ds[i]
        ids, labels, pos = _naive_sample(stream, set(starts), i, ds.seq_len, ds.pad_id)
        assert sample["input_ids"].tolist() == ids
        assert sample["labels"].tolist() == labels
        assert sample["position_ids"].tolist() == pos
    last = ds[len(ds) - 1]
    assert (last["labels"] == IGNORE_INDEX).any()


def test_mix_follows_token_weights_and_seed(corpus, tmp_path, byte_tok):
    cfg = _cfg(corpus, tmp_path, num_tokens=6000)
    ds = load_packed(cfg, byte_tok)
    stream, bounds = np.asarray(ds.tokens), [*ds.doc_starts.tolist(), len(ds.tokens)]
    share = {"t": 0, "j": 0, "p": 0}
    order = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        text = byte_tok.decode(stream[a : b - 1].tolist())
        share[text[0]] += b - a
        order.append(text)
    total = sum(share.values())
    assert total >= 6000
    for tag, weight in (("t", 0.25), ("j", 0.5), ("p", 0.25)):
        assert abs(share[tag] / total - weight) < 0.02, share
    again = load_packed(cfg, byte_tok)
    assert np.array_equal(np.asarray(again.tokens), stream)
    # num_tokens null: the limiting source (txt) appears exactly once, the other is upsampled
    small = DataConfig(
        sources=[
            SourceConfig(path=str(corpus["txt"])),
            SourceConfig(path=str(corpus["parquet"]), weight=1.3),
        ],
        seq_len=8,
        cache_dir=str(tmp_path / "cache"),
    )
    mixed = load_packed(small, byte_tok)
    starts = mixed.doc_starts.tolist()
    tags = [chr(mixed.tokens[a]) for a in starts]
    assert tags.count("t") == 12 and tags.count("p") > 8
    other = load_packed(_cfg(corpus, tmp_path, num_tokens=6000, seed=4), byte_tok)
    assert other.path != ds.path and not np.array_equal(
        np.asarray(other.tokens)[:500], stream[:500]
    )


def test_heldout_documents_never_in_train(corpus, tmp_path, byte_tok):
    cfg = _cfg(corpus, tmp_path, heldout_fraction=0.2)
    path = prepare_packed(cfg, byte_tok)

    def docs(split: str) -> set[str]:
        ds = PackedDataset(path, split)
        stream, bounds = np.asarray(ds.tokens), [*ds.doc_starts.tolist(), len(ds.tokens)]
        return {byte_tok.decode(stream[a : b - 1].tolist()) for a, b in zip(bounds, bounds[1:])}

    train, held = docs("train"), docs("heldout")
    assert held and not (train & held)
    assert len(held) == math.ceil(0.2 * 12) + math.ceil(0.2 * 20) + math.ceil(0.2 * 8)
    assert train | held == {d for v in corpus["docs"].values() for d in v}


def test_cache_hit_rebuild_and_mismatch(corpus, tmp_path, byte_tok, bpe_tok):
    cfg = _cfg(corpus, tmp_path)
    path = prepare_packed(cfg, byte_tok)
    stamp = (path / "train.tokens.npy").stat().st_mtime_ns
    assert prepare_packed(cfg, byte_tok) == path  # hit: nothing rebuilt
    assert (path / "train.tokens.npy").stat().st_mtime_ns == stamp
    # another tokenizer keys another cache ...
    bpe_path = prepare_packed(cfg, bpe_tok)
    assert bpe_path != path
    assert (
        PackedDataset(bpe_path, tokenizer=bpe_tok).meta["tokenizer_fingerprint"]
        != (PackedDataset(path).meta["tokenizer_fingerprint"])
    )
    # ... and opening a cache with the wrong tokenizer is refused by name
    with pytest.raises(DataError, match="built with tokenizer .* not with the given tokenizer"):
        PackedDataset(path, tokenizer=bpe_tok)
    # changed source content -> new cache
    corpus["txt"].write_text(corpus["txt"].read_text() + "\n\nnew document\n")
    assert prepare_packed(cfg, byte_tok) != path
    # a corrupted cache is detected by its checksums
    with open(path / "train.tokens.npy", "r+b") as fh:
        fh.seek(-3, 2)
        fh.write(b"\x07\x07\x07")
    with pytest.raises(CheckpointError, match="data cache .* is corrupt"):
        PackedDataset(path)
