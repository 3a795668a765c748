"""Where megadistill leans on a dependency's private or undocumented API: the one list.

Each row names the API, the distribution whose release can change it, the files that use it,
the source tokens that mark a use, and why no public API does the job.
``tests/test_private_apis.py`` checks every row against the installed releases (so a release that
changes one fails a test, not a user's run) and scans the source, so that a new private use cannot
go unlisted. Rows whose ``covered_by`` names tests are also exercised end to end there. This
module imports nothing of the dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Package = Literal["torch", "transformers", "deepspeed", "lm_eval", "mlstm_kernels", "datasets"]


@dataclass(frozen=True, kw_only=True)
class PrivateApi:
    """One private or undocumented API of a dependency that the product uses."""

    name: str
    """The API, as the code reaches it (also the id of its test)."""
    package: Package
    """The distribution (``importlib.metadata`` name) whose release can break it."""
    used_in: tuple[str, ...]
    """Repository paths of the product files that use it."""
    tokens: tuple[str, ...]
    """Source text that marks a use: each occurs in a file of ``used_in``, and the source scan
    of the tests accepts a private use only where a row lists its token and file."""
    why: str
    """Why no public API does the job."""
    covered_by: tuple[str, ...] = ()
    """Tests (pytest node ids) that also exercise it end to end."""


_ZERO3_CONSTRUCTION = (
    "tests/engine/test_zero3_construction.py::"
    "test_teacher_built_after_its_student_under_zero3_matches_the_plain_teacher"
)
_GENERATE = (
    "tests/model/test_student.py::test_generate_feeds_one_new_token_per_forward_after_prefill"
)

PRIVATE_APIS: tuple[PrivateApi, ...] = (
    # ------------------------------------------------------------------ transformers
    PrivateApi(
        name="PreTrainedModel.get_init_context",
        package="transformers",
        used_in=("megadistill/engine/loading.py",),
        tokens=("get_init_context", "_is_ds_init_called"),
        why="the only way to build a class under HF's ZeRO-3 contexts (dtype, no random init, "
        "fp32 RoPE buffers, zero.Init) without from_pretrained, which reads every shard on rank 0",
        covered_by=(_ZERO3_CONSTRUCTION,),
    ),
    PrivateApi(
        name="AutoModelForCausalLM._model_mapping",
        package="transformers",
        used_in=("megadistill/engine/loading.py",),
        tokens=("_model_mapping",),
        why="the Auto classes resolve config -> model class only inside from_config/"
        "from_pretrained, which also build the model; no public lookup",
        covered_by=(_ZERO3_CONSTRUCTION,),
    ),
    PrivateApi(
        name="Parameter._is_hf_initialized",
        package="transformers",
        used_in=("megadistill/engine/loading.py", "megadistill/model/modeling.py"),
        tokens=("_is_hf_initialized",),
        why="the flag transformers' own loader sets so that a later init_weights() leaves a "
        "loaded weight alone (loading.py sets it; modeling.py reads it to tell a hybrid layer "
        "whose new parameters were loaded from one built fresh); there is no public way to mark "
        "or see weights as loaded",
    ),
    PrivateApi(
        name="transformers.generation.utils.ALL_CACHE_NAMES",
        package="transformers",
        used_in=("megadistill/model/modeling.py",),
        tokens=("transformers.generation.utils", "ALL_CACHE_NAMES"),
        why="which output key generate() feeds back as the cache (``cache`` in 5.x, "
        "``past_key_values`` in 4.x) is not part of the documented API",
        covered_by=(_GENERATE,),
    ),
    PrivateApi(
        name="PreTrainedModel._init_weights",
        package="transformers",
        used_in=("megadistill/model/modeling.py",),
        tokens=("_init_weights",),
        why="the per-module init hook post_init() calls (the custom-model guide overrides it); "
        "5.25 skips it for a custom-code module without parameters of its own, so "
        "HybridPreTrainedModel.initialize_weights initialises the hybrid layers' new parameters",
        covered_by=(
            "tests/model/test_student.py::test_gate_on_swa_with_full_window_equals_teacher",
        ),
    ),
    PrivateApi(
        name="PreTrainedModel._no_split_modules",
        package="transformers",
        used_in=("megadistill/model/modeling.py",),
        tokens=("_no_split_modules",),
        why="the class attribute device_map='auto' reads to keep a decoder layer on one device",
    ),
    PrivateApi(
        name="PreTrainedModel._tied_weights_keys",
        package="transformers",
        used_in=("megadistill/model/modeling.py",),
        tokens=("_tied_weights_keys",),
        why="the class attribute that declares the LM head tied to the embeddings",
    ),
    PrivateApi(
        name="GenerationMixin._supports_default_dynamic_cache",
        package="transformers",
        used_in=("megadistill/model/modeling.py",),
        tokens=("_supports_default_dynamic_cache",),
        why="the hook that stops generate() from creating a DynamicCache for a model that "
        "brings its own recurrent cache",
        covered_by=(_GENERATE,),
    ),
    PrivateApi(
        name="PreTrainedModel._is_stateful",
        package="transformers",
        used_in=("megadistill/model/modeling.py",),
        tokens=("_is_stateful",),
        why="4.x generate() reads it to refuse modes that rewind the cache (assisted "
        "decoding); 5.x no longer reads it",
    ),
    PrivateApi(
        name="transformers.modeling_layers.GradientCheckpointingLayer",
        package="transformers",
        used_in=("megadistill/model/modeling.py",),
        tokens=("transformers.modeling_layers", "GradientCheckpointingLayer"),
        why="the base class that makes a decoder layer honour "
        "activation_checkpointing_enable(); not in the documented API",
        covered_by=(
            "tests/test_sharded.py::"
            "test_activation_checkpointing_same_gradients_less_activation_memory",
        ),
    ),
    PrivateApi(
        name="transformers.models.<family>.modeling_<family> building blocks",
        package="transformers",
        used_in=(
            "megadistill/teachers/registry.py",
            "megadistill/model/attention.py",
            "megadistill/model/modeling.py",
        ),
        tokens=("transformers.models", "apply_rotary_pos_emb", "scalar_embed_scale"),
        why="the student reuses each family's own RMSNorm, MLP, rotary embedding, "
        "apply_rotary_pos_emb (and Gemma 3's scaled embedding) so its numerics are the "
        "teacher's; only the model classes are documented",
        covered_by=(
            "tests/model/test_student.py::test_gate_on_swa_with_full_window_equals_teacher",
        ),
    ),
    PrivateApi(
        name="transformers.integrations.is_deepspeed_zero3_enabled",
        package="transformers",
        used_in=("megadistill/engine/loading.py",),
        tokens=("is_deepspeed_zero3_enabled",),
        why="true exactly while a documented HfDeepSpeedConfig with stage 3 is alive (the "
        "engines keep theirs referenced); the function itself is undocumented",
    ),
    # ------------------------------------------------------------------ deepspeed
    PrivateApi(
        name="ZeRO-3 parameter attributes",
        package="deepspeed",
        used_in=(
            "megadistill/engine/loading.py",
            "megadistill/engine/builders.py",
            "megadistill/engine/optim.py",
            "megadistill/selftest.py",
            "megadistill/bench/train.py",
            "megadistill/model/attention.py",
        ),
        tokens=(
            "ds_tensor",
            "ds_numel",
            "ds_shape",
            "ds_id",
            "ds_process_group",
            "ds_secondary_tensor",
            "final_location",
        ),
        why="a partitioned parameter's full shape, size, own shard and group are only on these "
        "attributes; loading a shard without a gather writes ds_tensor directly",
        covered_by=(_ZERO3_CONSTRUCTION, "tests/test_sharded.py::test_zero3_partitions_are_halves"),
    ),
    PrivateApi(
        name="torch.utils._python_dispatch.TorchDispatchMode",
        package="torch",
        used_in=("megadistill/bench/generate.py",),
        tokens=("torch.utils._python_dispatch",),
        why="the benchmark counts the aten operations of a generated token; PyTorch documents "
        "this mode for exactly that (the dispatcher's Python extension point) but keeps it "
        "under a private module path, and no public API sees dispatched aten ops",
    ),
    PrivateApi(
        name="ZeRO-3 optimizer flat buffers",
        package="deepspeed",
        used_in=("megadistill/bench/train.py",),
        tokens=(
            "fp16_partitioned_groups_flat",
            "fp32_partitioned_groups_flat",
            "grad_partitions_flat_buffer",
            "ipg_buckets",
        ),
        why="the train benchmark counts the bytes of model states per rank; DeepSpeed reports "
        "no such figure",
        covered_by=("tests/test_plan.py::test_model_states_match_a_real_two_rank_zero3_run",),
    ),
    PrivateApi(
        name="deepspeed.ops.__compatible_ops__",
        package="deepspeed",
        used_in=("megadistill/engine/distributed.py", "megadistill/bench/merge.py"),
        tokens=("__compatible_ops__",),
        why="the only switch that stops init_distributed from compiling the shm_comm op on "
        "CPU (~140 s, used only by the ccl backend)",
    ),
    PrivateApi(
        name="deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs",
        package="deepspeed",
        used_in=("megadistill/plan.py",),
        tokens=("deepspeed.runtime.zero.stage3", "estimate_zero3_model_states_mem_needs"),
        why="the documented estimators (_all_live, _all_cold) print a table and return nothing",
        covered_by=("tests/test_plan.py::test_against_deepspeed_estimator",),
    ),
    PrivateApi(
        name="deepspeed.checkpoint.ds_to_universal.main",
        package="deepspeed",
        used_in=("megadistill/merge/tools.py",),
        tokens=("deepspeed.checkpoint.ds_to_universal",),
        why="DeepSpeed's universal-checkpoint converter is a script; main() takes its argparse "
        "Namespace",
        covered_by=("tests/merge/test_merge.py::test_inspect_cli_and_universal",),
    ),
    PrivateApi(
        name="ZeRO-3 checkpoint file layout",
        package="deepspeed",
        used_in=("megadistill/merge/zero_reader.py",),
        tokens=(
            "zero_pp_rank_",
            "param_shapes",
            "frozen_param_shapes",
            "frozen_param_fragments",
            "buffer_names",
            "shared_params",
            "fp32_flat_groups",
            "zero_stage",
        ),
        why="the merge reads shards tensor by tensor without an engine; zero_to_fp32 (the "
        "documented reader) loads every shard whole",
        covered_by=("tests/merge/test_merge.py::test_reader_matches_deepspeed_consolidation",),
    ),
    PrivateApi(
        name="python -m deepspeed.launcher.runner",
        package="deepspeed",
        used_in=("slurm/entrypoint.sh",),
        tokens=("deepspeed.launcher.runner", "--no_python", "--no_local_rank"),
        why="the module behind the documented `deepspeed` command, run by the job's own "
        "interpreter so that `deepspeed` need not be on PATH",
    ),
    # ------------------------------------------------------------------ torch
    PrivateApi(
        name="torch.save pickle protocol (torch._utils._rebuild_tensor_v2, ...)",
        package="torch",
        used_in=("megadistill/merge/torch_file.py",),
        tokens=("torch._utils", "torch._tensor", "_rebuild_tensor_v2", "persistent_load"),
        why="reading element ranges of a checkpoint's tensors without loading them; torch.load "
        "(even mmap=True) materialises whole storages",
        covered_by=("tests/merge/test_merge.py::test_reader_matches_deepspeed_consolidation",),
    ),
    PrivateApi(
        name="torch.nn.attention.flex_attention.create_block_mask(_compile=True)",
        package="torch",
        used_in=("megadistill/model/swa.py",),
        tokens=("_compile",),
        why="compiles the CUDA block mask (no T x T mask). torch 2.13 deprecates the flag for "
        "torch.compile(create_block_mask), which does the same; to switch once a GPU test runs",
    ),
    # ------------------------------------------------------------------ lm-eval
    PrivateApi(
        name="lm_eval HFLM._encode_pair, tok_encode, prefix_token_id, max_length",
        package="lm_eval",
        used_in=("megadistill/eval/lmeval.py",),
        tokens=("_encode_pair", "tok_encode", "prefix_token_id"),
        why="recording how long each scored request was needs lm-eval's own encoding; the LM "
        "interface documents only loglikelihood/generate_until",
        covered_by=("tests/eval/test_positions.py::test_eval_positions_floor_cache_and_report",),
    ),
    PrivateApi(
        name="lm_eval.utils.get_rolling_token_windows, make_disjoint_window",
        package="lm_eval",
        used_in=("megadistill/eval/lmeval.py",),
        tokens=("lm_eval.utils", "get_rolling_token_windows", "make_disjoint_window"),
        why="the rolling windows of a loglikelihood_rolling request, as HFLM builds them",
    ),
    PrivateApi(
        name="lm_eval.simple_evaluate sample records",
        package="lm_eval",
        used_in=("megadistill/eval/lmeval.py",),
        tokens=('"arguments"', '"doc_id"', '"output_type"'),
        why="per-document scores and request lengths come from the logged samples, whose "
        "fields are not documented",
        covered_by=("tests/eval/test_positions.py::test_eval_positions_floor_cache_and_report",),
    ),
    PrivateApi(
        name="lm_eval/tasks built-in YAML paths, TaskManager(include_defaults=)",
        package="lm_eval",
        used_in=("megadistill/eval/tasks.py", "megadistill/eval/lmeval.py"),
        tokens=("lm_eval.tasks", "include_defaults"),
        why="offline tasks include lm-eval's own task files by path and skip indexing the "
        "thousands of built-in ones",
        covered_by=(
            "tests/eval/test_honest.py::test_offline_fewshot_tasks_load_and_build_5_shot_prompts",
        ),
    ),
    # ------------------------------------------------------------------ datasets, mlstm_kernels
    PrivateApi(
        name="datasets.DatasetBuilder.hash",
        package="datasets",
        used_in=("megadistill/data/sources.py",),
        tokens=("load_dataset_builder",),
        why="a hub dataset's fingerprint for the packing cache; datasets documents no other",
    ),
    PrivateApi(
        name="mlstm_kernels kernel names and keyword arguments",
        package="mlstm_kernels",
        used_in=("megadistill/model/mlstm.py",),
        tokens=("chunkwise--native_autograd", "chunkwise--triton_limit_chunk", "m_initial"),
        why="get_mlstm_kernel is public, but the kernel names and their state arguments are "
        "only defined by its registry",
        covered_by=(
            "tests/model/test_mlstm.py::test_backend_matches_recurrent_values_and_grads",
            "tests/model/test_mlstm.py::test_triton_matches_chunkwise_on_gpu",
        ),
    ),
)
"""Every private or undocumented dependency API the product uses (README: Dependencies)."""
