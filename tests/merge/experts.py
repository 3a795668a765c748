"""Build real 2-rank ZeRO-3 expert checkpoints once per test session (run in spawned ranks).

Every expert starts from the same seeded initial model theta_0 and trains a few AdamW steps on
its own random tokens, then is saved in the megadistill checkpoint format: DeepSpeed's
``save_checkpoint`` output + ``megadistill.json`` + ``checksums.json`` + ``latest`` (written last).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

TAG = "step_00000003"
NUM_STEPS = 3
SEQ_LEN = 8

# Odd sizes on purpose: hidden 63 and vocab 257 give tensors whose element count is odd, so the
# ZeRO-3 partitions carry padding that a reader must drop.
TINY_LLAMA = dict(
    hidden_size=63,
    intermediate_size=100,
    num_hidden_layers=2,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=16,
    vocab_size=257,
    max_position_embeddings=64,
)


def ds_config() -> dict:
    """A tiny fp32 ZeRO-3 config where every parameter is partitioned."""
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 1_000_000,
    }


def tiny_llama(seed: int = 0, **overrides) -> torch.nn.Module:
    """The seeded initial model theta_0 (identical on every rank)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).float()


def fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the initial weights (names, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _train_and_save(
    model: torch.nn.Module,
    out: Path,
    expert: int,
    fp: str,
    tokenizer: str | None,
) -> None:
    import deepspeed
    import torch.distributed as dist

    from megadistill.integrity import atomic_write_json, atomic_write_text, write_manifest

    rank = dist.get_rank()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config())
    gen = torch.Generator().manual_seed(1000 * expert + rank)
    vocab = model.config.vocab_size
    for _ in range(NUM_STEPS):
        ids = torch.randint(0, vocab, (2, SEQ_LEN), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(str(out), tag=TAG, save_latest=False)
    dist.barrier()
    if rank == 0:
        meta = {
            "format": 1,
            "tag": TAG,
            "step": NUM_STEPS,
            "world_size": dist.get_world_size(),
            "fingerprint": fp,
            "model_config": model.config.to_dict(),
            "config": {"expert": expert},
            "version": "test",
            "git_revision": None,
            "tokenizer": tokenizer,
        }
        atomic_write_json(out / TAG / "megadistill.json", meta)
        write_manifest(out / TAG)
        atomic_write_text(out / "latest", TAG)
    dist.barrier()


def _student() -> tuple[torch.nn.Module, str]:
    from megadistill.teachers.conversion import convert
    from megadistill.teachers.tiny import tiny_teacher

    teacher = tiny_teacher("llama", tie_word_embeddings=True)
    student, fp = convert(teacher, seed=0)
    return student.float(), fp


def build_experts(root: str, num_experts: int) -> None:
    """Rank entry point: theta_0 as an HF folder, K full experts, 2 frozen ones, one mismatched.

    Layout under ``root``: ``theta0/`` (HF folder), ``tokenizer/``, ``expert_<k>/`` (all params
    trainable), ``frozen_<k>/`` (only attention q/o projections trainable, like stage I),
    ``wide/`` (different intermediate size), ``student_<k>/`` (the hybrid student with tied
    embeddings, only its new parameters trainable as in stage I; trained with next-token CE: the
    merge needs trained weights, not stage I's loss).
    """
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed()
    root_path = Path(root)
    fp = fingerprint(tiny_llama())
    if dist.get_rank() == 0:
        from megadistill.assets import byte_tokenizer

        tiny_llama().save_pretrained(root_path / "theta0")
        byte_tokenizer(root_path / "tokenizer")
    dist.barrier()
    tok = str(root_path / "tokenizer")
    for k in range(num_experts):
        _train_and_save(tiny_llama(), root_path / f"expert_{k}", k, fp, tok)
    for k in range(2):
        model = tiny_llama()
        for name, param in model.named_parameters():
            param.requires_grad_(name.endswith(("q_proj.weight", "o_proj.weight")))
        _train_and_save(model, root_path / f"frozen_{k}", 10 + k, fp, tok)

    _train_and_save(tiny_llama(intermediate_size=102), root_path / "wide", 30, fp, None)
    for k in range(2):
        student, student_fp = _student()
        new = set(student.new_parameter_names())
        for name, param in student.named_parameters():
            param.requires_grad_(name in new)
        _train_and_save(student, root_path / f"student_{k}", 40 + k, student_fp, tok)
    if dist.get_rank() == 0:
        (root_path / "done.json").write_text(json.dumps({"num_experts": num_experts}))
