"""The hybrid student: teacher parity, recurrent == parallel, O(1) cache, packing, HF round trip."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from megadistill.hybrid import HYBRID_KEYS
from megadistill.model import HybridForCausalLM
from megadistill.model.attention import NEW_PARAMETER_MODULES
from megadistill.stages.align import AttentionProbe
from megadistill.teachers import convert
from megadistill.teachers.conversion import architecture_difference
from megadistill.teachers.tiny import TINY_FAMILIES, tiny_teacher
from tests.decoding import make_both_branches_matter, prefilled_then_stepped


def align_loss(student, ids):
    """The stage I loss of one forward of ``student`` (the probe installed around it)."""
    with AttentionProbe(student) as probe:
        return probe.loss(student, ids)


def _student(family="llama", **hybrid):
    hybrid = {"window": 8, "num_sinks": 2, "chunk_size": 4, "local_layers": "hybrid", **hybrid}
    student, _ = convert(tiny_teacher(family), seed=0, **hybrid)
    return make_both_branches_matter(student)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_gate_on_swa_with_full_window_equals_teacher(family):
    teacher = tiny_teacher(family)
    student, _ = convert(teacher, seed=0, gate_mode="swa", window=64, num_sinks=4)
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


# Real configs' fields: Mistral's sliding_window (every layer); Qwen2/3's use_sliding_window with
# max_window_layers (layers from that index on); Olmo3's layer_types.
SLIDING = {
    "mistral": {"sliding_window": 12},
    "qwen2": {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": 12, "max_window_layers": 1},
    "olmo3": {"sliding_window": 12, "layer_types": ["sliding_attention", "full_attention"]},
    "phi3": {"sliding_window": 12},  # Phi-3-mini-4k ships sliding_window 2047
    "qwen3_moe": {"use_sliding_window": True, "sliding_window": 12},  # all layers, as its mask
}


@pytest.mark.parametrize("local_layers", ["hybrid", "swa"])
@pytest.mark.parametrize("family", sorted(SLIDING))
def test_sliding_window_teacher_equals_student_beyond_its_window(family, local_layers):
    teacher = tiny_teacher(family, **SLIDING[family])
    student, _ = convert(teacher, seed=0, gate_mode="swa", window=64, num_sinks=4,
                         local_layers=local_layers)  # fmt: skip
    windows = [layer.self_attn.teacher_window for layer in student.model.layers]
    assert 12 in windows and (family in ("mistral", "phi3", "qwen3_moe") or None in windows)
    ids = torch.randint(0, 256, (2, 48))  # 4x the teacher's window
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)
        # Stage I's target is the teacher's windowed attention: exact student, zero loss.
        assert align_loss(student, ids).item() < 1e-10
        # The window matters at this length (same weights, a window covering it: differ).
        unwindowed = tiny_teacher(family, **{**SLIDING[family], "sliding_window": 4096})
        assert (unwindowed(ids).logits - teacher(ids).logits).abs().max() > 1e-3


def test_moe_mlp_passes_through_untouched():
    teacher = tiny_teacher("qwen3_moe")
    student, _ = convert(teacher, seed=0)
    moe = student.model.layers[1].mlp
    assert type(moe) is type(teacher.model.layers[1].mlp) and "SparseMoe" in type(moe).__name__
    assert type(student.model.layers[0].mlp).__name__ == "Qwen3MoeMLP"  # mlp_only_layers
    teacher_sd = teacher.state_dict()
    for name, p in student.state_dict().items():
        if ".mlp." in name:
            torch.testing.assert_close(p, teacher_sd[name], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mistral", "olmo3"])
def test_sliding_teacher_prefill_plus_decode_equals_full_forward(family):
    teacher = tiny_teacher(family, **SLIDING[family])
    student, _ = convert(teacher, seed=0, window=16, num_sinks=2, chunk_size=4,
                         local_layers="hybrid")  # fmt: skip
    student.eval()
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = student(ids).logits
    torch.testing.assert_close(prefilled_then_stepped(student, ids, 17), full)


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_learned_gate_differs_from_teacher(family):
    # The invariant above must not hold trivially: with the mLSTM in play outputs change.
    teacher = tiny_teacher(family)
    student = _student(family)
    ids = torch.randint(0, 256, (1, 32))
    with torch.no_grad():
        assert (student(ids).logits - teacher(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_a_fresh_learned_gate_student_is_exactly_the_swa_floor(family):
    """gate_init 'floor' (the default): the converted student is the SWA-only student, bit for
    bit, at any length and through a cache; 'half' (the paper's gate at 0.5) is not."""
    teacher = tiny_teacher(family)
    hybrid = {"window": 8, "num_sinks": 2, "chunk_size": 4}
    fresh, _ = convert(teacher, seed=0, **hybrid)
    floor, _ = convert(teacher, seed=0, gate_mode="swa", **hybrid)
    half, _ = convert(teacher, seed=0, gate_init="half", **hybrid)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = floor(ids).logits
        torch.testing.assert_close(fresh(ids).logits, want, rtol=0, atol=0)
        torch.testing.assert_close(prefilled_then_stepped(fresh, ids, 13), want)
        assert (half(ids).logits - want).abs().max() > 1e-3


def test_a_negative_input_gate_bias_starts_shared_norm_at_the_floor():
    """mix shared_norm weighs a key beyond the window by exp(input gate): igate_bias -12 makes a
    fresh student the SWA floor within 1e-3 where the default 0 is far from it, and stage I
    still gets a gradient on every new parameter (small: Adam scales it up)."""
    teacher = tiny_teacher("llama")
    hybrid = {"window": 8, "num_sinks": 2, "chunk_size": 4, "mix": "shared_norm"}
    floor, _ = convert(teacher, seed=0, gate_mode="swa", **hybrid)
    open_, _ = convert(teacher, seed=0, **hybrid)
    closed, _ = convert(teacher, seed=0, igate_bias=-12.0, **hybrid)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = floor(ids).logits
        gaps = [(m(ids).logits - want).abs().max().item() for m in (open_, closed)]
    assert gaps[1] < 1e-3 < gaps[0], gaps
    assert all((b == -12.0).all() for n, b in closed.named_parameters() if "igate.bias" in n)
    align_loss(closed, ids).backward()
    new = [p for n, p in closed.named_parameters() if n.split(".")[-2] in NEW_PARAMETER_MODULES]
    assert new and all(p.grad is not None and p.grad.abs().sum() > 0 for p in new)


def test_the_floor_gate_learns_from_the_first_step():
    """At conversion the mLSTM branch is multiplied by 0, so only the per-head factor gets a
    gradient in stage I; after it moves, the rest of the branch does too."""
    student, _ = convert(tiny_teacher("llama"), seed=0, window=8, num_sinks=2, chunk_size=4)
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    new = dict(student.named_parameters())
    align_loss(student, ids).backward()
    scale = [p.grad for n, p in new.items() if "ogate_scale" in n]
    assert scale and all(g is not None and g.abs().sum() > 0 for g in scale)
    fgate = [p.grad for n, p in new.items() if "fgate.weight" in n]
    assert all(g is None or g.abs().sum() == 0 for g in fgate)
    student.zero_grad()
    with torch.no_grad():
        for n, p in new.items():
            if "ogate_scale" in n:
                p.fill_(0.5)
    align_loss(student, ids).backward()
    assert all(p.grad.abs().sum() > 0 for n, p in new.items() if "fgate.weight" in n)


def test_a_student_saved_before_gate_init_loads_with_the_half_gate(tmp_path):
    from megadistill.model import HybridConfig

    student, _ = convert(tiny_teacher("llama"), seed=0, window=8, num_sinks=2, gate_init="half")
    student.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    assert '"gate_init": "half"' in cfg
    old = "\n".join(line for line in cfg.splitlines() if '"gate_init"' not in line)
    assert old != cfg
    (tmp_path / "config.json").write_text(old)
    assert HybridConfig.from_pretrained(tmp_path).gate_init == "half"
    loaded = HybridForCausalLM.from_pretrained(tmp_path)
    assert not hasattr(loaded.model.layers[0].self_attn, "ogate_scale")


def test_a_shared_norm_student_saved_before_rope_on_none_loads_as_converted(tmp_path):
    # rope_on defaults to "none" with mix shared_norm now; a student converted with "input"
    # keeps it, whether its config names it or (saved before the setting existed) not.
    from megadistill.model import HybridConfig

    hybrid = {"window": 8, "num_sinks": 2, "mix": "shared_norm"}
    assert convert(tiny_teacher("llama"), seed=0, **hybrid)[0].config.rope_on == "none"
    student, _ = convert(tiny_teacher("llama"), seed=0, rope_on="input", **hybrid)
    student.save_pretrained(tmp_path)
    cfg = (tmp_path / "config.json").read_text()
    assert '"rope_on": "input"' in cfg
    assert HybridConfig.from_pretrained(tmp_path).rope_on == "input"
    (tmp_path / "config.json").write_text(
        "\n".join(line for line in cfg.splitlines() if '"rope_on"' not in line)
    )
    loaded = HybridForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.rope_on == "input" and not loaded.model.layers[0].self_attn.plain_features
    ids = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student.eval()(ids).logits)


