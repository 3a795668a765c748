"""Gemma 3 (``gemma3_text``): the adapter on the real configs' fields, parity beyond the local
layers' window, decoding, and the configs it refuses."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from megadistill.cli import main
from megadistill.errors import MegadistillError, UnsupportedTeacherError
from megadistill.model import HybridForCausalLM
from megadistill.model.configuration import HybridConfig
from megadistill.teachers import adapter_for, convert
from megadistill.teachers.conversion import (
    check_teacher_config,
    count_parameters,
    load_teacher_config,
)
from megadistill.teachers.tiny import tiny_teacher, tiny_teacher_config
from tests.decoding import make_both_branches_matter, prefilled_then_stepped
from tests.model.test_student import align_loss

# google/gemma-3-1b-pt's config.json as published (transformers 4.50 format: rope_theta,
# rope_local_base_freq and sliding_window_pattern instead of rope_parameters and layer_types).
GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "attn_logit_softcapping": None, "bos_token_id": 2, "cache_implementation": "hybrid",
    "eos_token_id": 1, "final_logit_softcapping": None, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
    "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
    "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1,
    "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000, "rope_scaling": None, "rope_theta": 1000000,
    "sliding_window": 512, "sliding_window_pattern": 6, "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0", "use_cache": True, "vocab_size": 262144,
}  # fmt: skip
# The text_config of google/gemma-3-27b-pt (the rest are Gemma3TextConfig's defaults): head_dim
# 128 but query_pre_attn_scalar 168, linear RoPE scaling (factor 8) on the global layers only.
GEMMA3_27B_TEXT = {
    "model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376,
    "intermediate_size": 21504, "num_attention_heads": 32, "num_hidden_layers": 62,
    "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024,
}  # fmt: skip


def _config_file(tmp_path, data):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("data", "window", "scalar", "billions"),
    [(GEMMA3_1B, 512, 256, 1.0), (GEMMA3_27B_TEXT, 1024, 168, 27.0)],
)
def test_real_configs_build_on_meta_with_the_teachers_layout(
    tmp_path, data, window, scalar, billions
):
    cfg = load_teacher_config(_config_file(tmp_path, data))
    counts = count_parameters(cfg, window=512, num_sinks=4)
    assert abs(counts["teacher"] / 1e9 - billions) / billions < 0.1
    assert counts["student"] == counts["teacher"] + counts["new"]
    student_cfg = HybridConfig.from_teacher(cfg, window=512)
    with torch.device("meta"):
        student = HybridForCausalLM(student_cfg)
    layers = student.model.layers
    # Five local layers, then one global, as sliding_window_pattern 6 says.
    expected = [None if (i + 1) % 6 == 0 else window for i in range(len(layers))]
    assert [layer.self_attn.teacher_window for layer in layers] == expected
    assert [layer.layer_type == "full_attention" for layer in layers] == [
        w is None for w in expected
    ]
    # By default a local layer stays the teacher's SWA (W_t slots, no sinks, no new parameters).
    local = layers[0].self_attn
    assert local.keep_local and local.window == window and local.num_sinks == 0
    assert not any(".layers.0." in n for n in student.new_parameter_names())
    assert layers[5].self_attn.window == 512 and layers[5].self_attn.num_sinks == 4
    assert all(layer.self_attn.scaling == scalar**-0.5 for layer in layers)
    # The student's copy of the teacher config rebuilds the same RoPE per layer type.
    rope = student_cfg.teacher().rope_parameters
    assert rope["sliding_attention"]["rope_theta"] == 10000
    assert rope["full_attention"]["rope_theta"] == 1000000
    linear = bool(data.get("rope_scaling"))
    assert rope["full_attention"]["rope_type"] == ("linear" if linear else "default")
    names = {n for n, _ in student.named_parameters()} - set(student.new_parameter_names())
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(cfg)
    assert names == {n for n, _ in teacher.named_parameters()}


def test_student_keeps_the_teachers_gemma_modules():
    teacher = tiny_teacher("gemma3_text")
    student, _ = convert(teacher, seed=0)
    # Scaled embedding, (1 + w) RMSNorm everywhere, four norms per layer, the teacher's MLP.
    assert type(student.model.embed_tokens) is type(teacher.model.embed_tokens)
    assert student.model.embed_tokens.embed_scale.item() == pytest.approx(64**0.5)
    for s_layer, t_layer in zip(student.model.layers, teacher.model.layers, strict=True):
        for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):  # fmt: skip
            assert type(getattr(s_layer, name)).__name__ == "Gemma3RMSNorm"
        assert type(s_layer.self_attn.q_norm).__name__ == "Gemma3RMSNorm"
        assert type(s_layer.mlp) is type(t_layer.mlp)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()


SLIDING = {"sliding_window": 12}  # the tiny config: layer 0 local, layer 1 global


@pytest.mark.parametrize("local_layers", ["hybrid", "swa"])
def test_gate_on_swa_equals_teacher_beyond_the_local_window_and_stage_one_target(local_layers):
    teacher = tiny_teacher("gemma3_text", **SLIDING)
    student, _ = convert(teacher, seed=0, gate_mode="swa", window=64, num_sinks=4,
                         local_layers=local_layers)  # fmt: skip
    assert student.model.layers[0].self_attn.keep_local == (local_layers == "swa")
    ids = torch.randint(0, 256, (2, 48))  # 4x the local window, within the global one
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)
        assert align_loss(student, ids).item() < 1e-10
        # The local window, the per-type RoPE and the query scalar all matter at this length.
        for change in ({"sliding_window": 4096}, {"rope_local_base_freq": 1e6},
                       {"query_pre_attn_scalar": 16}):  # fmt: skip
            other = tiny_teacher("gemma3_text", **{**SLIDING, **change})
            assert (other(ids).logits - teacher(ids).logits).abs().max() > 1e-3, change


@pytest.mark.parametrize("local_layers", ["hybrid", "swa"])
def test_decoding_and_generate_equal_the_teacher_beyond_the_local_window(local_layers):
    teacher = tiny_teacher("gemma3_text", **SLIDING)
    student, _ = convert(teacher, seed=0, gate_mode="swa", window=64, num_sinks=4,
                         local_layers=local_layers)  # fmt: skip
    prompt = torch.randint(3, 256, (2, 10))
    kwargs = {"max_new_tokens": 40, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        out = student.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
        expected = teacher.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(out, expected) and out.shape[1] == 50
    with torch.no_grad():
        full = teacher(out).logits
    torch.testing.assert_close(prefilled_then_stepped(student, out, 13), full)


def test_learned_gate_decodes_as_its_parallel_forward():
    student, _ = convert(tiny_teacher("gemma3_text", **SLIDING), seed=0, window=16,
                         num_sinks=2, chunk_size=4, local_layers="hybrid")  # fmt: skip
    student.eval()
    ids = torch.randint(0, 256, (2, 40))
    make_both_branches_matter(student)
    with torch.no_grad():
        full = student(ids).logits
    torch.testing.assert_close(prefilled_then_stepped(student, ids, 17), full)


@pytest.mark.parametrize(
    "field",
    [{"attn_logit_softcapping": 50.0}, {"final_logit_softcapping": 30.0},
     {"use_bidirectional_attention": True}],
)  # fmt: skip
def test_configs_the_student_cannot_reproduce_are_refused_naming_the_field(field):
    cfg = tiny_teacher_config("gemma3_text", **field)
    (name,) = field
    with pytest.raises(MegadistillError, match=name):
        check_teacher_config(cfg)
    assert adapter_for("gemma3_text").refusal(tiny_teacher_config("gemma3_text")) is None


def test_multimodal_gemma3_is_refused_with_the_way_out(tmp_path, capsys):
    data = {"model_type": "gemma3", "text_config": {**GEMMA3_27B_TEXT}}
    (tmp_path / "gemma").mkdir()
    _config_file(tmp_path / "gemma", data)
    with pytest.raises(UnsupportedTeacherError, match="gemma3_text"):
        adapter_for("gemma3")
    assert (
        main(["convert", "--teacher", str(tmp_path / "gemma"), "--out", str(tmp_path / "s")]) == 2
    )
    err = capsys.readouterr().err
    assert "multimodal" in err and "Gemma3ForCausalLM" in err
    assert not (tmp_path / "s").exists()
