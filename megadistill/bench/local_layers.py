"""What a teacher's sliding-window layer should become, measured: the ``local_layers`` setting.

``python -m megadistill.bench.local_layers`` builds a real sliding-window teacher offline:
SmolLM2-135M-Instruct (the demo's teacher) as a Qwen2 model with Olmo-3's layer pattern (three
``sliding_attention`` layers of W_t tokens, then one ``full_attention`` layer; zero q/k/v biases,
so the weights compute what SmolLM2 computes inside the window). Two students of it, same seed:
``local_layers=hybrid`` (every layer a hybrid; the local ones with window min(W, W_t)) and
``local_layers=swa`` (the local layers kept as the teacher's own SWA, only the global ones hybrid),
each trained by stage I (layer-wise alignment, new parameters only, the same steps and data),
then measured on held-out Austen chapters: next-token NLL by position against the teacher, and
prefill/decode time and cache size side by side (interleaved, medians of repeats, as ratios).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from megadistill.stages.align import AttentionProbe
from megadistill.teachers import convert

log = logging.getLogger(__name__)


def sliding_teacher(folder: Path, window: int, every: int = 4) -> torch.nn.Module:
    """SmolLM2 (a Llama) as a Qwen2 with ``sliding_attention`` layers of ``window`` tokens and a
    ``full_attention`` layer every ``every``-th (Olmo-3's pattern)."""
    data = json.loads((folder / "config.json").read_text())
    for key in ("model_type", "architectures", "_model_name_or_path", "transformers_version"):
        data.pop(key, None)
    n = data["num_hidden_layers"]
    types = ["full_attention" if (i + 1) % every == 0 else "sliding_attention" for i in range(n)]
    cfg = AutoConfig.for_model(
        "qwen2", **data, use_sliding_window=True, sliding_window=window, layer_types=types
    )
    teacher = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    src = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()
    missing, unexpected = teacher.load_state_dict(src, strict=False)
    assert not unexpected and all(k.endswith("_proj.bias") for k in missing), (missing, unexpected)
    with torch.no_grad():
        for name, p in teacher.named_parameters():
            if name.endswith("_proj.bias"):
                p.zero_()
    teacher.tie_weights()
    return teacher.eval()


def token_windows(tokenizer, docs: list[str], length: int, limit: int) -> torch.Tensor:
    """Up to ``limit`` rows of ``length`` tokens, each the start of one document."""
    rows = []
    for doc in docs:
        ids = tokenizer(doc)["input_ids"]
        if len(ids) >= length:
            rows.append(ids[:length])
        if len(rows) == limit:
            break
    return torch.tensor(rows)


def stage_one(student, batches: torch.Tensor, lr: float, warmup: int) -> list[float]:
    """Stage I as the stage does it: only the new parameters learn, loss = summed layer MSE;
    linear warm-up to ``lr``, cosine to lr / 100."""
    new = set(student.new_parameter_names())
    params = [p for n, p in student.named_parameters() if n in new]
    for n, p in student.named_parameters():
        p.requires_grad_(n in new)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = len(batches)
    losses = []
    student.train()
    for step, ids in enumerate(batches):
        frac = (step + 1) / warmup if step < warmup else None
        if frac is None:
            prog = (step - warmup) / max(1, steps - warmup)
            frac = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * prog))
        for group in opt.param_groups:
            group["lr"] = lr * frac
        with AttentionProbe(student) as probe:
            loss = probe.loss(student, ids[None])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    student.eval()
    return losses


@torch.no_grad()
def nll_by_position(model, rows: torch.Tensor) -> torch.Tensor:
    """(rows, T-1) next-token NLL."""
    out = []
    for ids in rows:
        logits = model(ids[None]).logits[0, :-1].float()
        out.append(torch.nn.functional.cross_entropy(logits, ids[1:], reduction="none"))
    return torch.stack(out)


