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

import collections
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from trainer.models import remat as remat_lib
from trainer.models.attention import attention
from trainer.models.config import SLIDING, ModelConfig
from trainer.models.kv_cache import KVCache, write_layer
from trainer.models.rope import rope, rope_inv_freq
from trainer.settings import options

Array = jax.Array


# open tallies of the keys drawn per stream (``keys_per_block``): under tracing a count is a tracer
_TALLIES: list[collections.Counter] = []


def keys_per_block(cfg: ModelConfig, streams: tuple[str, ...]) -> dict[str, int]:
    """How many keys one ``Block(cfg, rngs)`` draws from each of ``rngs``' streams (named
    ``streams``): every block draws the same, so layer ``i`` of a model starts ``i`` times this
    after layer 0 (``ModelSpec``'s layer-by-layer init)."""
    drawn: collections.Counter = collections.Counter()
    _TALLIES.append(drawn)
    try:
        nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(**{n: i for i, n in enumerate(streams)})))
    finally:
        _TALLIES.remove(drawn)
    return {n: drawn[n] for n in streams}


def _next_key(rngs: nnx.Rngs, name: str) -> jax.Array:
    """``rngs.<name>()``: the same key (``fold_in(stream key, count)``, the ``default`` stream when
    there is no ``name``) and the count advanced, but the count is replaced whole. nnx's
    ``count[...] += 1`` is an indexed update, and under tracing (``eval_shape``, the jitted init) flax
    then asks the tracer for its sharding and JAX formats an error message to say it has none: about
    10 ms a key, 12 s of building a 30-layer model (measured with cProfile, ``trainer.bench``)."""
    stream = getattr(rngs, name)
    for drawn in _TALLIES:
        drawn[stream.tag] += 1
    stream.count._check_can_update()
    count = stream.count[...]
    stream.count.set_value(count + 1)
    return jax.random.fold_in(stream.key[...], count)


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], dtype: Any,
           fan_in: int | None = None, init: str = "normal") -> nnx.Param:
    if init in ("ones", "zeros"):
        value = (jnp.ones if init == "ones" else jnp.zeros)(shape, dtype)
    else:
        std = 1.0 / (fan_in ** 0.5) if fan_in else 0.02
        key = _next_key(rngs, "params")
        value = (std * jax.random.truncated_normal(key, -2.0, 2.0, shape)).astype(dtype)
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


# The projections LoRA can adapt, with how many leading axes of each weight are its input (``o`` is
# [heads, head_dim, embed]: two). Names follow our params; PEFT's are ``<name>_proj``.
# each target projection -> the number of its weight's input axes (o: [heads, head_dim, embed])
LORA_TARGETS = dict(zip(options.LORA_TARGETS, (1, 1, 1, 2, 1, 1, 1)))
_LORA_IDS = {name: i for i, name in enumerate(LORA_TARGETS)}  # folded into the dropout key


def _lora_params(module: nnx.Module, name: str, weight: nnx.Param, cfg: ModelConfig, rngs: nnx.Rngs,
                 ) -> None:
    """Adds ``<name>_lora_a`` / ``<name>_lora_b`` beside ``weight`` if ``cfg`` targets ``name``.

    PEFT's default init: A Kaiming-uniform (``a=sqrt(5)``, i.e. U(+-1/sqrt(fan_in))), B zeros, so the
    adapted model starts exactly equal to the base. A takes the weight's input axes, B its output
    axes, so adapters shard by the same logical rules as their projection (rank: replicated).
    """
    if not cfg.lora_rank or name not in cfg.lora_targets:
        return
    n_in, pd, r = LORA_TARGETS[name], jnp.dtype(cfg.param_dtype), cfg.lora_rank
    shape, names = weight.shape, weight.get_metadata()["out_sharding"]
    fan_in = math.prod(shape[:n_in])
    bound = 1.0 / fan_in ** 0.5
    # A draws from its own ``lora`` stream when the caller gives one, so the base params of a LoRA
    # model are those of the same model without LoRA (same seed).
    key = _next_key(rngs, "lora" if "lora" in rngs else "params")
    a = jax.random.uniform(key, (*shape[:n_in], r), pd, -bound, bound)
    setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=(*names[:n_in], "lora_rank"),
                                                    eager_sharding=False))
    setattr(module, f"{name}_lora_b", nnx.LoRAParam(jnp.zeros((r, *shape[n_in:]), pd),
                                                    out_sharding=("lora_rank", *names[n_in:]),
                                                    eager_sharding=False))


