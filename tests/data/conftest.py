"""Fixtures for the data tests: tokenizers and small corpora on disk."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

WORDS = "alpha beta gamma delta river stone light cloud amber north quiet seven".split()


def make_docs(n: int, seed: int, prefix: str) -> list[str]:
    """``n`` distinct documents of varied length (each starts with a unique tag)."""
    rng = random.Random(seed)
    return [
        f"{prefix}{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 30)))
        for i in range(n)
    ]


@pytest.fixture(scope="session")
def byte_tok(tmp_path_factory: pytest.TempPathFactory):
    from megadistill.assets import byte_tokenizer

    return byte_tokenizer(tmp_path_factory.mktemp("byte_tok"))


@pytest.fixture(scope="session")
def bpe_tok(tmp_path_factory: pytest.TempPathFactory):
    """A second, different tokenizer: a small byte-level BPE trained on the test words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(make_docs(200, 1, "d"), trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>")
    out = tmp_path_factory.mktemp("bpe_tok")
    tok.save_pretrained(str(out))
    return tok


@pytest.fixture()
def corpus(tmp_path: Path) -> dict[str, Path]:
    """Three sources: a .txt (paragraphs), a .jsonl and a .parquet, with known documents."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    txt_docs, jsonl_docs, pq_docs = (
        make_docs(12, 2, "t"),
        make_docs(20, 3, "j"),
        make_docs(8, 4, "p"),
    )
    (tmp_path / "a.txt").write_text("\n\n".join(txt_docs) + "\n")
    with open(tmp_path / "b.jsonl", "w") as fh:
        for i, doc in enumerate(jsonl_docs):
            fh.write(json.dumps({"id": i, "content": doc}) + "\n")
    pq.write_table(
        pa.table({"text": pq_docs, "n": list(range(len(pq_docs)))}), tmp_path / "c.parquet"
    )
    return {
        "txt": tmp_path / "a.txt",
        "jsonl": tmp_path / "b.jsonl",
        "parquet": tmp_path / "c.parquet",
        "docs": {"txt": txt_docs, "jsonl": jsonl_docs, "parquet": pq_docs},
        "root": tmp_path,
    }
