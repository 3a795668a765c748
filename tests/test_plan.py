"""The memory planner: hand-computed bytes, DeepSpeed's estimator, 7B configs, the offload ladder,
the activation formula against saved tensors, and model states against a real 2-rank ZeRO-3 run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from megadistill.config import ConfigError, parse_size
from megadistill.engine.launch import run_distributed
from megadistill.plan import (
    PREFETCH_BUCKET,
    REDUCE_BUCKET,
    GiB,
    ModelShape,
    Option,
    PlanSettings,
    deepspeed_estimate,
    layer_activation_terms,
    make_plan,
    model_shape,
    plan_stage,
    zero3_model_states,
)
from megadistill.stages.align import AttentionProbe
from megadistill.teachers.conversion import load_teacher_config
from megadistill.teachers.tiny import tiny_teacher, tiny_teacher_config

TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, vocab_size=256)


def test_parse_size() -> None:
    assert parse_size("80GB") == 80 * GiB
    assert parse_size("80GiB") == 80 * GiB
    assert parse_size("1TB") == 1024 * GiB
    assert parse_size("512M") == 512 * 1024**2
    with pytest.raises(ConfigError, match="80GB"):
        parse_size("eighty")


def test_model_states_by_hand() -> None:
    # 1000 params, all trainable, 4 ranks, bf16: 250 per rank.
    ms = zero3_model_states(1000, 1000, 4, "bf16", offload_optimizer=False)
    assert (ms.params, ms.grads, ms.master, ms.adam, ms.step_fp32_grads) == (
        500, 500, 1000, 2000, 1000,
    )  # fmt: skip
    assert ms.persistent == 4000 and ms.gpu == 5000 and ms.cpu == 0
    # fp32: parameters and gradients at 4 bytes; DeepSpeed still keeps a separate fp32 master.
    ms = zero3_model_states(1000, 1000, 4, "fp32", offload_optimizer=False)
    assert (ms.params, ms.grads, ms.master, ms.adam) == (1000, 1000, 1000, 2000)
    # stage I: only 100 new params train; 1001 params round up to 251 per rank.
    ms = zero3_model_states(1001, 100, 4, "bf16", offload_optimizer=False)
    assert (ms.params, ms.grads, ms.master, ms.adam) == (502, 50, 100, 200)
    # optimizer offload: only the parameters stay on the GPU.
    ms = zero3_model_states(1000, 1000, 4, "bf16", offload_optimizer=True)
    assert ms.gpu == 500 and ms.cpu == 500 + 1000 + 2000 + 1000


def _toy_shape(**kw) -> ModelShape:
    base = dict(
        family="llama", vocab=100, hidden=8, intermediate=16, num_layers=2, num_heads=2,
        num_kv_heads=1, head_dim=4, feature_dim=4, window=4, num_sinks=1, chunk_size=2,
        num_softmax_layers=0, mlstm_feature_dim=4,
        qk_norm=False, mlstm_backend="chunkwise", swa_backend="flex", teacher_params=1000,
        student_params=1100, new_params=100, student_largest_module=400,
        teacher_largest_module=400,
    )  # fmt: skip
    base.update(kw)
    return ModelShape(**base)


def test_layer_activation_terms_by_hand() -> None:
    s = _toy_shape()  # H=8, I=16, nh=2, nkv=1, d=f=4, c=2; bf16 (a=2)
    terms = layer_activation_terms(s, 2, "distill")
    expected = {
        "norms": 2 * (4 * 8 + 2 * 8 + 4),  # two RMSNorms: fp32 input, bf16 output, rsqrt
        "proj_input": 2 * 8,
        "value": 2 * 1 * 4,
        "rope_qk": 2 * 3 * 4,
        "feature_maps": 2 * 3 * 4,
        "gate_input": 2 * 4 * 4,
        "qk_norm": 0,
        "mlstm_inputs": 4 * 2 * 4 + 4 * 2 * (4 + 4),  # fp32 q/sqrt(d); fp32 k, v (repeated)
        "mlstm_vectors": 8 * 2 * 4 + 4 * 2 * 4,
        "mlstm_scores": 12 * 2 * 2 + 2 + 4 * 2 * 2,
        "mlstm_states": 3 * 4 * 2 * 4 * 4 / 2,  # entering, carried and own (C, n) per chunk
        "mlstm_out": 2 * 2 * 4,
        "mixing": 2 * 2 * 4 + 2 * 2 * 2,
        "o_proj_input": 2 * 2 * 4,
        "mlp": 4 * 2 * 16 + 2 * 8,
        "swa_lse": 4 * 2,
    }
    assert terms == expected
    align = layer_activation_terms(s, 2, "align")
    assert "mlp" not in align and "norms" not in align
    assert align["align_mse"] == 4 * 8 and align["mlstm_scores"] == 12 * 2 * 2 + 2


def test_stage_plan_items_by_hand() -> None:
    s = _toy_shape()
    st = PlanSettings(nodes=1, gpus_per_node=4, gpu_mem=GiB, seq_len=8, micro_batch=1,
                      top_k=4, loss_chunk=2, reserve=0)  # fmt: skip
    p = plan_stage(s, st, "distill-online", Option(teacher_offload="cpu"))
    assert p.cpu["teacher params (offloaded)"] == 2 * 250
    assert "teacher params" not in p.gpu
    assert p.gpu["top-k targets buffer"] == 8 * 4 * 12
    assert p.gpu["chunked loss buffer"] == 2 * 100 * (2 + 12)
    assert p.gpu["student ZeRO-3 working (gathered layer, buckets)"] == 2 * (
        2 * 400 + PREFETCH_BUCKET + REDUCE_BUCKET
    )
    assert p.gpu["student fp32 master + Adam"] == 12 * 275
    nvme = plan_stage(s, st, "distill-online", Option(teacher_offload="nvme"))
    assert nvme.nvme == 500 and "teacher params (offloaded)" not in nvme.cpu
    align = plan_stage(s, st, "align", Option())
    assert align.gpu["student fp32 master + Adam"] == 12 * 25  # only the 100 new params


@pytest.fixture(scope="module")
def shapes() -> dict[str, ModelShape]:
    names = ("olmo3_7b", "llama31_8b", "qwen25_7b_instruct")
    return {n: model_shape(load_teacher_config(n)) for n in names}


def test_7b_numbers_are_sensible(shapes: dict[str, ModelShape]) -> None:
    olmo = shapes["olmo3_7b"]
    assert 7.2e9 < olmo.student_params < 7.5e9 and olmo.new_params < 0.01 * olmo.student_params
    # 8 nodes x 8 GPUs: fp32 master + Adam moments = 12 bytes per param over 64 ranks (~1.4 GB).
    ms = zero3_model_states(olmo.student_params, olmo.student_params, 64, "bf16", False)
    assert ms.master + ms.adam == 12 * -(-olmo.student_params // 64)
    assert 1.2 * GiB < ms.master + ms.adam < 1.35 * GiB
    for name, s in shapes.items():
        plan = make_plan(s, PlanSettings(nodes=1, gpus_per_node=8, gpu_mem=80 * GiB))
        for stage, sp in plan.stages.items():
            assert sp.fits, (name, stage, sp.reason)
            assert sp.option.optimizer_offload == "none", (name, stage)
        # checkpointing trades ~an order of magnitude of activation memory at 4K tokens
        acts = plan.stages["distill-offline"].activations
        assert acts is not None and acts.checkpointed * 5 < acts.full


def test_against_deepspeed_estimator(shapes: dict[str, ModelShape]) -> None:
    for s in shapes.values():
        for nodes, gpus in ((1, 8), (8, 8)):
            world = nodes * gpus
            ours = zero3_model_states(s.student_params, s.student_params, world, "bf16", False)
            _, ds_gpu = deepspeed_estimate(
                s.student_params, s.student_largest_module, nodes, gpus, offload=False
            )
            ours_gpu = ours.gpu + 2 * 2 * s.student_largest_module  # + gathered layer & grads
            assert abs(ours_gpu / ds_gpu - 1) < 0.15, (ours_gpu, ds_gpu)
            off = zero3_model_states(s.student_params, s.student_params, world, "bf16", True)
            ds_cpu, _ = deepspeed_estimate(
                s.student_params, s.student_largest_module, nodes, gpus, offload=True
            )
            ours_cpu_node = (off.cpu + off.params) * gpus  # params offloaded too in that row
            assert abs(ours_cpu_node / (ds_cpu / 1.5) - 1) < 0.15, (ours_cpu_node, ds_cpu)


def test_offload_ladder(shapes: dict[str, ModelShape]) -> None:
    s = shapes["llama31_8b"]
    base = dict(nodes=1, gpus_per_node=8, seq_len=4096, activation_checkpointing=True)
    # Roomy GPUs: nothing offloaded.
    plan = make_plan(s, PlanSettings(gpu_mem=80 * GiB, **base))
    assert plan.stages["distill-online"].option == Option(activation_checkpointing=True)
    # A GPU just too small for the teacher's partition: offload the teacher to CPU.
    roomy = plan.stages["distill-online"].gpu_total
    tight = roomy - plan.stages["distill-online"].gpu["teacher params"] // 2
    plan = make_plan(s, PlanSettings(gpu_mem=tight, **base))
    assert plan.stages["distill-online"].option.teacher_offload == "cpu"
    assert plan.stages["distill-offline"].option.teacher_offload == "none"  # no teacher there
    # ... and with too little CPU memory for the teacher's partitions, to NVMe.
    plan = make_plan(s, PlanSettings(gpu_mem=tight, cpu_mem=8 * GiB, **base))
    assert plan.stages["distill-online"].option.teacher_offload == "nvme"
    # GPUs too small even for the optimizer states: offload the optimizer as well.
    plan = make_plan(s, PlanSettings(gpu_mem=16 * GiB, **base))
    online = plan.stages["distill-online"]
    assert online.fits and online.option.optimizer_offload == "cpu"
    # Nothing fits: the report says so.
    plan = make_plan(s, PlanSettings(gpu_mem=2 * GiB, **base))
    assert not plan.stages["distill-online"].fits
    assert "GPU needs" in plan.stages["distill-online"].reason


def _saved_bytes_per_token(family: str, precision: torch.dtype, stage: str) -> float:
    """Bytes autograd saves for one student layer's forward, per token (params excluded)."""
    torch.manual_seed(0)
    from megadistill.teachers import convert

    # The formula is a hybrid layer's (layer 0 of olmo3 is local: make it a hybrid; a local
    # layer kept as the teacher's SWA saves less, so the plan is an upper bound there).
    student, _ = convert(tiny_teacher(family, **TINY), window=64, num_sinks=4, chunk_size=32,
                         swa_backend="blocked", local_layers="hybrid")  # fmt: skip
    student = student.to(precision).train()
    if stage == "align":
        new = set(student.new_parameter_names())
        for n, p in student.named_parameters():
            p.requires_grad_(n in new)
    tokens = 512
    ids, pos = torch.randint(0, 256, (1, tokens)), torch.arange(tokens)[None]
    layer = student.model.layers[0]
    x = torch.randn(1, tokens, TINY["hidden_size"], dtype=precision, requires_grad=stage != "align")
    info = student.model._seq_info(ids, None, pos, None)
    rope_args = (layer.layer_type,) if family == "olmo3" else ()
    cos, sin = student.model.rotary_emb(x, info.pos, *rope_args)
    params = {p.untyped_storage().data_ptr() for p in student.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    probe = AttentionProbe(student) if stage == "align" else None
    with contextlib.ExitStack() as stack:
        if probe is not None:  # stage I's forward: the layer's MSE to the teacher's attention
            stack.enter_context(probe)
            stack.enter_context(probe.recording())
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x, cos, sin, info)
    return sum(seen.values()) / tokens


