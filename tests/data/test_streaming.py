"""Preparation at scale: a budget reads only a prefix, workers do not change the output, and
pre-tokenised corpora (flat token files, tokenised datasets folders) mix with text sources."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megadistill.data import DataConfig, DataError, PackedDataset, SourceConfig, prepare_packed
from tests.data.conftest import make_docs


def _docs_of(path: Path, split: str, tok) -> list[str]:
    ds = PackedDataset(path, split)
    stream, bounds = np.asarray(ds.tokens), [*ds.doc_starts.tolist(), len(ds.tokens)]
    return [tok.decode(stream[a : b - 1].tolist()) for a, b in zip(bounds, bounds[1:])]


def test_budget_reads_only_a_prefix_of_a_large_source(tmp_path, byte_tok):
    # 20k good documents, then lines that are not JSON: reading them would fail the build
    good = make_docs(20_000, 5, "g")
    with open(tmp_path / "big.jsonl", "w") as fh:
        fh.writelines(json.dumps({"text": d}) + "\n" for d in good)
        fh.writelines("this line is not JSON\n" for _ in range(20_000))
    for num_proc in (1, 2):
        cfg = DataConfig(
            sources=[SourceConfig(path=str(tmp_path / "big.jsonl"))],
            seq_len=32,
            num_tokens=3000,
            heldout_fraction=0.1,
            shuffle_buffer=64,
            num_proc=num_proc,
            cache_dir=str(tmp_path / f"cache{num_proc}"),
        )
        path = prepare_packed(cfg, byte_tok)
        meta = PackedDataset(path).meta
        source = meta["sources"][0]
        assert not source["read_whole"]
        # read: the budget (~3000 / ~100 tokens per document) plus the documented look-ahead
        assert source["documents_read"] < 3000 / 20 / 0.9 + 1
        train = meta["splits"]["train"]["tokens"]
        assert 3000 <= train < 3000 + 200  # at most one document over the budget
        assert set(_docs_of(path, "train", byte_tok)) <= set(good)
        held = _docs_of(path, "heldout", byte_tok)
        assert len(held) == source["heldout_documents"] >= 1
        assert not set(held) & set(_docs_of(path, "train", byte_tok))
    with pytest.raises(DataError, match="big.jsonl: line 20001 is not JSON"):
        prepare_packed(
            DataConfig(
                sources=[SourceConfig(path=str(tmp_path / "big.jsonl"))],
                seq_len=32,
                cache_dir=str(tmp_path / "all"),
            ),
            byte_tok,
        )  # num_tokens null reads everything once


def test_output_identical_for_one_and_two_workers(corpus, tmp_path, bpe_tok):
    sources = [
        SourceConfig(path=str(corpus["txt"])),
        SourceConfig(path=str(corpus["jsonl"]), text_field="content", weight=2.0),
        SourceConfig(path=str(corpus["parquet"])),
    ]
    big = tmp_path / "big.txt"
    big.write_text("\n".join(make_docs(3000, 9, "b")) + "\n")
    sources.append(SourceConfig(path=str(big), txt_documents="line", weight=3.0))
    for num_tokens in (None, 40_000):
        built = []
        for num_proc in (1, 2):
            cfg = DataConfig(
                sources=sources,
                seq_len=16,
                seed=7,
                num_tokens=num_tokens,
                heldout_fraction=0.1,
                shuffle_buffer=100,
                num_proc=num_proc,
                cache_dir=str(tmp_path / f"c{num_proc}"),
            )
            built.append(prepare_packed(cfg, bpe_tok))
        assert built[0].name == built[1].name  # num_proc is not part of the cache key
        for name in ("train.tokens.npy", "train.doc_starts.npy", "heldout.tokens.npy"):
            assert (built[0] / name).read_bytes() == (built[1] / name).read_bytes(), name


def _write_tokens(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for d in docs:
        ids += [*tok(d)["input_ids"], tok.eos_token_id]
    return ids


def test_pretokenised_sources_mix_with_text(corpus, tmp_path, byte_tok):
    import datasets

    a, b, c = make_docs(30, 11, "u"), make_docs(25, 12, "v"), make_docs(10, 13, "w")
    np.asarray(_write_tokens(byte_tok, a), dtype=np.uint16).tofile(tmp_path / "a.npy")  # raw
    np.save(tmp_path / "b.npy", np.asarray(_write_tokens(byte_tok, b), dtype=np.uint32))
    rows = [byte_tok(d)["input_ids"] for d in c]
    datasets.Dataset.from_dict({"input_ids": rows}).save_to_disk(str(tmp_path / "c_ds"))
    sources = [
        SourceConfig(path=str(tmp_path / "a.npy"), token_dtype="uint16"),
        SourceConfig(path=str(tmp_path / "b.npy")),
        SourceConfig(path=str(tmp_path / "c_ds")),
        SourceConfig(path=str(corpus["txt"])),
    ]
    cfg = DataConfig(sources=sources, seq_len=16, cache_dir=str(tmp_path / "cache"))
    path = prepare_packed(cfg, byte_tok)
    got = _docs_of(path, "train", byte_tok)
    assert set(got) == set(a) | set(b) | set(c) | set(corpus["docs"]["txt"])
    # a headerless file needs its dtype, named in the error
    with pytest.raises(DataError, match="a.npy: a token file without a numpy header; set token_dt"):
        prepare_packed(
            DataConfig(
                sources=[SourceConfig(path=str(tmp_path / "a.npy"))],
                seq_len=16,
                cache_dir=str(tmp_path / "x"),
            ),
            byte_tok,
        )


def test_token_ids_beyond_the_vocabulary_name_the_file(tmp_path, byte_tok):
    ids = _write_tokens(byte_tok, make_docs(5, 1, "x"))
    ids[40] = 300  # the byte tokenizer has 256 ids
    folder = tmp_path / "olmo"
    folder.mkdir()
    np.asarray(ids, dtype=np.uint32).tofile(folder / "part-000.npy")
    cfg = DataConfig(
        sources=[SourceConfig(path=str(folder), token_dtype="uint32")],
        seq_len=16,
        cache_dir=str(tmp_path / "cache"),
    )
    with pytest.raises(
        DataError, match=r"part-000.npy: token id 300 at position 40 is outside .* \(size 256\)"
    ):
        prepare_packed(cfg, byte_tok)
    import datasets

    datasets.Dataset.from_dict({"input_ids": [[5, 6, 70000]]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"d \(row 0\): token id 70000"):
        prepare_packed(
            DataConfig(
                sources=[SourceConfig(path=str(tmp_path / "d"))],
                seq_len=8,
                cache_dir=str(tmp_path / "y"),
            ),
            byte_tok,
        )
    assert not list((tmp_path / "cache").iterdir())
