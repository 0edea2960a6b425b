"""Weight-only quantisation of a frozen base (QLoRA): int8 per channel, NF4 blockwise.

Ours rather than qwix (which Tunix uses): qwix is not on this project's package index, and what
QLoRA needs is small -- quantise each frozen projection once on load, dequantise it inside the
layer that uses it. Written here it also keeps our per-head weight layout (``q: [embed, heads,
head_dim]``) and our logical-axis shardings as they are.

A ``QTensor`` is a pytree (codes + scales) that stands where the float weight stood in the param
dict. Reading it as the model reads any weight, ``w[...]``, returns the dequantised values, so the
model code does not know which it got; under ``lax.scan`` each layer's slice is dequantised in its
own iteration (never the whole model at once). Axes are stored negative so that the same tensor
works stacked over layers (``[layers, ...]``) or per layer.

  * ``int8``: symmetric, one float scale per output channel (absmax over the input axes).
  * ``nf4``: QLoRA's 4-bit NormalFloat levels, one absmax scale per block of up to 64 inputs along
    the last input axis; two codes per byte. Scales are kept in float32, not double-quantised
    (QLoRA's second trick saves ~0.4 bits/param more; not done).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from trainer.settings import options

KINDS = options.QUANT_KINDS
# QLoRA's NF4 levels (Dettmers et al. 2023, appendix E; bitsandbytes' table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0], np.float32)
_NF4_MIDPOINTS = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
BLOCK = 64


@struct.dataclass
class QTensor:
    """A quantised weight. ``codes``: int8 (same shape as the weight) or uint8 NF4 pairs;
    ``scale``: float32. ``in_axes``: the weight's input axes, negative."""

    codes: jax.Array
    scale: jax.Array
    kind: str = struct.field(pytree_node=False)
    in_axes: tuple[int, ...] = struct.field(pytree_node=False)
    block: int = struct.field(pytree_node=False, default=0)

    def __getitem__(self, index) -> jax.Array:
        return dequantize(self)[index]

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes


def _block_size(n: int) -> int:
    return next(b for b in (BLOCK, 32, 16, 8, 4, 2) if n % b == 0)


def quantize(w: Any, kind: str, in_axes: tuple[int, ...]) -> QTensor:
    """``w`` (numpy on the host, or a jax array) -> QTensor. ``in_axes``: negative input axes."""
    xp = jnp if isinstance(w, jax.Array) else np
    w = w.astype(xp.float32)
    if kind == "int8":
        absmax = xp.max(xp.abs(w), axis=in_axes, keepdims=True)
        scale = xp.where(absmax > 0, absmax / 127.0, 1.0).astype(xp.float32)
        codes = xp.clip(xp.round(w / scale), -127, 127).astype(xp.int8)
        return QTensor(codes, scale, kind, tuple(in_axes))
    if kind != "nf4":
        raise ValueError(f"lora.base_quant must be one of {', '.join(KINDS)} (or empty), got {kind!r}")
    ax = w.ndim + in_axes[-1]
    n = w.shape[ax]
    if n % 2:
        raise ValueError(f"nf4 needs an even input size, got {n}")
    blk = _block_size(n)
    blocks = w.reshape(w.shape[:ax] + (n // blk, blk) + w.shape[ax + 1:])
    absmax = xp.max(xp.abs(blocks), axis=ax + 1, keepdims=True)
    scale = xp.where(absmax > 0, absmax, 1.0).astype(xp.float32)
    codes = xp.searchsorted(xp.asarray(_NF4_MIDPOINTS), (blocks / scale).ravel()).reshape(blocks.shape)
    pairs = codes.astype(xp.uint8).reshape(blocks.shape[:ax + 1] + (blk // 2, 2) + blocks.shape[ax + 2:])
    hi = xp.take(pairs, 0, axis=ax + 2)
    lo = xp.take(pairs, 1, axis=ax + 2)
    return QTensor((hi << 4) | lo, scale, kind, tuple(in_axes), blk)


def dequantize(q: QTensor) -> jax.Array:
    """The float32 weight a QTensor stands for (stacked or not)."""
    if q.kind == "int8":
        return q.codes.astype(jnp.float32) * q.scale
    nd = q.codes.ndim  # [..., blocks, blk/2, ...]
    ax = nd - 1 + q.in_axes[-1]  # the blocks axis (the packed weight has one more axis than w)
    codes = jnp.stack([q.codes >> 4, q.codes & 15], axis=ax + 2)
    codes = codes.reshape(codes.shape[:ax + 1] + (q.block,) + codes.shape[ax + 3:])
    values = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)] * q.scale
    return values.reshape(values.shape[:ax] + (-1,) + values.shape[ax + 2:])


def sharding(kind: str, in_axes: tuple[int, ...], weight_shape: tuple[int, ...],
             weight_sharding: NamedSharding) -> QTensor:
    """Shardings of the QTensor of a weight sharded as ``weight_sharding`` (a QTensor of
    NamedShardings, for jit/Orbax): codes follow the weight; a scale axis of size 1 (or a block axis
    the mesh does not divide) is replicated."""
    mesh, spec = weight_sharding.mesh, tuple(weight_sharding.spec) + (None,) * (
        len(weight_shape) - len(weight_sharding.spec))
    nd = len(weight_shape)
    if kind == "int8":
        scale_spec = tuple(None if i - nd in in_axes else s for i, s in enumerate(spec))
        return QTensor(weight_sharding, NamedSharding(mesh, PartitionSpec(*scale_spec)), kind, in_axes)
    ax = nd + in_axes[-1]
    n = weight_shape[ax]
    blk = _block_size(n)
    entry = spec[ax]
    size = 1
    for a in (entry if isinstance(entry, tuple) else (entry,) if entry else ()):
        size *= mesh.shape[a]
    blocks_entry = entry if (n // blk) % size == 0 else None
    codes_spec = spec[:ax] + (blocks_entry, None) + spec[ax + 1:]
    return QTensor(NamedSharding(mesh, PartitionSpec(*codes_spec)),
                   NamedSharding(mesh, PartitionSpec(*codes_spec)), kind, in_axes, blk)
