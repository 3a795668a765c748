"""softmax_heads: single KV heads of a hybrid layer kept as the teacher's full attention.

A kept head is the teacher's attention for that head (and its GQA query heads) at any length;
the layer's other heads are the hybrid's, untouched; with every head of every layer kept the
student is the teacher. The cache paths (chunks, decoding steps, packed documents) are covered
by ``test_cache.py``'s cases with softmax_heads.
"""

import json

import pytest
import torch

from megadistill.assets import byte_tokenizer
from megadistill.cli import main
from megadistill.config import ConfigError
from megadistill.eval.layer_choice import rank_heads
from megadistill.hybrid import HybridSettings
from megadistill.teachers import convert
from megadistill.teachers.tiny import tiny_teacher
from tests.decoding import make_both_branches_matter, stepped_with_cache

HYBRID = {"window": 8, "num_sinks": 2, "chunk_size": 4}


def _o_proj_inputs(model, ids):
    """The input of every layer's o_proj (B, T, H * d): the heads' outputs, concatenated."""
    seen = []
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0]))
        for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("mix", ["gate", "shared_norm"])
def test_every_head_kept_is_the_teacher(mix):
    teacher = tiny_teacher("llama", seed=0)
    n, kv = teacher.config.num_hidden_layers, teacher.config.num_key_value_heads
    heads = [[i, h] for i in range(n) for h in range(kv)]
    student, _ = convert(teacher, seed=0, mix=mix, softmax_heads=heads, **HYBRID)
    student = make_both_branches_matter(student.eval())
    ids = torch.randint(0, 256, (2, 40))  # five windows
    with torch.no_grad():
        want = teacher(ids).logits
        torch.testing.assert_close(student(ids).logits, want)
    stepped, _ = stepped_with_cache(student, ids, 3)  # a prefill of 3, then steps
    torch.testing.assert_close(stepped, want)


def test_a_kept_head_is_the_teachers_and_the_other_heads_are_the_hybrids():
    # Layer 1, KV head 0 (query heads 0 and 1 of 4: GQA groups of 2) kept: those two heads'
    # outputs are the teacher's, heads 2 and 3 those of the same student without it (layer 0
    # kept whole in both, so that layer 1 sees the teacher's input).
    teacher = tiny_teacher("llama", seed=0)
    d = teacher.config.hidden_size // teacher.config.num_attention_heads
    hybrid = {**HYBRID, "softmax_layers": [0]}
    with_head, _ = convert(teacher, seed=0, softmax_heads=[[1, 0]], **hybrid)
    without, _ = convert(teacher, seed=0, **hybrid)
    with_head, without = make_both_branches_matter(with_head), make_both_branches_matter(without)
    ids = torch.randint(0, 256, (1, 40))
    got, hybrid, want = (_o_proj_inputs(m, ids) for m in (with_head, without, teacher))
    torch.testing.assert_close(got[0], want[0])
    kept, rest = slice(0, 2 * d), slice(2 * d, 4 * d)
    torch.testing.assert_close(got[1][..., kept], want[1][..., kept])
    torch.testing.assert_close(got[1][..., rest], hybrid[1][..., rest])
    assert not torch.allclose(hybrid[1][..., kept], want[1][..., kept])  # beyond W they differ


