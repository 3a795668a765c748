"""The benchmarks run, tiny, and measure what they claim (their ratios are not judged here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megadistill.bench.generate import GenerateBenchConfig
from megadistill.bench.merge import MergeBenchConfig
from megadistill.bench.train import TrainBenchConfig, run_train_bench
from megadistill.cli import main
from megadistill.config import ConfigError

REPO = Path(__file__).resolve().parents[1]


def test_inference_bench_student_cache_is_constant_teacher_cache_grows(capsys):
    args = ["hidden_size=64", "vocab_size=256", "contexts=[64,128]", "decode_tokens=4", "window=32"]
    assert main(["bench", "inference", *args]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["context"] for r in rows] == [64, 128]
    assert rows[0]["student_cache_mib"] == rows[1]["student_cache_mib"]  # S + W buffer, O(1)
    # The teacher's KV cache holds every prefilled and decoded token: bytes per token constant.
    per_token = [r["teacher_cache_mib"] / (r["context"] + 4) for r in rows]
    assert per_token[0] == pytest.approx(per_token[1])
    for r in rows:
        assert r["decode_ratio"] == pytest.approx(
            r["student_decode_tok_s"] / r["teacher_decode_tok_s"]
        )


def test_inference_bench_softmax_layer_cache_grows_with_context(capsys):
    base = ["hidden_size=64", "vocab_size=256", "contexts=[64,128]", "decode_tokens=4", "window=32"]
    assert main(["bench", "inference", *base]) == 0
    hybrid = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["bench", "inference", *base, "softmax_layers=[1]"]) == 0
    kept = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # One of 4 layers keeps every key: its share of the teacher's KV cache grows per token.
    growth = [k["student_cache_mib"] - h["student_cache_mib"] for k, h in zip(kept, hybrid)]
    teacher_layer = [r["teacher_cache_mib"] / 4 for r in kept]
    assert growth[1] > growth[0] > 0
    assert teacher_layer[1] - teacher_layer[0] == pytest.approx(growth[1] - growth[0], rel=0.05)


def test_inference_bench_on_a_teacher_folder_interleaved(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from megadistill.teachers.tiny import tiny_teacher_config

    folder = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(
        tiny_teacher_config(max_position_embeddings=128)
    ).save_pretrained(folder)
    base = [f"teacher={folder}", "decode_tokens=3", "window=32", "threads=1"]
    assert main(["bench", "inference", *base, "contexts=[64,128]", "repeats=2"]) == 0
    out = capsys.readouterr().out
    assert "student decode tok/s at 128 / at 64" in out
    rows = json.loads(out.strip().splitlines()[-1])
    assert [r["context"] for r in rows] == [64, 128]
    assert rows[0]["student_cache_mib"] == rows[1]["student_cache_mib"]
    # The real teacher's own limit bounds the contexts; a missing folder is named.
    assert main(["bench", "inference", *base, "contexts=[256]"]) == 2
    assert "max_position_embeddings is 128" in capsys.readouterr().err
    assert main(["bench", "inference", f"teacher={tmp_path / 'nothing'}"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_generate_bench_times_both_models_through_generate(capsys):
    args = ["hidden_size=64", "vocab_size=256", "prompts=[16,40]", "new_tokens=3", "window=16",
            "repeats=1", "count_tokens=2"]  # fmt: skip
    assert main(["bench", "generate", *args]) == 0
    out = capsys.readouterr().out
    assert "aten ops per generated token" in out
    result = json.loads(out.strip().splitlines()[-1])
    assert [r["prompt"] for r in result["rows"]] == [16, 40]
    for r in result["rows"]:
        assert r["ratio"] == pytest.approx(r["teacher_s"] / r["student_s"])
        for kind in ("teacher", "student"):  # the first forward (prefill) splits the time
            assert 0 < r[f"{kind}_prefill_s"] < r[f"{kind}_s"] and r[f"{kind}_decode_s"] > 0
        assert r["decode_ratio"] == pytest.approx(r["teacher_decode_s"] / r["student_decode_s"])
    assert result["ops_per_token"]["teacher"] > 0 and result["ops_per_token"]["student"] > 0
    # floor=true times the SWA-only student beside them: the bound of the ratio.
    assert main(["bench", "generate", *args[:-1], "prompts=[16]", "floor=true"]) == 0
    out = capsys.readouterr().out
    assert "SWA-only student" in out
    row = json.loads(out.strip().splitlines()[-1])["rows"][0]
    assert row["floor_ratio"] == pytest.approx(row["teacher_s"] / row["floor_s"])
    assert row["floor_decode_ratio"] == pytest.approx(
        row["teacher_decode_s"] / row["floor_decode_s"]
    )
    assert "ratio" in row and "floor_prefill_ratio" in row
    # eager_step=true: the same student without its compiled step and scan, beside it.
    assert main(["bench", "generate", *args, "prompts=[16]", "eager_step=true"]) == 0
    out = capsys.readouterr().out
    assert "on eager ops" in out
    result = json.loads(out.strip().splitlines()[-1])
    row = result["rows"][0]
    assert row["eager_ratio"] == pytest.approx(row["teacher_s"] / row["eager_s"])
    # the compiled branch is ~40 ops per layer fewer (2 layers)
    assert result["ops_per_token"]["eager"] > result["ops_per_token"]["student"] + 50
    with pytest.raises(ConfigError, match="clock"):
        GenerateBenchConfig(clock="sundial")
    # mix= / feature_map=: the quality recipe's student (shared_norm), named in the table
    # and softmax_heads= (the student and the floor keep them)
    assert main(["bench", "generate", *args, "prompts=[40]", "mix=shared_norm",
                 "feature_map=hedgehog_pm", "softmax_heads=[[1,0]]", "floor=true"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert (
        "W = 16, mix shared_norm, feature map hedgehog_pm, 0 softmax layer(s), 1 softmax KV" in out
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["student"] == {"window": 16, "mix": "shared_norm", "feature_map": "hedgehog_pm",
                                 "softmax_layers": [], "softmax_heads": [[1, 0]]}  # fmt: skip
    assert result["rows"][0]["ratio"] > 0 and result["rows"][0]["floor_ratio"] > 0
    with pytest.raises(ConfigError, match="mix='blend'"):
        GenerateBenchConfig(mix="blend")
    with pytest.raises(ConfigError, match="softmax_heads"):
        GenerateBenchConfig(softmax_heads=((1,),))


def test_generate_bench_on_a_config_with_random_weights(tmp_path, capsys):
    """teacher=CONFIG.json builds random weights of that config (no weights file, no hub); the
    shipped names are the real small teachers' configs (parameter counts of the real models)."""
    import torch

    from megadistill.bench.synthetic import SyntheticModelConfig, bench_configs
    from megadistill.teachers.tiny import tiny_teacher_config

    config = tmp_path / "gemma3.json"
    data = tiny_teacher_config("gemma3_text", max_position_embeddings=128).to_dict()
    config.write_text(json.dumps({**data, "model_type": "gemma3_text"}))
    args = [f"teacher={config}", "prompts=[16]", "new_tokens=2", "window=8", "repeats=1",
            "count_tokens=0"]  # fmt: skip
    assert main(["bench", "generate", *args]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["prompt"] for r in result["rows"]] == [16] and result["rows"][0]["ratio"] > 0
    assert not list(tmp_path.glob("*.safetensors"))
    want = {"gemma3_270m": 268.1e6, "qwen25_0p5b": 494.0e6}
    assert set(bench_configs()) == set(want)
    for name, count in want.items():
        with torch.device("meta"):
            teacher = SyntheticModelConfig(teacher=name).load_teacher(0)
        assert sum(p.numel() for p in teacher.parameters()) == pytest.approx(count, rel=1e-3)


