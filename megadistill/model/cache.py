"""The recurrent decoding cache: O(1) memory per sequence, whatever the context length.

Per layer it holds the mLSTM state (C, n, m), a ring buffer of the last W keys/values and the
S sink keys/values. Buffers are allocated at full size on first use, so memory after 16 tokens and
after 2,000 tokens is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from megadistill.model.mlstm import State


@dataclass
class LayerCache:
    """One layer's decoding state (batch-first)."""

    mlstm: State | None = None
    ring_k: torch.Tensor | None = None  # (B, KV, W, d)
    ring_v: torch.Tensor | None = None
    ring_abs: torch.Tensor | None = None  # (B, W) token index held in each slot, -1 if empty
    ring_ok: torch.Tensor | None = None  # (B, W) slot holds a real (non-padding) token
    sink_k: torch.Tensor | None = None  # (B, KV, S, d)
    sink_v: torch.Tensor | None = None
    sink_abs: torch.Tensor | None = None  # (B, S)
    sink_ok: torch.Tensor | None = None  # (B, S)

    def tensors(self) -> list[torch.Tensor]:
        out = [t for t in (self.ring_k, self.ring_v, self.ring_abs, self.ring_ok) if t is not None]
        out += [t for t in (self.sink_k, self.sink_v, self.sink_abs, self.sink_ok) if t is not None]
        return out + list(self.mlstm or ())


@dataclass
class HybridCache:
    """Decoding cache for :class:`~megadistill.model.modeling.HybridForCausalLM`."""

    num_layers: int
    window: int
    num_sinks: int
    layers: list[LayerCache] = field(default_factory=list)
    seen: int = 0  # tokens consumed per row (padding included)
    next_pos: torch.Tensor | None = None  # (B,) next RoPE position per row
    sinks_taken: torch.Tensor | None = None  # (B,) real tokens written to the sink buffer

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [LayerCache() for _ in range(self.num_layers)]

    # transformers' generation utilities call these.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        del layer_idx
        return self.seen

    def __len__(self) -> int:
        return self.num_layers

    def nbytes(self) -> int:
        """Bytes held by all state tensors."""
        return sum(t.numel() * t.element_size() for lc in self.layers for t in lc.tensors())

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select rows (beam search)."""
        for lc in self.layers:
            for name in vars(lc):
                val = getattr(lc, name)
                if isinstance(val, torch.Tensor):
                    setattr(lc, name, val.index_select(0, beam_idx.to(val.device)))
                elif isinstance(val, tuple):
                    setattr(lc, name, tuple(v.index_select(0, beam_idx.to(v.device)) for v in val))
        for name in ("next_pos", "sinks_taken"):
            val = getattr(self, name)
            if val is not None:
                setattr(self, name, val.index_select(0, beam_idx.to(val.device)))

    def kv_slots(self, lc: LayerCache, k: torch.Tensor) -> None:
        """Allocate the ring and sink buffers of ``lc`` for keys shaped like ``k`` (B,KV,T,d)."""
        if lc.ring_k is not None:
            return
        b, kv, _, d = k.shape
        w, s = self.window, self.num_sinks
        lc.ring_k = k.new_zeros(b, kv, w, d)
        lc.ring_v = k.new_zeros(b, kv, w, d)
        lc.ring_abs = torch.full((b, w), -1, dtype=torch.long, device=k.device)
        lc.ring_ok = torch.zeros(b, w, dtype=torch.bool, device=k.device)
        lc.sink_k = k.new_zeros(b, kv, s, d)
        lc.sink_v = k.new_zeros(b, kv, s, d)
        lc.sink_abs = torch.full((b, s), -1, dtype=torch.long, device=k.device)
        lc.sink_ok = torch.zeros(b, s, dtype=torch.bool, device=k.device)
