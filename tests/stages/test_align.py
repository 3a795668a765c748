"""Stage I: the attention probe and its loss (the model itself knows nothing of stage I)."""

import pytest
import torch

from megadistill.stages.align import AttentionProbe, layer_mse
from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher
from tests.model.test_student import _student, align_loss


def test_align_mode_returns_layer_mse_and_only_new_params_get_grads():
    student = _student("qwen3").train()
    new = set(student.new_parameter_names())
    for name, p in student.named_parameters():
        p.requires_grad_(name in new)
    ids = torch.randint(0, 256, (2, 24))
    loss = align_loss(student, ids)
    assert loss.ndim == 0 and loss > 0
    loss.backward()
    grads = {
        n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert grads and grads <= new
    # With the gate on SWA and a full window the alignment loss is zero.
    exact, _ = convert(tiny_teacher("qwen3"), seed=0, gate_mode="swa", window=64)
    assert align_loss(exact, ids).item() < 1e-10


def test_align_mode_skips_softmax_layers():
    teacher = tiny_teacher("qwen3")
    n = teacher.config.num_hidden_layers
    exact, _ = convert(teacher, seed=0, window=4, softmax_layers=list(range(n)))
    ids = torch.randint(0, 256, (1, 24))
    assert align_loss(exact, ids).item() == 0.0
    mixed = _student("qwen3", softmax_layers=[0]).train()
    assert not any(".layers.0." in n for n in mixed.new_parameter_names())
    assert align_loss(mixed, ids) > 0


def test_shared_norm_align_gradients_reach_only_new_parameters():
    student = _student("qwen3", mix="shared_norm").train()
    new = set(student.new_parameter_names())
    for name, p in student.named_parameters():
        p.requires_grad_(name in new)
    align_loss(student, torch.randint(0, 256, (2, 24))).backward()
    grads = {n for n, p in student.named_parameters() if p.grad is not None}
    assert grads == new
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert any(p.grad.abs().sum() > 0 for n, p in student.named_parameters() if "igate" in n)


@pytest.mark.parametrize("family", ["llama", "qwen3", "olmo2"])
def test_align_loss_equals_an_independent_computation_from_the_teacher(family):
    # Each hybrid layer is fed the teacher's own hidden states (the teacher path), so the loss is
    # the sum over layers of the MSE between the student layer and the teacher's attention block,
    # both run here on what the teacher's attention block received in the teacher's forward.
    teacher = tiny_teacher(family)
    student, _ = convert(teacher, seed=0, window=8, num_sinks=2, chunk_size=4)
    for layer in student.model.layers:
        layer.self_attn.ogate.bias.data.fill_(0.3)  # both branches matter
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def keep(module, args, kwargs, output):
        seen.append((kwargs.get("hidden_states", args[0] if args else None), output[0]))

    hooks = [
        layer.self_attn.register_forward_hook(keep, with_kwargs=True)
        for layer in teacher.model.layers
    ]
    with torch.no_grad():
        teacher(ids, use_cache=False)
        for hook in hooks:
            hook.remove()
        info = student.model._seq_info(ids, None, None, None)
        cos, sin = student.model.rotary_emb(seen[0][0], info.pos)
        expected = sum(
            (layer.self_attn(x, cos, sin, info) - a).pow(2).mean()
            for layer, (x, a) in zip(student.model.layers, seen, strict=True)
        )
        got = align_loss(student, ids)
    assert got > 1e-6  # the student differs from the teacher: the comparison means something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-9)


def test_probe_is_removed_on_exit_and_the_model_is_unchanged_outside_it():
    student = _student("llama")
    ids = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        plain = student(ids).logits
        with AttentionProbe(student) as probe:
            teacher_path = student(ids).logits  # layers pass the teacher's attention on
            with pytest.raises(RuntimeError, match="already have an observer"):
                AttentionProbe(student).__enter__()
            assert probe.loss(student, ids) > 0
        assert all(layer.self_attn.observer is None for layer in student.model.layers)
        torch.testing.assert_close(student(ids).logits, plain, rtol=0, atol=0)
    assert (teacher_path - plain).abs().max() > 1e-4


def test_layer_mse_ignores_padding():
    out, target = torch.zeros(1, 3, 4), torch.ones(1, 3, 4)
    target[0, 2] = 5.0  # a padded position's error must not count
    valid = torch.tensor([[True, True, False]])
    assert layer_mse(out, target, valid).item() == 1.0


def test_relative_layer_mse_is_the_error_over_the_targets_scale():
    # align_loss: relative divides by the target's mean square on the same real tokens, so a
    # layer (or a batch) whose outputs are 10x larger weighs the same; padding counts in neither.
    g = torch.Generator().manual_seed(0)
    out, target = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    target[1, 4] = 100.0  # padding
    want = layer_mse(out, target, valid) / layer_mse(torch.zeros_like(out), target, valid)
    got = layer_mse(out, target, valid, relative=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(layer_mse(10 * out, 10 * target, valid, relative=True), got)
    assert layer_mse(out, target, torch.zeros_like(valid), relative=True).item() == 0.0


def test_align_loss_setting_is_checked_by_name(tmp_path):
    from megadistill.config import ConfigError
    from megadistill.stages.runner import load_stage_config

    base = [
        "stage=align", "student=s", f"out_dir={tmp_path}", "data.sources=[{path: a.txt}]",
        "data.seq_len=64", "engine.ds_config=student_zero3", "engine.global_batch_size=2",
        "engine.micro_batch_size=1", "optim.lr=1e-2", "trainer.max_steps=1",
    ]  # fmt: skip
    assert load_stage_config(None, base).align_loss == "mse"
    assert load_stage_config(None, [*base, "align_loss=relative"]).align_loss == "relative"
    with pytest.raises(ConfigError, match="'align_loss' = 'l1' is not one of 'mse', 'relative'"):
        load_stage_config(None, [*base, "align_loss=l1"])
