"""Tokenise, mix and pack documents into fixed-length sequences, cached on disk.

Layout of the token stream (one per split): every document is tokenised with the teacher's
tokenizer (plus the tokenizer's own special tokens when ``add_special_tokens``), followed by EOS,
and the documents are concatenated in mix order. ``doc_starts`` holds the stream offset where each
document begins.

Sample ``i`` of a split covers stream positions ``[i * L, i * L + L]`` (L = seq_len, one token of
overlap with the next sample): ``input_ids`` are the first L tokens and ``labels[t]`` is the token
that follows position ``t`` (labels are already shifted: do NOT shift them again, and do not pass
them to a Hugging Face model that shifts internally). ``labels[t] = -100`` where the next token
begins a new document (the EOS of one document never predicts the first token of the next) and on
padding. ``position_ids`` restart at 0 at every document start and at the start of every sample
(a document cut by a sample boundary continues as a new segment). The last sample is padded with
the pad token (position ids of padding restart at 0, labels -100).

The mix: weights are shares of *tokens*. Each source is read as a stream in a seeded order and
tokenised in parallel (:mod:`megadistill.data.tokenize`); with ``num_tokens`` set, reading stops
once the source's training documents reach its share ``weight_i / sum(weights) * num_tokens``
(the documented over-read is in :mod:`megadistill.data.tokenize`). Per source, the documents read
are then drawn in seeded random order, cycling through all of them again (another permutation)
when a small source has fewer tokens than its share, until the share is reached; the chosen
documents of all sources are interleaved by one seeded permutation. With ``num_tokens`` null every
source is read whole and the mix is the smallest one in which every training document of every
source appears at least once.

The held-out split: the documents of each source that the rule of
:func:`megadistill.data.tokenize.is_heldout` picks from those read (``ceil(f * n)`` of ``n``, at
least one when the fraction is > 0), unmixed and in read order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from megadistill.config import to_dict
from megadistill.data.config import DataConfig
from megadistill.data.errors import DataError
from megadistill.data.sources import source_hash
from megadistill.data.tokenize import Encoder, Tokenized, tokenize_source
from megadistill.integrity import MANIFEST, atomic_dir, atomic_write_json, verify_manifest

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
IGNORE_INDEX = -100
SPLITS = ("train", "heldout")
META = "meta.json"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of everything that decides token ids: the full fast-tokenizer JSON (or vocab) and
    the special-token ids. Two tokenizers with equal fingerprints tokenise identically."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    specials = {
        name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
    }
    digest.update(json.dumps(specials, sort_keys=True).encode())
    return digest.hexdigest()


def data_fingerprint(cfg: DataConfig, tokenizer_fp: str, content_hashes: list[str]) -> str:
    """Key of a cache: sources (content and settings), tokenizer, packing and mix settings."""
    key = {
        "format": FORMAT_VERSION,
        "sources": [
            {**to_dict(src), "content": h}
            for src, h in zip(cfg.sources, content_hashes, strict=True)
        ],
        "tokenizer": tokenizer_fp,
        "seq_len": cfg.seq_len,
        "seed": cfg.seed,
        "heldout_fraction": cfg.heldout_fraction,
        "num_tokens": cfg.num_tokens,
        "add_special_tokens": cfg.add_special_tokens,
        "shuffle_buffer": cfg.shuffle_buffer,
    }
    for src in key["sources"]:
        src.pop("path", None)  # content decides, not where the file lives
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no eos_token; documents "
            "are separated by EOS, so set tokenizer.eos_token"
        )
    pad = tokenizer.pad_token_id
    return int(eos), int(eos if pad is None else pad)


def mix_documents(
    doc_lengths: list[np.ndarray], weights: list[float], seed: int, num_tokens: int | None
) -> np.ndarray:
    """Choose and order documents of all sources by token weight (see the module docstring).

    Args:
        doc_lengths: per source, the token length of each of its candidate documents.
        weights: per source, its relative share of tokens.
        seed: sampling seed.
        num_tokens: tokens in the mix, or None for "every document at least once".

    Returns:
        int64 [num_chosen, 2]: (source index, index into that source's candidates) in mix order.
    """
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    totals = [int(lengths.sum()) for lengths in doc_lengths]
    # kept as a float: rounding it up would add one repeated document to the limiting source
    mix_tokens = (
        max(t / s for t, s in zip(totals, shares, strict=True))
        if num_tokens is None
        else num_tokens
    )
    chosen = []
    for i, lengths in enumerate(doc_lengths):
        target = shares[i] * mix_tokens
        rng = np.random.default_rng([seed, i, 0x313])
        reps = max(1, math.ceil(target / totals[i]))
        order = np.concatenate([rng.permutation(len(lengths)) for _ in range(reps)])
        cum = np.cumsum(lengths[order])
        # smallest prefix reaching the target (floating slack so exact multiples stay exact)
        n = int(np.searchsorted(cum, target - 1e-6, side="left")) + 1
        picked = order[: min(n, len(order))]
        chosen.append(np.stack([np.full(len(picked), i), picked], axis=1))
    everything = np.concatenate(chosen).astype(np.int64)
    perm = np.random.default_rng([seed, 0x6D1C]).permutation(len(everything))
    return everything[perm]


_WRITE_BUFFER_TOKENS = 1 << 22
"""Tokens gathered before one write of :func:`_write_stream` (16 MiB)."""


def _write_stream(
    work: Path, split: str, entries: np.ndarray, toks: list[Tokenized]
) -> dict[str, int]:
    """Concatenate the chosen documents into ``<split>.tokens.npy`` / ``<split>.doc_starts.npy``."""
    lengths = np.array(
        [toks[s].offsets[d + 1] - toks[s].offsets[d] for s, d in entries], dtype=np.int64
    )
    starts = np.zeros(len(entries), dtype=np.int64)
    if len(entries):
        np.cumsum(lengths[:-1], out=starts[1:])
    total = int(lengths.sum())
    np.save(work / f"{split}.doc_starts.npy", starts)
    if total == 0:  # an empty split (no held-out documents): a zero-length memmap is invalid
        np.save(work / f"{split}.tokens.npy", np.zeros(0, dtype=np.uint32))
        return {"tokens": 0, "documents": 0}
    # plain reads and buffered writes, not memory maps: the pages of a mapped file count in the
    # process's resident memory until the kernel reclaims them, so copying a corpus through maps
    # made the peak RSS grow with the corpus (4.3 GiB at 2 GB of text, against 1 GiB at 256 MB)
    readers = [open(t.tokens.filename, "rb") for t in toks]  # noqa: SIM115 - closed below
    try:
        with open(work / f"{split}.tokens.npy", "wb") as fh:
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint32)),
                      "fortran_order": False, "shape": (total,)}  # fmt: skip
            np.lib.format.write_array_header_1_0(fh, header)
            pending, buffered = [], 0
            for s, d in entries:
                offset, n = (
                    int(toks[s].offsets[d]),
                    int(toks[s].offsets[d + 1] - toks[s].offsets[d]),
                )
                readers[s].seek(offset * 4)
                pending.append(np.fromfile(readers[s], dtype=np.uint32, count=n))
                buffered += n
                if buffered >= _WRITE_BUFFER_TOKENS:
                    fh.write(np.concatenate(pending).tobytes())
                    pending, buffered = [], 0
            if pending:
                fh.write(np.concatenate(pending).tobytes())
    finally:
        for reader in readers:
            reader.close()
    return {"tokens": total, "documents": len(entries)}


def num_samples(num_tokens: int, seq_len: int) -> int:
    """Samples of a stream of ``num_tokens``: each covers seq_len inputs plus one next token."""
    return 0 if num_tokens < 2 else math.ceil((num_tokens - 1) / seq_len)


def _build_cache(
    cfg: DataConfig, tokenizer: Any, fingerprint: str, tok_fp: str, work: Path
) -> None:
    from megadistill.progress import progress_bar

    eos, pad = _special_ids(tokenizer)
    weights = [s.weight for s in cfg.sources]
    shares = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    toks = []
    encoder = Encoder(tokenizer, cfg.add_special_tokens, eos, cfg.num_proc)
    with progress_bar(cfg.num_tokens, "prepare data") as bar, encoder:
        for i in range(len(cfg.sources)):
            target = None if cfg.num_tokens is None else shares[i] * cfg.num_tokens
            out = work / f"source{i:03d}.tokens.bin"
            toks.append(tokenize_source(cfg, i, encoder, out, target, bar))
    train_lengths, train_ids, held = [], [], []
    for i, t in enumerate(toks):
        lengths = np.diff(t.offsets)
        ids = np.flatnonzero(~t.heldout)
        train_ids.append(ids)
        train_lengths.append(lengths[ids])
        held.append(np.stack([np.full(int(t.heldout.sum()), i), np.flatnonzero(t.heldout)], 1))
    mixed = mix_documents(train_lengths, weights, cfg.seed, cfg.num_tokens)
    train_entries = np.stack([mixed[:, 0], [train_ids[s][d] for s, d in mixed]], axis=1)
    splits = {
        "train": _write_stream(work, "train", train_entries.astype(np.int64), toks),
        "heldout": _write_stream(work, "heldout", np.concatenate(held).astype(np.int64), toks),
    }
    for info in splits.values():
        info["samples"] = num_samples(info["tokens"], cfg.seq_len)
    for i, t in enumerate(toks):
        del t.tokens  # close the memmap before deleting its file
        (work / f"source{i:03d}.tokens.bin").unlink()
    meta = {
        "format": FORMAT_VERSION,
        "fingerprint": fingerprint,
        "tokenizer_fingerprint": tok_fp,
        "tokenizer": getattr(tokenizer, "name_or_path", None) or None,
        "seq_len": cfg.seq_len,
        "eos_id": eos,
        "pad_id": pad,
        "splits": splits,
        "sources": [
            {
                "source": s.describe(),
                "weight": s.weight,
                "documents_read": len(t.offsets) - 1,
                "tokens_read": int(t.offsets[-1]),
                "heldout_documents": int(t.heldout.sum()),
                "read_whole": t.exhausted,
            }
            for s, t in zip(cfg.sources, toks, strict=True)
        ],
        "config": to_dict(cfg),
    }
    atomic_write_json(work / META, meta)


def cache_root_dir(cfg: DataConfig) -> Path:
    """The folder holding this config's caches (``cache_dir`` or ``$MEGADISTILL_CACHE/data``)."""
    if cfg.cache_dir is not None:
        return Path(cfg.cache_dir).expanduser()
    from megadistill.assets import cache_root

    return cache_root() / "data"


def _cache_key(cfg: DataConfig, tokenizer: Any) -> tuple[Path, str, str]:
    tok_fp = tokenizer_fingerprint(tokenizer)
    fingerprint = data_fingerprint(cfg, tok_fp, [source_hash(s) for s in cfg.sources])
    return cache_root_dir(cfg) / fingerprint[:24], fingerprint, tok_fp


def cache_path(cfg: DataConfig, tokenizer: Any) -> Path:
    """Where the cache of (sources, tokenizer, settings) lives, built or not (reads no data)."""
    return _cache_key(cfg, tokenizer)[0]


def prepare_packed(cfg: DataConfig, tokenizer: Any) -> Path:
    """Return the cache folder for (sources' content, tokenizer, settings), building it if absent.

    Safe to call from several processes at once: each builds in a private temporary folder and the
    first complete one wins (the others are discarded).
    """
    final, fingerprint, tok_fp = _cache_key(cfg, tokenizer)
    if (final / MANIFEST).is_file():
        log.info("data cache hit: %s", final)
        return final
    log.info("building data cache %s", final)
    try:
        with atomic_dir(final, overwrite=final.exists()) as work:
            _build_cache(cfg, tokenizer, fingerprint, tok_fp, work)
    except OSError:
        if not (final / MANIFEST).is_file():  # not a lost race with another builder
            raise
    return final


class PackedDataset:
    """Random access to the packed samples of one split of a cache (memory-mapped).

    Args:
        path: a cache folder written by :func:`prepare_packed`.
        split: 'train' or 'heldout'.
        tokenizer: when given, its fingerprint must equal the one the cache was built with.
        verify: check the sha256 manifest first.
    """

    def __init__(
        self, path: str | Path, split: str = "train", tokenizer: Any = None, verify: bool = True
    ) -> None:
        self.path = Path(path)
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; choose one of {SPLITS}")
        if verify:
            verify_manifest(self.path, what="data cache")
        elif not (self.path / MANIFEST).is_file():
            raise DataError(f"data cache {self.path} is incomplete (no {MANIFEST}); rebuild it")
        self.meta = json.loads((self.path / META).read_text())
        if self.meta.get("format") != FORMAT_VERSION:
            raise DataError(
                f"data cache {self.path} has format {self.meta.get('format')}, this code reads "
                f"{FORMAT_VERSION}; delete the cache folder to rebuild it"
            )
        if tokenizer is not None:
            check_tokenizer(self.meta, tokenizer, self.path)
        self.split = split
        self.seq_len = int(self.meta["seq_len"])
        self.pad_id = int(self.meta["pad_id"])
        self.fingerprint = str(self.meta["fingerprint"])
        self.tokens = np.load(self.path / f"{split}.tokens.npy", mmap_mode="r")
        self.doc_starts = np.load(self.path / f"{split}.doc_starts.npy")
        self.num_tokens = len(self.tokens)

    def __len__(self) -> int:
        return num_samples(self.num_tokens, self.seq_len)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        """Sample ``index``: int64 arrays ``input_ids``, ``labels``, ``position_ids`` of seq_len."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        length = self.seq_len
        start = index * length
        stop = min(start + length + 1, self.num_tokens)  # one token of look-ahead for labels
        window = np.asarray(self.tokens[start:stop], dtype=np.int64)
        n_in = min(length, len(window))
        pos = np.arange(start, start + n_in)
        # the latest document start at or before each position, but never before the sample
        seg = self.doc_starts[np.searchsorted(self.doc_starts, pos, side="right") - 1]
        position_ids = pos - np.maximum(seg, start)
        labels = np.full(length, IGNORE_INDEX, dtype=np.int64)
        n_lab = len(window) - 1
        labels[:n_lab] = window[1 : n_lab + 1]
        nxt = pos[:n_lab] + 1
        hit = np.searchsorted(self.doc_starts, nxt).clip(max=max(len(self.doc_starts) - 1, 0))
        starts_next = self.doc_starts[hit] == nxt
        labels[:n_lab][starts_next] = IGNORE_INDEX
        input_ids = np.full(length, self.pad_id, dtype=np.int64)
        input_ids[:n_in] = window[:n_in]
        pad_pos = np.arange(length - n_in, dtype=np.int64)
        return {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": np.concatenate([position_ids, pad_pos]),
        }

    def padding_sample(self) -> dict[str, np.ndarray]:
        """An all-padding sample (every label ignored), used to keep ranks in lockstep."""
        length = self.seq_len
        return {
            "input_ids": np.full(length, self.pad_id, dtype=np.int64),
            "labels": np.full(length, IGNORE_INDEX, dtype=np.int64),
            "position_ids": np.arange(length, dtype=np.int64),
        }


def check_tokenizer(meta: dict[str, Any], tokenizer: Any, where: Path | str) -> None:
    """Raise DataError when ``tokenizer`` is not the one a cache was built with."""
    have = tokenizer_fingerprint(tokenizer)
    want = meta["tokenizer_fingerprint"]
    if have != want:
        raise DataError(
            f"data cache {where} was built with tokenizer {meta.get('tokenizer')!r} "
            f"(fingerprint {want[:12]}), not with the given tokenizer "
            f"{getattr(tokenizer, 'name_or_path', None)!r} (fingerprint {have[:12]}); use the "
            "teacher's tokenizer, or let prepare_packed build a cache for this one"
        )


def load_packed(cfg: DataConfig, tokenizer: Any, split: str = "train") -> PackedDataset:
    """Build (or reuse) the cache for ``cfg`` and open one split."""
    path = prepare_packed(cfg, tokenizer)
    return PackedDataset(path, split, tokenizer=tokenizer, verify=cfg.verify_cache)
