"""Text generation from a saved student (or any causal LM) folder."""

from __future__ import annotations

from pathlib import Path

import torch

from megadistill.errors import CheckpointError


def generate_text(model_dir: str | Path, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy-decode ``prompt`` with the model and tokenizer in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    from megadistill.model import load_tokenizer  # (registers the student with the Auto classes)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise CheckpointError(f"{model_dir} is not a model folder (no config.json)")
    try:
        tok = load_tokenizer(model_dir)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{model_dir} has no usable tokenizer: {exc}") from exc
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        )
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
