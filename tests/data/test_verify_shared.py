"""A cache is verified once across ranks (each file hashed by one rank), the verdict shared; a
corrupt or truncated file fails every rank with an error naming it. Real gloo ranks."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from megadistill.data import DataConfig, SourceConfig, build_loader, prepare_packed
from megadistill.engine.launch import run_distributed
from megadistill.integrity import MANIFEST, verify_manifest_shared
from tests.data.conftest import make_docs


def _cfg(root: Path) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(path=str(root / "a.txt"), txt_documents="line")],
        seq_len=16,
        heldout_fraction=0.2,
        cache_dir=str(root / "cache"),
    )


def _init() -> int:
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    return dist.get_rank()


def run_verify(root: str) -> None:
    """Rank body: hash this rank's share of the cache, record which files, open the loader."""
    from transformers import AutoTokenizer

    rank = _init()
    tok = AutoTokenizer.from_pretrained(str(Path(root) / "tok"))
    path = prepare_packed(_cfg(Path(root)), tok)
    mine = verify_manifest_shared(path, what="data cache")
    Path(root, f"rank{rank}.json").write_text(json.dumps(mine))
    loader = build_loader(_cfg(Path(root)), tok, micro_batch=2)
    assert len(loader) > 0


def run_expect_corrupt(root: str) -> None:
    """Rank body: the loader must refuse the damaged cache on every rank, naming the file."""
    from transformers import AutoTokenizer

    from megadistill.errors import CheckpointError

    rank = _init()
    tok = AutoTokenizer.from_pretrained(str(Path(root) / "tok"))
    try:
        build_loader(_cfg(Path(root)), tok, micro_batch=2)
    except CheckpointError as exc:
        Path(root, f"error{rank}.txt").write_text(str(exc))
        return
    raise AssertionError("a damaged cache was accepted")


@pytest.mark.parametrize("damage", ["corrupt", "truncate"])
def test_cache_verified_once_across_ranks(tmp_path, byte_tok, damage):
    byte_tok.save_pretrained(str(tmp_path / "tok"))
    (tmp_path / "a.txt").write_text("\n".join(make_docs(200, 3, "d")) + "\n")
    path = prepare_packed(_cfg(tmp_path), byte_tok)
    run_distributed(run_verify, 2, str(tmp_path), timeout_s=300)
    shares = [set(json.loads((tmp_path / f"rank{r}.json").read_text())) for r in (0, 1)]
    listed = set(json.loads((path / MANIFEST).read_text())["files"])
    assert shares[0] and shares[1] and not shares[0] & shares[1]  # each file hashed once
    assert shares[0] | shares[1] == listed
    target = path / "train.tokens.npy"
    if damage == "corrupt":
        with open(target, "r+b") as fh:
            fh.seek(-5, 2)
            fh.write(b"\x09" * 5)
    else:
        data = target.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    run_distributed(run_expect_corrupt, 2, str(tmp_path), timeout_s=300)
    for r in (0, 1):
        msg = (tmp_path / f"error{r}.txt").read_text()
        assert f"data cache {path}: file train.tokens.npy is corrupt" in msg
