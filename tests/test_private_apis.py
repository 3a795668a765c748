"""Every private or undocumented dependency API the product uses (megadistill/compat.py) still has
the shape the product relies on, checked against the installed releases; and a scan of the source
that fails when a private use appears that the table does not list.

One check per row: signatures through ``inspect.signature``, attributes after a tiny real
construction (the ZeRO-3 parameter attributes in one spawned gloo rank), return types. A failure
names the API, the files that use it and the versions it ran against. Rows whose ``covered_by``
names tests are also exercised end to end there; those references are checked to exist.
"""

from __future__ import annotations

import ast
import contextlib
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import pkgutil
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from megadistill.compat import PRIVATE_APIS, PrivateApi
from megadistill.engine.launch import run_distributed
from megadistill.teachers.tiny import tiny_teacher_config

ROOT = Path(__file__).resolve().parents[1]
ROWS = {row.name: row for row in PRIVATE_APIS}
CHECKS: dict[str, Callable[..., None]] = {}


def check(name: str) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register ``fn`` as the check of the row ``name`` (its arguments are pytest fixtures)."""
    assert name in ROWS, f"no row {name!r} in megadistill/compat.py"

    def register(fn: Callable[..., None]) -> Callable[..., None]:
        CHECKS[name] = fn
        return fn

    return register


def versions(row: PrivateApi) -> str:
    names = dict.fromkeys((row.package, "torch"))
    return ", ".join(f"{n} {importlib.metadata.version(n)}" for n in names)


def params(fn: Callable[..., object]) -> list[str]:
    return list(inspect.signature(fn).parameters)


def tiny_student(**teacher: object) -> torch.nn.Module:
    from megadistill.model import HybridConfig, HybridForCausalLM

    return HybridForCausalLM(HybridConfig.from_teacher(tiny_teacher_config("llama", **teacher)))


def _built_in_init_contexts(dtype: torch.dtype) -> tuple[torch.nn.Module, list]:
    """A tiny Llama built inside the contexts ``get_init_context`` returns, as loading.py does;
    and those contexts."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_teacher_config("llama")
    cls = AutoModelForCausalLM._model_mapping[type(cfg)]
    contexts = list(
        cls.get_init_context(
            dtype=dtype, is_quantized=False, _is_ds_init_called=False, allow_all_kernels=None
        )
    )
    with contextlib.ExitStack() as stack:
        for ctx in contexts:
            stack.enter_context(ctx)
        return cls(cfg), contexts


def transformers_major() -> int:
    return int(importlib.metadata.version("transformers").split(".")[0])