@torch.no_grad()
def _timed(model, ids: torch.Tensor, decode: int, student: bool) -> tuple[float, float, int]:
    cache = model.new_cache() if student else DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(ids, cache=cache, use_cache=True, logits_to_keep=1)
    t1 = time.perf_counter()
    nxt = out.logits[:, -1:].argmax(-1)
    for _ in range(decode):
        nxt = model(nxt, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
    t2 = time.perf_counter()
    if student:
        mem = cache.nbytes()
    else:
        mem = sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
            if isinstance(t, torch.Tensor)
        )
    return t1 - t0, (t2 - t1) / decode, mem


def speed(models: dict[str, Any], context: int, batch: int, decode: int, repeats: int):
    """Prefill and per-token decode seconds (median over ``repeats``, models interleaved) and
    cache bytes after ``context`` + ``decode`` tokens."""
    ids = torch.randint(3, 1000, (batch, context))
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in models}
    mem = {}
    for _ in range(repeats):
        for name, model in models.items():
            pre, dec, mem[name] = _timed(model, ids, decode, name != "teacher")
            times[name].append((pre, dec))
    return {
        name: {
            "prefill_s": statistics.median(t[0] for t in ts),
            "decode_s_per_token": statistics.median(t[1] for t in ts),
            "cache_mib": mem[name] / 2**20,
        }
        for name, ts in times.items()
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from megadistill.assets import english_corpus, smollm2_teacher

    torch.manual_seed(0)
    folder = smollm2_teacher()
    teacher = sliding_teacher(folder, args.teacher_window)
    tok = AutoTokenizer.from_pretrained(folder)
    train = token_windows(tok, english_corpus(split="train"), args.seq, args.steps)
    held = token_windows(tok, english_corpus(split="heldout"), args.eval_len, args.eval_docs)
    results: dict[str, Any] = {"settings": vars(args)}
    students = {}
    for mode in ("hybrid", "swa"):
        student, _ = convert(
            teacher, seed=0, window=args.window, num_sinks=4, local_layers=mode, mix="gate",
            gate_mode=args.gate_mode,
        )  # fmt: skip
        t0 = time.perf_counter()
        losses = stage_one(student, train, args.lr, args.warmup) if args.steps else [0.0]
        results[f"{mode}/stage1"] = {
            "first": sum(losses[:5]) / len(losses[:5]), "last": sum(losses[-5:]) / len(losses[-5:]),
            "seconds": time.perf_counter() - t0,
            "new_parameters": sum(p.numel() for n, p in student.named_parameters()
                                  if n in set(student.new_parameter_names())),
        }  # fmt: skip
        students[mode] = student
        log.info("%s: %s", mode, results[f"{mode}/stage1"])
    nll = {"teacher": nll_by_position(teacher, held)}
    nll.update({m: nll_by_position(s, held) for m, s in students.items()})
    w, wt = args.window, args.teacher_window
    buckets = {
        "[0,W)": (0, w),
        "[W,Wt)": (w, wt),
        "[Wt,2Wt)": (wt, 2 * wt),
        ">=2Wt": (2 * wt, None),
    }
    for name, (lo, hi) in buckets.items():
        cols = slice(max(lo - 1, 0), None if hi is None else hi - 1)  # predicting position >= lo
        t = nll["teacher"][:, cols].mean(1)
        row = {"teacher": t.mean().item()}
        for m in students:
            gap = nll[m][:, cols].mean(1) - t  # per document
            row[m] = gap.mean().item()
            row[f"{m}_se"] = (gap.std() / len(gap) ** 0.5).item()
        results[f"nll_gap/{name}"] = row
        log.info("nll_gap %s: %s", name, row)
    for batch in args.batches:
        results[f"speed/batch{batch}"] = speed(
            {"teacher": teacher, **students}, args.context, batch, args.decode, args.repeats
        )
        log.info("speed batch %d: %s", batch, results[f"speed/batch{batch}"])
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher-window", type=int, default=256)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=60, help="stage I steps (0: untrained)")
    p.add_argument("--gate-mode", default="learned", help="learned, or swa: the SWA floors")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--eval-len", type=int, default=1024)
    p.add_argument("--eval-docs", type=int, default=8)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--decode", type=int, default=16)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = run(args)
    text = json.dumps(results, indent=2, default=str)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