@pytest.mark.parametrize("packed", [False, True])
def test_a_prefill_builds_no_t_by_t_mask_for_kept_heads_and_layers(monkeypatch, packed):
    # A prompt of T tokens into an empty cache: kept layers and heads take the no-cache paths
    # (SDPA's causal kernel for one plain document, the blocked form for packed rows), never a
    # T x T mask (at 32K tokens that mask alone is 1 GiB per layer, 4 GiB as SDPA's floats); the
    # logits are the parallel forward's.
    import torch.nn.functional as F

    teacher = tiny_teacher("llama", seed=0)
    student, _ = convert(teacher, seed=0, softmax_layers=[0], softmax_heads=[[1, 0]], **HYBRID)
    student = make_both_branches_matter(student.eval())
    t = 320  # beyond the blocked form's threshold (2 blocks of 128)
    ids = torch.randint(0, 256, (2, t))
    pos = torch.arange(t).expand(2, -1).clone()
    if packed:
        pos[1, 100:] -= 100  # row 1: a second document from token 100
    with torch.no_grad():
        want = student(ids, position_ids=pos).logits
    sdpa, masks = F.scaled_dot_product_attention, []

    def spy(*args, attn_mask=None, **kw):
        if attn_mask is not None:
            masks.append(tuple(attn_mask.shape[-2:]))
        return sdpa(*args, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    cache = student.new_cache()
    with torch.no_grad():
        got = student(ids, position_ids=pos, cache=cache).logits
    assert not [m for m in masks if m[0] >= t and m[1] >= t], masks
    assert cache.layers[0].k.shape[2] == cache.layers[1].full.k.shape[2] == t
    torch.testing.assert_close(got, want)


def test_decoding_appends_kept_keys_into_room_not_a_copy_of_the_cache(monkeypatch):
    # A decoding step writes its key into the kept layer's and kept head's buffers, which keep
    # room for more (a quarter of the cache, at least ROOM_MIN tokens), where torch.cat copied
    # the whole cache at every step: the buffers move only when they grow, the logits are the
    # parallel forward's across growths and across a beam search's reordering of the rows, and
    # nbytes counts the room.
    from megadistill.model import cache as cache_module

    monkeypatch.setattr(cache_module, "ROOM_MIN", 3)
    teacher = tiny_teacher("llama", seed=0)
    student, _ = convert(teacher, seed=0, softmax_layers=[0], softmax_heads=[[1, 0]], **HYBRID)
    student = make_both_branches_matter(student.eval())
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        want = student(ids).logits
    cache, rows, got, buffers = student.new_cache(), torch.tensor([0, 1]), [], []
    with torch.no_grad():
        got.append(student(ids[:, :8], cache=cache).logits)
        for j in range(8, 40):
            if j == 24:  # a beam search swaps the rows
                rows = rows.flip(0)
                cache.reorder_cache(torch.tensor([1, 0]))
            got.append(student(ids[rows, j : j + 1], cache=cache).logits[rows])
            kept, head = cache.layers[0], cache.layers[1].full
            assert kept.k.shape[2] == head.k.shape[2] == j + 1
            buffers += [(lc.room[0].shape[2], lc.room[0].data_ptr()) for lc in (kept, head)]
    torch.testing.assert_close(torch.cat(got, 1), want)
    # 8 tokens grow to 12, 16, 21, 27 (room: a quarter, at least 3, beyond the next token); the
    # swap at 24 copies the rows and starts over: 31, 39, 49. Between growths nothing moves.
    sizes = [size for size, _ in buffers[::2]]
    assert sorted(set(sizes)) == [12, 16, 21, 27, 31, 39, 49]
    steps = list(zip(buffers[::2], buffers[2::2])) + list(zip(buffers[1::2], buffers[3::2]))
    assert all(a == b for a, b in steps if a[0] == b[0])
    views = sum(t.numel() * t.element_size() for lc in cache.layers for t in lc.tensors())
    assert cache.nbytes() > views


def test_kept_heads_train_the_other_heads_only():
    # Stage I's gradient reaches the new parameters of the heads that stay hybrid; the kept
    # head's share of the gates gets none (its hybrid output is replaced).
    teacher = tiny_teacher("llama", seed=0)
    student, _ = convert(teacher, seed=0, softmax_heads=[[1, 0]], **HYBRID)
    make_both_branches_matter(student).train()
    student(torch.randint(0, 256, (1, 40))).logits.square().mean().backward()
    grad = student.model.layers[1].self_attn.igate.weight.grad  # (H, hidden)
    assert grad[:2].abs().max() == 0 and grad[2:].abs().max() > 0


def test_bad_softmax_heads_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"\[layer, kv_head\] pairs"):
        HybridSettings(softmax_heads=[3])
    with pytest.raises(ConfigError, match="distinct"):
        HybridSettings(softmax_heads=[[1, 0], [1, 0]])
    with pytest.raises(ConfigError, match="softmax_layers keeps whole"):
        HybridSettings(softmax_heads=[[1, 0]], softmax_layers=[1])
    teacher = tiny_teacher("llama", seed=0)
    with pytest.raises(ValueError, match=r"kv_head in \[0, 2\)"):
        convert(teacher, softmax_heads=[[0, 2]], **HYBRID)
    with pytest.raises(ValueError, match=r"layer in \[0, 2\)"):
        convert(teacher, softmax_heads=[[5, 0]], **HYBRID)
    mistral = tiny_teacher("mistral", sliding_window=12)  # every layer local
    with pytest.raises(ValueError, match="local .sliding-window. teacher"):
        convert(mistral, softmax_heads=[[0, 0]], local_layers="hybrid", **HYBRID)


def test_heads_ranked_by_attention_on_the_needle_and_the_cli_prints_them(tmp_path, capsys):
    teacher = tiny_teacher("llama", seed=0)
    teacher.save_pretrained(tmp_path / "t")
    tokenizer = byte_tokenizer(tmp_path / "t")
    result = rank_heads(tmp_path / "t", needle_length=96, num_trials=1)
    n, kv = teacher.config.num_hidden_layers, teacher.config.num_key_value_heads
    assert sorted(result["ranking"]) == [[i, h] for i in range(n) for h in range(kv)]
    scores = [result["scores"][i][h] for i, h in result["ranking"]]
    assert scores == sorted(scores, reverse=True) and 0 < scores[0] <= 1
    # the score, by hand: one probe's attention weights (output_attentions) on the needle
    from megadistill.eval.niah import DEFAULT_FILLER, NEEDLE, _probe_ids, probe_plan

    filler = tokenizer(DEFAULT_FILLER, add_special_tokens=False).input_ids
    teacher.config._attn_implementation = "eager"
    total = torch.zeros(n, teacher.config.num_attention_heads)
    probes = probe_plan([96], (0.1, 0.5, 0.9), 1, seed=1)[96]
    for depth, value in probes:
        ids, n_ans = _probe_ids(tokenizer, filler, 96, depth, value)
        needle = tokenizer(NEEDLE.format(value=value), add_special_tokens=False).input_ids
        start = next(j for j in range(len(ids)) if ids[j : j + len(needle)] == needle)
        with torch.no_grad():
            att = teacher(torch.tensor([ids]), output_attentions=True).attentions
        rows = range(len(ids) - n_ans - 1, len(ids) - 1)
        for i, a in enumerate(att):
            total[i] += a[0][:, rows, start : start + len(needle)].sum(-1).mean(-1)
    by_hand = (total / len(probes)).view(n, kv, -1).amax(-1)
    torch.testing.assert_close(torch.tensor(result["scores"]), by_hand)
    out = tmp_path / "heads.json"
    args = ["choose-heads", "--teacher", str(tmp_path / "t"), "--k", "2", "--needle-length", "96",
            "--trials", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    top = sorted(json.loads(out.read_text())["ranking"][:2])
    assert f"softmax_heads for k = 2: {json.dumps(top)}" in capsys.readouterr().out