def test_same_teacher_and_seed_give_same_fingerprint():
    teacher = tiny_teacher("qwen2")
    _, fp1 = convert(teacher, seed=3)
    _, fp2 = convert(teacher, seed=3)
    _, fp3 = convert(teacher, seed=4)
    assert fp1 == fp2 != fp3


@pytest.mark.parametrize(
    "change",
    [{"window": 16}, {"num_sinks": 2}, {"feature_dim": 8}, {"gate_mode": "swa"},
     {"mlstm_backend": "recurrent"}, {"swa_backend": "blocked"}, {"chunk_size": 16},
     {"local_layers": "hybrid"}, {"gate_init": "half"}, {"rope_on": "none"}],
)  # fmt: skip
def test_fingerprint_covers_the_hybrid_settings(change):
    # Same weights (same teacher and seed), different architecture: different students.
    teacher = tiny_teacher("qwen2")
    base = {"window": 8}
    assert convert(teacher, seed=3, **{**base, **change})[1] != convert(teacher, seed=3, **base)[1]


def test_architecture_covers_every_hybrid_key_and_the_teacher_config():
    student, _ = convert(tiny_teacher("mistral", sliding_window=16), seed=0)
    cfg = student.config.to_dict()
    for key in HYBRID_KEYS:
        assert architecture_difference(cfg, {**cfg, key: "changed"}).startswith(f"{key}=")
    other = {**cfg, "teacher_config": {**cfg["teacher_config"], "sliding_window": 32}}
    assert architecture_difference(cfg, other) == (
        "teacher_config.sliding_window=16 vs teacher_config.sliding_window=32"
    )
    assert architecture_difference(cfg, {**cfg, "transformers_version": "0"}) is None


