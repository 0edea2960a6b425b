"""One decoder in Flax NNX for Llama, Mistral, Qwen2/2.5, Qwen3, Gemma 1/2/3 and GPT-2.

The families share the math -- embed, N x (norm -> attention -> residual, norm -> MLP -> residual),
norm, logits -- and differ in switches that ``ModelConfig`` names (biases, q/k norms, the norm's form,
gated or plain MLP, the activation, embedding scale, learned positions, post-norms, soft-capping,
sliding-window layers, RoPE scaling). One implementation with those switches, not a copy per family.

Parameters carry *logical* axis names only (``embed``, ``mlp``, ``heads``, ...); which mesh axis each
maps to is decided by the rules in the config (``trainer.sharding``), never here.

Layout conventions: activations ``[batch, seq, embed]``; attention weights kept per head
(``q: [embed, heads, head_dim]``) so that tensor parallelism shards ``heads`` without reshapes.
Parameters are stored in ``param_dtype`` and cast to ``dtype`` for compute; norms, softmax and the
logits are float32.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
FULL, SLIDING = "full_attention", "sliding_attention"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters (names follow HF's configs). Defaults are Llama's."""

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
    attention_impl: str = "auto"  # auto | xla | cudnn | splash (see ``resolve_attention``)
    # Mesh axes that attention's batch and head dimensions are split over (from the sharding rules),
    # for kernels GSPMD cannot partition itself (splash runs under shard_map over them).
    attention_batch_axes: tuple[str, ...] = ()
    attention_head_axes: tuple[str, ...] = ()
    # ---- family switches ----------------------------------------------------------------
    qkv_bias: bool = False         # Qwen2, GPT-2
    o_bias: bool = False           # GPT-2
    mlp_bias: bool = False         # GPT-2
    qk_norm: bool = False          # Qwen3, Gemma 3: RMSNorm of each head's q and k
    norm: str = "rms"              # rms | layer (LayerNorm with bias: GPT-2)
    norm_offset: float = 0.0       # Gemma: the norm multiplies by (offset + weight)
    mlp: str = "gated"             # gated: down(act(gate x) * up x) | plain: down(act(up x))
    activation: str = "silu"       # silu | gelu_tanh | gelu
    embed_scale: bool = False      # Gemma: embeddings times sqrt(hidden_size)
    position_embedding: str = "rope"  # rope | learned (GPT-2)
    post_norms: bool = False       # Gemma 2/3: also normalise the attention and MLP outputs
    attn_logit_softcap: float = 0.0   # Gemma 2: tanh soft-capping of attention logits (0: off)
    final_logit_softcap: float = 0.0  # Gemma 2: ... of the output logits
    query_pre_attn_scalar: float = 0.0  # softmax scale is this ** -0.5 (0: head_dim, the usual)
    sliding_window: int = 0        # keys at most this many positions back (0: unlimited)
    layer_types: tuple[str, ...] = ()  # per layer full_attention | sliding_attention (): all
    # RoPE: "default", "linear" (factor) or "llama3" (factor, low/high_freq_factor, original_max_...)
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_position_embeddings: int = 8192
    rope_local_theta: float = 0.0  # Gemma 3: sliding layers' theta, unscaled (0: same as global)
    # Rematerialisation of each block in the backward pass: none | full (keep only block inputs) |
    # dots (keep matmul outputs without a batch dimension); trades compute for activation memory.
    remat: str = "none"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return SLIDING if self.sliding_window else FULL

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in names}
        for key in ("layer_types", "attention_batch_axes", "attention_head_axes"):
            if key in d:
                d[key] = tuple(d[key] or ())
        return cls(**d)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], dtype: Any,
           fan_in: int | None = None, init: str = "normal") -> nnx.Param:
    if init in ("ones", "zeros"):
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    else:
        std = 1.0 / (fan_in ** 0.5) if fan_in else 0.02
        value = (std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, shape)).astype(dtype)
    # eager_sharding=False: sharding is applied by jit out_shardings, not at construction time.
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


