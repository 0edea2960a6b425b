"""A Llama-architecture decoder in Flax NNX.

Parameters carry *logical* axis names only (``embed``, ``mlp``, ``heads``, ...); which mesh axis each
maps to is decided by the rules in the config (``trainer.sharding``), never here.

Layout conventions: activations ``[batch, seq, embed]``; attention weights kept per head
(``q: [embed, heads, head_dim]``) so that tensor parallelism shards ``heads`` without reshapes.
Parameters are stored in ``param_dtype`` (float32) and cast to ``dtype`` for compute; RMSNorm,
softmax and the logits are float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (names follow HF's ``LlamaConfig``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    dtype: str = "float32"        # compute dtype
    param_dtype: str = "float32"  # storage dtype
    attention_impl: str = "auto"  # passed to jax.nn.dot_product_attention: auto|xla|cudnn

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], dtype: Any,
           fan_in: int | None = None, init: str = "normal") -> nnx.Param:
    if init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        std = 1.0 / (fan_in ** 0.5) if fan_in else 0.02
        value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)
    # eager_sharding=False: sharding is applied by jit out_shardings, not at construction time.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, rngs: nnx.Rngs, param_dtype: Any):
        self.eps = eps
        self.scale = _param(rngs, (dim,), ("norm",), param_dtype, init="ones")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def rope(x: Array, positions: Array, theta: float) -> Array:
    """Rotary embedding in HF's "rotate half" layout. x: [b, s, h, d]; positions: [b, s] int32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = positions[..., None].astype(jnp.float32) * inv_freq  # [b, s, d/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.q = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), pd, fan_in=e)
        self.k = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, fan_in=e)
        self.v = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, fan_in=e)
        self.o = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), pd, fan_in=h * d)

    def __call__(self, x: Array, positions: Array, mask: Array,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """x: [b, s, e]; positions: [b, s]; mask: [b, s, t] bool (t = s, or the cache length).

        With ``cache=(k, v)`` of shape ``[b, t, kv_heads, head_dim]``, the new keys/values are written
        at ``cache_index`` (a scalar: all rows decode in lockstep) and attention runs over the cache.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = jnp.einsum("bse,ehd->bshd", x, self.q[...].astype(dt))
        k = jnp.einsum("bse,ehd->bshd", x, self.k[...].astype(dt))
        v = jnp.einsum("bse,ehd->bshd", x, self.v[...].astype(dt))
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta)
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            cache = (k, v)
        impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
        # Softmax is computed in float32 inside dot_product_attention for low-precision inputs.
        out = jax.nn.dot_product_attention(q, k.astype(dt), v.astype(dt), mask=mask[:, None, :, :],
                                           implementation=impl)
        return jnp.einsum("bshd,hde->bse", out, self.o[...].astype(dt)), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, f, pd = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.gate = _param(rngs, (e, f), ("embed", "mlp"), pd, fan_in=e)
        self.up = _param(rngs, (e, f), ("embed", "mlp"), pd, fan_in=e)
        self.down = _param(rngs, (f, e), ("mlp", "embed"), pd, fan_in=f)

    def __call__(self, x: Array) -> Array:
        dt = self.dtype
        h = jax.nn.silu(x @ self.gate[...].astype(dt)) * (x @ self.up[...].astype(dt))
        return h @ self.down[...].astype(dt)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs, pd)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs, pd)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, mask, cache=None, cache_index=None):
        h, cache = self.attn(self.attn_norm(x), positions, mask, cache, cache_index)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
    """Decoder-only LM. ``__call__`` returns float32 logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs, pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd,
                                  fan_in=cfg.hidden_size)

    def __call__(self, tokens: Array, positions: Array, mask: Array,
                 cache: list[tuple[Array, Array]] | None = None, cache_index: Array | None = None
                 ) -> tuple[Array, list[tuple[Array, Array]] | None]:
        """Args:
          tokens: [batch, seq] int32.
          positions: [batch, seq] int32 (restart at 0 per packed segment).
          mask: [batch, seq, kv_len] bool -- which keys each query may attend to
            (see ``attention_mask``/``decode_mask``).
          cache: optional per-layer ``(k, v)`` of shape [batch, kv_len, kv_heads, head_dim].
          cache_index: scalar int32, where this call's keys are written in the cache.

        Returns:
          logits [batch, seq, vocab] float32, and the updated cache (None without one).
        """
        dt = jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            x, c = layer(x, positions, mask, None if cache is None else cache[i], cache_index)
            if new_cache is not None:
                new_cache.append(c)
        x = self.final_norm(x)
        head = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("bse,ev->bsv", x, head.astype(dt), preferred_element_type=jnp.float32)
        return logits.astype(jnp.float32), new_cache


def attention_mask(segment_ids: Array) -> Array:
    """Causal mask that never crosses segments. segment_ids: [b, s] int32, 0 = padding.

    Returns [b, s, s] bool. Padding queries attend to themselves only, so their (ignored) outputs stay
    finite instead of a softmax over nothing.
    """
    s = segment_ids.shape[1]
    causal = jnp.tril(jnp.ones((s, s), bool))[None]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    valid = (segment_ids[:, None, :] != 0)
    eye = jnp.eye(s, dtype=bool)[None]
    return (causal & same & valid) | eye
