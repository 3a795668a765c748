"""Budgeted, parallel tokenisation of one source into a flat token file.

The source is read as a stream (:func:`megadistill.data.sources.iter_documents`, seeded order)
and cut into batches of :data:`BATCH_DOCS` documents. ``num_proc`` worker processes tokenise
batches; the parent writes each batch's tokens to the source's file in batch order as soon as it
is its turn, so the file is complete when the stream ends (no shard to concatenate afterwards)
and memory holds at most ``2 * num_proc`` batches plus the shuffle buffer, whatever the corpus
size. Batches and their order do not depend on ``num_proc``, so the file is identical for any
number of workers.

Held-out documents: document ``j`` of the stream (0-based, in shuffled order) is held out when
``ceil((j + 1) * f) > ceil(j * f)`` for ``f = heldout_fraction``: the first document and then one
in every ``1/f``, ``ceil(f * n)`` of any ``n`` read. The rule needs no document count, so it
works on a stream that stops early.

Budget: reading stops as soon as the source's training documents reach ``target`` tokens. The
over-read is at most one document beyond the target, plus the held-out documents of that prefix
(``f / (1 - f)`` of the target), plus what was read ahead and discarded: the shuffle buffer
(``shuffle_buffer`` documents) and the batches in flight (``2 * num_proc * BATCH_DOCS``
documents).
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from megadistill.data.config import DataConfig
from megadistill.data.errors import DataError
from megadistill.data.sources import Document, is_tokenized, iter_documents

log = logging.getLogger(__name__)

BATCH_DOCS = 256
"""Documents per tokenizer call (and per task sent to a worker)."""


@dataclass
class Tokenized:
    """The tokenised documents of one source (only the prefix a budget needed)."""

    tokens: np.ndarray
    """All documents read, each followed by EOS (uint32, memory-mapped)."""
    offsets: np.ndarray
    """int64 [num_docs + 1]: document d is tokens[offsets[d]:offsets[d + 1]]."""
    heldout: np.ndarray
    """bool [num_docs]: the document belongs to the held-out split."""
    exhausted: bool
    """The whole source was read (no budget stop)."""


def source_seed(seed: int, index: int) -> int:
    """The stream seed of source ``index`` (a 32-bit int, as ``datasets`` shuffling needs)."""
    return int(np.random.SeedSequence([seed, index, 0x5EED]).generate_state(1)[0])


def is_heldout(j: int, fraction: float) -> bool:
    """Held-out rule of the module docstring (``round`` keeps 0.2 * 5 from ceiling to 2)."""
    if fraction <= 0:
        return False
    return math.ceil(round((j + 1) * fraction, 9)) > math.ceil(round(j * fraction, 9))


def encode_batch(
    batch: list[Document], tokenizer: Any, add_special_tokens: bool, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """Tokenise a batch (token-id documents pass through); every document ends with one EOS.

    Returns:
        (uint32 tokens of all documents back to back, int64 length of each document).
    """
    texts = [d for d in batch if isinstance(d, str)]
    encoded = iter(
        tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False)[
            "input_ids"
        ]
        if texts
        else []
    )
    docs = []
    for doc in batch:
        ids = next(encoded) if isinstance(doc, str) else doc
        if not len(ids) or ids[-1] != eos:
            ids = [*ids, eos] if isinstance(ids, list) else np.append(ids, eos)
        docs.append(ids)
    lengths = np.fromiter((len(d) for d in docs), dtype=np.int64, count=len(docs))
    if not texts:  # already token ids: no per-token Python loop
        return np.concatenate(docs).astype(np.uint32), lengths
    flat = np.fromiter(
        itertools.chain.from_iterable(docs), dtype=np.uint32, count=int(lengths.sum())
    )
    return flat, lengths


_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Any, add_special_tokens: bool, eos: int) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: N workers, N cores
    _WORKER.update(tokenizer=tokenizer, add_special_tokens=add_special_tokens, eos=eos)


def _encode_in_worker(batch: list[Document]) -> tuple[np.ndarray, np.ndarray]:
    return encode_batch(batch, _WORKER["tokenizer"], _WORKER["add_special_tokens"], _WORKER["eos"])


class Encoder:
    """Encodes batches in input order with ``num_proc`` processes (1: in this process).

    The worker pool starts at the first parallel :meth:`map` and serves every source of a build;
    at most ``2 * num_proc`` batches are in flight, and closing a :meth:`map` generator stops
    reading its input. Use as a context manager (the pool ends with it).
    """

    def __init__(self, tokenizer: Any, add_special_tokens: bool, eos: int, num_proc: int) -> None:
        self.args = (tokenizer, add_special_tokens, eos)
        self.num_proc = num_proc
        self._pool: Any = None

    def map(
        self, batches: Iterator[list[Document]], parallel: bool = True
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Encoded batches in order (``parallel=False``: in this process)."""
        if self.num_proc <= 1 or not parallel:
            for batch in batches:
                yield encode_batch(batch, *self.args)
            return
        if self._pool is None:  # spawn: never fork a process that may hold torch threads
            ctx = mp.get_context("spawn")
            self._pool = ctx.Pool(self.num_proc, _init_worker, self.args)
        pending: deque[Any] = deque()
        for batch in batches:
            pending.append(self._pool.apply_async(_encode_in_worker, (batch,)))
            if len(pending) >= 2 * self.num_proc:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None


