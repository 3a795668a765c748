"""The hybrid student as a transformers model: decoder layers, base model, causal LM head."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation import utils as _generation
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from megadistill.model.attention import NEW_PARAMETER_MODULES, HybridAttention, SeqInfo
from megadistill.model.cache import HybridCache
from megadistill.model.configuration import HybridConfig
from megadistill.model.remote_code import write_remote_code
from megadistill.model.rows import use_row_linear
from megadistill.model.swa import Tokens, document_layout
from megadistill.teachers.registry import adapter_for


@dataclass
class HybridCausalLMOutput(ModelOutput):
    """Output of :class:`HybridForCausalLM` (``loss``: from ``labels``, or ``head_fn``'s value).

    The decoding cache is ``cache``; under a transformers release whose ``generate()`` reads the
    cache back from ``past_key_values`` (4.x) it is returned under that key too (see
    :data:`CACHE_OUTPUT_NAME`).
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: HybridCache | None = None
    hidden_states: torch.Tensor | None = None


# The output key generate() feeds back into the next step: ``cache`` since transformers renamed
# it, ``past_key_values`` before. A release that found no cache there would silently re-run the
# whole prefix at every new token (right tokens, quadratic time).
_GENERATE_CACHE_NAMES = getattr(_generation, "ALL_CACHE_NAMES", ())
CACHE_OUTPUT_NAME = "cache" if "cache" in _GENERATE_CACHE_NAMES else "past_key_values"


def layer_generator(seed: int, layer_idx: int) -> torch.Generator:
    """The random generator of layer ``layer_idx``'s new parameters."""
    return torch.Generator().manual_seed(seed * 1_000_003 + layer_idx)


class HybridDecoderLayer(GradientCheckpointingLayer):
    """The teacher's decoder layer with its attention replaced by :class:`HybridAttention`."""

    def __init__(self, config: HybridConfig, layer_idx: int, teacher_cfg) -> None:
        super().__init__()
        adapter = adapter_for(teacher_cfg.model_type)
        self.norm_placement = adapter.norm_placement
        norm_cls = adapter.cls("RMSNorm")
        hidden, eps = teacher_cfg.hidden_size, teacher_cfg.rms_norm_eps
        self.self_attn = HybridAttention(config, layer_idx, adapter, teacher_cfg)
        self.mlp = adapter.build_mlp(teacher_cfg, layer_idx)
        # The teacher's norms under the teacher's names: pre (Llama) has input/post_attention,
        # post (Olmo2/3) post_attention/post_feedforward, sandwich (Gemma 3) all four.
        names = {
            "pre": ("input_layernorm", "post_attention_layernorm"),
            "post": ("post_attention_layernorm", "post_feedforward_layernorm"),
            "sandwich": ("input_layernorm", "post_attention_layernorm",
                         "pre_feedforward_layernorm", "post_feedforward_layernorm"),
        }[self.norm_placement]  # fmt: skip
        for name in names:
            setattr(self, name, norm_cls(hidden, eps=eps))
        types = getattr(teacher_cfg, "layer_types", None)
        self.layer_type = types[layer_idx] if types else "full_attention"

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, info: SeqInfo):
        if self.norm_placement == "post":
            x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, info))
            return x + self.post_feedforward_layernorm(self.mlp(x))
        if self.norm_placement == "sandwich":
            attn = self.self_attn(self.input_layernorm(x), cos, sin, info)
            x = x + self.post_attention_layernorm(attn)
            return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, info)
        return x + self.mlp(self.post_attention_layernorm(x))


