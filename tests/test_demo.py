"""The README's main job, quick variant, end to end; and every shipped recipe is valid."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from megadistill.cli import main
from megadistill.integrity import verify_manifest
from megadistill.pipeline import load_recipe, write_plan

RECIPES = sorted((Path(__file__).parents[1] / "megadistill" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_shipped_recipes_validate_every_stage(recipe, tmp_path):
    parsed = load_recipe(recipe)
    write_plan(parsed, tmp_path / "run")  # checks every stage section as a StageConfig
    assert abs(sum(parsed.weights) - 1) < 1e-9 and len(parsed.experts) >= 1


def test_quick_demo_runs_the_whole_pipeline(tmp_path, capsys):
    run = tmp_path / "demo"
    assert main(["demo", "--quick", "--run-dir", str(run)]) == 0
    report = run / "pipeline" / "eval" / "report.md"
    assert capsys.readouterr().out.strip().endswith(f"report: {report.resolve()}")
    text = report.read_text()
    assert "| tiny_mc" in text and "SWA window W: 16" in text
    # A random teacher may sit at chance on tiny_mc: then the report says so instead of C_alpha.
    assert "alpha*" in text or "tiny_mc (teacher at chance: not in C_alpha) | acc |" in text
    assert "## Training budget" in text and "random" in text
    assert (report.parent / "recovery.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((report.parent / "results.json").read_text())
    # Teacher and student rows come from two real lm-eval runs on different models.
    assert results["teacher"]["config"]["model_type"] == "llama"
    assert results["student"]["config"]["model_type"] == "megadistill_hybrid"
    assert results["teacher"]["fingerprint"] != results["student"]["fingerprint"]
    # Every stage trained and every artefact verifies.
    for stage in (
        "experts/gpl/align",
        "experts/gpl/distill",
        "experts/permissive/distill",
        "final",
    ):
        rows = (run / "pipeline" / stage / "metrics.jsonl").read_text().splitlines()
        assert len(rows) >= 2, stage
    for folder in ("merged", "final/final"):
        verify_manifest(run / "pipeline" / folder)
    # The merge really averaged the two experts.
    a, b, merged = (
        load_file(next((run / "pipeline" / p).glob("*.safetensors")))
        for p in ("experts/gpl/distill/final", "experts/permissive/distill/final", "merged")
    )
    name = "model.layers.0.self_attn.q_feature.weight"
    assert ((a[name] + b[name]) / 2 - merged[name]).abs().max() < 1e-6

    # `report` rebuilds keep the budget section; running the demo again resumes: nothing reruns.
    assert main(["report", str(report.parent)]) == 0
    assert report.read_text() == text
    final = run / "pipeline" / "final" / "final" / "checksums.json"
    stamp = final.stat().st_mtime_ns
    assert main(["demo", "--quick", "--run-dir", str(run)]) == 0
    assert final.stat().st_mtime_ns == stamp and report.read_text() == text


def test_demo_layer_choice_both_takes_the_two_rankings_in_turn(tmp_path):
    """--layer-criterion both: the retrieval and the NLL ranking are each measured once (cached in
    the run's assets) and the kept layers are their best layers taken in turn."""
    from megadistill.config import ConfigError
    from megadistill.demo import RECIPES, DemoConfig, _choose_layers, _quick_assets
    from megadistill.eval.layer_choice import combine_rankings

    teacher, data, _ = _quick_assets(tmp_path)
    sources = [{"path": str(data["gpl"])}]
    cfg, recipe = DemoConfig(quick=True), RECIPES / "tiny_cpu.yaml"
    layers = _choose_layers(tmp_path, teacher, sources, 2, recipe, cfg, "both")
    caches = {p.name: json.loads(p.read_text()) for p in tmp_path.glob("layer_choice*.json")}
    assert sorted(c["criterion"] for c in caches.values()) == ["nll", "retrieval"]
    by = {c["criterion"]: c["ranking"] for c in caches.values()}
    assert layers == sorted(combine_rankings(by["retrieval"], by["nll"])[:2])
    assert combine_rankings([3, 1, 2, 0], [1, 3, 0, 2]) == [3, 1, 2, 0]
    assert combine_rankings([0, 1, 2], [2, 1, 0]) == [0, 2, 1]
    # measured once: a second choice reads the caches (a changed cache changes the answer)
    flipped = {**caches["layer_choice_retrieval_w16_s2.json"]}
    flipped["ranking"] = flipped["ranking"][::-1]
    (tmp_path / "layer_choice_retrieval_w16_s2.json").write_text(json.dumps(flipped))
    again = _choose_layers(tmp_path, teacher, sources, 1, recipe, cfg, "both")
    assert again == [flipped["ranking"][0]]
    with pytest.raises(ConfigError, match="'knn' is not one of nll, retrieval, both"):
        _choose_layers(tmp_path, teacher, sources, 1, recipe, cfg, "knn")


def test_keep_flags_replace_the_recipes_whole_choice():
    # --keep-softmax or --keep-heads alone replaces both the recipe's layers and its heads (the
    # quality recipe keeps heads: K layers must not land beside them); both set both.
    from megadistill.demo import kept_overrides

    assert kept_overrides(None, None, None, None) == []
    heads = [[1, 0], [3, 2]]
    assert kept_overrides(2, None, [4, 5], None) == [
        "hybrid.softmax_layers=[4, 5]", "hybrid.softmax_heads=[]"]  # fmt: skip
    assert kept_overrides(None, 2, None, heads) == [
        "hybrid.softmax_layers=[]", "hybrid.softmax_heads=[[1, 0], [3, 2]]"]  # fmt: skip
    for zero in ((0, None), (None, 0)):  # 0: none of either
        assert kept_overrides(*zero, None, None) == [
            "hybrid.softmax_layers=[]", "hybrid.softmax_heads=[]"]  # fmt: skip
    assert kept_overrides(1, 2, [4], heads) == [
        "hybrid.softmax_layers=[4]", "hybrid.softmax_heads=[[1, 0], [3, 2]]"]  # fmt: skip


def test_quality_recipe_keeps_valid_retrieval_heads():
    # The recipe's heads convert against SmolLM2-135M's shape (30 layers, 9 heads, 3 KV heads;
    # student built on the meta device), 12 KV heads of 9 layers, no whole layer.
    from transformers import LlamaConfig

    from megadistill.plan import model_shape

    (quality,) = [r for r in RECIPES if r.stem == "smollm2_quality"]
    recipe = load_recipe(quality, ["teacher=unused"])
    smollm2 = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                          num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)  # fmt: skip
    shape = model_shape(smollm2, **recipe.hybrid.to_dict())
    assert shape.num_softmax_heads == 12 and shape.num_softmax_layers == 0


