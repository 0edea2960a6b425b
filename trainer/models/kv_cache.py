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
    # cache into that order first. The keys transposed, head_dim before slots: the score dot q . k
    # then reads them as the plain [head_dim, slots] right-hand matrix of a matmul; given [slots,
    # head_dim] (contracted on its last axis) XLA:CPU's dot took 1.4-1.8x as long for one query over
    # the cache (0.47 against 0.33 ms a layer at the demo's shape, 128 rows; 0.23-0.26 against 0.15
    # for 32 rows of SmolLM2's). An unrolled model keeps one array per layer: reading layer i out of
    # a stack is a copy of it on XLA:CPU (a slice is not a view), a third of a small model's decode
    # step; a scanned model's loop over the layers needs the stack.
    k: Array | tuple[Array, ...]  # [layers, batch, kv_heads, head_dim, slots] or per layer [batch, ...]
    v: Array | tuple[Array, ...]  # [layers, batch, kv_heads, slots, head_dim] or per layer [batch, ...]
    segment_ids: Array  # [batch, slots] int32: 1 where a real token's key was written, else 0
    positions: Array    # [batch, slots] int32
    index: Array        # int32 scalar: the slot the next call's first token is written to

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        n, kh, d = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_size
        dtype = jnp.dtype(cfg.dtype)
        k, v = jnp.zeros((n, batch, kh, d, slots), dtype), jnp.zeros((n, batch, kh, slots, d), dtype)
        if not cfg.scan_layers:
            k, v = tuple(k[i] for i in range(n)), tuple(v[i] for i in range(n))
        # index 0 as a Python int: the prefill then knows statically that its queries start at slot 0
        # (and takes the blockwise attention path); it becomes an array after the first call.
        return cls(k, v, jnp.zeros((batch, slots), jnp.int32), jnp.zeros((batch, slots), jnp.int32), 0)


def write_layer(stored: Array, layer: Array | None, index: Array | int, new: Array, keys: bool
                ) -> tuple[Array, Array]:
    """Writes ``new`` [b, s, kv_heads, d] at slot ``index`` of this layer's cache (``keys``: the
    transposed keys', else the values'); returns the cache as stored (the stack when ``layer`` is
    given, else this layer's own array) and this layer's array as stored: [b, kv_heads, d, slots]
    (keys) or [b, kv_heads, slots, d], what ``attention(..., cached=True)`` takes."""
    new = new.transpose(0, 2, 3, 1) if keys else new.transpose(0, 2, 1, 3)
    at = (0, 0, 0, index) if keys else (0, 0, index, 0)
    if layer is not None:
        new, at = new[None], (layer, *at)
    stored = jax.lax.dynamic_update_slice(stored, new.astype(stored.dtype), at)
    mine = stored if layer is None else jax.lax.dynamic_index_in_dim(stored, layer, 0, keepdims=False)
    return stored, mine
