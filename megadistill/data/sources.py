"""Reading documents from one source as a stream: local text files, pre-tokenised token files,
folders, ``datasets`` folders and Hugging Face hub datasets.

Every reader yields documents one at a time (a file is never read whole, a hub dataset is
streamed), either as ``str`` (text to tokenise) or as a 1-D integer array (a document that is
already tokenised; it ends with EOS). A reader fails with a :class:`DataError` that names the
source and the fix (missing file, empty file, missing text field, token ids outside the
vocabulary). Each source also has a cheap content key (:func:`source_hash`) that keys the cache.

Order: with ``seed`` None a source is read in its file order. With a seed (what preparation
uses) the files of a folder are read in a seeded permutation and the documents pass through a
seeded shuffle buffer of ``shuffle_buffer`` documents (hub datasets: ``IterableDataset.shuffle``,
which permutes the dataset's shards and keeps a buffer of the same size). The cost in randomness:
a document can move at most about ``shuffle_buffer`` places away from its position in its file,
and documents of files late in the permutation are never read when a token budget stops early.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from megadistill.data.config import SourceConfig
from megadistill.data.errors import DataError

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
TOKEN_SUFFIXES = (".npy", ".bin")
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + TOKEN_SUFFIXES
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")
_HASH_SPAN = 1 << 20  # bytes hashed at each end of a file for its content key
_TOKEN_CHUNK = 1 << 22  # tokens read from a token file at a time
_NPY_MAGIC = b"\x93NUMPY"
INPUT_IDS = "input_ids"

Document = str | np.ndarray


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (
        ("txt", TEXT_SUFFIXES),
        ("jsonl", JSONL_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
        ("tokens", TOKEN_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return kind
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _SAVED_DATASET_MARKERS)


def source_files(source: SourceConfig) -> list[Path]:
    """The local files of a ``path`` source, sorted; raises DataError when there are none."""
    assert source.path is not None
    path = Path(source.path).expanduser()
    if not path.exists():
        raise DataError(f"data source {source.path}: no such file or folder; fix data.sources.path")
    if path.is_file():
        if _suffix_kind(path) is None:
            raise DataError(
                f"data source {source.path}: unsupported file type; use one of "
                f"{', '.join(ALL_SUFFIXES)}"
            )
        return [path]
    if _is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix_kind(p) is not None)
    if not files:
        raise DataError(
            f"data source {source.path}: the folder holds no {', '.join(ALL_SUFFIXES)} files"
        )
    return files


def _file_key(path: Path) -> str:
    """sha256 of a file's size and its first and last MiB: reads at most 2 MiB of any file.

    A file edited in place without changing its size, its first or its last MiB keeps its key
    (delete the cache folder after such an edit)."""
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(_HASH_SPAN))
        if size > _HASH_SPAN:
            fh.seek(max(_HASH_SPAN, size - _HASH_SPAN))
            digest.update(fh.read(_HASH_SPAN))
    return digest.hexdigest()


def source_hash(source: SourceConfig) -> str:
    """Content key of a source: per local file its name, size and first/last MiB (cheap at any
    corpus size); for a hub dataset its name, config, split and the builder's hash."""
    digest = hashlib.sha256()
    if source.path is not None:
        root = Path(source.path).expanduser()
        for f in source_files(source):
            rel = f.name if root.is_file() else str(f.relative_to(root))
            digest.update(f"{rel}\0{_file_key(f)}\n".encode())
    else:
        digest.update(f"hf\0{source.hf_name}\0{source.hf_config}\0{source.split}\0".encode())
        digest.update(_hub_call(source, _builder_hash).encode())
    return digest.hexdigest()


def is_tokenized(source: SourceConfig) -> bool:
    """True for a source of token ids (token files, or a saved dataset with ``input_ids`` and
    no ``text_field`` column)."""
    if source.path is None:
        return False
    path = Path(source.path).expanduser()
    if _is_saved_dataset(path):
        names = _load_saved(path, source).column_names
        return source.text_field not in names and INPUT_IDS in names
    files = source_files(source)
    kinds = {_suffix_kind(f) for f in files}
    if "tokens" in kinds and len(kinds) > 1:
        raise DataError(
            f"data source {source.path}: the folder mixes token files (.npy/.bin) with text "
            "files; list them as two sources"
        )
    return kinds == {"tokens"}