@pytest.mark.parametrize("row", PRIVATE_APIS, ids=lambda row: row.name)
def test_private_api_still_has_the_shape_the_product_relies_on(
    row: PrivateApi, request: pytest.FixtureRequest
) -> None:
    """The row's API (``row.name``, used in ``row.used_in``) against the installed release."""
    for node in row.covered_by:
        path, name = node.split("::")
        source = (ROOT / path).read_text()
        assert f"def {name}(" in source, f"{row.name}: covered_by names a missing test {node}"
    fn = CHECKS.get(row.name)
    if fn is None:
        assert row.covered_by, f"{row.name}: no check here and no covered_by test"
        return
    kwargs = {p: request.getfixturevalue(p) for p in params(fn)}
    try:
        fn(**kwargs)
    except (AssertionError, AttributeError, ImportError, KeyError, TypeError) as exc:
        raise AssertionError(
            f"{row.name} ({versions(row)}; used in {', '.join(row.used_in)}) changed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


# ----------------------------------------------------------------------------- transformers
@check("PreTrainedModel.get_init_context")
def _get_init_context(zero3: dict) -> None:
    from transformers import PreTrainedModel

    names = params(PreTrainedModel.get_init_context)
    assert names[:4] == ["dtype", "is_quantized", "_is_ds_init_called", "allow_all_kernels"], names
    model, _ = _built_in_init_contexts(torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert zero3["zero_init_context"], "no deepspeed.zero.Init among the contexts under ZeRO-3"
    assert zero3["attrs"]["ds_id"] == "int", "a model built in the contexts is not partitioned"


@check("AutoModelForCausalLM._model_mapping")
def _model_mapping() -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from megadistill.engine.loading import _model_class
    from megadistill.model import HybridConfig, HybridForCausalLM

    cfg = tiny_teacher_config("llama")
    assert AutoModelForCausalLM._model_mapping[type(cfg)] is LlamaForCausalLM
    assert AutoModelForCausalLM._model_mapping[HybridConfig] is HybridForCausalLM  # registered
    assert not hasattr(LlamaForCausalLM, "_model_mapping")  # how an Auto class is told apart
    assert _model_class(cfg, None) is LlamaForCausalLM
    assert _model_class(cfg, AutoModelForCausalLM) is LlamaForCausalLM
    assert _model_class(cfg, HybridForCausalLM) is HybridForCausalLM


@check("Parameter._is_hf_initialized")
def _is_hf_initialized() -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_teacher_config("llama"))
    loaded, fresh = model.lm_head, model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        loaded.weight.zero_()
        fresh.weight.zero_()
    loaded.weight._is_hf_initialized = True
    model._init_weights(loaded)
    model._init_weights(fresh)
    assert bool((fresh.weight != 0).any()), "_init_weights left an unflagged weight at zero"
    assert bool((loaded.weight == 0).all()), "_init_weights overwrote a weight flagged as loaded"


@check("transformers.generation.utils.ALL_CACHE_NAMES")
def _all_cache_names() -> None:
    from transformers.generation import utils

    from megadistill.model.modeling import CACHE_OUTPUT_NAME

    if transformers_major() >= 5:
        assert "cache" in utils.ALL_CACHE_NAMES, utils.ALL_CACHE_NAMES
        assert CACHE_OUTPUT_NAME == "cache"
    else:
        assert CACHE_OUTPUT_NAME == "past_key_values"


@check("PreTrainedModel._init_weights")
def _init_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import PreTrainedModel

    from megadistill.model.attention import FeatureMap
    from megadistill.model.modeling import HybridPreTrainedModel

    assert params(PreTrainedModel._init_weights) == ["self", "module"]
    seen: list[str] = []
    original = HybridPreTrainedModel._init_weights

    def spy(self, module):
        seen.append(type(module).__name__)
        original(self, module)

    monkeypatch.setattr(HybridPreTrainedModel, "_init_weights", spy)
    tiny_student()
    # the modules that hold parameters or buffers (the RoPE branch of the override needs it)
    for name in ("LlamaRotaryEmbedding", FeatureMap.__name__, "Embedding", "LlamaRMSNorm"):
        assert name in seen, f"building a model no longer calls _init_weights on {name}"


def test_a_student_built_from_its_config_has_its_new_parameters_initialised() -> None:
    """transformers 5.25 skips ``_init_weights`` on HybridAttention (no parameters of its own):
    ``HybridPreTrainedModel.initialize_weights`` initialises its new parameters instead."""
    model = tiny_student()
    attn = model.model.layers[0].self_attn
    low, high = model.config.fgate_bias
    torch.testing.assert_close(attn.fgate.bias, torch.linspace(low, high, attn.num_heads))
    assert torch.equal(attn.ogate_scale.weight, torch.zeros(attn.num_heads))  # the SWA floor
    for p in attn.q_feature.parameters():
        assert torch.isfinite(p).all() and p.abs().max() < 10, "feature map left uninitialised"


@check("PreTrainedModel._no_split_modules")
def _no_split_modules() -> None:
    from transformers import PreTrainedModel

    assert "_no_split_modules" in vars(PreTrainedModel)
    assert "HybridDecoderLayer" in tiny_student()._no_split_modules


@check("PreTrainedModel._tied_weights_keys")
def _tied_weights_keys() -> None:
    tied, untied = tiny_student(tie_word_embeddings=True), tiny_student()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight, "the head is no longer tied"
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@check("GenerationMixin._supports_default_dynamic_cache")
def _supports_default_dynamic_cache() -> None:
    from transformers import GenerationMixin

    from megadistill.model import HybridForCausalLM

    assert params(GenerationMixin._supports_default_dynamic_cache) == []
    source = inspect.getsource(GenerationMixin._prepare_cache_for_generation)
    assert "_supports_default_dynamic_cache" in source, "generate() no longer consults the hook"
    assert HybridForCausalLM._supports_default_dynamic_cache() is False


@check("torch.utils._python_dispatch.TorchDispatchMode")
def _torch_dispatch_mode() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Count():
        torch.ones(2) + 1
    assert any("add" in name for name in seen), seen


@check("PreTrainedModel._is_stateful")
def _is_stateful() -> None:
    # What the flag is for: generation modes that rewind the cache (assisted decoding, prompt
    # lookup) must be refused, since a recurrent state cannot be rolled back. transformers 5.24
    # refuses them by reading the flag; 5.25 no longer reads it but refuses them for a model
    # whose cache it does not know. Either way they must fail, not decode wrongly.
    from megadistill.teachers import convert
    from megadistill.teachers.tiny import tiny_teacher

    teacher = tiny_teacher("llama")
    student, _ = convert(teacher, seed=0, window=8, num_sinks=2)
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(0))
    for extra in ({"assistant_model": teacher}, {"prompt_lookup_num_tokens": 3}):
        try:
            student.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, **extra)
        except (ValueError, RuntimeError):
            continue
        raise AssertionError(f"generate({extra}) ran on a stateful student: it cannot rewind")