def test_demo_head_choice_keeps_the_teachers_best_retrieval_heads(tmp_path):
    """--keep-heads K: the teacher's KV heads ranked once by attention on the needle (cached in
    the run's assets), the top K kept."""
    from megadistill.demo import _choose_heads, _quick_assets

    teacher, _, _ = _quick_assets(tmp_path)
    heads = _choose_heads(tmp_path, teacher, 3)
    cached = json.loads((tmp_path / "head_choice.json").read_text())
    assert heads == sorted(cached["ranking"][:3]) and len(cached["ranking"]) > 3
    cached["ranking"] = cached["ranking"][::-1]  # read back, not measured again
    (tmp_path / "head_choice.json").write_text(json.dumps(cached))
    assert _choose_heads(tmp_path, teacher, 1) == [cached["ranking"][0]]


def test_quality_demo_puts_every_student_beside_the_trained_floor(tmp_path):
    """The quality demo's `positions/`: the fresh, stage I and final students and the trained
    SWA-only floor by position, with the recipe's needle lengths for every model (here the
    floor stands in for each student: its losses and needles are the untrained floor's)."""
    from megadistill.assets import byte_tokenizer
    from megadistill.demo import TRAINED_FLOOR, _compare_floors, _quick_assets
    from megadistill.teachers import convert
    from megadistill.teachers.tiny import tiny_teacher

    teacher, _, heldout = _quick_assets(tmp_path / "assets")
    floor, _ = convert(tiny_teacher("llama", seed=0), window=8, num_sinks=2, gate_mode="swa")
    pipeline = tmp_path / "pipeline"
    dirs = [pipeline / "student", pipeline / "experts" / "a" / "align" / "final",
            pipeline / "final" / "final", tmp_path / "floor"]  # fmt: skip
    for d in dirs:
        floor.save_pretrained(d)
        byte_tokenizer(d)
    md = _compare_floors(teacher, pipeline, dirs[-1], [f"lgpl:out:{heldout}"],
                         tmp_path / "positions", str(tmp_path / "cache"), "96,128")  # fmt: skip
    result = json.loads((tmp_path / "positions" / "positions.json").read_text())
    assert list(result["students"]) == ["fresh", "stage_I_a", "student", TRAINED_FLOOR]
    assert result["reference"] == TRAINED_FLOOR and result["niah"]["lengths"] == [96, 128]
    beyond = result["sets"]["lgpl"]["beyond"]
    for name in ("fresh", "stage_I_a", "student"):
        assert beyond[name]["rel_gap"] == pytest.approx(beyond["floor"]["rel_gap"], abs=1e-9)
        assert result["niah"]["models"][name] == result["niah"]["models"]["floor"]
    assert "| swa_trained | " in md.read_text()
