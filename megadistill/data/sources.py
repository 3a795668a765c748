"""Reading documents from one source: local .txt/.jsonl/.parquet files, folders, HF datasets.

Every reader yields plain ``str`` documents in a fixed order and fails with a :class:`DataError`
that names the source and the fix (missing file, empty file, missing text field). Each source also
has a content hash (:func:`source_hash`) that keys the tokenised cache.
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

from megadistill.data.config import SourceConfig
from megadistill.data.errors import DataError
from megadistill.integrity import sha256_file

log = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSONL_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
ALL_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
_SAVED_DATASET_MARKERS = ("dataset_dict.json", "state.json")


def _suffix_kind(path: Path) -> str | None:
    name = path.name.lower()
    for kind, suffixes in (("txt", TEXT_SUFFIXES), ("jsonl", JSONL_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
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


def source_hash(source: SourceConfig) -> str:
    """sha256 over a source's content (local files) or its datasets fingerprint (hub datasets)."""
    digest = hashlib.sha256()
    if source.path is not None:
        root = Path(source.path).expanduser()
        for f in source_files(source):
            rel = f.name if root.is_file() else str(f.relative_to(root))
            digest.update(f"{rel}\0{sha256_file(f)}\n".encode())
    else:
        digest.update(f"hf\0{_load_hf(source)._fingerprint}".encode())
    return digest.hexdigest()


def iter_documents(source: SourceConfig) -> Iterator[str]:
    """Yield the source's documents (non-empty strings) in a fixed order.

    Raises:
        DataError: missing/empty file, a record without ``text_field``, a non-string text, or a
            source that yields no document at all.
    """
    count = 0
    for doc in _raw_documents(source):
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


def _raw_documents(source: SourceConfig) -> Iterator[Any]:
    if source.hf_name is not None:
        yield from _dataset_documents(_load_hf(source), source)
        return
    path = Path(source.path or "").expanduser()
    if _is_saved_dataset(path):
        yield from _dataset_documents(_load_saved(path, source), source)
        return
    for f in source_files(source):
        if f.stat().st_size == 0:
            raise DataError(f"data source {source.describe()}: file {f} is empty; remove it")
        kind = _suffix_kind(f)
        if kind == "txt":
            yield from _txt_documents(f, source)
        elif kind == "jsonl":
            yield from _jsonl_documents(f, source)
        else:
            yield from _parquet_documents(f, source)


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _txt_documents(path: Path, source: SourceConfig) -> Iterator[str]:
    with _open_text(path) as fh:
        if source.txt_documents == "line":
            yield from (line.rstrip("\n") for line in fh)
            return
        text = fh.read()
    if source.txt_documents == "file":
        yield text
        return
    para: list[str] = []
    for line in text.splitlines():
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


def _dataset_documents(ds: Any, source: SourceConfig) -> Iterator[Any]:
    if source.text_field not in ds.column_names:
        raise DataError(
            f"data source {source.describe()}: no column '{source.text_field}' "
            f"(columns: {ds.column_names}); set text_field to the text column"
        )
    for start in range(0, len(ds), 1024):
        yield from ds[start : start + 1024][source.text_field]


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


def _load_hf(source: SourceConfig) -> Any:
    import datasets

    offline = any(
        os.environ.get(v, "").lower() in ("1", "true", "yes")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    try:
        return datasets.load_dataset(source.hf_name, source.hf_config, split=source.split)
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