@check("transformers.modeling_layers.GradientCheckpointingLayer")
def _gradient_checkpointing_layer() -> None:
    from transformers.modeling_layers import GradientCheckpointingLayer

    assert issubclass(GradientCheckpointingLayer, torch.nn.Module)
    model = tiny_student()
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    model.activation_checkpointing_enable({"use_reentrant": False})  # as stages/runner.py
    assert all(layer.gradient_checkpointing for layer in model.model.layers)


@check("transformers.models.<family>.modeling_<family> building blocks")
def _family_building_blocks() -> None:
    from megadistill.teachers.registry import ADAPTERS

    for family, a in ADAPTERS.items():
        cfg = tiny_teacher_config(family)
        rope = a.cls("RotaryEmbedding")(config=cfg)
        assert rope.config is cfg, family  # _init_weights rebuilds RoPE from module.config
        rope_params = params(rope.forward)[:3]
        want = ["x", "position_ids", "layer_type"] if a.rope_per_layer_type else rope_params[:2]
        assert rope_params[: len(want)] == want, (family, rope_params)
        rotary = a.modeling().apply_rotary_pos_emb  # 5.x: a hub-kernel nn.Module wrapper
        rotary = rotary.forward if isinstance(rotary, torch.nn.Module) else rotary
        assert params(rotary)[:4] == ["q", "k", "cos", "sin"], family
        a.cls("RMSNorm")(8, eps=1e-6)
        a.build_mlp(cfg, 1)
        emb = a.build_embedding(cfg)
        if a.scaled_embedding:
            assert emb.scalar_embed_scale == cfg.hidden_size**0.5 and hasattr(emb, "embed_scale")