class Norm(nnx.Module):
    """RMSNorm (``x / rms(x) * (offset + scale)``) or LayerNorm (with bias), in float32."""

    def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, axis_name: str = "norm"):
        pd = jnp.dtype(cfg.param_dtype)
        self.eps, self.offset, self.kind = cfg.rms_norm_eps, cfg.norm_offset, cfg.norm
        # With an offset (Gemma) the stored weight starts at 0, so the initial multiplier is 1.
        self.scale = _param(rngs, (dim,), (axis_name,), pd, init="zeros" if cfg.norm_offset else "ones")
        if cfg.norm == "layer":
            self.bias = _param(rngs, (dim,), (axis_name,), pd, init="zeros")

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "layer":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        y = y * (self.offset + self.scale[...].astype(jnp.float32))
        if self.kind == "layer":
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


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


def rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotary embedding in HF's "rotate half" layout. x: [b, s, h, d]; positions: [b, s] int32."""
    d = x.shape[-1]
    ang = positions[..., None].astype(jnp.float32) * jnp.asarray(inv_freq)  # [b, s, d/2]
    cos = jnp.cos(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    sin = jnp.sin(jnp.concatenate([ang, ang], -1))[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (x32 * cos + rotated * sin).astype(x.dtype)


def _activation(name: str):
    return {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
            "gelu": lambda x: jax.nn.gelu(x, approximate=False)}[name]


def _softcapped_attention(q, k, v, mask, scale, softcap):
    """Plain attention with tanh soft-capping of the logits (Gemma 2), softmax in float32.

    ``jax.nn.dot_product_attention`` has no soft-capping, so this path is written out.
    """
    h, kh = q.shape[2], k.shape[2]
    k = jnp.repeat(k, h // kh, axis=2)
    v = jnp.repeat(v, h // kh, axis=2)
    logits = jnp.einsum("bshd,bthd->bhst", q, k, preferred_element_type=jnp.float32) * scale
    logits = softcap * jnp.tanh(logits / softcap)
    logits = jnp.where(mask[:, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhst,bthd->bshd", probs, v)


def resolve_attention(cfg: ModelConfig, platform: str | None = None) -> str:
    """The attention backend ``cfg.attention_impl`` means on this platform.

    ``auto``: splash (Pallas) on TPU, cuDNN flash attention on GPU for bf16/fp16 without soft-capping,
    otherwise XLA. An explicit choice the model cannot use raises ``ValueError`` naming the reason.
    """
    platform = platform or jax.default_backend()
    impl = cfg.attention_impl
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and cfg.dtype in ("bfloat16", "float16") and not cfg.attn_logit_softcap:
            return "cudnn"
        return "xla"
    if impl == "cudnn" and (cfg.dtype not in ("bfloat16", "float16") or cfg.attn_logit_softcap):
        raise ValueError("attention_impl='cudnn' needs model.dtype bfloat16/float16 and no attention "
                         "soft-capping (Gemma 2); use 'xla' or 'auto'")
    if impl not in ("xla", "cudnn", "splash"):
        raise ValueError(f"attention_impl must be auto, xla, cudnn or splash, got {impl!r}")
    return impl


def _splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, cfg: ModelConfig, scale: float,
                      sliding: bool) -> Array:
    """Pallas splash attention: causal (or sliding-window), segment ids, optional soft-capping.

    q/k/v: [b, s, heads, d] (k/v already repeated to all heads). Runs per device under ``shard_map``
    over the batch/head mesh axes (a Pallas kernel cannot be partitioned by GSPMD); off TPU it runs
    in Pallas interpret mode, which is how the CPU tests check it.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_kernel as sk, splash_attention_mask as sm)
    s = q.shape[1]
    if s % 128:
        raise ValueError(f"splash attention needs the sequence length ({s}) to be a multiple of 128")
    block = next(n for n in (512, 256, 128) if s % n == 0)

    def local(q, k, v, seg):
        shape = (s, s)
        base = (sm.LocalMask(shape, window_size=(cfg.sliding_window - 1, 0), offset=0)
                if sliding and cfg.sliding_window else sm.CausalMask(shape))
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([base] * q.shape[2]), head_shards=1, q_seq_shards=1,
            block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                      block_q_dkv=block, block_kv_dkv=block,
                                      block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
            attn_logits_soft_cap=cfg.attn_logit_softcap or None,
            interpret=jax.default_backend() != "tpu")
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
            heads_first(q * scale), heads_first(k), heads_first(v), seg)
        return heads_first(out)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local(q, k, v, segment_ids)
    P = jax.sharding.PartitionSpec
    batch = tuple(a for a in cfg.attention_batch_axes if a in mesh.axis_names) or None
    heads = tuple(a for a in cfg.attention_head_axes if a in mesh.axis_names) or None
    spec = P(batch, None, heads, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec, P(batch, None)),
                         out_specs=spec, check_vma=False)(q, k, v, segment_ids)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.sliding = cfg.layer_type(layer) == SLIDING
        self.q = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), pd, fan_in=e)
        self.k = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, fan_in=e)
        self.v = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, fan_in=e)
        self.o = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), pd, fan_in=h * d)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), pd, init="zeros")
            self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
        if cfg.o_bias:
            self.o_bias = _param(rngs, (e,), ("embed",), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = Norm(d, cfg, rngs, "head_dim")
            self.k_norm = Norm(d, cfg, rngs, "head_dim")

    def __call__(self, x: Array, positions: Array, mask: Array, key_positions: Array,
                 cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 segment_ids: Array | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        """x: [b, s, e]; positions: [b, s]; mask: [b, s, t] bool (t = s, or the cache length);
        key_positions: [b, t] (the position of every key, for sliding windows); segment_ids: [b, s]
        (training/scoring only: lets kernels that take segment ids skip the dense mask).

        With ``cache=(k, v)`` of shape ``[b, t, kv_heads, head_dim]``, the new keys/values are written
        at ``cache_index`` (a scalar: all rows decode in lockstep) and attention runs over the cache.
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = jnp.einsum("bse,ehd->bshd", x, self.q[...].astype(dt))
        k = jnp.einsum("bse,ehd->bshd", x, self.k[...].astype(dt))
        v = jnp.einsum("bse,ehd->bshd", x, self.v[...].astype(dt))
        if cfg.qkv_bias:
            q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                       v + self.v_bias[...].astype(dt))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.position_embedding == "rope":  # (a numpy constant: an array attribute would be state)
            inv_freq = rope_inv_freq(cfg, cfg.head_size, local=self.sliding)
            q = rope(q, positions, inv_freq)
            k = rope(k, positions, inv_freq)
        if cache is not None:
            ck, cv = cache
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), cache_index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), cache_index, axis=1)
            cache = (k, v)
        if self.sliding and cfg.sliding_window:
            near = positions[:, :, None] - key_positions[:, None, :] < cfg.sliding_window
            mask = mask & near
        scale = (cfg.query_pre_attn_scalar or cfg.head_size) ** -0.5
        impl = resolve_attention(cfg)
        if impl == "splash" and cache is None and segment_ids is not None:
            groups = cfg.num_attention_heads // cfg.num_key_value_heads
            out = _splash_attention(q, jnp.repeat(k, groups, 2).astype(dt),
                                    jnp.repeat(v, groups, 2).astype(dt), segment_ids, cfg, scale,
                                    self.sliding)
        elif cfg.attn_logit_softcap:
            out = _softcapped_attention(q, k.astype(dt), v.astype(dt), mask, scale,
                                        cfg.attn_logit_softcap)
        else:  # decoding (a cache) always takes this path; splash is for full sequences
            # Softmax is computed in float32 inside dot_product_attention for low-precision inputs.
            out = jax.nn.dot_product_attention(q, k.astype(dt), v.astype(dt), mask=mask[:, None, :, :],
                                               scale=scale,
                                               implementation="cudnn" if impl == "cudnn" else "xla")
        out = jnp.einsum("bshd,hde->bse", out, self.o[...].astype(dt))
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, f, pd = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        if cfg.mlp == "gated":
            self.gate = _param(rngs, (e, f), ("embed", "mlp"), pd, fan_in=e)
        self.up = _param(rngs, (e, f), ("embed", "mlp"), pd, fan_in=e)
        self.down = _param(rngs, (f, e), ("mlp", "embed"), pd, fan_in=f)
        if cfg.mlp_bias:
            self.up_bias = _param(rngs, (f,), ("mlp",), pd, init="zeros")
            self.down_bias = _param(rngs, (e,), ("embed",), pd, init="zeros")

    def __call__(self, x: Array) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        act = _activation(cfg.activation)
        up = x @ self.up[...].astype(dt)
        if cfg.mlp_bias:
            up = up + self.up_bias[...].astype(dt)
        h = act(x @ self.gate[...].astype(dt)) * up if cfg.mlp == "gated" else act(up)
        out = h @ self.down[...].astype(dt)
        return out + self.down_bias[...].astype(dt) if cfg.mlp_bias else out


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
        self.post_norms = cfg.post_norms
        self.attn_norm = Norm(cfg.hidden_size, cfg, rngs)
        self.attn = Attention(cfg, layer, rngs)
        self.mlp_norm = Norm(cfg.hidden_size, cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        if cfg.post_norms:
            self.post_attn_norm = Norm(cfg.hidden_size, cfg, rngs)
            self.post_mlp_norm = Norm(cfg.hidden_size, cfg, rngs)

    def __call__(self, x, positions, mask, key_positions, cache=None, cache_index=None,
                 segment_ids=None):
        h, cache = self.attn(self.attn_norm(x), positions, mask, key_positions, cache, cache_index,
                             segment_ids)
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x))
        return x + (self.post_mlp_norm(h) if self.post_norms else h), cache


