"""Tiny random teachers of every supported family (2 layers, hidden 64, vocabulary 256).

The quick demo, the benchmarks, the self-test and the tests build their teachers here: small
enough for a CPU in seconds, and every family's particular parameters (biases, q/k norms, sliding
layers, partial RoPE, MoE) are present so that each code path runs.
"""

from __future__ import annotations

from typing import Any

TINY_FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "olmo2", "olmo3", "phi3", "qwen3_moe", "gemma3_text",
)  # fmt: skip


def tiny_teacher_config(family: str = "llama", **overrides: Any):
    """A 2-layer, hidden-64 config of a teacher family (GQA: 4 query heads, 2 KV heads)."""
    from transformers import AutoConfig

    base: dict[str, Any] = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=None,
        bos_token_id=1,
        eos_token_id=2,
    )
    if family == "llama":
        base["attention_bias"] = True  # exercise every bias path
    if family == "qwen3":
        base["head_dim"] = 16
    if family == "olmo3":
        base["sliding_window"] = 4096
        base["layer_types"] = ["sliding_attention", "full_attention"]
    if family == "phi3":
        base["partial_rotary_factor"] = 0.5  # as Phi-3.5/Phi-4-mini: RoPE on part of head_dim
    if family == "qwen3_moe":
        # Layer 0 dense (mlp_only_layers), layer 1 a 4-expert top-2 MoE, as real configs mix.
        base.update(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    mlp_only_layers=[0], decoder_sparse_step=1, norm_topk_prob=True)  # fmt: skip
    if family == "gemma3_text":
        # As the real configs: explicit head_dim, a query_pre_attn_scalar that is not head_dim
        # (the 27B's 168 vs 128), local/global layers with their own RoPE (linear scaling on the
        # global ones, as the 4B+), tied embeddings.
        base.update(head_dim=16, query_pre_attn_scalar=24, sliding_window=4096,
                    layer_types=["sliding_attention", "full_attention"],
                    rope_scaling={"rope_type": "linear", "factor": 8.0}, rope_theta=1e6,
                    rope_local_base_freq=1e4, tie_word_embeddings=True)  # fmt: skip
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def tiny_teacher(family: str = "llama", seed: int = 0, **overrides: Any):
    """A tiny random teacher of ``family`` in fp32, eval mode, eager attention."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_teacher_config(family, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    # Random (not zero) biases and norm weights so parity tests see every parameter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