def _project(module: nnx.Module, name: str, x: Array, spec: str, rng: Array | None) -> Array:
    """``x`` through projection ``name`` (einsum ``spec``), plus its LoRA branch if it has one.

    The branch is ``(alpha / rank) * (dropout(x) . A) . B`` as in PEFT: never the merged weight, so
    the frozen weight needs no gradient of its own and dropout acts on the branch only.
    """
    cfg, dt = module.cfg, jnp.dtype(module.cfg.dtype)
    n_in = LORA_TARGETS[name]  # the weight is [its n_in input axes..., its output axes...], as ``spec`` says
    x_axes, w_axes, out_axes = spec.replace("->", ",").split(",")
    assert w_axes[:n_in] == x_axes[2:] and w_axes[n_in:] == out_axes[2:], spec
    # One plain 2-D matmul, [tokens, in] x [in, out], whatever the axes. Batch and sequence flattened
    # into one token axis: with two contracted token axes XLA:CPU's weight gradients materialised a
    # transposed copy of the activation gradient in every layer's backward (a third of the demo
    # step's time went to such copies and the dots around them). The weight's own axes flattened
    # (heads and head_dim are row-major neighbours, so both reshapes are free): left as two axes
    # (o's ``hd`` contracted, q/k/v's ``hd`` produced), XLA:CPU chose its own order of the pair and
    # transposed the weight to match at every call -- inside the decode loop too, 30 copies of o's
    # [576, 576] weight a step at SmolLM2's shape; the demo's train step held 258 copies, now 126.
    w = getattr(module, name)[...].astype(dt)
    lead, out_dims = x.shape[:2], w.shape[n_in:]
    x = x.reshape(-1, math.prod(x.shape[2:]))  # [tokens, in]
    out = x @ w.reshape(x.shape[1], -1)  # [tokens, out]
    if hasattr(module, f"{name}_lora_a"):
        if cfg.lora_dropout and rng is not None:
            keep = jax.random.bernoulli(jax.random.fold_in(rng, _LORA_IDS[name]), 1.0 - cfg.lora_dropout,
                                        x.shape)
            x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)
        a = getattr(module, f"{name}_lora_a")[...].astype(dt)  # [in axes..., rank]
        b = getattr(module, f"{name}_lora_b")[...].astype(dt)  # [rank, out axes...]
        low = x @ a.reshape(x.shape[1], -1)  # [tokens, rank]
        out = out + (low @ b.reshape(b.shape[0], -1)) * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, dt)
    # Named for remat="dots" with LoRA: keep this sum, as full fine-tuning keeps the projection's
    # output, and not each of its two matmuls' outputs (which doubled the saved activations).
    return checkpoint_name(out.reshape(*lead, *out_dims), remat_lib.PROJECTION)