def _batched(docs: Iterator[Document], size: int) -> Iterator[list[Document]]:
    while batch := list(itertools.islice(docs, size)):
        yield batch


def tokenize_source(
    cfg: DataConfig,
    index: int,
    encoder: Encoder,
    path: Path,
    target: float | None,
    bar: Any = None,
) -> Tokenized:
    """Tokenise source ``index`` of ``cfg`` into ``path`` until its training documents hold
    ``target`` tokens (None: the whole source). See the module docstring."""
    source = cfg.sources[index]
    tokenizer, _, eos = encoder.args
    docs = iter_documents(
        source,
        seed=source_seed(cfg.seed, index),
        shuffle_buffer=cfg.shuffle_buffer,
        eos_id=eos,
        vocab_size=len(tokenizer),
    )
    lengths: list[np.ndarray] = []
    num_docs, train_tokens, exhausted = 0, 0, True
    held: list[bool] = []
    stream = encoder.map(_batched(docs, BATCH_DOCS), parallel=not is_tokenized(source))
    with open(path, "wb") as fh:
        try:
            for flat, lens in stream:
                take = len(lens)
                before = train_tokens
                for k, n in enumerate(lens.tolist()):
                    h = is_heldout(num_docs + k, cfg.heldout_fraction)
                    held.append(h)
                    train_tokens += 0 if h else n
                    if target is not None and train_tokens >= target:
                        take, exhausted = k + 1, False
                        break
                flat[: int(lens[:take].sum())].tofile(fh)
                lengths.append(lens[:take])
                num_docs += take
                if bar is not None:
                    bar.update(train_tokens - before)
                if not exhausted:
                    break
        finally:
            stream.close()  # stops the workers and the source reader
    if train_tokens == 0:
        raise DataError(
            f"data source {source.describe()} has {num_docs} documents: heldout_fraction="
            f"{cfg.heldout_fraction} leaves none for training; lower heldout_fraction or add data"
        )
    offsets = np.zeros(num_docs + 1, dtype=np.int64)
    np.cumsum(np.concatenate(lengths), out=offsets[1:])
    log.info(
        "source %s: %d documents, %d tokens read%s",
        source.describe(),
        num_docs,
        offsets[-1],
        "" if exhausted else " (budget reached)",
    )
    tokens = np.memmap(path, dtype=np.uint32, mode="r")  # a source can exceed RAM
    return Tokenized(tokens, offsets, np.asarray(held, dtype=bool), exhausted)