@pytest.mark.parametrize(
    "family,dtype,stage",
    [("llama", torch.float32, "distill"), ("olmo3", torch.bfloat16, "distill"),
     ("qwen2", torch.bfloat16, "align")],
)  # fmt: skip
def test_activation_formula_matches_saved_tensors(family, dtype, stage) -> None:
    measured = _saved_bytes_per_token(family, dtype, stage)
    shape = model_shape(
        tiny_teacher_config(family, **TINY), window=64, num_sinks=4, chunk_size=32,
        swa_backend="blocked", local_layers="hybrid",
    )  # fmt: skip
    a = 2 if dtype == torch.bfloat16 else 4
    predicted = sum(layer_activation_terms(shape, a, stage).values())
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)


def test_cli_plan(tmp_path: Path, capsys) -> None:
    from megadistill.cli import main
    from megadistill.model import HybridConfig

    rc = main(["plan", "olmo3_7b", "--nodes", "1", "--gpus-per-node", "8", "--gpu-mem", "80GB"])
    out = capsys.readouterr().out
    assert rc == 0 and out.count("FITS with") == 3 and "top-k targets buffer" in out
    # A stage YAML pointing at a (config-only) student folder: its settings reach the plan.
    student = tmp_path / "student"
    HybridConfig.from_teacher(tiny_teacher_config("llama", **TINY), window=64).save_pretrained(
        student
    )
    recipe = tmp_path / "stage.yaml"
    recipe.write_text(
        json.dumps(
            {
                "stage": "distill",
                "student": str(student),
                "data": {"seq_len": 8192},
                "engine": {"micro_batch_size": 2},
                "distill": {"top_k": 64},
            }
        )  # fmt: skip
    )
    rc = main(["plan", str(recipe), "--gpus-per-node", "2", "--gpu-mem", "1GB"])
    out = capsys.readouterr().out
    assert "micro-batch 2 x 8192 tokens, top-k 64" in out
    assert rc == 1 and "DOES NOT FIT" in out  # 2 GiB reserve alone exceeds 1 GiB
    assert main(["plan", "no-such-teacher"]) == 2