def _assert_decoding_equals_parallel(student, ids, prefill=13):
    """Prefill + one token at a time, and one token at a time from empty, equal the parallel
    forward; returns the parallel logits."""
    with torch.no_grad():
        full = student(ids).logits
    torch.testing.assert_close(prefilled_then_stepped(student, ids, prefill), full)
    torch.testing.assert_close(prefilled_then_stepped(student, ids, 0), full)
    return full


@pytest.mark.parametrize("family", ["qwen3", "olmo3"])
def test_prefill_plus_decode_equals_full_forward(family):
    student = _student(family).eval()
    ids = torch.randint(0, 256, (2, 30))  # longer than window + sinks
    _assert_decoding_equals_parallel(student, ids)


@pytest.mark.parametrize("backend", ["recurrent", "native"])
def test_mlstm_backends_agree_in_the_model(backend):
    student = _student("llama")
    ids = torch.randint(0, 256, (2, 21))
    with torch.no_grad():
        ref = student(ids).logits
        student.config.mlstm_backend = backend
        torch.testing.assert_close(student(ids).logits, ref)


def test_cache_memory_constant_in_context_length():
    student = _student("llama", window=32, num_sinks=4).eval()
    with torch.no_grad():
        short = student.new_cache()
        student(torch.randint(0, 256, (1, 16)), cache=short)
        long = student.new_cache()
        student(torch.randint(0, 256, (1, 1990)), cache=long)
        for _ in range(10):
            student(torch.randint(0, 256, (1, 1)), cache=long)
    assert long.seen == 2000
    assert short.nbytes() == long.nbytes() > 0


def test_packed_documents_equal_separate_runs():
    student = _student("olmo2")
    a, b = torch.randint(0, 256, (1, 19)), torch.randint(0, 256, (1, 14))
    pos = torch.cat([torch.arange(19), torch.arange(14)])[None]
    with torch.no_grad():
        packed = student(torch.cat([a, b], 1), position_ids=pos).logits
        torch.testing.assert_close(packed[:, :19], student(a).logits)
        torch.testing.assert_close(packed[:, 19:], student(b).logits)


def test_save_load_round_trip_via_auto_class(tmp_path):
    student = _student("qwen2")
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, HybridForCausalLM)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=0, atol=0)