def test_train_bench_stage1_and_stage2_on_a_teacher_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    from megadistill.teachers.tiny import tiny_teacher_config

    folder = tmp_path / "teacher"
    AutoModelForCausalLM.from_config(tiny_teacher_config(attention_bias=False)).save_pretrained(
        folder
    )
    cfg = TrainBenchConfig(
        teacher=str(folder), seq_len=96, num_steps=2, top_k=16, loss_chunk_size=64, window=32,
        world_sizes=(1,), kinds=("teacher", "student", "align"), threads=1,
        work_dir=str(tmp_path / "work"),
    )  # fmt: skip
    summary = run_train_bench(cfg)
    assert sorted(summary["groups"]) == ["align_w1", "student_w1", "teacher_w1"]
    for name, group in summary["groups"].items():
        assert group["tokens_per_cpu_s"] > 0 and group["last_loss"] < group["first_loss"], name
    # Stage I trains only the new parameters: its optimizer holds far less than stage II's.
    states = {k: g["model_states_by_kind_mib"]["optim"] for k, g in summary["groups"].items()}
    assert states["align_w1"] < 0.5 * states["student_w1"]
    assert summary["ratios"]["step_cpu_align_over_teacher_w1"] > 0
    with pytest.raises(ConfigError, match="kinds"):
        TrainBenchConfig(kinds=("teacher", "stage3"))