# ----------------------------------------------------------------------------- real 2-rank run
def _model_state_bytes(engine) -> dict[str, int]:
    """Per-rank bytes of the ZeRO-3 model states, read from the engine (unique storages)."""
    opt = engine.optimizer
    groups: dict[str, dict[int, int]] = {"params": {}, "grads": {}, "adam": {}}

    def add(kind: str, t: torch.Tensor | None) -> None:
        if t is not None and t.numel() > 0:
            st = t.untyped_storage()
            if not any(st.data_ptr() in g for g in groups.values()):
                groups[kind][st.data_ptr()] = st.nbytes()

    for p in engine.module.parameters():
        add("params", p.ds_tensor)
    for t in (*opt.fp16_partitioned_groups_flat, *opt.fp32_partitioned_groups_flat):
        add("params", t)
    add("grads", opt.grad_partitions_flat_buffer)
    for state in opt.optimizer.state.values():
        for v in state.values():
            if torch.is_tensor(v) and v.dim() > 0:
                add("adam", v)
    out = {k: sum(v.values()) for k, v in groups.items()}
    out["reduce_bucket"] = max(b.buffer.numel() for b in opt.ipg_buckets.values())
    return out


def run_measure_model_states(out_file: str) -> None:
    """(each rank) One align and one distill step of a tiny student; write the measured bytes."""
    from megadistill.engine import (
        EngineConfig,
        OptimizerConfig,
        SchedulerConfig,
        build_ds_config,
        build_student_engine,
        init_distributed,
    )  # fmt: skip
    from megadistill.model import HybridConfig, HybridForCausalLM

    rank, world = init_distributed(timeout_s=120)
    cfg = HybridConfig.from_teacher(tiny_teacher_config("llama", **TINY), window=16)
    ds = build_ds_config(
        EngineConfig(ds_config="student_zero3", global_batch_size=world, micro_batch_size=1,
                     precision="fp32", param_persistence_threshold=0),
        world_size=world, device_type="cpu",
    )  # fmt: skip
    ids = torch.randint(0, 256, (1, 32), generator=torch.Generator().manual_seed(rank))
    result = {}
    for stage in ("align", "distill"):

        def build(stage=stage) -> torch.nn.Module:
            model = HybridForCausalLM._from_config(cfg, dtype=torch.float32)
            if stage == "align":
                new = set(model.new_parameter_names())
                for n, p in model.named_parameters():
                    p.requires_grad_(n in new)
            return model

        engine = build_student_engine(build, ds, OptimizerConfig(lr=1e-3), SchedulerConfig())
        if stage == "align":
            with AttentionProbe(engine.module) as probe:
                engine.backward(probe.loss(engine, ids))
        else:
            engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        trainable = sum(p.ds_numel for p in engine.module.parameters() if p.requires_grad)
        total = sum(p.ds_numel for p in engine.module.parameters())
        result[stage] = {**_model_state_bytes(engine), "trainable": trainable, "total": total}
    if rank == 0:
        Path(out_file).write_text(json.dumps(result))


