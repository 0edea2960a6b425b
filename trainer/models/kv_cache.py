"""The KV cache of generation: every layer's keys and values, heads-first, and the slot table
attention reads them with. ``Transformer`` writes it (``write_layer``); ``trainer.evaluation.generate``
makes an empty one per batch of prompts."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from trainer.models.config import ModelConfig

Array = jax.Array


@struct.dataclass
class KVCache:
    """Keys and values of every layer, and what attention needs to know of each slot.

    Rows are left-padded to a common prompt length so that all rows write the same slot each step.
    """

    # Heads before slots: a decode step's attention is a dot batched over (batch, kv_heads), which XLA
    # wants as leading dimensions; stored [.., slots, kv_heads, ..] every step copied each layer's whole
    # cache into that order first. An unrolled model keeps one array per layer: reading layer i out of
    # a stack is a copy of it on XLA:CPU (a slice is not a view), a third of a small model's decode
    # step; a scanned model's loop over the layers needs the stack.
    k: Array | tuple[Array, ...]  # [layers, batch, kv_heads, slots, head_dim] or per layer [batch, ...]
    v: Array | tuple[Array, ...]
    segment_ids: Array  # [batch, slots] int32: 1 where a real token's key was written, else 0
    positions: Array    # [batch, slots] int32
    index: Array        # int32 scalar: the slot the next call's first token is written to

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, slots, cfg.head_size)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        if not cfg.scan_layers:
            zeros = tuple(zeros[i] for i in range(cfg.num_hidden_layers))
        # index 0 as a Python int: the prefill then knows statically that its queries start at slot 0
        # (and takes the blockwise attention path); it becomes an array after the first call.
        return cls(zeros, zeros, jnp.zeros((batch, slots), jnp.int32),
                   jnp.zeros((batch, slots), jnp.int32), 0)


def heads_first(x: Array) -> Array:
    """[b, s, heads, d] <-> [b, heads, s, d] (its own inverse): the cache's order <-> attention's."""
    return x.transpose(0, 2, 1, 3)


def write_layer(stored: Array, layer: Array | None, index: Array | int, new: Array
                ) -> tuple[Array, Array]:
    """Writes ``new`` [b, s, kv_heads, d] at slot ``index`` of this layer's cache; returns the cache
    as stored (the stack when ``layer`` is given, else this layer's own array) and this layer's
    slots as attention takes them, [b, slots, kv_heads, d]."""
    new = heads_first(new)[None] if layer is not None else heads_first(new)
    at = (layer, 0, 0, index, 0) if layer is not None else (0, 0, index, 0)
    stored = jax.lax.dynamic_update_slice(stored, new.astype(stored.dtype), at)
    mine = stored if layer is None else jax.lax.dynamic_index_in_dim(stored, layer, 0, keepdims=False)
    return stored, heads_first(mine)