@check("transformers.integrations.is_deepspeed_zero3_enabled")
def _is_deepspeed_zero3_enabled() -> None:
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled

    assert not is_deepspeed_zero3_enabled()
    keep = HfDeepSpeedConfig(
        {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    )
    assert is_deepspeed_zero3_enabled(), "an HfDeepSpeedConfig alive no longer enables ZeRO-3"
    del keep
    gc.collect()
    assert not is_deepspeed_zero3_enabled(), "ZeRO-3 outlives its HfDeepSpeedConfig"


# ----------------------------------------------------------------------------- deepspeed
def run_zero3_attributes(out_file: str) -> None:
    """(one rank) A tiny Llama built in HF's init contexts under ZeRO-3: what a parameter holds."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum
    from transformers.integrations import HfDeepSpeedConfig

    from megadistill.engine.distributed import init_distributed
    from megadistill.engine.loading import _is_resident

    init_distributed(120)
    ds = {
        "train_batch_size": 1,
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    keep = HfDeepSpeedConfig(ds)
    model, contexts = _built_in_init_contexts(torch.float32)
    p = model.lm_head.weight
    names = ("ds_tensor", "ds_numel", "ds_shape", "ds_id", "ds_process_group",
             "ds_secondary_tensor")  # fmt: skip
    part = getattr(p, "ds_tensor", None)
    rec = {
        "zero_init_context": any(isinstance(c, deepspeed.zero.Init) for c in contexts),
        "attrs": {n: type(getattr(p, n)).__name__ if hasattr(p, n) else None for n in names},
        "ds_shape": list(getattr(p, "ds_shape", [])),
        "ds_numel": getattr(p, "ds_numel", None),
        "part_ds_numel": getattr(part, "ds_numel", None),
        "part_numel": None if part is None else part.numel(),
        "final_location": repr(getattr(part, "final_location", "missing")),
        "group_rank": dist.get_rank(group=getattr(p, "ds_process_group", dist.group.WORLD)),
        "nvme": str(OffloadDeviceEnum.nvme.value),
        "resident": _is_resident(p),
    }  # fmt: skip
    del keep
    Path(out_file).write_text(json.dumps(rec))


@pytest.fixture(scope="module")
def zero3(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("zero3") / "zero3.json"
    run_distributed(run_zero3_attributes, 1, str(out), timeout_s=300)
    return json.loads(out.read_text())


@check("ZeRO-3 parameter attributes")
def _zero3_parameter_attributes(zero3: dict) -> None:
    cfg = tiny_teacher_config("llama")
    want = {"ds_tensor": "Tensor", "ds_numel": "int", "ds_shape": "Size", "ds_id": "int",
            "ds_process_group": "ProcessGroup", "ds_secondary_tensor": "NoneType"}  # fmt: skip
    wrong = {k: zero3["attrs"].get(k) for k, v in want.items() if zero3["attrs"].get(k) != v}
    assert not wrong, f"parameter attributes now (type name, None: missing): {wrong}"
    assert zero3["ds_shape"] == [cfg.vocab_size, cfg.hidden_size]
    assert zero3["ds_numel"] == zero3["part_ds_numel"] == zero3["part_numel"]  # one rank
    assert zero3["final_location"] == "None", "ds_tensor.final_location is missing or moved"
    assert zero3["nvme"] == "nvme" and zero3["group_rank"] == 0 and zero3["resident"]


@check("deepspeed.ops.__compatible_ops__")
def _compatible_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    comm = importlib.import_module("deepspeed.comm.torch")
    assert get_accelerator().create_op_builder("ShareMemCommBuilder").NAME == "deepspeed_shm_comm"
    assert "__compatible_ops__" in inspect.getsource(comm.build_shm_op)
    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", False)
    assert comm.build_shm_op() is None, "the flag no longer stops building the shm_comm op"


@check("deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs")
def _estimate_zero3() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from megadistill.plan import deepspeed_estimate

    used = {"total_params", "largest_layer_params", "num_gpus_per_node", "num_nodes",
            "cpu_offload", "cpu_offload_params", "zero_init"}  # fmt: skip
    assert used <= set(params(estimate_zero3_model_states_mem_needs))
    cpu, gpu = deepspeed_estimate(10**9, 10**8, nodes=1, gpus_per_node=8, offload=False)
    assert cpu > 0 and gpu > 0


@check("deepspeed.checkpoint.ds_to_universal.main")
def _ds_to_universal(monkeypatch: pytest.MonkeyPatch) -> None:
    from deepspeed.checkpoint import ds_to_universal

    from megadistill.merge.tools import _universal_args

    assert params(ds_to_universal.main) == ["args"]
    monkeypatch.setattr(
        "sys.argv", ["ds_to_universal", "--input_folder", "i", "--output_folder", "o"]
    )
    theirs = set(vars(ds_to_universal.parse_arguments()))
    ours = set(vars(_universal_args(Path("i"), Path("o"), 1)))
    assert ours == theirs, (
        f"options: megadistill passes {sorted(ours)}, DeepSpeed has {sorted(theirs)}"
    )


@check("ZeRO-3 checkpoint file layout")
def _zero3_checkpoint_layout() -> None:
    import deepspeed.runtime.engine as engine
    from deepspeed.checkpoint import constants as c

    from megadistill.merge.zero_reader import _MODEL_RE, _OPTIM_RE

    keys = {c.PARAM_SHAPES: "param_shapes", c.FROZEN_PARAM_SHAPES: "frozen_param_shapes",
            c.FROZEN_PARAM_FRAGMENTS: "frozen_param_fragments", c.BUFFER_NAMES: "buffer_names",
            c.FP32_FLAT_GROUPS: "fp32_flat_groups", c.ZERO_STAGE: "zero_stage",
            c.OPTIMIZER_STATE_DICT: "optimizer_state_dict"}  # fmt: skip
    assert all(theirs == ours for theirs, ours in keys.items()), keys
    assert "shared_params=" in inspect.getsource(engine)
    name = f"{c.ZERO_FILE_PREFIX}3_{c.MODEL_FILE_PREFIX}00"
    assert _MODEL_RE.match(name + c.MODEL_FILE_SUFFIX), name + c.MODEL_FILE_SUFFIX
    assert _OPTIM_RE.match(name + c.OPTIM_FILE_SUFFIX), name + c.OPTIM_FILE_SUFFIX


@check("python -m deepspeed.launcher.runner")
def _launcher_runner() -> None:
    from deepspeed.launcher import runner

    script = (ROOT / "slurm/entrypoint.sh").read_text()
    assert '-m deepspeed.launcher.runner "${where[@]}"' in script  # the flags below are its own
    args = runner.parse_args(
        ["--hostfile", "/dev/null", "--num_nodes", "1", "--num_gpus", "2", "--master_addr",
         "10.0.0.1", "--master_port", "29500", "--no_python", "--no_local_rank", "prog", "x"]
    )  # fmt: skip
    assert (args.no_python, args.no_local_rank, args.num_gpus) == (True, True, 2)
    assert (args.user_script, args.user_args, args.master_addr) == ("prog", ["x"], "10.0.0.1")
    args = runner.parse_args(["--hostfile", "h", "--launcher", "pdsh", "prog"])
    assert (args.hostfile, args.launcher) == ("h", "pdsh")


# ----------------------------------------------------------------------------- torch
@check("torch.save pickle protocol (torch._utils._rebuild_tensor_v2, ...)")
def _torch_pickle(tmp_path: Path) -> None:
    from megadistill.merge import torch_file

    state = {"w": torch.randn(3, 4), "p": torch.nn.Parameter(torch.randn(5)),
             "h": torch.randn(6).bfloat16(), "i": torch.arange(4),
             "view": torch.randn(8)[2:6]}  # fmt: skip
    torch.save(state, tmp_path / "x.pt")
    seen: set[str] = set()

    class Spy(torch_file._LazyUnpickler):
        def find_class(self, module: str, name: str):
            seen.add(f"{module}.{name}")
            return super().find_class(module, name)

    f = torch_file.TorchFile(tmp_path / "x.pt")
    lazy = Spy(torch_file.io.BytesIO(f._pickle), f).load()
    handled = {"torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
               "collections.OrderedDict"}  # fmt: skip
    unknown = {g for g in seen if g not in handled and not re.fullmatch(r"torch\.\w+Storage", g)}
    assert not unknown, f"torch.save now pickles {sorted(unknown)}"
    for key, want in state.items():
        torch.testing.assert_close(lazy[key].load(), want.detach(), msg=key)
    f.close()


@check("torch.nn.attention.flex_attention.create_block_mask(_compile=True)")
def _create_block_mask_compile() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    assert "_compile" in params(create_block_mask)


# ----------------------------------------------------------------------------- lm-eval
@check("lm_eval HFLM._encode_pair, tok_encode, prefix_token_id, max_length")
def _hflm_encoding() -> None:
    from lm_eval.models.huggingface import HFLM

    assert params(HFLM._encode_pair) == ["self", "context", "continuation"]
    assert params(HFLM.tok_encode)[:2] == ["self", "string"]
    assert isinstance(HFLM.prefix_token_id, property) and isinstance(HFLM.max_length, property)


@check("lm_eval.utils.get_rolling_token_windows, make_disjoint_window")
def _rolling_windows() -> None:
    from lm_eval import utils

    tokens = list(range(10, 20))
    windows = utils.get_rolling_token_windows(
        token_list=tokens, prefix_token=-1, max_seq_len=4, context_len=1
    )
    pairs = [utils.make_disjoint_window(w) for w in windows]
    # what megadistill counts: every token scored once, each window at most max_seq_len long
    assert [t for _, pred in pairs for t in pred] == tokens, pairs
    assert all(len(ctx) + len(pred) - 1 <= 4 for ctx, pred in pairs), pairs


@check("lm_eval.simple_evaluate sample records")
def _sample_records() -> None:
    import lm_eval.evaluator as evaluator

    source = inspect.getsource(evaluator)
    assert '"doc_id":' in source, "samples have no doc_id"
    assert re.search(r'"arguments":\s*\[req\.args for req in requests\]', source), "arguments"


@check("lm_eval/tasks built-in YAML paths, TaskManager(include_defaults=)")
def _builtin_tasks() -> None:
    from lm_eval.tasks import TaskManager

    from megadistill.eval.tasks import OFFLINE_TASKS, _lm_eval_tasks_dir

    missing = [t.builtin_yaml for t in OFFLINE_TASKS.values()
               if not (_lm_eval_tasks_dir() / t.builtin_yaml).is_file()]  # fmt: skip
    assert not missing, f"lm_eval/tasks has no {missing}"
    assert {"include_path", "include_defaults"} <= set(params(TaskManager.__init__))


# ----------------------------------------------------------------------------- datasets
@check("datasets.DatasetBuilder.hash")
def _builder_hash(tmp_path: Path) -> None:
    import datasets

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    builder = datasets.load_dataset_builder(
        "json", data_files=str(tmp_path / "d.jsonl"), cache_dir=str(tmp_path / "cache")
    )
    assert isinstance(builder.hash, str) and builder.hash


def test_every_row_has_a_check_or_a_covering_test() -> None:
    lacking = [r.name for r in PRIVATE_APIS if r.name not in CHECKS and not r.covered_by]
    assert not lacking, lacking
    assert len(ROWS) == len(PRIVATE_APIS), "two rows share a name"


# ----------------------------------------------------------------------------- the source scan
WATCHED = ("torch", "transformers", "deepspeed", "lm_eval", "mlstm_kernels", "xlstm", "datasets",
           "safetensors", "huggingface_hub", "tokenizers", "accelerate")  # fmt: skip
PUBLIC_MODULES = frozenset(
    {"torch", "torch.nn", "torch.nn.functional", "torch.distributed", "torch.multiprocessing",
     "torch.utils.checkpoint", "torch.nn.attention.flex_attention", "transformers",
     "transformers.integrations", "transformers.utils", "deepspeed", "deepspeed.ops",
     "deepspeed.utils.zero_to_fp32", "lm_eval", "lm_eval.tasks", "lm_eval.models.huggingface",
     "mlstm_kernels.torch", "datasets", "safetensors", "safetensors.torch", "huggingface_hub",
     "tokenizers", "tokenizers.decoders", "tokenizers.models", "tokenizers.pre_tokenizers"}
)  # fmt: skip
"""Documented module paths; importing any other module of a watched package is a finding."""
OWN_PRIVATE = {"_handler": "megadistill/cli.py's own argparse default (set_defaults)"}
"""Underscore names that look foreign to the scan but are megadistill's own."""
STANDARD_DUNDERS = frozenset(
    {"__name__", "__init__", "__call__", "__class__", "__dict__", "__doc__", "__module__",
     "__qualname__", "__file__", "__version__", "__all__", "__post_init__", "__enter__",
     "__exit__", "__len__", "__getattr__", "__mro__", "__wrapped__", "__annotations__",
     "__dataclass_fields__"}
)  # fmt: skip
_PATH = re.compile(rf"({'|'.join(WATCHED)})(\.\w+)+")
_PREFIX = re.compile(rf"(({'|'.join(WATCHED)})(\.\w+)*)\.")


def _foreign_private(name: str) -> bool:
    """A name the scan looks at: ``_x`` (not a Python dunder) or DeepSpeed's ``ds_x``."""
    return (name.startswith("_") and name not in STANDARD_DUNDERS) or name.startswith("ds_")


def _watched(module: str) -> bool:
    return module.split(".")[0] in WATCHED


def _own_names(trees: list[ast.AST]) -> set[str]:
    """Names megadistill defines: functions, classes, arguments, variables, ``self.x``."""
    own = set(OWN_PRIVATE)
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                own.add(n.name)
            elif isinstance(n, ast.arg):
                own.add(n.arg)
            elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                own.add(n.id)
            elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
                if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
                    own.add(n.attr)
            elif isinstance(n, ast.alias) and n.asname:
                own.add(n.asname)
    return own


def _imported_path(module: str, name: str) -> str:
    """``from module import name``: ``module.name`` when that is a module, else ``module``."""
    with contextlib.suppress(ImportError, ValueError, AttributeError):
        if importlib.util.find_spec(f"{module}.{name}") is not None:
            return f"{module}.{name}"
    return module


def _findings_in(tree: ast.AST, own: set[str]) -> set[str]:
    """Private tokens of one file: internal modules, foreign ``_x``/``ds_x`` attributes (also
    through getattr/hasattr/setattr), ``_x=`` keywords, dotted strings with a ``_`` part."""
    out: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names if _watched(a.name) and a.name not in PUBLIC_MODULES}
        elif isinstance(n, ast.ImportFrom) and n.module and _watched(n.module):
            for a in n.names:
                path = _imported_path(n.module, a.name)
                out |= {path} if path not in PUBLIC_MODULES else set()
                out |= {a.name} if a.name.startswith("_") else set()
        elif isinstance(n, ast.Attribute) and _foreign_private(n.attr) and n.attr not in own:
            out.add(n.attr)
        elif isinstance(n, ast.Call):
            if isinstance(n.func, ast.Name) and n.func.id in ("getattr", "hasattr", "setattr"):
                arg = n.args[1] if len(n.args) > 1 else None
                name = arg.value if isinstance(arg, ast.Constant) else None
                if isinstance(name, str) and _foreign_private(name) and name not in own:
                    out.add(name)
            out |= {
                k.arg for k in n.keywords if k.arg and k.arg.startswith("_") and k.arg not in own
            }
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and _PATH.fullmatch(n.value):
            out |= {n.value} if any(p.startswith("_") for p in n.value.split(".")) else set()
        elif isinstance(n, ast.JoinedStr) and n.values and isinstance(n.values[0], ast.Constant):
            m = _PREFIX.fullmatch(str(n.values[0].value))
            out |= {m.group(1)} if m and m.group(1) not in PUBLIC_MODULES else set()
    return out


