"""The recurrent decoding cache: O(1) memory per sequence, whatever the context length.

Per layer it holds the mLSTM state (C, n, m), a ring buffer of the last W keys/values and the
S sink keys/values of the row's current document. Every slot records the token it holds (stream
index, document id, position in the document, real or not), so one rule,
:func:`megadistill.model.swa.visible`, decides what a query sees there, as in the parallel forward:
a new document in the stream (a prefill chunk or a decoding step with a reset) gets its own sinks,
and the previous document's keys stop being visible. Buffers are allocated at full size on first
use, so memory after 16 tokens and after 2,000 tokens is the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from megadistill.model.mlstm import State
from megadistill.model.swa import Tokens

ROOM_MIN = 256
"""Fewest tokens of room a kept layer's cache grows by (:meth:`LayerCache.append_full`)."""
_ROOM_DIMS = (2, 2, 1, 1)  # the token dim of k, v (B,KV,T,d), doc and ok (B,T)


@dataclass
class LayerCache:
    """One layer's decoding state (batch-first).

    Keys/values live in one buffer of S + W slots, each token held once: slot p < S holds the
    sink at position p of the row's current document, slot S + (index mod W) any other token
    among the last W (the ring slot of a sink reads as empty). Decoding one token attends over
    the whole buffer in place, without copying it. A layer kept as the teacher's full attention
    holds every key instead, in stream order (k, v, ``doc`` and ``ok`` grow with the context);
    so does ``full``, the cache of a hybrid layer's ``softmax_heads``, beside its ring buffer.
    """

    mlstm: State | None = None
    k: torch.Tensor | None = None  # (B, KV, S + W, d)
    v: torch.Tensor | None = None
    # Per slot, the token held: stream index (-1: empty), document id and position in the
    # document, in one tensor so that a decoding step writes them with one copy; and whether it
    # is a real (non-padding) token.
    held: torch.Tensor | None = None  # (B, 3, S + W)
    ok: torch.Tensor | None = None  # (B, S + W)
    doc: torch.Tensor | None = None  # kept full-attention layer only: (B, T) int32 documents
    # ``shared_norm`` mix only: per slot, the token's input gate and the log-decay it has
    # accumulated since it entered (it joins the mLSTM state with both when it leaves the window).
    gate_i: torch.Tensor | None = None  # (B, H, S + W)
    decay: torch.Tensor | None = None  # (B, H, S + W)
    # ... and with rope_on "none", each slot's key before RoPE: the key leaving the window joins
    # the state through the feature map of its plain key.
    k_plain: torch.Tensor | None = None  # (B, KV, S + W, d)
    # Decoding steps keep C and n of ``mlstm`` as views of one (B, H, F, D + 1) tensor [C | n]
    # (see mlstm.joint_state); this is that tensor (not counted again by ``tensors``).
    mlstm_joint: torch.Tensor | None = None
    # The KV heads of this hybrid layer kept as full attention (``softmax_heads``): their every
    # key, in stream order, as a kept layer's cache holds them.
    full: LayerCache | None = None
    # A kept layer's (k, v, doc, ok) with room for more tokens, of which k, v, doc and ok are
    # views once decoding appends (:meth:`append_full`).
    room: tuple[torch.Tensor, ...] | None = None

    def keys(self) -> Tokens:
        """The tokens the slots hold, as the visibility rule takes them."""
        return Tokens(*self.held.unbind(1), self.ok)

    def tensors(self) -> list[torch.Tensor]:
        own = (self.k, self.v, self.k_plain, self.held, self.ok, self.doc, self.gate_i,
               self.decay)  # fmt: skip
        full = self.full.tensors() if self.full is not None else []
        return [t for t in own if t is not None] + list(self.mlstm or ()) + full

    def nbytes(self) -> int:
        """Bytes held: a kept layer's room counted whole, not only its filled part."""
        held = sum(t.numel() * t.element_size() for t in self.tensors())  # ``full``'s included
        for lc in (self, self.full):
            if lc is not None and lc._in_room():  # the room beyond the filled views
                held += sum(b.numel() * b.element_size() for b in lc.room)
                held -= sum(x.numel() * x.element_size() for x in (lc.k, lc.v, lc.doc, lc.ok))
        return held

    def _in_room(self) -> bool:
        """Whether k, v, doc and ok are still views of ``room`` (a prefill or a beam search's
        selection replaces them)."""
        return (
            self.room is not None
            and self.k is not None
            and self.k.data_ptr() == self.room[0].data_ptr()
        )

    def append_full(self, k: torch.Tensor, v: torch.Tensor, doc: torch.Tensor, ok: torch.Tensor):
        """Append T tokens (k, v (B,KV,T,d); doc, ok (B,T)) to a kept layer's cache. The cache
        grows into buffers with room to spare (a quarter of its length, at least
        :data:`ROOM_MIN` tokens), so that a decoding step copies its own key, not the whole
        cache (as ``torch.cat`` would: 25 MB per token at 4K for SmolLM2's 12 kept heads)."""
        n, t = self.k.shape[2], k.shape[2]
        if not self._in_room() or self.room[0].shape[2] < n + t:
            cap = n + t + max(ROOM_MIN, n // 4)
            room = []
            for x, dim in zip((self.k, self.v, self.doc, self.ok), _ROOM_DIMS, strict=True):
                buf = x.new_empty(*x.shape[:dim], cap, *x.shape[dim + 1 :])
                buf.narrow(dim, 0, n).copy_(x)
                room.append(buf)
            self.room = tuple(room)
        for buf, x, dim in zip(self.room, (k, v, doc, ok), _ROOM_DIMS, strict=True):
            buf.narrow(dim, n, t).copy_(x)
        self.k, self.v, self.doc, self.ok = (
            buf.narrow(dim, 0, n + t) for buf, dim in zip(self.room, _ROOM_DIMS, strict=True)
        )

    def select(self, rows: torch.Tensor) -> None:
        """Keep the rows ``rows`` (B,) of every tensor, in that order (beam search)."""
        self.mlstm_joint = None  # the selected rows' C and n are copies, no longer its views
        self.room = None  # likewise the kept layer's k, v, doc and ok
        for name, val in list(vars(self).items()):
            if isinstance(val, torch.Tensor):
                setattr(self, name, val.index_select(0, rows.to(val.device)))
            elif isinstance(val, tuple):
                setattr(self, name, tuple(v.index_select(0, rows.to(v.device)) for v in val))
            elif isinstance(val, LayerCache):
                val.select(rows)


@dataclass
class HybridCache:
    """Decoding cache for :class:`~megadistill.model.modeling.HybridForCausalLM`."""

    num_layers: int
    window: int
    num_sinks: int
    layers: list[LayerCache] = field(default_factory=list)
    seen: int = 0  # tokens consumed per row (padding included)
    next_pos: torch.Tensor | None = None  # (B,) next RoPE position per row
    doc: torch.Tensor | None = None  # (B,) document id of each row's last token
    doc_start: torch.Tensor | None = None  # (B,) stream index where that document started
    # Every row's next token, if real and without given positions, goes on with the row's
    # document past its sinks (read back by the last forward's one host sync): a decoding step
    # then needs no sync at all.
    continuing: bool = False
    # Per layer, the weights a decoding step reads fused (HybridAttention._step_weights): built
    # from the layer's parameters at its first step with this cache and dropped with it, so no
    # change of the weights between two generations can leave them stale. Not decoding state:
    # neither counted by nbytes nor reordered.
    step_weights: dict[int, Any] = field(default_factory=dict)

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
        return sum(lc.nbytes() for lc in self.layers)

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Select rows (beam search)."""
        for lc in self.layers:
            lc.select(beam_idx)
        for name in ("next_pos", "doc", "doc_start"):
            val = getattr(self, name)
            if val is not None:
                setattr(self, name, val.index_select(0, beam_idx.to(val.device)))

    def kv_slots(
        self, lc: LayerCache, k: torch.Tensor, num_slots: int | None = None, plain: bool = False
    ) -> None:
        """Allocate the key/value buffer of ``lc`` for keys shaped like ``k`` (B,KV,T,d), with
        ``num_slots`` slots (default S + W; a layer whose teacher is local may need fewer);
        ``plain``: also ``lc.k_plain``, the keys before RoPE (rope_on "none", mix shared_norm)."""
        if lc.k is not None:
            return
        b, kv, _, d = k.shape
        n = num_slots if num_slots is not None else self.num_sinks + self.window
        lc.k = k.new_zeros(b, kv, n, d)
        lc.v = k.new_zeros(b, kv, n, d)
        if plain:
            lc.k_plain = k.new_zeros(b, kv, n, d)
        lc.held = torch.zeros(b, 3, n, dtype=torch.long, device=k.device)
        lc.held[:, 0] = -1  # empty
        lc.ok = torch.zeros(b, n, dtype=torch.bool, device=k.device)