def test_train_bench_halves_model_states_at_two_ranks(tmp_path):
    cfg = TrainBenchConfig(
        hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        vocab_size=512, seq_len=128, num_steps=2, top_k=16, loss_chunk_size=64, window=32,
        param_persistence_threshold=0, work_dir=str(tmp_path),
    )  # fmt: skip
    summary = run_train_bench(cfg)
    assert sorted(summary["groups"]) == ["student_w1", "student_w2", "teacher_w1", "teacher_w2"]
    for name, group in summary["groups"].items():
        assert group["tokens_per_s"] > 0 and group["last_loss"] < group["first_loss"], name
    ratios = summary["ratios"]
    for kind in ("teacher", "student"):  # nothing persists unpartitioned at threshold 0
        assert ratios[f"model_states_w2_over_w1_{kind}"] == pytest.approx(0.5, abs=0.02)
    assert ratios["step_cpu_student_over_teacher_w1"] > 0
    with pytest.raises(ConfigError, match="num_heads by num_kv_heads"):
        TrainBenchConfig(num_heads=8, num_kv_heads=3)


def test_merge_bench_script_smoke(tmp_path):
    # The tools/ script is the CLI's `megadistill bench merge`: its last line is the JSON.
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_merge.py"), "smoke=true", "num_experts=2",
         "repeats=2", f"work_dir={tmp_path / 'work'}"],
        capture_output=True, text=True, timeout=600, cwd=REPO, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "streaming_vs_baseline: peak" in proc.stdout
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for mode in ("baseline", "streaming_noverify", "streaming"):
        assert results[mode]["mode"] == mode
        assert results[mode]["peak_rss_mib"] > 0 and results[mode]["wall_s"] > 0
    assert set(results["summary"]) == {"streaming_vs_baseline", "streaming_noverify_vs_baseline"}
    assert not (tmp_path / "work").exists()  # removed without keep=true
    with pytest.raises(ConfigError, match="modes"):
        MergeBenchConfig(work_dir=str(tmp_path), modes=("baseline", "fast"))


def test_data_bench_counts_the_same_tokens_as_the_datasets_baseline(tmp_path, capsys):
    from megadistill.assets import byte_tokenizer

    byte_tokenizer(tmp_path / "tok")
    args = [f"work_dir={tmp_path / 'w'}", "corpus_mb=0.3", f"tokenizer={tmp_path / 'tok'}",
            "budget_tokens=20000", "seq_len=64"]  # fmt: skip
    assert main(["bench", "data", *args]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ours = {r["workers"]: r for r in rows if r["mode"] == "ours" and not r["budget"]}
    base = {r["workers"]: r for r in rows if r["mode"] == "baseline"}
    (budget,) = [r for r in rows if r["budget"]]
    assert set(ours) == set(base) == {1, 2}
    for n in (1, 2):  # the same documents: ours adds one EOS per document
        assert ours[n]["documents"] == base[n]["documents"] > 100
        assert ours[n]["tokens"] == base[n]["tokens"] + base[n]["documents"]
        assert ours[n]["peak_rss_mib"] > 0 and base[n]["peak_rss_mib"] > 0
    assert 20000 <= budget["train_tokens"] < ours[1]["tokens"] / 2  # only a prefix was read


def test_local_layers_bench_teacher_is_smollm2_inside_its_window():
    # The measured sliding-window teacher computes what SmolLM2 computes while the sequence fits
    # its window, and differs beyond it (its local layers cut the context).
    import torch
    from transformers import AutoModelForCausalLM

    from megadistill.assets import smollm2_teacher
    from megadistill.bench.local_layers import sliding_teacher

    folder = smollm2_teacher()
    teacher = sliding_teacher(folder, window=16)
    source = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(3, 1000, (1, 40))
    with torch.no_grad():
        got, want = teacher(ids).logits, source(ids).logits
    torch.testing.assert_close(got[:, :16], want[:, :16], rtol=1e-4, atol=1e-4)
    assert (got[:, 20:] - want[:, 20:]).abs().max() > 1e-2
    assert teacher.config.layer_types[:4] == ["sliding_attention"] * 3 + ["full_attention"]