def _overridden_hooks() -> set[tuple[str, str]]:
    """``(name, file)`` of every ``_x`` a megadistill class defines that a base class of a
    watched package also defines: hooks the dependency calls (or reads) by a private name."""
    import megadistill

    classes = []
    for info in pkgutil.walk_packages(megadistill.__path__, "megadistill."):
        module = importlib.import_module(info.name)
        classes += [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if c.__module__ == module.__name__]  # fmt: skip
    out = set()
    for cls in classes:
        foreign = [b for b in cls.__mro__ if _watched(b.__module__)]
        for own_cls in (b for b in cls.__mro__ if b.__module__.startswith("megadistill.")):
            for name in vars(own_cls):
                if name.startswith("_") and not name.startswith("__"):
                    if any(name in vars(b) for b in foreign):
                        file = own_cls.__module__.replace(".", "/") + ".py"
                        out.add((name, file))
    return out


def scan_private_uses() -> set[tuple[str, str]]:
    """``(token, repository path)`` of every private-looking use in megadistill/, tools/ and the
    shell scripts (``-m module`` of a watched package that is not a documented module)."""
    files = sorted((ROOT / "megadistill").rglob("*.py")) + sorted((ROOT / "tools").glob("*.py"))
    files.remove(ROOT / "megadistill/compat.py")  # the list itself names them all
    trees = {f: ast.parse(f.read_text(), str(f)) for f in files}
    own = _own_names(list(trees.values()))
    found = {(t, str(f.relative_to(ROOT))) for f, tree in trees.items()
             for t in _findings_in(tree, own)}  # fmt: skip
    found |= _overridden_hooks()
    for script in sorted((ROOT / "slurm").iterdir()) + sorted((ROOT / "tools").glob("*.sh")):
        for m in re.finditer(r"-m\s+([\w.]+)", script.read_text()):
            if _watched(m.group(1)) and m.group(1) not in PUBLIC_MODULES:
                found.add((m.group(1), str(script.relative_to(ROOT))))
    return found


