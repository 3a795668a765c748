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
from functools import partial
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from megadistill.bench.inference import prefill_decode
from megadistill.bench.timing import Clock, Stopwatch, measure, median_by_key
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


def speed(models: dict[str, Any], context: int, batch: int, decode: int, repeats: int):
    """Prefill and per-token decode seconds (median over ``repeats``, models interleaved) and
    cache bytes after ``context`` + ``decode`` tokens."""
    ids = torch.randint(3, 1000, (batch, context))
    clock = Clock("wall")
    calls = {
        name: partial(prefill_decode, model, ids, decode, clock, per_token=False)
        for name, model in models.items()
    }
    runs = measure(calls, repeats=repeats)
    out = {}
    for name, samples in runs.items():
        med = median_by_key(samples.values)
        out[name] = {
            "prefill_s": med["prefill_s"],
            "decode_s_per_token": med["decode_s_per_token"],
            "cache_mib": samples.values[-1]["cache_bytes"] / 2**20,
        }
    return out


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
        with Stopwatch() as sw:
            losses = stage_one(student, train, args.lr, args.warmup) if args.steps else [0.0]
        results[f"{mode}/stage1"] = {
            "first": sum(losses[:5]) / len(losses[:5]), "last": sum(losses[-5:]) / len(losses[-5:]),
            "seconds": sw.wall,
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
