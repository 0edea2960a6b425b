"""Rotary position embedding: the inverse frequencies of a model config (HF's RoPE scaling variants)
and the rotation itself, in HF's "rotate half" layout."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from trainer.models.attention_kernels import kernel_platform
from trainer.models.config import ModelConfig

Array = jax.Array


def rope_inv_freq(cfg: ModelConfig, head_dim: int, local: bool = False) -> np.ndarray:
    """Inverse frequencies [head_dim/2] float32, with HF's RoPE scaling variants."""
    theta = cfg.rope_local_theta if local and cfg.rope_local_theta else cfg.rope_theta
    inv = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    if local and cfg.rope_local_theta:  # Gemma 3's sliding layers: unscaled
        return inv.astype(np.float32)
    if cfg.rope_type == "linear":
        inv = inv / cfg.rope_factor
    elif cfg.rope_type == "llama3":
        old, lo, hi = (cfg.rope_original_max_position_embeddings, cfg.rope_low_freq_factor,
                       cfg.rope_high_freq_factor)
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / cfg.rope_factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        inv = np.where(medium, smoothed, scaled)
    elif cfg.rope_type != "default":
        raise ValueError(f"unsupported rope_type {cfg.rope_type!r} (default, linear, llama3)")
    return inv.astype(np.float32)


def rope(x: Array, positions: Array, inv_freq: np.ndarray, below: int | None = None) -> Array:
    """Rotary embedding in HF's "rotate half" layout. x: [b, s, h, d]; positions: [b, s] int32.

    ``below``: a bound on ``positions`` known when tracing (a call over its own tokens: its length).
    Compiled for a CPU, cos and sin then come from a ``[below, d/2]`` table read by position:
    XLA:CPU fuses a plain cos/sin into each consumer and evaluates them once per element of q and
    of k (every head), forward and backward (README, "CPU: the train step against PyTorch"). The
    values are the same cos of the same float32 angles; a position at or past ``below`` reads NaN,
    never a wrong angle. Other platforms keep the plain form: a TPU evaluates it once per position
    anyway, and its cost model put the gather above it."""
    d = x.shape[-1]
    if below and kernel_platform() == "cpu":
        ang = jnp.arange(below, dtype=jnp.float32)[:, None] * jnp.asarray(inv_freq)  # [below, d/2]
        cos, sin = (jnp.take(f(ang), positions, axis=0, mode="fill", fill_value=jnp.nan)
                    for f in (jnp.cos, jnp.sin))
    else:
        ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, s, d/2]
        cos, sin = jnp.cos(ang), jnp.sin(ang)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
