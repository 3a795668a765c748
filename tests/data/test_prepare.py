"""`megadistill prepare-data` builds the cache that training then hits."""

from __future__ import annotations

import json

import yaml

from megadistill.cli import main
from megadistill.data import DataConfig, SourceConfig, prepare_packed


def test_prepare_data_command_builds_the_training_cache(tmp_path, corpus, byte_tok, capsys):
    tok_dir = tmp_path / "tok"
    byte_tok.save_pretrained(str(tok_dir))
    recipe = {
        "student": str(tok_dir),
        "data": {"sources": [{"path": str(corpus["txt"])}], "seq_len": 16, "cache_dir": "x"},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    cache = tmp_path / "cache"
    assert main(["prepare-data", str(tmp_path / "r.yaml"), f"data.cache_dir={cache}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["splits"]["train"]["documents"] == 12
    cfg = DataConfig(
        sources=[SourceConfig(path=str(corpus["txt"]))], seq_len=16, cache_dir=str(cache)
    )
    assert str(prepare_packed(cfg, byte_tok)) == summary["cache"]  # training starts on a hit
    assert main(["prepare-data", str(tmp_path / "r.yaml"), "data.seq_len=1"]) == 2
    assert "data.seq_len must be >= 2" in capsys.readouterr().err