def test_model_states_match_a_real_two_rank_zero3_run(tmp_path: Path) -> None:
    out = tmp_path / "measured.json"
    run_distributed(run_measure_model_states, 2, str(out), timeout_s=300)
    measured = json.loads(out.read_text())
    for stage in ("align", "distill"):
        m = measured[stage]
        ms = zero3_model_states(m["total"], m["trainable"], 2, "fp32", offload_optimizer=False)
        real = m["params"] + m["grads"] + m["adam"]
        assert abs(ms.persistent / real - 1) < 0.15, (stage, ms, m)
        assert m["reduce_bucket"] == REDUCE_BUCKET  # the planner's working-buffer constant
    assert measured["align"]["trainable"] < measured["distill"]["trainable"]


def test_decode_cache_counts_softmax_layers_growing_and_hybrid_layers_constant():
    from megadistill.plan import decode_cache_bytes

    shape = _toy_shape(num_layers=4, num_softmax_layers=1)
    kv = 2 * 1 * 4 * 2  # K and V, one KV head of 4 values, bf16
    short, long = decode_cache_bytes(shape, 100), decode_cache_bytes(shape, 1000)
    assert long["teacher"] == 4 * 1000 * kv and short["teacher"] == 4 * 100 * kv
    assert long["student_softmax_layers"] == 1000 * kv
    assert short["student_constant"] == long["student_constant"]
    state = 2 * (4 * 4 + 4 + 1) * 4  # heads * (C + n + m) in fp32
    assert long["student_constant"] == 3 * (state + (4 + 1) * kv)