def _activation(name: str):
    return {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
            "gelu": lambda x: jax.nn.gelu(x, approximate=False)}[name]


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.q = _param(rngs, (e, h, d), ("embed", "heads", "head_dim"), pd, fan_in=e)
        self.k = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, fan_in=e)
        self.v = _param(rngs, (e, k, d), ("embed", "kv_heads", "head_dim"), pd, fan_in=e)
        self.o = _param(rngs, (h, d, e), ("heads", "head_dim", "embed"), pd, fan_in=h * d)
        for name in ("q", "k", "v", "o"):
            _lora_params(self, name, getattr(self, name), cfg, rngs)
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, d), ("heads", "head_dim"), pd, init="zeros")
            self.k_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
            self.v_bias = _param(rngs, (k, d), ("kv_heads", "head_dim"), pd, init="zeros")
        if cfg.o_bias:
            self.o_bias = _param(rngs, (e,), ("embed",), pd, init="zeros")
        if cfg.qk_norm:
            self.q_norm = Norm(d, cfg, rngs, "head_dim")
            self.k_norm = Norm(d, cfg, rngs, "head_dim")

    def __call__(self, x: Array, positions: Array, segment_ids: Array, sliding: Array | bool,
                 cache: tuple[Array, Array, Array | int, KVCache] | None = None,
                 rng: Array | None = None, last_only: bool = False
                 ) -> tuple[Array, tuple[Array, Array] | None]:
        """x: [b, s, e]; positions, segment_ids: [b, s] int32; sliding: this layer's type.
        Returns [b, s, e] -- or, with ``last_only``, [b, 1, e]: the queries of the last position
        alone (keys and values are still every position's).

        With ``cache=(k_all, v_all, layer, meta)`` -- every layer's keys/values as ``KVCache`` holds
        them (``[layers, b, kv_heads, head_dim, slots]`` keys, ``[layers, b, kv_heads, slots,
        head_dim]`` values) and this layer's index (or, with ``layer=None``, this layer's own arrays,
        without the layer axis) and the cache's slot table (already holding this
        call's tokens) -- the new keys/values are written at slot ``meta.index`` and attention runs
        over this layer's slots; the updated arrays are returned. Writing into the stack itself
        (not into a per-layer slice that is then put back) keeps the update in place: the put-back
        form made XLA copy the whole cache twice per layer, 2/3 of a SmolLM2-135M decode step.

        ``rng``: the LoRA dropout key of this layer (training only; None: no dropout).
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        # the queries' own positions and segments (the keys' are all of this call's)
        q_pos, q_seg, q_from = positions, segment_ids, 0
        if last_only:
            q_pos, q_seg, q_from = positions[:, -1:], segment_ids[:, -1:], x.shape[1] - 1
        q = _project(self, "q", x[:, q_from:], "bse,ehd->bshd", rng)
        k = _project(self, "k", x, "bse,ehd->bshd", rng)
        v = _project(self, "v", x, "bse,ehd->bshd", rng)
        if cfg.qkv_bias:
            q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                       v + self.v_bias[...].astype(dt))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        # keys: this call's own -- in training, scoring, and a prefill into an empty cache (whose
        # still-empty slots attention then need not read or mask out) -- else the cache's slots
        own = cache is None or (isinstance(cache[3].index, int) and cache[3].index == 0)
        if cfg.position_embedding == "rope":  # (numpy constants: an array attribute would be state)
            inv_freq = rope_inv_freq(cfg, cfg.head_size)
            if cfg.rope_local_theta and sliding is not False:
                local = rope_inv_freq(cfg, cfg.head_size, local=True)
                inv_freq = local if sliding is True else jnp.where(sliding, local, inv_freq)
            below = x.shape[1] if own else None  # the call's own positions are below its length
            q = rope(q, q_pos, inv_freq, below)
            k = rope(k, positions, inv_freq, below)
        keys = (k, v, segment_ids, positions, q_from)
        new, cached, products = None, False, False
        if cache is not None:
            k_all, v_all, layer, meta = cache
            k_all, ck = write_layer(k_all, layer, meta.index, k, keys=True)
            v_all, cv = write_layer(v_all, layer, meta.index, v, keys=False)
            new = (k_all, v_all)
            if not own:
                keys = (ck.astype(dt), cv.astype(dt), meta.segment_ids, meta.positions, meta.index + q_from)
                cached = True  # the cache's own layout (``KVCache``)
                products = layer is None and x.shape[0] == 1  # one row, this layer's own arrays
        kk, vv, kv_seg, kv_pos, q_offset = keys
        out = attention(q, kk, vv, q_segment_ids=q_seg, kv_segment_ids=kv_seg, q_positions=q_pos,
                        kv_positions=kv_pos, q_offset=q_offset, sliding=sliding, cfg=cfg,
                        generating=cache is not None, cached=cached, products=products)
        out = _project(self, "o", out, "bshd,hde->bse", rng)
        if cfg.o_bias:
            out = out + self.o_bias[...].astype(dt)
        return out, new


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, f, pd = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        if cfg.mlp == "gated":
            self.gate = _param(rngs, (e, f), ("embed", "mlp"), pd, fan_in=e)
        self.up = _param(rngs, (e, f), ("embed", "mlp"), pd, fan_in=e)
        self.down = _param(rngs, (f, e), ("mlp", "embed"), pd, fan_in=f)
        for name in ("gate", "up", "down"):
            if hasattr(self, name):
                _lora_params(self, name, getattr(self, name), cfg, rngs)
        if cfg.mlp_bias:
            self.up_bias = _param(rngs, (f,), ("mlp",), pd, init="zeros")
            self.down_bias = _param(rngs, (e,), ("embed",), pd, init="zeros")

    def __call__(self, x: Array, rng: Array | None = None) -> Array:
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        act = _activation(cfg.activation)
        up = _project(self, "up", x, "bse,ef->bsf", rng)
        if cfg.mlp_bias:
            up = up + self.up_bias[...].astype(dt)
        h = act(_project(self, "gate", x, "bse,ef->bsf", rng)) * up if cfg.mlp == "gated" else act(up)
        out = _project(self, "down", h, "bsf,fe->bse", rng)
        return out + self.down_bias[...].astype(dt) if cfg.mlp_bias else out


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.post_norms = cfg.post_norms
        self.attn_norm = Norm(cfg.hidden_size, cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg.hidden_size, cfg, rngs)
        self.mlp = MLP(cfg, rngs)
        if cfg.post_norms:
            self.post_attn_norm = Norm(cfg.hidden_size, cfg, rngs)
            self.post_mlp_norm = Norm(cfg.hidden_size, cfg, rngs)

    def __call__(self, x, positions, segment_ids, sliding, cache=None, rng=None, last_only=False):
        """``last_only``: the output at the last position alone, [b, 1, e] (see ``Transformer``)."""
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, sliding, cache, rng, last_only)
        x = x[:, -1:] if last_only else x
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x), rng)  # (each projection folds its own id into ``rng``)
        return x + (self.post_mlp_norm(h) if self.post_norms else h), cache


def _layer_rng(rng: Array | None, layer: Array | int) -> Array | None:
    return None if rng is None else jax.random.fold_in(rng, layer)


class Transformer(nnx.Module):
    """Decoder-only LM. ``__call__`` returns the final (normed) hidden states; ``logits`` applies the
    head. The training loss applies the head itself, in chunks (``trainer.training.loss``)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        if cfg.position_embedding == "learned":
            self.pos_embed = _param(rngs, (cfg.max_position_embeddings, cfg.hidden_size),
                                    (None, "embed"), pd)
        if cfg.scan_layers:  # one Block whose params carry a leading [layers] axis
            @nnx.split_rngs(splits=cfg.num_hidden_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def stacked(rngs):
                return Block(cfg, rngs)
            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.num_hidden_layers)])
        self.final_norm = Norm(cfg.hidden_size, cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd,
                                  fan_in=cfg.hidden_size)

    def __call__(self, tokens: Array, positions: Array, segment_ids: Array,
                 cache: KVCache | None = None, dropout_rng: Array | None = None,
                 last_only: bool = False) -> tuple[Array, KVCache | None]:
        """Args:
          tokens: [batch, seq] int32.
          positions: [batch, seq] int32 (restart at 0 per packed segment).
          segment_ids: [batch, seq] int32, 0 = padding; attention never crosses segments.
          cache: optional ``KVCache``; this call's tokens are written at ``cache.index``.
          dropout_rng: key for LoRA dropout (training); None (eval, generation): no dropout.
          last_only: only the last position's hidden state is wanted (a prefill: the LM head reads no
            other). The final layer then computes queries, attention and MLP at that position alone
            -- its keys and values still at every position, for the cache -- which saves most of a
            layer's work: about a fifth of the demo's 4-layer prefill, a thirtieth of SmolLM2's.

        Returns:
          hidden states [batch, seq, embed] ([batch, 1, embed] with ``last_only``; after the final
          norm, compute dtype) and the updated cache (None without one).
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        if cfg.embed_scale:  # Gemma rounds the multiplier to the compute dtype, as HF does
            x = x * jnp.asarray(cfg.hidden_size ** 0.5, dt)
        if cfg.position_embedding == "learned":
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
        meta = None
        if cache is not None:  # the slot table first: this call's tokens attend to themselves too
            meta = cache.replace(
                segment_ids=jax.lax.dynamic_update_slice_in_dim(cache.segment_ids, segment_ids,
                                                                cache.index, axis=1),
                positions=jax.lax.dynamic_update_slice_in_dim(cache.positions, positions,
                                                              cache.index, axis=1))
        kinds = [cfg.layer_type(i) == SLIDING for i in range(cfg.num_hidden_layers)]
        remat = cfg.remat if cache is None else "none"
        if cfg.scan_layers:
            x, kv = self._scan(x, positions, segment_ids, kinds, meta, remat, dropout_rng, last_only)
        else:
            x, kv = self._unrolled(x, positions, segment_ids, kinds, meta, remat, dropout_rng, last_only)
        new_cache = None
        if cache is not None:
            new_cache = meta.replace(k=kv[0], v=kv[1],
                                     index=jnp.asarray(cache.index + tokens.shape[1], jnp.int32))
        return self.final_norm(x), new_cache

    def _unrolled(self, x, positions, segment_ids, kinds, meta, remat, rng=None, last_only=False):
        kv = None if meta is None else (meta.k, meta.v)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            trim = last_only and i == last  # (a Python bool: nnx.remat would trace a default argument)
            if meta is None:
                def call(blk, x_, sliding=kinds[i], rng_i=_layer_rng(rng, i)):
                    return blk(x_, positions, segment_ids, sliding, None, rng_i, trim)[0]  # noqa: B023 (called here)
                lora = bool(self.cfg.lora_rank)
                x = (call if remat == "none" else nnx.remat(call, policy=remat_lib.policy(remat, lora)))(layer, x)
                continue
            x, (k_i, v_i) = layer(x, positions, segment_ids, kinds[i], (kv[0][i], kv[1][i], None, meta),
                                  last_only=trim)
            kv = (kv[0][:i] + (k_i,) + kv[0][i + 1:], kv[1][:i] + (v_i,) + kv[1][i + 1:])
        return x, kv

    def _scan(self, x, positions, segment_ids, kinds, meta, remat, rng=None, last_only=False):
        graphdef, state = nnx.split(self.layers)
        uniform = all(kinds) or not any(kinds)
        flags = jnp.asarray(kinds) if not uniform else None

        def run(x, kv, layer_state, i, sliding, last_only=False):
            block = nnx.merge(graphdef, layer_state)
            if kv is None:
                return block(x, positions, segment_ids, sliding, None, _layer_rng(rng, i), last_only)[0], None
            return block(x, positions, segment_ids, sliding, (*kv, i, meta), last_only=last_only)

        def body(carry, xs):
            layer_state, i, flag = xs
            return run(*carry, layer_state, i, kinds[0] if uniform else flag), None

        body = remat_lib.remat(body, remat, bool(self.cfg.lora_rank))
        kv = None if meta is None else (meta.k, meta.v)
        n = self.cfg.num_hidden_layers
        xs = (state, jnp.arange(n, dtype=jnp.int32), flags)
        if not last_only:
            (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
            return x, kv
        # The last layer outside the loop, at the last position only (``__call__``'s ``last_only``).
        # The loop reads layer i out of the whole stack: a scan over ``state[:-1]`` made XLA copy all
        # but one layer's weights first (15 GB per chip for the 8B preset's gathered bfloat16 weights).
        def prefix(carry, i):
            layer = jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, i, keepdims=False), state)
            return body(carry, (layer, i, None if flags is None else flags[i]))

        (x, kv), _ = jax.lax.scan(prefix, (x, kv), jnp.arange(n - 1, dtype=jnp.int32))
        return run(x, kv, jax.tree.map(lambda a: a[-1], state), n - 1, kinds[-1], last_only=True)

    def head(self) -> Array:
        """The output projection ``[embed, vocab]`` in the compute dtype (the embeddings if tied)."""
        head = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return head.astype(jnp.dtype(self.cfg.dtype))

    def logits(self, hidden: Array) -> Array:
        """hidden: [batch, seq, embed] -> float32 logits [batch, seq, vocab] (soft-capped: Gemma 2).

        For generation and tests; training and eval losses never materialise these (``trainer.training.loss``).
        """
        logits = jnp.einsum("bse,ev->bsv", hidden, self.head(), preferred_element_type=jnp.float32)
        return softcap_logits(logits.astype(jnp.float32), self.cfg.final_logit_softcap)

    def forward_logits(self, tokens: Array, positions: Array, segment_ids: Array) -> Array:
        """Logits [batch, seq, vocab] float32 for full sequences (``logits(self(...)[0])``)."""
        return self.logits(self(tokens, positions, segment_ids)[0])


def softcap_logits(logits: Array, cap: float) -> Array:
    """Gemma 2's tanh soft-capping of the output logits (identity when ``cap`` is 0)."""
    return cap * jnp.tanh(logits / cap) if cap else logits


# ---------------------------------------------------------------------------------------------
# Layer layouts: unrolled ``{"layers": {0: block, 1: block, ...}}`` <-> scanned ``{"layers": block}``
# with a leading [layers] axis on every leaf. Checkpoints keep the run's layout; HF import/export
# converts through these.
# ---------------------------------------------------------------------------------------------

def stack_layers(params: dict[str, Any], num_layers: int, stack=np.stack) -> dict[str, Any]:
    """Unrolled pure params -> scanned (each leaf stacked over the layers)."""
    layers = [params["layers"][i] for i in range(num_layers)]
    return {**params, "layers": jax.tree.map(lambda *xs: stack(xs), *layers)}


def unstack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Scanned pure params -> unrolled (layer i is every leaf's slice i)."""
    return {**params, "layers": {i: jax.tree.map(lambda x, i=i: x[i], params["layers"])
                                 for i in range(num_layers)}}