def test_tied_embeddings_round_trip(tmp_path):
    teacher = tiny_teacher("llama", tie_word_embeddings=True)
    student, _ = convert(teacher, seed=0, gate_mode="swa", window=64)
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    student.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, teacher(ids).logits)


def test_generate_equals_greedy_loop_without_cache():
    student = _student("mistral").eval()
    prompt = torch.randint(3, 256, (2, 5))
    out = student.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=14, do_sample=False,
        pad_token_id=0,
    )  # fmt: skip
    x = prompt
    with torch.no_grad():
        for _ in range(14):
            x = torch.cat([x, student(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, x)


def test_generate_feeds_one_new_token_per_forward_after_prefill():
    # Without its cache fed back, generate() re-runs the whole prefix each step: right tokens
    # (the test above passes either way), quadratic time. Count what each forward receives.
    student = _student("qwen2").eval()
    lengths = []

    def count(_module, args, kwargs):
        lengths.append((args[0] if args else kwargs["input_ids"]).shape[1])

    student.register_forward_pre_hook(count, with_kwargs=True)
    prompt = torch.randint(3, 256, (2, 7))
    student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=9,
                     do_sample=False, pad_token_id=0)  # fmt: skip
    assert lengths == [7] + [1] * 8


def test_generate_computes_only_the_logits_it_reads():
    # generate() asks for the last position's logits (logits_to_keep=1): the prefill of a long
    # prompt must not run the LM head over every prompt token.
    student = _student("llama").eval()
    positions = []
    student.lm_head.register_forward_pre_hook(lambda _m, args: positions.append(args[0].shape[1]))
    prompt = torch.randint(3, 256, (2, 20))
    student.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                     do_sample=False, pad_token_id=0)  # fmt: skip
    assert positions == [1] * 4


def _left_padded_pair():
    """Rows of 12 and 7 tokens, batched with the short one left-padded by 5: (long, short,
    batch, attention_mask)."""
    long, short = torch.randint(3, 256, (1, 12)), torch.randint(3, 256, (1, 7))
    batch = torch.cat([long, torch.cat([torch.zeros(1, 5, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :5] = 0
    return long, short, batch, mask


def test_left_padded_batch_matches_single_rows():
    student = _student("llama").eval()
    long, short, batch, mask = _left_padded_pair()
    with torch.no_grad():
        both = student(batch, attention_mask=mask).logits
        torch.testing.assert_close(both[1, 5:], student(short).logits[0])
        torch.testing.assert_close(both[0], student(long).logits[0])
        out = student.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)  # fmt: skip
        alone = student.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, 5:], alone[0])


def test_softmax_layers_are_the_teachers_attention_beyond_the_window():
    teacher = tiny_teacher("llama")
    n = teacher.config.num_hidden_layers
    student = _student("llama", softmax_layers=list(range(n)))
    assert student.new_parameter_names() == []
    ids = torch.randint(0, 256, (2, 40))  # 5x the window
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_softmax_layer_decode_equals_parallel_and_its_cache_grows(family):
    student = _student(family, softmax_layers=[1]).eval()
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        full = student(ids).logits
        cache = student.new_cache()
        parts = [student(ids[:, :13], cache=cache).logits]
        sizes = []
        for i in range(13, 30):
            parts.append(student(ids[:, i : i + 1], cache=cache).logits)
            sizes.append([lc.k.shape[2] for lc in cache.layers])
        torch.testing.assert_close(torch.cat(parts, 1), full)
    assert [s[1] for s in sizes] == list(range(14, 31))  # the kept layer holds every key
    assert len({s[0] for s in sizes}) == 1  # the hybrid layer's buffer stays S + W


def test_softmax_layer_left_padding_matches_single_rows():
    student = _student("llama", softmax_layers=[0]).eval()
    long, short, batch, mask = _left_padded_pair()
    with torch.no_grad():
        out = student.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False,
                               pad_token_id=0)  # fmt: skip
        alone = student.generate(short, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, 5:], alone[0])


def test_hedgehog_both_signs_doubles_the_features_and_decodes_exactly():
    student = _student("qwen2", feature_map="hedgehog_pm").eval()
    attn = student.model.layers[0].self_attn
    x = torch.randn(1, attn.num_heads, 5, attn.head_dim)
    phi = attn.q_feature(x)
    assert phi.shape[-1] == 2 * student.config.feature_dim
    torch.testing.assert_close(phi.sum(-1), torch.full((1, attn.num_heads, 5), 2.0))
    ids = torch.randint(0, 256, (1, 26))
    with torch.no_grad():
        full = student(ids).logits
    torch.testing.assert_close(prefilled_then_stepped(student, ids, 0), full)