def test_decode_cache_counts_softmax_heads_one_kv_head_each():
    from megadistill.plan import decode_cache_bytes, model_shape
    from megadistill.teachers.tiny import tiny_teacher_config

    # Two KV heads per layer; one kept head grows like half a softmax layer, and its layer
    # keeps its constant part (the hybrid still runs on every head).
    one_head = decode_cache_bytes(_toy_shape(num_kv_heads=2, num_softmax_heads=1), 1000)
    one_layer = decode_cache_bytes(_toy_shape(num_kv_heads=2, num_softmax_layers=1), 1000)
    none = decode_cache_bytes(_toy_shape(num_kv_heads=2), 1000)
    assert 2 * one_head["student_softmax_layers"] == one_layer["student_softmax_layers"] > 0
    assert one_head["student_constant"] == none["student_constant"]
    shape = model_shape(tiny_teacher_config("llama"), window=8, softmax_heads=[[0, 1], [1, 0]])
    assert shape.num_softmax_heads == 2 and shape.num_softmax_layers == 0


def test_plan_states_the_prepare_step_time_and_disk(capsys) -> None:
    from megadistill.cli import main
    from megadistill.config import load_yaml
    from megadistill.data.prepare import MEASURED_TOKENS_PER_S_PER_WORKER, prepare_estimates

    recipe = Path(__file__).resolve().parents[1] / "megadistill/recipes/olmo3_7b.yaml"
    main(["plan", str(recipe), "--nodes", "4", "--gpus-per-node", "8", "--gpu-mem", "80GB"])
    out = capsys.readouterr().out
    assert "== prepare" in out and out.count(" h  cache ") == 5  # 4 experts + the final stage
    rows = prepare_estimates(load_yaml(recipe))
    assert [r["task"] for r in rows] == ["math", "code", "stem", "chat", "final"]
    math = rows[0]  # stage I 655M + stage II 5B tokens, 32 tokenizer processes, 4 B per token
    assert math["tokens"] == 5_655_000_000 and math["cache_bytes"] >= 4 * math["tokens"]
    assert math["seconds"] == pytest.approx(5.655e9 / (32 * MEASURED_TOKENS_PER_S_PER_WORKER))
    assert math["peak_bytes"] == 2 * math["cache_bytes"]


def test_decode_cache_counts_local_layers_at_the_teachers_window():
    from megadistill.plan import decode_cache_bytes, model_shape
    from megadistill.teachers.tiny import tiny_teacher_config

    # Teacher: three sliding-window layers of 16 tokens and one full layer; the student keeps
    # two of the local layers as the teacher's SWA (16 slots each, no mLSTM state).
    shape = _toy_shape(num_layers=4, kept_local_windows=(16, 16),
                       teacher_windows=(16, 16, 16, None))  # fmt: skip
    kv = 2 * 1 * 4 * 2
    state = 2 * (4 * 4 + 4 + 1) * 4
    c = decode_cache_bytes(shape, 1000)
    assert c["teacher"] == (3 * 16 + 1000) * kv
    assert c["student_constant"] == 2 * (state + (4 + 1) * kv) + 2 * 16 * kv
    assert c["student_constant"] == decode_cache_bytes(shape, 5000)["student_constant"]
    # The shape read off a real student: which layers are kept, and the teacher's windows.
    cfg = tiny_teacher_config("olmo3", sliding_window=12)
    kept = model_shape(cfg, window=8, local_layers="swa")
    assert kept.kept_local_windows == (12,) and kept.teacher_windows == (12, None)
    assert model_shape(cfg, window=8, local_layers="hybrid").kept_local_windows == ()
