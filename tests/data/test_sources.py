"""Bad data and bad data configs fail with a clear message naming the input and the fix."""

from __future__ import annotations

import json

import pytest

from megadistill.config import ConfigError, from_dict
from megadistill.data import DataConfig, DataError, SourceConfig, prepare_packed
from megadistill.data.sources import iter_documents


def _prepare(tmp_path, tok, **source):
    cfg = DataConfig(sources=[SourceConfig(**source)], seq_len=8, cache_dir=str(tmp_path / "c"))
    return prepare_packed(cfg, tok)


def test_bad_sources_raise_clear_errors(tmp_path, byte_tok, corpus):
    with pytest.raises(DataError, match="nope.txt: no such file or folder"):
        _prepare(tmp_path, byte_tok, path=str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataError, match="empty.txt is empty"):
        _prepare(tmp_path, byte_tok, path=str(tmp_path / "empty.txt"))
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "  "}) + "\n")
    with pytest.raises(DataError, match="no non-empty document"):
        _prepare(tmp_path, byte_tok, path=str(tmp_path / "blank.jsonl"))
    with pytest.raises(
        DataError, match=r"line 1 has no field 'text' \(found \['content', 'id'\]\)"
    ):
        _prepare(tmp_path, byte_tok, path=str(corpus["jsonl"]))
    with pytest.raises(DataError, match=r"no column 'body' \(columns: \['text', 'n'\]\)"):
        _prepare(tmp_path, byte_tok, path=str(corpus["parquet"]), text_field="body")
    with pytest.raises(DataError, match="holds int, not text"):
        _prepare(tmp_path, byte_tok, path=str(corpus["jsonl"]), text_field="id")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported file type"):
        _prepare(tmp_path, byte_tok, path=str(tmp_path / "data.csv"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="line 1 is not JSON"):
        _prepare(tmp_path, byte_tok, path=str(tmp_path / "bad.jsonl"))
    assert not list((tmp_path / "c").iterdir())  # no half-built cache left behind


def test_hub_dataset_offline_fails_clearly(tmp_path, byte_tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(
        DataError, match="hf:megadistill-no-such/set:train: the Hugging Face Hub is"
    ):
        _prepare(tmp_path, byte_tok, hf_name="megadistill-no-such/set")


def test_folder_and_saved_dataset_sources(tmp_path, corpus):
    import datasets

    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "x.txt").write_text("one\ntwo\n")
    (folder / "y.txt").write_text("three\n")
    docs = list(iter_documents(SourceConfig(path=str(folder), txt_documents="line")))
    assert docs == ["one", "two", "three"]
    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {"validation": datasets.Dataset.from_dict({"q": ["a b", "c"]})}
    ).save_to_disk(str(saved))
    src = SourceConfig(path=str(saved), split="validation", text_field="q")
    assert list(iter_documents(src)) == ["a b", "c"]
    with pytest.raises(DataError, match="no split 'train'"):
        list(iter_documents(SourceConfig(path=str(saved), text_field="q")))


def test_config_validation_names_the_field():
    ok = {"sources": [{"path": "x.txt", "weight": 2}], "seq_len": 16}
    cfg = from_dict(DataConfig, ok)
    assert cfg.sources[0].weight == 2.0 and isinstance(cfg.sources[0], SourceConfig)
    bad = [
        ({"sources": [], "seq_len": 16}, "data.sources is empty"),
        ({"sources": [{"path": "x", "hf_name": "y"}], "seq_len": 16}, "exactly one of 'path'"),
        ({"sources": [{"path": "x", "weight": 0}], "seq_len": 16}, "weight must be > 0"),
        ({"sources": [{"path": "x"}], "seq_len": 1}, "seq_len must be >= 2"),
        ({"sources": [{"path": "x"}], "seq_len": 8, "heldout_fraction": 1.0}, "heldout_fraction"),
        ({"sources": [{"path": "x", "colour": 1}], "seq_len": 8}, "unknown config key"),
        ({"sources": [{"path": "x", "txt_documents": "page"}], "seq_len": 8}, "txt_documents"),
    ]
    for data, msg in bad:
        with pytest.raises(ConfigError, match=msg):
            from_dict(DataConfig, data)