def iter_documents(
    source: SourceConfig,
    *,
    seed: int | None = None,
    shuffle_buffer: int = 0,
    eos_id: int | None = None,
    vocab_size: int | None = None,
) -> Iterator[Document]:
    """Yield the source's non-empty documents as a stream (see the module docstring for order).

    Args:
        source: the source.
        seed: None reads in file order; an int permutes files and shuffles through a buffer.
        shuffle_buffer: documents held by the shuffle buffer (with a seed).
        eos_id: the EOS id that separates documents in token files (needed for token sources).
        vocab_size: token ids must be below it (checked for token sources).

    Raises:
        DataError: missing/empty file, a record without ``text_field``, a non-string text, a
            token id >= ``vocab_size``, or a source that yields no document at all.
    """
    count = 0
    docs = _raw_documents(source, seed, shuffle_buffer, eos_id, vocab_size)
    if seed is not None and shuffle_buffer > 1 and source.hf_name is None:
        docs = shuffle_buffered(docs, shuffle_buffer, seed)
    for doc in docs:
        if isinstance(doc, np.ndarray):
            if len(doc):
                count += 1
                yield doc
            continue
        if not isinstance(doc, str):
            raise DataError(
                f"data source {source.describe()}: field '{source.text_field}' holds "
                f"{type(doc).__name__}, not text; point text_field at a string column"
            )
        if doc.strip():
            count += 1
            yield doc
    if count == 0:
        raise DataError(
            f"data source {source.describe()}: no non-empty document found; check the file "
            f"content and text_field='{source.text_field}'"
        )


def shuffle_buffered(items: Iterator[Any], size: int, seed: int) -> Iterator[Any]:
    """Seeded shuffle through a buffer of ``size`` items: each incoming item replaces a uniformly
    chosen buffered one, which is yielded; the rest are yielded in a permutation at the end."""
    rng = np.random.default_rng([seed, 0x5B])
    buffer: list[Any] = []
    picks: list[int] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        if not picks:
            picks = rng.integers(0, size, 4096).tolist()[::-1]
        j = picks.pop()
        yield buffer[j]
        buffer[j] = item
    for j in rng.permutation(len(buffer)):
        yield buffer[j]


def _raw_documents(
    source: SourceConfig,
    seed: int | None,
    shuffle_buffer: int,
    eos_id: int | None,
    vocab_size: int | None,
) -> Iterator[Any]:
    if source.hf_name is not None:
        yield from _hub_documents(source, seed, shuffle_buffer)
        return
    path = Path(source.path or "").expanduser()
    if _is_saved_dataset(path):
        yield from _dataset_documents(_load_saved(path, source), source, str(path), vocab_size)
        return
    files = source_files(source)
    if seed is not None:
        files = [files[i] for i in np.random.default_rng([seed, 0xF1]).permutation(len(files))]
    for f in files:
        if f.stat().st_size == 0:
            raise DataError(f"data source {source.describe()}: file {f} is empty; remove it")
        kind = _suffix_kind(f)
        if kind == "txt":
            yield from _txt_documents(f, source)
        elif kind == "jsonl":
            yield from _jsonl_documents(f, source)
        elif kind == "parquet":
            yield from _parquet_documents(f, source)
        else:
            yield from _token_file_documents(f, source, eos_id, vocab_size)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_documents(path: Path, source: SourceConfig) -> Iterator[str]:
    with _open_text(path) as fh:
        if source.txt_documents == "file":
            yield fh.read()
            return
        if source.txt_documents == "line":
            yield from (line.rstrip("\n") for line in fh)
            return
        para: list[str] = []
        for line in fh:
            line = line.rstrip("\r\n")
            if line.strip():
                para.append(line)
            elif para:
                yield "\n".join(para)
                para = []
        if para:
            yield "\n".join(para)


def _jsonl_documents(path: Path, source: SourceConfig) -> Iterator[Any]:
    with _open_text(path) as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"data source {path}: line {lineno} is not JSON ({exc})") from exc
            if not isinstance(record, dict) or source.text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"data source {path}: line {lineno} has no field '{source.text_field}' "
                    f"(found {keys}); set text_field to the text field"
                )
            yield record[source.text_field]


def _parquet_documents(path: Path, source: SourceConfig) -> Iterator[Any]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = pf.schema_arrow.names
    if source.text_field not in columns:
        raise DataError(
            f"data source {path}: no column '{source.text_field}' (columns: {columns}); "
            "set text_field to the text column"
        )
    for batch in pf.iter_batches(columns=[source.text_field], batch_size=1024):
        yield from batch.column(0).to_pylist()


def open_token_file(path: Path, source: SourceConfig) -> np.ndarray:
    """Memory-map a flat token file: a ``.npy`` with a numpy header, or a headerless array
    (OLMo/Dolma's layout) of ``source.token_dtype``."""
    with open(path, "rb") as fh:
        has_header = fh.read(len(_NPY_MAGIC)) == _NPY_MAGIC
    if has_header:
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise DataError(f"data source {path}: unreadable numpy file ({exc})") from exc
        if arr.ndim != 1 or arr.dtype.kind not in "ui":
            raise DataError(
                f"data source {path}: holds a {arr.dtype} array of shape {arr.shape}; a token "
                "file is one flat integer array"
            )
        return arr
    if source.token_dtype is None:
        raise DataError(
            f"data source {path}: a token file without a numpy header; set token_dtype "
            "(uint16 or uint32, as the tokenizing tool wrote it; OLMo/Dolma use uint32 for "
            "vocabularies over 65535)"
        )
    dtype = np.dtype(source.token_dtype)
    if path.stat().st_size % dtype.itemsize:
        raise DataError(
            f"data source {path}: {path.stat().st_size} bytes is not a whole number of "
            f"{source.token_dtype} tokens; the file is truncated or token_dtype is wrong"
        )
    return np.memmap(path, dtype=dtype, mode="r")