def test_forget_gate_bias_range_is_a_setting():
    student = _student("llama", fgate_bias=[1.0, 9.0])
    bias = student.model.layers[0].self_attn.fgate.bias
    assert bias[0].item() == 1.0 and bias[-1].item() == 9.0
    with pytest.raises(ValueError, match="fgate_bias"):
        _student("llama", fgate_bias=[5.0, 1.0])
    with pytest.raises(ValueError, match="softmax_layers"):
        _student("llama", softmax_layers=[99])


# ----------------------------------------------------------------------------- shared_norm mix
def test_shared_norm_is_the_teacher_while_the_window_holds_the_context():
    teacher = tiny_teacher("llama")
    student = _student("llama", window=64, mix="shared_norm")
    assert not any("ogate" in n for n in student.new_parameter_names())
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)
        short = _student("llama", window=8, mix="shared_norm")
        assert (short(ids).logits - teacher(ids).logits).abs().max() > 1e-3  # beyond W it differs


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shared_norm_decode_equals_parallel(family):
    student = _student(family, mix="shared_norm").eval()
    ids = torch.randint(0, 256, (2, 30))
    full = _assert_decoding_equals_parallel(student, ids)
    with torch.no_grad():
        cache = student.new_cache()  # a chunk after a non-empty cache
        chunks = [
            student(ids[:, :5], cache=cache).logits,
            student(ids[:, 5:30], cache=cache).logits,
        ]
        torch.testing.assert_close(torch.cat(chunks, 1), full)


@pytest.mark.parametrize("mix", ["shared_norm", "gate"])
def test_rope_on_none_reads_the_same_at_every_offset(mix):
    """rope_on "none" (shared_norm's default): the feature maps read q and k before RoPE, so the
    same text at position ids from 0 or from 1000 gives the same logits (the softmax branch's
    RoPE is relative); past the training length the recurrent branch meets no new angle. With
    rope_on "input" the features see absolute angles and the logits move."""
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))  # 5 W
    pos = torch.arange(40).expand(2, -1)
    for rope_on in ("none", "input"):
        student = _student("llama", mix=mix, rope_on=rope_on).double().eval()
        with torch.no_grad():
            for layer in student.model.layers:  # feature maps well off the identity
                for fmap in (layer.self_attn.q_feature, layer.self_attn.k_feature):
                    fmap.weight.mul_(4.0)
            logits = [student(ids, position_ids=pos + off).logits for off in (0, 1000)]
            # decoding at the offset (prefill, then steps: the cache's plain keys) reads the same
            cache = student.new_cache()
            steps = [student(ids[:, :12], position_ids=pos[:, :12] + 1000, cache=cache).logits]
            for j in range(12, 40):
                steps.append(student(ids[:, j : j + 1], cache=cache).logits)
        torch.testing.assert_close(torch.cat(steps, 1), logits[1], rtol=1e-9, atol=1e-9)
        moved = (logits[0] - logits[1]).abs().max().item()
        # (the teacher's RoPE tables are float32: its angles at 1000 + p round apart from p's)
        assert moved < 1e-6 if rope_on == "none" else moved > 1e-3


def test_shared_norm_cache_is_constant_and_packing_is_exact():
    student = _student("olmo2", mix="shared_norm").eval()
    a, b = torch.randint(0, 256, (1, 19)), torch.randint(0, 256, (1, 14))
    pos = torch.cat([torch.arange(19), torch.arange(14)])[None]
    with torch.no_grad():
        packed = student(torch.cat([a, b], 1), position_ids=pos).logits
        torch.testing.assert_close(packed[:, :19], student(a).logits)
        torch.testing.assert_close(packed[:, 19:], student(b).logits)
        short, long = student.new_cache(), student.new_cache()
        student(torch.randint(0, 256, (1, 12)), cache=short)
        student(torch.randint(0, 256, (1, 300)), cache=long)
    assert short.nbytes() == long.nbytes() > 0


def test_shared_norm_row_starting_mid_document_then_a_new_one_is_two_documents():
    """A packed row that begins inside a document (no reset at its first token) and then starts
    another has one reset but two documents: the second must not see the first's keys, also where
    the row is long enough (> 2W) for the blocked form."""
    student = _student("llama", mix="shared_norm").eval()  # W = 8
    a, b = torch.randint(0, 256, (1, 23)), torch.randint(0, 256, (1, 20))
    pos = torch.cat([torch.arange(5, 28), torch.arange(20)])[None]
    with torch.no_grad():
        packed = student(torch.cat([a, b], 1), position_ids=pos).logits
        torch.testing.assert_close(packed[:, 23:], student(b).logits)