class HybridPreTrainedModel(PreTrainedModel):
    config_class = HybridConfig
    config: HybridConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HybridDecoderLayer"]
    _is_stateful = True

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the model builds its own HybridCache

    def initialize_weights(self) -> None:
        """transformers' initialisation of every weight not loaded from a checkpoint, then the
        new parameters of each hybrid layer none of which were loaded.

        transformers >= 5.25 never calls ``_init_weights`` on a custom-code module without
        parameters of its own, which :class:`HybridAttention` is: its new parameters (feature
        maps, gates) would keep their construction values in a student built from its config.
        Under ZeRO-3 construction (``deepspeed.zero.Init``) a parameter is already partitioned
        here (no elements on this rank) and keeps those values, as transformers' own init does.
        """
        fresh = [
            m
            for m in self.modules()
            if isinstance(m, HybridAttention)
            and not m.kept
            and not any(getattr(p, "_is_hf_initialized", False) for p in m.parameters())
            and all(p.numel() > 0 for p in m.parameters())
        ]
        super().initialize_weights()
        for attn in fresh:
            attn.init_new_parameters()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, HybridAttention):  # transformers < 5.25 reaches the layer itself
            module.init_new_parameters()
        elif hasattr(module, "scalar_embed_scale"):
            # Gemma 3's scaled embedding: sqrt(hidden) lives in a non-persistent buffer that
            # from_pretrained leaves empty unless initialised here (as the teacher's own init).
            if module.embed_scale.device.type != "meta":
                with torch.no_grad():
                    module.embed_scale.fill_(module.scalar_embed_scale)
        elif "RotaryEmbedding" in type(module).__name__:
            # Teacher families initialise RoPE buffers in their own _init_weights (Olmo3 and
            # Gemma3 keep one inv_freq per layer type, which the generic init does not know), so
            # from_pretrained would leave them empty: rebuild them from the teacher's own class.
            with torch.device("cpu"):
                fresh = type(module)(config=module.config)
            with torch.no_grad():
                for name, buf in fresh.named_buffers():
                    target = module.get_buffer(name)
                    if target.device.type != "meta":
                        target.copy_(buf.to(target.dtype))

    @classmethod
    def register_for_auto_class(cls, auto_class: str = "AutoModel") -> None:
        """No-op: transformers calls this after a ``trust_remote_code`` load so that a later
        ``save_pretrained`` copies this module into the folder; the folder ships the shims of
        :mod:`megadistill.model.remote_code` instead (written by :meth:`save_pretrained`)."""
        del auto_class

    def save_pretrained(self, save_directory, *args: Any, **kwargs: Any) -> None:
        """``PreTrainedModel.save_pretrained`` plus the code that lets the folder load with
        ``trust_remote_code=True`` in a fresh process (see :mod:`megadistill.model.remote_code`)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_remote_code(save_directory)


class HybridModel(HybridPreTrainedModel):
    """Embeddings, hybrid decoder layers and the final norm."""

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        teacher_cfg = config.teacher()
        self.adapter = adapter_for(teacher_cfg.model_type)
        self.embed_tokens = self.adapter.build_embedding(teacher_cfg)
        self.layers = nn.ModuleList(
            HybridDecoderLayer(config, i, teacher_cfg) for i in range(teacher_cfg.num_hidden_layers)
        )
        self.norm = self.adapter.cls("RMSNorm")(
            teacher_cfg.hidden_size, eps=teacher_cfg.rms_norm_eps
        )
        self.rotary_emb = self.adapter.cls("RotaryEmbedding")(config=teacher_cfg)
        self.gradient_checkpointing = False
        self.post_init()

    def _seq_info(self, input_ids, attention_mask, position_ids, cache) -> SeqInfo:
        bsz, t = input_ids.shape[:2]
        if t == 1 and attention_mask is None and position_ids is None and cache is not None:
            if cache.continuing:
                return self._step_info(bsz, cache)
        dev = input_ids.device
        valid = (
            attention_mask[:, -t:].bool()
            if attention_mask is not None and attention_mask.dim() == 2
            else torch.ones(bsz, t, dtype=torch.bool, device=dev)
        )
        start = cache.next_pos if cache is not None and cache.next_pos is not None else None
        if position_ids is None:
            pos = valid.long().cumsum(-1) - 1
            pos = (pos + start[:, None]) if start is not None else pos
            position_ids = pos.clamp(min=0)
        position_ids = position_ids.expand(bsz, -1)
        reset = (position_ids == 0) & valid
        seen = cache.seen if cache is not None else 0
        abs_idx = torch.arange(seen, seen + t, device=dev)
        # Documents continue across forwards: a cache carries each row's document and its start.
        doc0, start0 = (cache.doc, cache.doc_start) if cache is not None else (None, None)
        doc, doc_pos = document_layout(reset, abs_idx, doc0, start0)
        # The next token's RoPE position: after the row's last token, or where its last real
        # one left off when the row ends in padding.
        last = valid[:, -1]
        next_pos = torch.where(
            last,
            position_ids[:, -1] + 1,
            position_ids.masked_fill(~valid, -1).amax(-1) + 1,
        )
        # The facts layers branch on, read back in one host sync per forward (not one per layer).
        # One document per row means no document starts after the row's first token: a row that
        # begins mid-document and then starts another has one reset but holds two documents.
        # ``continuing``: every row's next token (real, positions not given) goes on with its
        # document past its sinks, so that steps can skip this sync (see _step_info).
        all_valid, any_reset, one_doc, sink_tokens, continuing = torch.stack(
            [valid.all(), reset.any(), ~reset[:, 1:].any(),
             (valid & (doc_pos < self.config.num_sinks)).any(),
             (next_pos > 0).all() & (doc_pos[:, -1] + 1 >= self.config.num_sinks).all()]
        ).tolist()  # fmt: skip
        if cache is not None:
            cache.continuing = continuing
        return SeqInfo(
            reset=reset, valid=valid, pos=position_ids, abs_idx=abs_idx,
            tokens=Tokens(abs_idx.expand(bsz, -1), doc, doc_pos, valid), cache=cache,
            all_valid=all_valid,
            any_reset=any_reset, one_doc=one_doc, sink_tokens=sink_tokens, next_pos=next_pos,
        )  # fmt: skip

    def _step_info(self, bsz: int, cache: HybridCache) -> SeqInfo:
        """:meth:`_seq_info` of one real token per row after ``cache``, positions not given,
        when the cache says every row goes on with its document past its sinks
        (``cache.continuing``, as in generate()'s steps without padding): then no token starts a
        document nor is a sink, and the host knows every fact the layers branch on without
        reading the device (no sync)."""
        dev = cache.next_pos.device
        seen = cache.seen
        valid = torch.ones(bsz, 1, dtype=torch.bool, device=dev)
        abs_idx = torch.arange(seen, seen + 1, device=dev)
        doc_pos = (seen - cache.doc_start)[:, None]
        return SeqInfo(
            reset=torch.zeros_like(valid), valid=valid, pos=cache.next_pos[:, None],
            abs_idx=abs_idx, tokens=Tokens(abs_idx.expand(bsz, 1), cache.doc[:, None], doc_pos,
            valid), cache=cache, all_valid=True,
            any_reset=False, one_doc=True, sink_tokens=False, next_pos=cache.next_pos + 1,
        )  # fmt: skip

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: HybridCache | None = None,
    ) -> torch.Tensor:
        """Final hidden states (B, T, hidden)."""
        info = self._seq_info(input_ids, attention_mask, position_ids, cache)
        x = self.embed_tokens(input_ids)
        rope = {}
        for layer in self.layers:
            if layer.layer_type not in rope:
                args = (layer.layer_type,) if self.adapter.rope_per_layer_type else ()
                rope[layer.layer_type] = self.rotary_emb(x, info.pos, *args)
        for layer in self.layers:
            cos, sin = rope[layer.layer_type]
            x = layer(x, cos, sin, info)
        if cache is not None:
            cache.seen += input_ids.shape[1]
            cache.next_pos = info.next_pos
            if info.any_reset or cache.doc is None:  # (else the documents go on as they were)
                cache.doc = info.tokens.doc[:, -1]
                cache.doc_start = cache.seen - 1 - info.tokens.pos[:, -1]
        return self.norm(x)


class HybridForCausalLM(HybridPreTrainedModel, GenerationMixin):
    """Hybrid student with a language-model head (the teacher's)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HybridConfig) -> None:
        super().__init__(config)
        self.model = HybridModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # Decoding steps' products over torch's threads (one thread otherwise, at a few rows)
        use_row_linear(self)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    def new_parameter_names(self) -> list[str]:
        """Names of the parameters the teacher does not have (feature maps and gates)."""
        return [
            n
            for n, _ in self.named_parameters()
            if any(f".{m}." in n for m in NEW_PARAMETER_MODULES)
        ]

    @torch.no_grad()
    def init_new_parameters(self, seed: int) -> None:
        """Re-initialise the new parameters deterministically from ``seed`` (one generator per
        layer, so a layer's values do not depend on the order layers are built in)."""
        for i, layer in enumerate(self.model.layers):
            layer.self_attn.init_new_parameters(layer_generator(seed, i))

    def new_cache(self) -> HybridCache:
        """An empty decoding cache."""
        return HybridCache(len(self.model.layers), self.config.window, self.config.num_sinks)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        cache: HybridCache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: HybridCache | None = None,
        head_fn: Callable[[torch.Tensor, nn.Module], Any] | None = None,
        **kwargs,
    ) -> HybridCausalLMOutput:
        """Args:
        input_ids: (B, T) token ids.
        attention_mask: (B, T[+past]) 1 for real tokens, 0 for padding.
        position_ids: (B, T); a 0 starts a new document (mLSTM reset, SWA mask).
        labels: (B, T) targets for next-token CE (shifted inside; -100 ignored).
        cache: a :class:`HybridCache` to continue from (``use_cache`` creates one).
        logits_to_keep: if > 0, only the last that many positions get logits.
        head_fn: ``(final hidden states, lm_head module) -> value``, called instead of computing
            the logits (e.g. a chunked objective that never materialises them all); its value is
            returned as ``loss``. Calling the head inside forward lets ZeRO-3 gather it.
        """
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = self.new_cache()
        hidden = self.model(input_ids, attention_mask, position_ids, cache)
        if head_fn is not None:
            return HybridCausalLMOutput(loss=head_fn(hidden, self.lm_head))
        h = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100
            )
        out = HybridCausalLMOutput(loss=loss, logits=logits, cache=cache, hidden_states=hidden)
        if CACHE_OUTPUT_NAME != "cache" and cache is not None:
            out[CACHE_OUTPUT_NAME] = cache
        return out

    def prepare_inputs_for_generation(
        self,
        input_ids,
        cache=None,
        attention_mask=None,
        past_key_values=None,
        token_type_ids=None,  # returned by some tokenizers; transformers 4.x refuses unknown names
        logits_to_keep=None,
        **kwargs,
    ):
        del token_type_ids
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.seen > 0:
            input_ids = input_ids[:, cache.seen :]
        inputs = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": kwargs.get("use_cache", True),
        }
        # generate() asks for the last position's logits only (1; more when it verifies
        # candidate tokens): without it the prefill computed the LM head over the whole prompt.
        if logits_to_keep is not None:
            inputs["logits_to_keep"] = logits_to_keep
        return inputs
