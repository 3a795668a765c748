"""Helpers for the tests only (product code never imports this module).

Tiny teachers live in :mod:`megadistill.teachers.tiny`, the multi-process launcher in
:mod:`megadistill.engine.launch`; this module keeps what only tests need.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

_FRESH_LOAD = r"""
import json, sys
folder, ids_file, out_file = sys.argv[1:4]
assert not any(m == "megadistill" or m.startswith("megadistill.") for m in sys.modules)
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
ids = torch.load(ids_file)
with torch.no_grad():
    logits = model(ids).logits
torch.save({"logits": logits, "config": type(config).__module__ + "." + type(config).__name__,
            "model": type(model).__module__ + "." + type(model).__name__,
            "vocab": len(tokenizer)}, out_file)
"""


def load_in_fresh_process(folder: str | Path, ids: Any, timeout_s: float = 300.0) -> dict[str, Any]:
    """Load ``folder`` with the Auto classes and ``trust_remote_code=True`` in a new Python process
    that imports nothing of megadistill first (as a Hugging Face user or lm-eval would).

    Returns:
        ``logits`` of ``ids`` (B, T), the loaded ``config`` and ``model`` class paths, and the
        tokenizer's ``vocab`` size. Raises ``RuntimeError`` with the child's stderr on failure.
    """
    import subprocess
    import sys

    import torch

    with tempfile.TemporaryDirectory(prefix="md-fresh-") as tmp:
        torch.save(ids, Path(tmp, "ids.pt"))
        # Dynamic modules are copied under HF_MODULES_CACHE: keep them out of the user's cache.
        env = {**os.environ, "HF_MODULES_CACHE": str(Path(tmp, "modules"))}
        proc = subprocess.run(
            [sys.executable, "-c", _FRESH_LOAD, str(folder), f"{tmp}/ids.pt", f"{tmp}/out.pt"],
            env=env,
            stdin=subprocess.DEVNULL,  # a trust_remote_code prompt must fail, not wait
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"loading {folder} in a fresh process failed:\n{proc.stderr[-4000:]}"
            )
        return torch.load(Path(tmp, "out.pt"))