def test_shared_norm_left_padding_and_generate():
    student = _student("llama", mix="shared_norm").eval()
    long, short, batch, mask = _left_padded_pair()
    with torch.no_grad():
        both = student(batch, attention_mask=mask).logits
        torch.testing.assert_close(both[1, 5:], student(short).logits[0])
        out = student.generate(batch, attention_mask=mask, max_new_tokens=12, do_sample=False,
                               pad_token_id=0)  # fmt: skip
        alone = student.generate(short, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(out[1, 5:], alone[0])


# ----------------------------------------------------------------------------- local layers
@pytest.mark.parametrize("family", ["mistral", "olmo3", "gemma3_text"])
def test_local_layers_swa_keeps_the_teachers_window_exactly(family):
    teacher = tiny_teacher(family, **SLIDING.get(family, {"sliding_window": 12}))
    student, _ = convert(teacher, seed=0, window=8, num_sinks=2, chunk_size=4,
                         local_layers="swa")  # fmt: skip
    local = [layer.self_attn.teacher_window is not None for layer in student.model.layers]
    kept = [layer.self_attn.keep_local for layer in student.model.layers]
    assert kept == local and any(local)
    new = student.new_parameter_names()
    assert [any(f".layers.{i}." in n for n in new) for i in range(2)] == [not x for x in local]
    ids = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        if all(local):  # every layer kept: the teacher itself, whatever W is (8 < W_t = 12)
            torch.testing.assert_close(student(ids).logits, teacher(ids).logits)
            assert align_loss(student, ids).item() == 0.0
    student.eval()
    _assert_decoding_equals_parallel(student, ids)
    with torch.no_grad():
        cache = student.new_cache()
        student(ids, cache=cache)
    sizes = [lc.k.shape[2] for lc in cache.layers]
    assert sizes == [12 if is_local else 8 + 2 for is_local in local]  # W_t slots vs S + W


def test_softmax_layers_keep_a_local_layers_window():
    # A local teacher layer listed in softmax_layers is the teacher's windowed attention (a
    # W_t-slot ring buffer), not full attention.
    teacher = tiny_teacher("olmo3", **SLIDING["olmo3"])
    student, _ = convert(teacher, seed=0, gate_mode="swa", window=64, local_layers="hybrid",
                         softmax_layers=[0, 1])  # fmt: skip
    assert student.new_parameter_names() == []
    ids = torch.randint(0, 256, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(student(ids).logits, teacher(ids).logits)


def test_default_keeps_local_layers_and_older_students_load_as_they_were_made(tmp_path):
    import json

    teacher = tiny_teacher("olmo3", **SLIDING["olmo3"])
    assert convert(teacher, seed=0)[0].config.local_layers == "swa"
    student, _ = convert(teacher, seed=0, window=8, local_layers="hybrid")
    student.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    del cfg["local_layers"]  # as saved before the setting existed
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.config.local_layers == "hybrid"
    ids = torch.randint(0, 256, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, student(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_no_module_is_shared_between_layers(family):
    """Each module of a student is reachable by one path only. ZeRO-3 hooks every child of every
    module: a module shared by all layers (transformers >= 5.25 makes apply_rotary_pos_emb one
    nn.Module per family) is hooked once per layer at each of its calls (30x the hooks and
    3,600 autograd nodes per SmolLM2 step)."""
    student, _ = convert(tiny_teacher(family), window=8, num_sinks=2, softmax_layers=[0])
    paths: dict[int, list[str]] = {}
    for name, module in student.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    shared = {names[0]: names[1:] for names in paths.values() if len(names) > 1}
    assert not shared, f"modules reachable by several paths: {shared}"
    # the family's RoPE is still what the student applies
    attn = student.model.layers[-1].self_attn
    q, k = (
        torch.randn(1, attn.num_heads, 5, attn.head_dim),
        torch.randn(1, attn.num_kv, 5, attn.head_dim),
    )
    cos, sin = torch.randn(1, 5, attn.head_dim), torch.randn(1, 5, attn.head_dim)
    rope = attn.adapter.modeling().apply_rotary_pos_emb
    for got, want in zip(attn.apply_rotary(q, k, cos, sin), rope(q, k, cos, sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