class Transformer(nnx.Module):
    """Decoder-only LM. ``__call__`` returns float32 logits ``[batch, seq, vocab]``."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        if cfg.position_embedding == "learned":
            self.pos_embed = _param(rngs, (cfg.max_position_embeddings, cfg.hidden_size),
                                    (None, "embed"), pd)
        self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_hidden_layers)])
        self.final_norm = Norm(cfg.hidden_size, cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd,
                                  fan_in=cfg.hidden_size)

    def __call__(self, tokens: Array, positions: Array, mask: Array,
                 cache: list[tuple[Array, Array]] | None = None, cache_index: Array | None = None,
                 key_positions: Array | None = None, segment_ids: Array | None = None,
                 last_only: bool = False) -> tuple[Array, list[tuple[Array, Array]] | None]:
        """Args:
          tokens: [batch, seq] int32.
          positions: [batch, seq] int32 (restart at 0 per packed segment).
          mask: [batch, seq, kv_len] bool -- which keys each query may attend to
            (see ``attention_mask``).
          cache: optional per-layer ``(k, v)`` of shape [batch, kv_len, kv_heads, head_dim].
          cache_index: scalar int32, where this call's keys are written in the cache.
          key_positions: [batch, kv_len] int32, each key's position (sliding windows); defaults to
            ``positions`` (no cache).
          segment_ids: [batch, seq] int32, the segments ``mask`` was built from (0 = padding); given
            for full sequences so the splash kernel can use them instead of the dense mask.
          last_only: logits for the last position only (generation's prefill: ``[batch, 1, vocab]``
            instead of ``[batch, seq, vocab]``, which for a 50k vocabulary dwarfs the model).

        Returns:
          logits [batch, seq (or 1), vocab] float32, and the updated cache (None without one).
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        key_positions = positions if key_positions is None else key_positions
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        if cfg.embed_scale:  # Gemma rounds the multiplier to the compute dtype, as HF does
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, dt)
        if cfg.position_embedding == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
        new_cache = [] if cache is not None else None
        call = _block_call(cfg.remat if cache is None else "none")
        for i, layer in enumerate(self.layers):
            x, c = call(layer, x, positions, mask, key_positions, None if cache is None else cache[i],
                        cache_index, segment_ids)
            if new_cache is not None:
                new_cache.append(c)
        x = self.final_norm(x[:, -1:] if last_only else x)
        head = self.embed[...].T if cfg.tie_word_embeddings else self.lm_head[...]
        logits = jnp.einsum("bse,ev->bsv", x, head.astype(dt), preferred_element_type=jnp.float32)
        logits = logits.astype(jnp.float32)
        if cfg.final_logit_softcap:
            logits = cfg.final_logit_softcap * jnp.tanh(logits / cfg.final_logit_softcap)
        return logits, new_cache


def _block_call(remat: str):
    """``block(*args)``, rematerialised in the backward pass as ``remat`` asks."""
    def call(block, *args):
        return block(*args)
    if remat == "none":
        return call
    policies = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
    if remat not in policies:
        raise ValueError(f"model.remat must be none, full or dots, got {remat!r}")
    return nnx.remat(call, policy=policies[remat])


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