def test_every_private_use_in_the_source_is_listed() -> None:
    """A private use that no row of megadistill/compat.py lists (token and file) fails here."""
    listed = {(t, f) for row in PRIVATE_APIS for t in row.tokens for f in row.used_in}
    unlisted = sorted(scan_private_uses() - listed)
    assert not unlisted, (
        f"private dependency APIs not in megadistill/compat.py: {unlisted}; use a public API, "
        "or add a row (tokens, used_in, why) and its check in tests/test_private_apis.py"
    )


def _occurs(token: str, text: str) -> bool:
    """``token`` is in ``text``, or (a module path) imported as ``from parent import last``."""
    parent, _, last = token.rpartition(".")
    pattern = rf"from {re.escape(parent)} import [\w, ]*\b{re.escape(last)}\b"
    return token in text or bool(parent and re.search(pattern, text))


def test_every_row_token_occurs_where_the_row_says() -> None:
    """The table stays true when code changes: each token is in one of its files, and each file
    holds one of its tokens."""
    for row in PRIVATE_APIS:
        texts = {f: (ROOT / f).read_text() for f in row.used_in}
        for token in row.tokens:
            assert any(_occurs(token, t) for t in texts.values()), f"{row.name}: {token!r} gone"
        for f, text in texts.items():
            assert any(_occurs(t, text) for t in row.tokens), f"{row.name}: {f} uses no token"
