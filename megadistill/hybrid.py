"""The hybrid settings: what makes a student out of a teacher (window, sinks, gate, backends, ...).

One typed object, read everywhere the settings are given: a recipe's ``hybrid:`` section,
``megadistill convert ... window=512 num_sinks=4`` (the same dotted ``key=value`` overrides as
every config, :func:`megadistill.config.apply_overrides`), and the student's
:class:`~megadistill.model.configuration.HybridConfig`, which stores them flat in ``config.json``.
Checks that need the teacher (``feature_dim`` against its head size, ``softmax_layers`` against
its depth) are the config's. This module needs neither torch nor transformers: a recipe is read
and checked without them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args

from megadistill.config import ConfigError

GateMode = Literal["learned", "swa", "mlstm"]
MLSTMBackend = Literal["chunkwise", "recurrent", "native", "triton"]
SWABackend = Literal["auto", "reference", "blocked", "flex"]
RopeOn = Literal["input", "features", "none"]
FeatureMap = Literal["hedgehog", "hedgehog_pm"]
Mix = Literal["gate", "shared_norm"]
LocalLayers = Literal["swa", "hybrid"]
GateInit = Literal["floor", "half"]

GATE_MODES: tuple[str, ...] = get_args(GateMode)
MLSTM_BACKENDS: tuple[str, ...] = get_args(MLSTMBackend)
SWA_BACKENDS: tuple[str, ...] = get_args(SWABackend)
ROPE_ON: tuple[str, ...] = get_args(RopeOn)
FEATURE_MAPS: tuple[str, ...] = get_args(FeatureMap)
MIXES: tuple[str, ...] = get_args(Mix)
LOCAL_LAYERS: tuple[str, ...] = get_args(LocalLayers)
GATE_INITS: tuple[str, ...] = get_args(GateInit)


@dataclass(kw_only=True)
class HybridSettings:
    """How each attention block of the teacher becomes a hybrid block."""

    window: int = 512
    """Sliding-window length W of the softmax branch."""
    num_sinks: int = 4
    """Sink tokens (the first tokens of each document) that every query sees."""
    gate_mode: GateMode = "learned"
    """``learned`` (per-head gate), ``swa`` (softmax branch only: with W >= length the student is
    the teacher) or ``mlstm`` (mLSTM branch only)."""
    mlstm_backend: MLSTMBackend = "chunkwise"
    """mLSTM kernel: ``chunkwise`` (plain torch), ``recurrent``, ``native``, ``triton``."""
    swa_backend: SWABackend = "auto"
    """Sliding-window attention kernel: ``auto``, ``reference``, ``blocked``, ``flex``."""
    chunk_size: int = 64
    """Chunk length of the chunkwise mLSTM."""
    feature_dim: int | None = None
    """Output size of the Hedgehog feature maps (None: the teacher's head_dim)."""
    rope_on: RopeOn | None = None
    """Where the recurrent branch's feature maps meet RoPE: ``input``, feature maps of the RoPE'd
    q/k; ``features``, RoPE on the feature-mapped q/k (needs feature_dim == head_dim and
    feature_map 'hedgehog'); ``none``, feature maps of q/k before RoPE, so phi(q).phi(k) reads
    the same at every position (the softmax branch keeps RoPE). None: ``none`` with mix
    ``shared_norm`` (whose ``input`` form degrades past the training length: README "Past the
    training length"), ``input`` with the gated mix. A student's config stores the value; one
    saved before ``none`` existed without it loads as ``input``, as it was converted."""
    feature_map: FeatureMap = "hedgehog"
    """``hedgehog`` (softmax(xW)) or ``hedgehog_pm`` ([softmax(xW), softmax(-xW)], twice the
    features; the Hedgehog/LoLCATs form)."""
    fgate_bias: list[float] = field(default_factory=lambda: [3.0, 6.0])
    """[low, high] of the forget-gate biases at initialisation, spread linearly over the heads;
    memory spans ~e^b tokens."""
    igate_bias: float = 0.0
    """Input-gate bias at conversion (every head). With mix ``shared_norm`` a key beyond the
    window weighs ``exp(i + log-decay) * phi(q).phi(k)`` against the window's best key, so a
    negative bias starts the far past near zero: at -6 a fresh SmolLM2 student at W = 64 is the
    SWA floor within 1% of the floor's gap up to 2K tokens. Stage I opens it slowly (Adam moves
    the bias by at most the learning rate per step): on the quality recipe it ends where 0 ends,
    so 0 is the default (README: "Where the recurrent branch starts")."""
    softmax_layers: list[int] = field(default_factory=list)
    """Layers kept as the teacher's full softmax attention (their cache grows with the context)."""
    softmax_heads: list[list[int]] = field(default_factory=list)
    """Single key/value heads kept as the teacher's full softmax attention inside hybrid layers,
    as ``[layer, kv_head]`` pairs (with GQA, a KV head and every query head that reads it): the
    heads that look facts up far back (``megadistill choose-heads``), at a KV cache of
    one head each where ``softmax_layers`` costs every head of a layer. The layer's other heads
    stay hybrid."""
    mix: Mix = "gate"
    """How the branches combine with gate_mode 'learned': ``gate`` (the paper's per-head sigmoid
    gate) or ``shared_norm`` (exact softmax inside the window, mLSTM keys beyond, one
    normaliser)."""
    local_layers: LocalLayers = "swa"
    """What a layer becomes where the teacher attends to a sliding window of W_t tokens (Mistral,
    Olmo3's and Gemma 3's local layers, ...): ``swa`` keeps the teacher's own sliding-window
    attention (exact, no new parameters, a W_t-slot cache); ``hybrid`` makes it a hybrid layer
    whose softmax branch has window min(W, W_t) and no sinks and whose stage I target is the
    teacher's windowed attention (README: "Sliding-window teachers"). A student config saved
    before this setting existed loads as ``hybrid``, as it was converted."""
    gate_init: GateInit = "floor"
    """Where the learned gate of mix ``gate`` starts: ``floor`` scales each head's gate by a
    learned factor that starts at 0, so a freshly converted student is exactly the SWA floor
    and the mLSTM branch comes in as it learns (the factor gets a gradient from the first
    step); ``half`` is the paper's plain sigmoid gate, 0.5 at first: every layer then mixes in
    half of the untrained mLSTM's output. A student config saved before this setting existed
    loads as ``half``, as it was converted. (mix ``shared_norm`` has no gate.)"""

    def __post_init__(self) -> None:
        self.window, self.num_sinks = int(self.window), int(self.num_sinks)
        self.chunk_size = int(self.chunk_size)
        self.feature_dim = int(self.feature_dim) if self.feature_dim else None
        self.fgate_bias = [float(b) for b in self.fgate_bias]
        self.igate_bias = float(self.igate_bias)
        self.softmax_layers = sorted(int(i) for i in self.softmax_layers)
        self.softmax_heads = _head_pairs(self.softmax_heads)
        if self.rope_on is None:
            self.rope_on = "none" if self.mix == "shared_norm" else "input"
        for name, low in (("window", 1), ("num_sinks", 0), ("chunk_size", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name, choices in (("gate_mode", GATE_MODES), ("mlstm_backend", MLSTM_BACKENDS),
                              ("swa_backend", SWA_BACKENDS), ("rope_on", ROPE_ON),
                              ("feature_map", FEATURE_MAPS), ("mix", MIXES),
                              ("local_layers", LOCAL_LAYERS), ("gate_init", GATE_INITS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        if self.mlstm_backend == "triton" and (
            self.chunk_size < 16 or self.chunk_size & (self.chunk_size - 1)
        ):
            raise ConfigError(
                f"mlstm_backend='triton' needs chunk_size a power of 2 >= 16 (its kernel's "
                f"blocks), got {self.chunk_size}"
            )
        if self.mix == "shared_norm" and self.rope_on == "features":
            raise ConfigError("mix='shared_norm' needs rope_on 'none' or 'input'")
        if self.rope_on == "features" and self.feature_map != "hedgehog":
            raise ConfigError("rope_on='features' needs feature_map='hedgehog'")
        if len(self.fgate_bias) != 2 or self.fgate_bias[0] > self.fgate_bias[1]:
            raise ConfigError(
                f"fgate_bias must be [low, high] with low <= high, got {self.fgate_bias}"
            )
        if len(set(self.softmax_layers)) != len(self.softmax_layers) or any(
            i < 0 for i in self.softmax_layers
        ):
            raise ConfigError(
                f"softmax_layers={self.softmax_layers}: each must be a distinct layer index >= 0"
            )
        if both := sorted({i for i, _ in self.softmax_heads} & set(self.softmax_layers)):
            raise ConfigError(
                f"softmax_heads name heads of layers {both}, which softmax_layers keeps whole: "
                "drop them from one of the two"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every setting by name (plain values: YAML, JSON and ``key=value`` safe)."""
        return asdict(self)

    def changed(self) -> dict[str, Any]:
        """The settings that differ from the defaults (all a ``key=value`` command line needs:
        every reader of the settings shares these defaults)."""
        default = HybridSettings().to_dict()
        return {k: v for k, v in self.to_dict().items() if v != default[k]}


HYBRID_KEYS: tuple[str, ...] = tuple(f.name for f in fields(HybridSettings))


def _head_pairs(value: Any) -> list[list[int]]:
    """``softmax_heads`` as sorted, distinct ``[layer, kv_head]`` pairs of ints >= 0."""
    try:
        pairs = sorted([int(i), int(h)] for i, h in value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"softmax_heads={value!r}: give [layer, kv_head] pairs, e.g. [[18, 2], [14, 1]]"
        ) from None
    if any(i < 0 or h < 0 for i, h in pairs) or len({tuple(p) for p in pairs}) != len(pairs):
        raise ConfigError(f"softmax_heads={value!r}: each must be a distinct pair of indices >= 0")
    return pairs