def _check_ids(ids: np.ndarray, vocab_size: int | None, where: str, offset: int) -> None:
    if vocab_size is None or not len(ids):
        return
    top = int(ids.max())
    if top >= vocab_size or (ids.dtype.kind == "i" and int(ids.min()) < 0):
        bad = int(np.flatnonzero((ids >= vocab_size) | (ids < 0))[0])
        raise DataError(
            f"data source {where}: token id {int(ids[bad])} at position {offset + bad} is outside "
            f"the teacher tokenizer's vocabulary (size {vocab_size}); these tokens were made with "
            "another tokenizer: tokenise the text again with the teacher's"
        )


def _token_file_documents(
    path: Path, source: SourceConfig, eos_id: int | None, vocab_size: int | None
) -> Iterator[np.ndarray]:
    """EOS-separated documents of a flat token file, read in chunks (each ends with its EOS)."""
    if eos_id is None:
        raise DataError(f"data source {path}: token files need the tokenizer's eos id")
    tokens = open_token_file(path, source)
    carry = np.zeros(0, dtype=np.int64)
    for start in range(0, len(tokens), _TOKEN_CHUNK):
        chunk = np.asarray(tokens[start : start + _TOKEN_CHUNK], dtype=np.int64)
        _check_ids(chunk, vocab_size, str(path), start)
        ends = np.flatnonzero(chunk == eos_id) + 1
        prev = 0
        for end in ends.tolist():
            doc = chunk[prev:end] if not len(carry) else np.concatenate([carry, chunk[prev:end]])
            carry = carry[:0]
            prev = end
            if len(doc) > 1:  # a lone EOS is an empty document
                yield doc
        carry = np.concatenate([carry, chunk[prev:]])
    if len(carry):
        yield carry  # the last document may lack its EOS; packing appends one


def _dataset_documents(
    ds: Any, source: SourceConfig, where: str, vocab_size: int | None
) -> Iterator[Any]:
    names = ds.column_names
    column = source.text_field
    if column not in names:
        if INPUT_IDS not in names:
            raise DataError(
                f"data source {source.describe()}: no column '{column}' or '{INPUT_IDS}' "
                f"(columns: {names}); set text_field to the text column"
            )
        column = INPUT_IDS
    for start in range(0, len(ds), 1024):
        rows = ds[start : start + 1024][column]
        if column != INPUT_IDS:
            yield from rows
            continue
        for j, row in enumerate(rows):
            ids = np.asarray(row, dtype=np.int64)
            _check_ids(ids, vocab_size, f"{where} (row {start + j})", 0)
            yield ids


def _hub_documents(source: SourceConfig, seed: int | None, buffer: int) -> Iterator[Any]:
    ds = _hub_call(source, _stream_hub)
    if seed is not None and buffer > 1:
        ds = ds.shuffle(seed=seed, buffer_size=buffer)
    for record in ds:
        if source.text_field not in record:
            raise DataError(
                f"data source {source.describe()}: no column '{source.text_field}' (columns: "
                f"{sorted(record)}); set text_field to the text column"
            )
        yield record[source.text_field]


def _load_saved(path: Path, source: SourceConfig) -> Any:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if source.split not in ds:
            raise DataError(
                f"data source {path}: no split '{source.split}' (splits: {list(ds)}); set split"
            )
        ds = ds[source.split]
    return ds


def _stream_hub(source: SourceConfig) -> Any:
    import datasets

    return datasets.load_dataset(
        source.hf_name, source.hf_config, split=source.split, streaming=True
    )


def _builder_hash(source: SourceConfig) -> str:
    import datasets

    return str(datasets.load_dataset_builder(source.hf_name, source.hf_config).hash)


def _hub_call(source: SourceConfig, fn: Any) -> Any:
    """Call ``fn(source)`` (a hub access) and turn any failure into a DataError with the fix."""
    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    try:
        return fn(source)
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for "not reachable"
        hint = (
            "the Hugging Face Hub is switched off here (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE) and "
            "the dataset is not in the local datasets cache"
            if offline
            else "the dataset could not be loaded"
        )
        raise DataError(
            f"data source {source.describe()}: {hint} ({type(exc).__name__}: {exc}). Where a hub "
            "is reachable, run datasets.load_dataset(...).save_to_disk(DIR) and use path: DIR"
        ) from exc
