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
