"""Memory planner: per-rank GPU and CPU memory of each stage, and the smallest offload that fits.

``megadistill plan RECIPE_OR_TEACHER --nodes N --gpus-per-node G --gpu-mem 80GB`` prints, for
stage I (align), stage II with the teacher online and stage II with offline targets, what one rank
holds and whether it fits. Pure arithmetic on parameter counts taken from the models built on the
meta device: no weights, no process group, no GPU.

Notation: ``N`` ranks (data parallel, ZeRO-3 over all of them), ``P`` student parameters, ``Tr``
trainable ones (stage I: the new parameters only; stage II: all), ``b`` bytes per parameter and
activation element (2 for bf16, 4 for fp32), ``B`` micro batch, ``T`` sequence length.

Student model states under ZeRO-3 (DeepSpeed ``DeepSpeedZeroOptimizer_Stage3``, per rank):

- parameters ``b*P/N`` (frozen ones too: zero.Init partitions every parameter);
- gradient partitions ``b*Tr/N`` (``grad_partitions_flat_buffer``, in the parameter dtype);
- fp32 master ``4*Tr/N`` (a separate copy even in fp32 training, as measured);
- Adam moments ``8*Tr/N`` (torch AdamW ``exp_avg``, ``exp_avg_sq`` on the fp32 master);
- at the optimizer step, an fp32 copy of the gradients of one sub-group ``4*min(Tr/N, 1e9)``;
- working buffers: the gathered parameters and full gradients of the largest module
  (``2*b*largest``), the prefetch bucket and the reduce (IPG) bucket (``b * 5e7`` each with the
  shipped ``ds_configs/student_zero3.json``).
With optimizer offload, master, moments, fp32 and partitioned gradients live in CPU memory.
DeepSpeed's own ``estimate_zero3_model_states_mem_needs`` counts 18 bytes per parameter where we
count 20 (it leaves out the low-precision gradient partition); the tests cross-check both.

Teacher (stage II online): a frozen ZeRO-3 engine, ``b*P_teacher/N`` per rank on the GPU, in CPU
memory (offload ``cpu``) or on NVMe (``nvme``, with ``buffer_count * buffer_size`` pinned CPU
buffers); the GPU then holds only the gathered largest module and the prefetch bucket.

Activations per decoder layer and token (bytes; ``H`` hidden, ``I`` MLP width, ``nh``/``nkv``
query/KV heads of width ``d``, feature width ``f``, mLSTM chunk ``c``, ``a = b``; the mLSTM
computes in fp32): see :func:`layer_activation_terms`, one named term per saved tensor group:
two RMSNorms ``2*(4H + aH + 4)``; projection input ``aH``; gate input ``a(nh+2nkv)d``; RoPE'd q/k
``a(nh+nkv)d``; v ``a*nkv*d``; feature maps ``a(nh+nkv)f``; SWA (flex: output ``a*nh*d`` plus
log-sum-exp ``4nh``; CPU blocked: also the per-block mask and repeated K/V); mLSTM chunkwise:
fp32 q/k/v ``4nh(2f+d)``, five fp32 vectors ``4nh(2f+3d)``, four ``c x c`` score matrices
``16*nh*c``, the chunk states ``4*nh*f*d/c``; mixing ``3a*nh*d``; MLP ``4aI + aH``.
Stage I saves only what the new parameters' gradients need (no MLP, no SWA, no q/k/v inputs).
With activation checkpointing a layer keeps only its input ``aH`` per token, plus one layer
recomputed in backward.

Loss buffers: the teacher's top-k targets ``B*T*k*(4+8)`` (fp32 log-probs, int64 ids); one chunk of
full-vocabulary logits in the chunked loss ``chunk*V*(a + 12)``; online, the teacher's full logits
``B*T*V*a`` and one fp32 log-softmax chunk while its top-k is taken. A fixed per-GPU reserve (CUDA
context, NCCL buffers, allocator slack) is added to every GPU total.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megadistill.config import ConfigError
from megadistill.errors import MegadistillError

log = logging.getLogger(__name__)

GiB = 1024**3
Precision = Literal["bf16", "fp32"]
Offload = Literal["none", "cpu", "nvme"]
STAGES = ("align", "distill-online", "distill-offline")
# DeepSpeed defaults / ds_configs/student_zero3.json (elements).
SUB_GROUP_SIZE = 1_000_000_000
PREFETCH_BUCKET = 50_000_000
REDUCE_BUCKET = 50_000_000
# ds_configs/teacher_zero3_offload_nvme.json: pinned swap buffers (elements).
NVME_BUFFER_COUNT = 5
NVME_BUFFER_SIZE = 100_000_000
SWA_BLOCK = 128  # megadistill.model.swa.swa_blocked's query block
ADAM_BYTES = 8
MASTER_BYTES = 4
TOPK_BYTES = 4 + 8  # fp32 log-prob + int64 id per kept token


@dataclass(frozen=True)
class ModelShape:
    """What the planner needs to know about a teacher and its student."""

    family: str
    """Teacher ``model_type``."""
    vocab: int
    hidden: int
    intermediate: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    feature_dim: int
    window: int
    num_sinks: int
    num_softmax_layers: int
    """Layers kept as full softmax attention (their KV cache grows with the context)."""
    mlstm_feature_dim: int
    chunk_size: int
    qk_norm: bool
    """The family normalises q/k (adds saved tensors)."""
    mlstm_backend: str
    swa_backend: str
    teacher_params: int
    student_params: int
    new_params: int
    student_largest_module: int
    """Parameters of the largest single module (DeepSpeed's ``largest_layer_params``)."""
    teacher_largest_module: int
    num_softmax_heads: int = 0
    """KV heads of hybrid layers kept as full softmax attention (``softmax_heads``; each one's
    KV cache grows with the context)."""
    kept_local_windows: tuple[int, ...] = ()
    """Window W_t of each teacher sliding-window layer kept as the teacher's SWA (W_t KV slots,
    no mLSTM state)."""
    teacher_windows: tuple[int | None, ...] = ()
    """The teacher's window per layer (None: full attention); empty: full everywhere."""


def _largest_module(model: Any) -> int:
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def model_shape(teacher_cfg: Any, **hybrid: Any) -> ModelShape:
    """Build teacher and student on the meta device and read off counts and dimensions."""
    import torch
    from transformers import AutoModelForCausalLM

    from megadistill.model import HybridConfig, HybridForCausalLM
    from megadistill.teachers.conversion import check_teacher_config
    from megadistill.teachers.registry import adapter_for

    check_teacher_config(teacher_cfg)
    try:
        cfg = HybridConfig.from_teacher(teacher_cfg, **hybrid)
    except ValueError as exc:
        raise ConfigError(f"hybrid settings: {exc}") from exc
    with torch.device("meta"):
        teacher = AutoModelForCausalLM.from_config(teacher_cfg)
        student = HybridForCausalLM(cfg)
    new = set(student.new_parameter_names())
    heads = teacher_cfg.num_attention_heads
    return ModelShape(
        family=teacher_cfg.model_type,
        vocab=teacher_cfg.vocab_size,
        hidden=teacher_cfg.hidden_size,
        intermediate=teacher_cfg.intermediate_size,
        num_layers=teacher_cfg.num_hidden_layers,
        num_heads=heads,
        num_kv_heads=getattr(teacher_cfg, "num_key_value_heads", None) or heads,
        head_dim=cfg.head_dim,
        feature_dim=cfg.feature_dim,
        window=cfg.window,
        num_sinks=cfg.num_sinks,
        num_softmax_layers=sum(layer.self_attn.full for layer in student.model.layers),
        num_softmax_heads=len(cfg.softmax_heads),
        kept_local_windows=tuple(
            layer.self_attn.window for layer in student.model.layers if layer.self_attn.keep_local
        ),
        teacher_windows=tuple(layer.self_attn.teacher_window for layer in student.model.layers),
        mlstm_feature_dim=cfg.mlstm_feature_dim,
        chunk_size=cfg.chunk_size,
        qk_norm=adapter_for(teacher_cfg.model_type).qk_norm != "none",
        mlstm_backend=cfg.mlstm_backend,
        swa_backend=cfg.swa_backend,
        teacher_params=sum(p.numel() for p in teacher.parameters()),
        student_params=sum(p.numel() for p in student.parameters()),
        new_params=sum(p.numel() for n, p in student.named_parameters() if n in new),
        student_largest_module=_largest_module(student),
        teacher_largest_module=_largest_module(teacher),
    )


@dataclass(kw_only=True)
class PlanSettings:
    """Cluster and run settings of a plan."""

    nodes: int = 1
    """Nodes; ranks = nodes * gpus_per_node."""
    gpus_per_node: int = 8
    """GPUs (ranks) per node."""
    gpu_mem: int = 80 * GiB
    """Memory of one GPU (bytes)."""
    cpu_mem: int | None = None
    """CPU memory of one node (bytes); None leaves CPU memory unchecked."""
    seq_len: int = 4096
    """Tokens per sequence."""
    micro_batch: int = 1
    """Sequences per rank per forward/backward."""
    top_k: int = 256
    """Teacher tokens kept per position (stage II)."""
    loss_chunk: int = 1024
    """Tokens per chunk of full-vocabulary logits in the stage II loss."""
    precision: Precision = "bf16"
    """Parameter/activation precision on the GPU."""
    activation_checkpointing: bool | None = None
    """Recompute decoder layers; None lets the planner choose (off when it fits)."""
    reserve: int = 2 * GiB
    """Fixed per-GPU reserve: CUDA context, NCCL buffers, allocator fragmentation."""

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "seq_len", "micro_batch", "top_k", "loss_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"plan: {name} must be >= 1, got {getattr(self, name)}")
        if self.gpu_mem <= 0:
            raise ConfigError(f"plan: gpu_mem must be > 0, got {self.gpu_mem}")
        if self.precision not in ("bf16", "fp32"):
            raise ConfigError(f"plan: precision must be 'bf16' or 'fp32', got {self.precision!r}")

    @property
    def world(self) -> int:
        """Ranks in the job."""
        return self.nodes * self.gpus_per_node

    @property
    def bytes_per(self) -> int:
        """Bytes per parameter / activation element."""
        return 2 if self.precision == "bf16" else 4


# ----------------------------------------------------------------------------- model states
@dataclass(frozen=True)
class ModelStates:
    """Per-rank bytes of a ZeRO-3 engine's model states (see the module docstring)."""

    params: int
    grads: int
    master: int
    adam: int
    step_fp32_grads: int
    offload_optimizer: bool

    @property
    def persistent(self) -> int:
        """What stays allocated between steps (params, grads, master, moments)."""
        return self.params + self.grads + self.master + self.adam

    @property
    def gpu(self) -> int:
        """Peak GPU bytes (the step's fp32 gradient copy included)."""
        if self.offload_optimizer:
            return self.params
        return self.persistent + self.step_fp32_grads

    @property
    def cpu(self) -> int:
        """CPU bytes (only with optimizer offload)."""
        return (
            self.grads + self.master + self.adam + self.step_fp32_grads
            if self.offload_optimizer
            else 0
        )


def zero3_model_states(
    num_params: int, num_trainable: int, world: int, precision: Precision, offload_optimizer: bool
) -> ModelStates:
    """Per-rank model states of a ZeRO-3 student with torch AdamW (partitions rounded up)."""
    b = 2 if precision == "bf16" else 4
    part_all = -(-num_params // world)
    part_tr = -(-num_trainable // world)
    # Measured (tests/test_plan.py, DeepSpeed 0.19.8): a separate fp32 master partition exists
    # in fp32 training too, although stage3._create_fp32_partitions has a shared-buffer branch.
    master = MASTER_BYTES * part_tr
    return ModelStates(
        params=b * part_all,
        grads=b * part_tr,
        master=master,
        adam=ADAM_BYTES * part_tr,
        step_fp32_grads=4 * min(part_tr, SUB_GROUP_SIZE) if num_trainable else 0,
        offload_optimizer=offload_optimizer,
    )


def deepspeed_estimate(
    num_params: int, largest_module: int, nodes: int, gpus_per_node: int, offload: bool
) -> tuple[int, int]:
    """DeepSpeed's own ZeRO-3 estimate ``(cpu bytes per node, gpu bytes per GPU)``.

    ``offload=True`` means optimizer and parameters offloaded to CPU; DeepSpeed applies its
    ``additional_buffer_factor`` (1.5) to the CPU figure.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
        total_params=num_params, largest_layer_params=largest_module,
        num_gpus_per_node=gpus_per_node, num_nodes=nodes, cpu_offload=offload,
        cpu_offload_params=offload, zero_init=True,
    )  # fmt: skip
    return int(cpu), int(gpu)


# ----------------------------------------------------------------------------- activations
def _swa_terms(s: ModelShape, a: int) -> dict[str, float]:
    qd = s.num_heads * s.head_dim
    backend = "flex" if s.swa_backend == "auto" else s.swa_backend
    if backend == "flex":  # GPU default: the output (counted in mixing) + log-sum-exp
        return {"swa_lse": 4 * s.num_heads}
    # blocked (CPU): each block of queries keeps its float mask and repeated K/V
    keys = s.window + SWA_BLOCK + s.num_sinks
    per_block = 4 * keys + 2 * qd * a * keys / SWA_BLOCK
    return {"swa_lse": 4 * s.num_heads, "swa_blocks": per_block}


def _mlstm_terms(s: ModelShape, a: int, stage: str) -> dict[str, float]:
    nh, f, d, c = s.num_heads, s.feature_dim, s.head_dim, s.chunk_size
    # k and v as the kernel sees them: fp32 casts, or (fp32 runs) the GQA-repeated copies
    kv = 4 * nh * (f + d) if (a != 4 or nh > s.num_kv_heads) else 0
    states = 4 * nh * f * d / c  # one (C, n) per chunk
    if s.mlstm_backend in ("triton", "native"):
        # The kernel saves its inputs and the per-chunk states and recomputes the rest.
        return {"mlstm_inputs": 4 * nh * f + kv, "mlstm_states": states, "mlstm_out": a * nh * d}
    # chunkwise: q/sqrt(d), q@C, numerator; log-decay, q@k^T and its decay weights (c x c, fp32);
    # three (C, n) per chunk: the entering states (stacked), the scan's carried states and each
    # chunk's own contribution
    terms = {
        "mlstm_inputs": 4 * nh * f + kv,
        "mlstm_vectors": 8 * nh * d,
        "mlstm_scores": 12 * nh * c + c,
        "mlstm_states": 3 * states,
        "mlstm_out": a * nh * d,
    }
    if stage != "align":  # v needs a gradient: the weighted scores s and k*w are kept too
        terms["mlstm_vectors"] += 4 * nh * f
        terms["mlstm_scores"] += 4 * nh * c
    return terms


def layer_activation_terms(s: ModelShape, a: int, stage: str) -> dict[str, float]:
    """Saved-for-backward bytes per token of one hybrid decoder layer, by tensor group.

    Args:
        s: model shape.
        a: bytes per activation element (2 bf16, 4 fp32).
        stage: ``align`` (only the new parameters' paths) or ``distill`` (everything).
    """
    h, nh, nkv, d, f = s.hidden, s.num_heads, s.num_kv_heads, s.head_dim, s.feature_dim
    terms: dict[str, float] = {
        "rope_qk": a * (nh + nkv) * d,
        "feature_maps": a * (nh + nkv) * f,
        "gate_input": a * (nh + 2 * nkv) * d,
        **_mlstm_terms(s, a, stage),
        "mixing": a * nh * d + 2 * a * nh,  # the SWA output and the gate, kept for the gate
    }
    if stage == "align":
        terms["gate_x"] = a * h  # igate/fgate input
        terms["align_mse"] = 4 * h  # fp32 difference to the teacher's attention output
        return terms
    qk_norm = (4 + a) * (nh + nkv) * d if s.qk_norm else 0
    terms.update(
        norms=2 * (4 * h + a * h + 4),
        proj_input=a * h,
        value=a * nkv * d,
        qk_norm=qk_norm,
        o_proj_input=a * nh * d,
        mlp=4 * a * s.intermediate + a * h,
        **_swa_terms(s, a),
    )
    return terms


@dataclass(frozen=True)
class Activations:
    """Activation bytes of one rank's micro-batch, without and with checkpointing."""

    per_layer: int
    full: int
    checkpointed: int


def activations(s: ModelShape, settings: PlanSettings, stage: str) -> Activations:
    """Saved activations of the student for ``stage`` ('align' or 'distill').

    Without checkpointing: every layer's saved tensors, plus one layer's worth of gradients in
    flight during backward. With checkpointing: each layer's input, plus one layer recomputed
    and its gradients.
    """
    a = settings.bytes_per
    tokens = settings.micro_batch * settings.seq_len
    per_layer = int(sum(layer_activation_terms(s, a, stage).values()) * tokens)
    # embeddings output, final norm (fp32 copy + output), RoPE cos/sin (shared by all layers)
    outside = tokens * (a * s.hidden + 4 * s.hidden + a * s.hidden + 2 * a * s.head_dim)
    layer_input = tokens * a * s.hidden
    full = s.num_layers * per_layer + per_layer + outside
    ckpt = s.num_layers * layer_input + 2 * per_layer + outside
    return Activations(per_layer=per_layer, full=full, checkpointed=ckpt)


# ----------------------------------------------------------------------------- stage plans
@dataclass(frozen=True)
class Option:
    """One offload / recompute setting."""

    teacher_offload: Offload = "none"
    optimizer_offload: Offload = "none"
    activation_checkpointing: bool = False

    def describe(self, has_teacher: bool) -> str:
        parts = [f"teacher offload {self.teacher_offload}"] if has_teacher else []
        parts.append(f"optimizer offload {self.optimizer_offload}")
        parts.append(f"activation checkpointing {'on' if self.activation_checkpointing else 'off'}")
        return ", ".join(parts)


@dataclass
class StagePlan:
    """Per-rank memory of one stage under one option."""

    stage: str
    option: Option
    gpu: dict[str, int] = field(default_factory=dict)
    """Named GPU items (bytes per rank)."""
    cpu: dict[str, int] = field(default_factory=dict)
    """Named CPU items (bytes per rank)."""
    nvme: int = 0
    """NVMe bytes per rank (teacher partitions)."""
    activations: Activations | None = None
    fits: bool = False
    reason: str = ""

    @property
    def gpu_total(self) -> int:
        return sum(self.gpu.values())

    @property
    def cpu_total(self) -> int:
        return sum(self.cpu.values())


def _student_items(s: ModelShape, st: PlanSettings, stage: str, opt: Option, plan: StagePlan):
    b = st.bytes_per
    trainable = s.new_params if stage == "align" else s.student_params
    ms = zero3_model_states(
        s.student_params, trainable, st.world, st.precision, opt.optimizer_offload == "cpu"
    )
    plan.gpu["student params"] = ms.params
    if opt.optimizer_offload == "none":
        plan.gpu["student grads"] = ms.grads
        plan.gpu["student fp32 master + Adam"] = ms.master + ms.adam
        plan.gpu["student fp32 grads (step)"] = ms.step_fp32_grads
    else:
        plan.cpu["student grads + fp32 master + Adam (offloaded)"] = ms.cpu
    largest = s.student_largest_module
    plan.gpu["student ZeRO-3 working (gathered layer, buckets)"] = b * (
        2 * largest + PREFETCH_BUCKET + REDUCE_BUCKET
    )
    acts = activations(s, st, "align" if stage == "align" else "distill")
    plan.activations = acts
    plan.gpu["activations"] = acts.checkpointed if opt.activation_checkpointing else acts.full


def _teacher_items(s: ModelShape, st: PlanSettings, opt: Option, plan: StagePlan) -> None:
    b = st.bytes_per
    tokens = st.micro_batch * st.seq_len
    part = b * -(-s.teacher_params // st.world)
    if opt.teacher_offload == "none":
        plan.gpu["teacher params"] = part
    elif opt.teacher_offload == "cpu":
        plan.cpu["teacher params (offloaded)"] = part
    else:
        plan.nvme = part
        plan.cpu["teacher NVMe swap buffers"] = b * NVME_BUFFER_COUNT * NVME_BUFFER_SIZE
    plan.gpu["teacher ZeRO-3 working (gathered layer, prefetch)"] = b * (
        s.teacher_largest_module + PREFETCH_BUCKET
    )
    # The teacher's phase (full logits, one fp32 log-softmax chunk) ends before the student's
    # forward; only the larger of the two phases counts on top of what persists.
    teacher_phase = tokens * s.vocab * b + 2 * 4 * st.loss_chunk * s.vocab
    student_phase = plan.gpu["activations"] + plan.gpu.get("chunked loss buffer", 0)
    plan.gpu["teacher logits + top-k (phase peak above student's)"] = max(
        0, teacher_phase - student_phase
    )


def plan_stage(s: ModelShape, st: PlanSettings, stage: str, opt: Option) -> StagePlan:
    """Per-rank memory of ``stage`` ('align', 'distill-online', 'distill-offline') under ``opt``."""
    if stage not in STAGES:
        raise ConfigError(f"plan: stage {stage!r} is not one of {', '.join(STAGES)}")
    plan = StagePlan(stage=stage, option=opt)
    _student_items(s, st, stage, opt, plan)
    tokens = st.micro_batch * st.seq_len
    if stage == "align":
        # the teacher's full causal attention per layer (no grad): a dense T x T mask, transient
        plan.gpu["align teacher-attention mask (transient)"] = (
            st.micro_batch * st.seq_len**2 * (1 + st.bytes_per)
        )
    else:
        plan.gpu["top-k targets buffer"] = tokens * st.top_k * TOPK_BYTES
        plan.gpu["chunked loss buffer"] = st.loss_chunk * s.vocab * (st.bytes_per + 12)
    if stage == "distill-online":
        _teacher_items(s, st, opt, plan)
    plan.gpu["reserve (CUDA context, NCCL, fragmentation)"] = st.reserve
    _check_fit(st, plan)
    return plan


def _check_fit(st: PlanSettings, plan: StagePlan) -> None:
    if plan.gpu_total > st.gpu_mem:
        plan.fits, plan.reason = (
            False,
            (f"GPU needs {plan.gpu_total / GiB:.1f} GiB > {st.gpu_mem / GiB:.1f} GiB"),
        )
        return
    node_cpu = plan.cpu_total * st.gpus_per_node
    if st.cpu_mem is not None and node_cpu > st.cpu_mem:
        plan.fits, plan.reason = (
            False,
            (f"CPU needs {node_cpu / GiB:.1f} GiB per node > {st.cpu_mem / GiB:.1f} GiB"),
        )
        return
    plan.fits, plan.reason = True, "fits"


def candidate_options(stage: str, checkpointing: bool | None) -> list[Option]:
    """Options from the least to the most offload/recompute, in the order they are tried.

    Offload ladder: none -> teacher cpu -> teacher nvme -> optimizer cpu (with the teacher on
    cpu, then nvme). Each step is tried without activation checkpointing first unless the run
    fixes it.
    """
    teacher = ["none", "cpu", "nvme"] if stage == "distill-online" else ["none"]
    ladder = [(t, "none") for t in teacher]
    ladder += [(t, "cpu") for t in teacher if t != "none" or len(teacher) == 1]
    recompute = [False, True] if checkpointing is None else [checkpointing]
    return [
        Option(teacher_offload=t, optimizer_offload=o, activation_checkpointing=r)  # type: ignore[arg-type]
        for t, o in ladder
        for r in recompute
    ]


@dataclass
class Plan:
    """The plan of every stage: the chosen (smallest fitting) option, or the last one tried."""

    shape: ModelShape
    settings: PlanSettings
    stages: dict[str, StagePlan]


def make_plan(shape: ModelShape, settings: PlanSettings) -> Plan:
    """For each stage, the first option of :func:`candidate_options` that fits."""
    chosen = {}
    for stage in STAGES:
        tried = [
            plan_stage(shape, settings, stage, o)
            for o in candidate_options(stage, settings.activation_checkpointing)
        ]
        chosen[stage] = next((p for p in tried if p.fits), tried[-1])
    return Plan(shape=shape, settings=settings, stages=chosen)


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class PlanInput:
    """What a RECIPE_OR_TEACHER argument resolves to."""

    teacher_config: Any
    hybrid: dict[str, Any]
    settings: dict[str, Any]
    """PlanSettings fields the recipe fixes (seq_len, micro_batch, top_k, ...)."""


def _stage_settings(section: dict[str, Any]) -> dict[str, Any]:
    """PlanSettings fields read from a stage config dict (see megadistill/stages/config.py)."""
    out: dict[str, Any] = {}
    data, engine = section.get("data") or {}, section.get("engine") or {}
    distill = section.get("distill") or {}
    for key, value in (
        ("seq_len", data.get("seq_len")),
        ("micro_batch", engine.get("micro_batch_size")),
        ("top_k", distill.get("top_k")),
        ("loss_chunk", distill.get("chunk_size")),
        ("activation_checkpointing", section.get("activation_checkpointing")),
    ):
        if value is not None:
            out[key] = value
    if engine.get("precision") in ("bf16", "fp32"):
        out["precision"] = engine["precision"]
    return out


def _from_model_path(path: str) -> tuple[Any, dict[str, Any]]:
    """Teacher config + hybrid settings from a teacher name/config or a student folder."""
    import json

    from megadistill.model import HybridConfig
    from megadistill.teachers.conversion import load_teacher_config

    cfg_file = Path(path) / "config.json" if Path(path).is_dir() else Path(path)
    if cfg_file.is_file() and cfg_file.suffix == ".json":
        data = json.loads(cfg_file.read_text())
        if data.get("model_type") == HybridConfig.model_type:
            student = HybridConfig.from_dict(data)
            hybrid = student.hybrid_settings.to_dict()
            return student.teacher(), hybrid
    return load_teacher_config(path), {}


def load_plan_input(source: str) -> PlanInput:
    """Resolve ``megadistill plan``'s first argument.

    Accepted:
      - a shipped recipe name (``olmo3_7b``, ``llama31_8b``, ``qwen25_7b_instruct``: the
        recipe in ``megadistill/recipes/``, whose teacher config ships under the same name);
      - a teacher ``config.json`` or a teacher Hugging Face folder;
      - a student folder (converted, ``model_type`` megadistill_hybrid): its teacher and hybrid
        settings;
      - a stage YAML (:class:`megadistill.stages.config.StageConfig` keys): ``student`` (or
        ``teacher``), ``data.seq_len``, ``engine.micro_batch_size``/``precision``,
        ``distill.top_k``/``chunk_size``, ``activation_checkpointing``;
      - a pipeline recipe YAML (has ``experts``): ``teacher``, ``hybrid`` and the same keys from
        its ``distill`` section.
    """
    from megadistill.config import load_yaml
    from megadistill.teachers.conversion import shipped_recipes

    recipe = shipped_recipes().get(source)
    if recipe is not None and not Path(source).exists():
        source = str(recipe)
    if not source.endswith((".yaml", ".yml")):
        cfg, hybrid = _from_model_path(source)
        return PlanInput(teacher_config=cfg, hybrid=hybrid, settings={})
    data = load_yaml(source)
    if "experts" in data:  # pipeline recipe
        cfg, _ = _from_model_path(str(data["teacher"]))
        hybrid = dict(data.get("hybrid") or {})
        return PlanInput(cfg, hybrid, _stage_settings(data.get("distill") or {}))
    model = data.get("student") or data.get("teacher")
    if not model:
        raise MegadistillError(
            f"{source} names neither 'student' nor 'teacher'; give a stage YAML, a pipeline "
            "recipe, a teacher name or a model folder"
        )
    cfg, hybrid = _from_model_path(str(model))
    return PlanInput(cfg, hybrid, _stage_settings(data))


# ----------------------------------------------------------------------------- report
def _gib(n: int | float) -> str:
    return f"{n / GiB:8.2f}"


def decode_cache_bytes(s: ModelShape, context: int, bytes_per_value: int = 2) -> dict[str, int]:
    """Decoding cache of one sequence after ``context`` tokens: the teacher's KV cache (W_t
    tokens in its sliding-window layers), the student's constant part (mLSTM state + sink/window
    KV of each hybrid layer, the state in fp32; W_t KV slots in each local layer kept as the
    teacher's SWA) and the growing KV cache of its softmax layers."""
    kv_per_token = 2 * s.num_kv_heads * s.head_dim * bytes_per_value
    hybrid_layers = s.num_layers - s.num_softmax_layers - len(s.kept_local_windows)
    f, d = s.mlstm_feature_dim, s.head_dim
    state = s.num_heads * (f * d + f + 1) * 4
    window = min(context, s.window + s.num_sinks) * kv_per_token
    kept_local = sum(min(context, w) for w in s.kept_local_windows) * kv_per_token
    spans = s.teacher_windows or (None,) * s.num_layers
    teacher = sum(context if w is None else min(context, w) for w in spans) * kv_per_token
    return {
        "teacher": teacher,
        "student_constant": hybrid_layers * (state + window) + kept_local,
        "student_softmax_layers": (s.num_softmax_layers + s.num_softmax_heads / s.num_kv_heads)
        * context
        * kv_per_token,
    }


def format_cache(s: ModelShape, contexts: tuple[int, ...] = (8192, 32768)) -> list[str]:
    """One line per context length: teacher vs student decoding cache (bf16 KV)."""
    lines = []
    for n in contexts:
        c = decode_cache_bytes(s, n)
        student = c["student_constant"] + c["student_softmax_layers"]
        lines.append(
            f"decode cache per sequence at {n // 1024}K tokens (bf16 KV): teacher "
            f"{c['teacher'] / 2**20:,.1f} MiB, student {student / 2**20:,.1f} MiB "
            f"({c['student_constant'] / 2**20:,.1f} constant + "
            f"{c['student_softmax_layers'] / 2**20:,.1f} in {s.num_softmax_layers} softmax layer(s)"
            + (f" and {s.num_softmax_heads} softmax KV head(s)" if s.num_softmax_heads else "")
            + ")"
        )
    return lines


def format_plan(plan: Plan) -> str:
    """Human-readable per-rank tables, one per stage."""
    s, st = plan.shape, plan.settings
    lines = [
        f"teacher {s.family}: {s.teacher_params:,d} params; student {s.student_params:,d} "
        f"({s.new_params:,d} new)",
        *format_cache(s),
        f"{st.nodes} node(s) x {st.gpus_per_node} GPU(s) = {st.world} ranks, "
        f"{st.gpu_mem / GiB:.0f} GiB per GPU"
        + (f", {st.cpu_mem / GiB:.0f} GiB CPU per node" if st.cpu_mem else "")
        + f"; {st.precision}, micro-batch {st.micro_batch} x {st.seq_len} tokens, top-k {st.top_k}",
    ]
    for stage, sp in plan.stages.items():
        has_teacher = stage == "distill-online"
        verdict = "FITS" if sp.fits else f"DOES NOT FIT ({sp.reason})"
        lines += ["", f"== {stage}: {verdict} with {sp.option.describe(has_teacher)}"]
        lines.append(f"  {'per rank':58s} {'GiB':>8s}")
        lines += [f"  GPU {name:54s} {_gib(v)}" for name, v in sp.gpu.items()]
        lines += [f"  CPU {name:54s} {_gib(v)}" for name, v in sp.cpu.items()]
        if sp.nvme:
            lines.append(f"  NVMe {'teacher params':53s} {_gib(sp.nvme)}")
        lines.append(f"  {'GPU total':58s} {_gib(sp.gpu_total)}")
        if sp.cpu:
            lines.append(f"  {'CPU total per node':58s} {_gib(sp.cpu_total * st.gpus_per_node)}")
        acts = sp.activations
        if acts is not None:
            lines.append(
                f"  activations: {acts.full / GiB:.2f} GiB without checkpointing, "
                f"{acts.checkpointed / GiB:.2f} GiB with ({acts.per_layer / GiB:.3f} GiB per layer)"
            )
    return "\n".join(lines)


def plan_from_cli(source: str, overrides: dict[str, Any], hybrid: dict[str, Any]) -> Plan:
    """Resolve the input, merge recipe settings with command-line ones, and plan every stage.

    Args:
        source: see :func:`load_plan_input`.
        overrides: PlanSettings fields given on the command line (win over the recipe's).
        hybrid: hybrid settings given on the command line (win over the recipe's).
    """
    inp = load_plan_input(source)
    settings = PlanSettings(**{**inp.settings, **overrides})
    shape = model_shape(inp.teacher_config, **{**inp.hybrid, **hybrid})
    return make_plan(shape, settings)
