"""Attention: one interface (``attention``), several backends -- XLA (blockwise, here), cuDNN, the
Pallas GPU flash kernel and TPU splash (``attention_kernels``) -- and the choice among them for the
target devices (``resolve_attention``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from trainer.models import attention_kernels as kernels
from trainer.models.config import ModelConfig
from trainer.settings import options

Array = jax.Array

#
# Layers never see a mask. They pass segment ids and positions (of the queries and of the keys) and
# the slot of their first query; each backend derives what it needs from those: the XLA path builds
# its dense mask block by block inside, splash and the Pallas GPU kernel take segment ids, cuDNN takes
# ``is_causal``. The rules, the same for every backend: a query attends to keys
#   - at a slot <= its own (causal by slot: a packed row's segments and a cache's slots are in order),
#   - of its own segment, never padding (segment id 0),
#   - and, on a sliding-window layer, less than ``window`` positions back.
# A padding query (segment 0) attends to nothing; its output is finite (a uniform average) and ignored.

BACKENDS = options.ATTENTION_BACKENDS


def resolve_attention(cfg: ModelConfig, platform: str | None = None) -> str:
    """The attention backend ``cfg.attention_impl`` means on ``platform`` (the target devices'; the
    run resolves it once from its mesh, so ``auto`` never reaches the traced model there).

    ``auto``: splash (Pallas, segment ids) on TPU; on GPU for bf16/fp16 without soft-capping, cuDNN
    flash attention -- causal for unpacked rows, and for packed rows with a bound on their segments
    (``max_segments``) on Hopper or later -- else the Pallas GPU flash kernel (segment ids) for
    packed ones; otherwise XLA (blockwise, skipping blocks above the diagonal). An explicit choice the
    model cannot use raises ``ValueError`` naming the reason.
    """
    platform = platform or kernels.kernel_platform()
    impl = cfg.attention_impl
    low_precision = cfg.dtype in ("bfloat16", "float16")
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and low_precision and not cfg.attn_logit_softcap:
            if not cfg.packed_inputs:
                return "cudnn"
            if cfg.sliding_window:
                return "xla"
            return "cudnn" if cfg.max_segments > 0 and kernels.hopper_or_later() else "flash"
        return "xla"
    if impl not in BACKENDS:
        raise ValueError(f"attention_impl must be auto, {', '.join(BACKENDS)}, got {impl!r}")
    if impl == "cudnn":
        if not low_precision or cfg.attn_logit_softcap:
            raise ValueError("attention_impl='cudnn' needs model.dtype bfloat16/float16 and no attention "
                             "soft-capping (Gemma 2); use 'xla' or 'auto'")
        if cfg.packed_inputs and (cfg.max_segments <= 0 or cfg.sliding_window):
            raise ValueError("attention_impl='cudnn' keeps packed segments apart only with a bound on "
                             "a row's segments (data.max_segments_per_row > 0) and no sliding window; "
                             "use 'flash' (segment ids) or 'auto', or data.packing='none'")
    if impl == "flash" and (cfg.attn_logit_softcap or cfg.sliding_window):
        raise ValueError("attention_impl='flash' (the Pallas GPU kernel) has no soft-capping or sliding "
                         "window; use 'xla' or 'auto'")
    return impl


def _dense_attention(q: Array, k: Array, v: Array, q_seg: Array, kv_seg: Array, q_pos: Array,
                     kv_pos: Array, q_slot: Array, kv_slot: Array, window: int | None,
                     scale: float, softcap: float, keys_transposed: bool = False, products: bool = False
                     ) -> Array:
    """Reference attention with the mask built here, heads-first: q: [b, kh, group, s, d]; k/v:
    [b, kh, t, d] (k [b, kh, d, t] with ``keys_transposed``: the KV cache's layout); *_seg/*_pos:
    [b, s] and [b, t]; q_slot [s], kv_slot [t]: slot indices. Returns [b, kh, group, s, d]. Softmax
    in float32.

    Grouped-query heads are a [kh, group] split of the query heads, never a copy of k/v. The dots are
    heads-first because XLA:CPU runs a batched dot fastest with its batch dimensions leading and the
    result in the same order: given [b, s, kh, ...] forms it chose operand orders that made the dots 3x
    slower for a decode step (one query over the cache, whose heads-first keys need no transpose at
    all) and the attention's forward + backward 15-25% slower in training.
    """
    mask = ((kv_slot[None, None, :] <= q_slot[None, :, None])
            & (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0))
    if window is not None:
        mask = mask & (q_pos[:, :, None] - kv_pos[:, None, :] < window)
    return _softmax_attend(q, k, v, mask, scale, softcap, keys_transposed, products)


# the score dot (q . k) and its two transposes, by whether k is [b, kh, t, d] or (the cache's) [b, kh, d, t]
_QK = {False: "bkgsd,bktd->bkgst", True: "bkgsd,bkdt->bkgst"}
_DQ = {False: "bkgst,bktd->bkgsd", True: "bkgst,bkdt->bkgsd"}
_DK = {False: "bkgst,bkgsd->bktd", True: "bkgst,bkgsd->bkdt"}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _softmax_attend(q: Array, k: Array, v: Array, mask: Array, scale: float, softcap: float,
                    keys_transposed: bool = False, products: bool = False) -> Array:
    """softmax(mask(q . k * scale)) . v, heads-first (``_dense_attention``; mask: [b, s, t]), with its
    backward written out: the softmax's backward takes its row sums from the output (``sum(d_out *
    out)`` over the head dim, as flash attention's does) instead of from a pass over the [s, t]
    probabilities, and the chain of elementwise passes autodiff made of the mask and softmax is one.
    7% of the demo's CPU train step (147 against 158 ms, medians of 6 alternating rounds).

    The output is named ``CONTEXT`` here, in the layout the backward reads it: remat's
    "dots_with_context" keeps it, so the backward recomputes the scores only (not the values' dot).
    ``keys_transposed``: k is [b, kh, d, t], the KV cache's layout (and so is its gradient).
    ``products``: the two dots as products and sums (one row over a layer's own cache arrays)."""
    return _softmax_attend_fwd(q, k, v, mask, scale, softcap, keys_transposed, products)[0]


def _softmax_attend_fwd(q, k, v, mask, scale, softcap, keys_transposed=False, products=False):
    # ``products``, one row over an unrolled model's cache: XLA:CPU turns a dot's batch dimension of
    # 1 into a reshape, fuses the cache's update on both sides of it and copies every layer's keys
    # and values 4 times a decode step (a SmolLM2 step with 1,024-token prompts: ~35 ms without the
    # dots, 40-45 with them; README). More rows keep the dots (products ran 1.1-2.2x slower there),
    # and so does a scanned model, whose stack XLA then copied whole every step.
    f32 = jnp.float32
    if products:  # q [1, kh, g, s, d] x k [1, kh, d, t] -> [1, kh, g, s, t]
        logits = jnp.sum(q[..., None].astype(f32) * k[:, :, None, None].astype(f32), axis=-2) * scale
    else:
        logits = jnp.einsum(_QK[keys_transposed], q, k, preferred_element_type=f32) * scale
    capped = None
    if softcap:
        capped = jnp.tanh(logits / softcap)
        logits = softcap * capped
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    if products:  # probs [1, kh, g, s, t] x v [1, kh, t, d] -> [1, kh, g, s, d]
        out = jnp.sum(probs[..., None].astype(f32) * v[:, :, None, None].astype(f32), axis=-2).astype(v.dtype)
    else:
        out = jnp.einsum("bkgst,bktd->bkgsd", probs, v)
    out = checkpoint_name(out, kernels.CONTEXT)
    return out, (q, k, v, mask, probs, out, capped)


def _softmax_attend_bwd(scale, softcap, keys_transposed, products, res, d_out):
    q, k, v, mask, probs, out, capped = res
    f32 = jnp.float32
    d_probs = jnp.einsum("bkgsd,bktd->bkgst", d_out, v, preferred_element_type=f32)
    rows = jnp.sum(d_out.astype(f32) * out.astype(f32), axis=-1, keepdims=True)  # = sum(d_probs * probs)
    d_logits = jnp.where(mask[:, None, None], probs.astype(f32) * (d_probs - rows), 0.0)
    if softcap:
        d_logits = d_logits * (1.0 - capped * capped)
    d_logits = (d_logits * scale).astype(q.dtype)
    dq = jnp.einsum(_DQ[keys_transposed], d_logits, k)
    # The keys' and values' gradients contract the [s, t] probabilities and score gradient over
    # their rows, and XLA:CPU's batched dot copies that operand transposed. From t = 4 d on they are
    # taken as [d, s] x [s, t] instead, so the copy is of the [s, d] operand (a quarter or less); at
    # 2 d the swapped dots ran slower (README, "CPU: the train step against PyTorch").
    if probs.shape[-1] >= 4 * q.shape[-1]:
        dv = jnp.einsum("bkgsd,bkgst->bkdt", d_out.astype(probs.dtype), probs).swapaxes(-1, -2)
        dk = jnp.einsum("bkgsd,bkgst->bkdt", q, d_logits)
        dk = dk if keys_transposed else dk.swapaxes(-1, -2)
    else:
        dv = jnp.einsum("bkgst,bkgsd->bktd", probs, d_out.astype(probs.dtype))
        dk = jnp.einsum(_DK[keys_transposed], d_logits, q)
    return dq, dk, dv, None


_softmax_attend.defvjp(_softmax_attend_fwd, _softmax_attend_bwd)


def _xla_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_offset, window, scale, softcap,
                   block: int, cached: bool = False, products: bool = False) -> Array:
    """Blockwise causal attention in plain XLA: query block i only meets key blocks 0..i (and, on a
    sliding layer with a static window, only the blocks the window reaches), so the fully masked
    upper triangle is never computed or stored -- about half the FLOPs and memory of a dense mask.

    Used when the queries start at slot 0 (training, scoring, prefill); a decode step (one query at
    slot ``q_offset``) takes the dense path over the whole cache. q: [b, s, h, d], k/v: [b, t, kh, d]
    are put heads-first once here, not once per block (key block j is read by every later block);
    ``cached``: k/v are the KV cache's own arrays, heads-first already and the keys transposed
    (``KVCache``).
    """
    b, s, h, d = q.shape
    if cached:
        kh, t = k.shape[1], k.shape[3]
    else:
        t, kh = k.shape[1], k.shape[2]
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [b, kh, t, d]
    slots = jnp.arange(max(s, t), dtype=jnp.int32)
    q = q.reshape(b, s, kh, h // kh, d).transpose(0, 2, 3, 1, 4)  # [b, kh, group, s, d]
    # At most 8 query blocks: each block is its own ops in the program, and 32 blocks of 128 at 4k
    # tokens made compiles 4x longer for little more skipping (7/16 of the square instead of 1/2).
    # At least 2 x head_dim rows: narrower blocks' dots cost more than the FLOPs they skip (CPU
    # train steps at head_dim 32 and 64, README "CPU: the train step against PyTorch").
    block = max(block, 2 * d, s // 8) if block else 0
    if not cached and isinstance(q_offset, int) and q_offset == 0 and block and s > block and s % block == 0:
        outs = []
        for i in range(s // block):
            q0, q1 = i * block, (i + 1) * block
            k0 = 0
            if window is not None:  # keys more than ``window`` slots back are out of reach
                k0 = max(0, (q0 - window + 1) // block * block)
            sl = slice(k0, min(q1, t))
            outs.append(_dense_attention(
                q[:, :, :, q0:q1], k[:, :, sl], v[:, :, sl], q_seg[:, q0:q1], kv_seg[:, sl],
                q_pos[:, q0:q1], kv_pos[:, sl], slots[q0:q1], slots[sl], window, scale, softcap))
        out = jnp.concatenate(outs, axis=3)
    else:
        out = _dense_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, slots[:s] + q_offset, slots[:t],
                               window, scale, softcap, keys_transposed=cached, products=products)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, s, h, d)


def context_saveable(prim, *_, **params) -> bool:
    """The remat policy piece that keeps what attention's backward needs of its forward: whatever
    carries the name ``CONTEXT`` (the XLA path's output; splash's and the Pallas GPU kernel's output
    and log-sum-exp), and the outputs of cuDNN's forward call (output and softmax statistics: JAX's
    rule passes them on unnamed, straight from this primitive)."""
    return (prim.name == kernels.CUDNN_FORWARD
            or (prim.name == "name" and params.get("name") == kernels.CONTEXT))


def attention(q: Array, k: Array, v: Array, *, q_segment_ids: Array, kv_segment_ids: Array,
              q_positions: Array, kv_positions: Array, q_offset: Array | int, sliding: Array | bool,
              cfg: ModelConfig, generating: bool = False, cached: bool = False, products: bool = False
              ) -> Array:
    """The one attention entry point (see the rules above).

    Args:
      q: [batch, s, heads, head_dim]; k, v: [batch, t, kv_heads, head_dim] -- or, with ``cached``
        (a decode step reading the KV cache; the XLA path), the cache's own arrays: k [batch,
        kv_heads, head_dim, t], v [batch, kv_heads, t, head_dim] (``KVCache``).
      q_segment_ids, q_positions: [batch, s] int32; kv_segment_ids, kv_positions: [batch, t] int32.
      q_offset: the slot of the first query (0 for a full sequence; the cache index when decoding;
        the last slot when only the last position queries, as in a prefill's final layer).
      sliding: whether this is a sliding-window layer (a Python bool, or a traced bool under scan).
      generating: a prefill or decode step over left-padded prompts of any length: the XLA path
        (the kernels want lengths in multiples of their blocks, and cuDNN's causal mask alone would
        let prompts attend to their left padding). Otherwise q and k/v are the same full sequences
        from slot 0 (training, scoring), which the configured backend takes.
      products: with ``cached``, one row over a layer's own cache arrays (an unrolled model): the
        XLA path's two dots as products and sums (``_softmax_attend_fwd`` says why).

    Returns:
      [batch, s, heads, head_dim] in the compute dtype.
    """
    scale = (cfg.query_pre_attn_scalar or cfg.head_size) ** -0.5
    softcap = cfg.attn_logit_softcap
    W = cfg.sliding_window or None
    impl = "xla" if generating or cached else resolve_attention(cfg)

    def run(window: int | None) -> Array:
        if impl == "xla":  # (its output is named CONTEXT inside, heads-first: ``_softmax_attend``)
            return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                                  q_offset, window, scale, softcap, cfg.attention_block_size, cached,
                                  products)
        if impl in ("splash", "flash"):
            # GQA natively: each query head reads its group's k/v block (forward and backward), so the
            # [b, s, heads, d] copies of k and v are never made -- unless the mesh's head axis cannot
            # split the k/v heads evenly (e.g. 4 ways over 2): then each device gets its query heads'
            # k/v, repeated.
            kr, vr = k, v
            if cfg.num_key_value_heads % kernels.head_shards(cfg):
                groups = cfg.num_attention_heads // cfg.num_key_value_heads
                kr, vr = jnp.repeat(k, groups, 2), jnp.repeat(v, groups, 2)
            if impl == "splash":
                return kernels.splash_attention(q, kr, vr, q_segment_ids, cfg, scale, window)
            return kernels.flash_gpu_attention(q, kr, vr, q_segment_ids, cfg, scale)
        if impl == "cudnn" and cfg.packed_inputs:
            return kernels.cudnn_packed_attention(q, k, v, q_segment_ids, cfg.max_segments, scale)
        if impl == "cudnn":  # unpacked rows: causal (right-padded: padding keys follow every real query)
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                local_window_size=(window - 1, 0) if window else None)

    if W is None or sliding is False:
        return run(None)
    if sliding is True:
        return run(W)
    return jax.lax.cond(sliding, lambda: run(W), lambda: run(None))  # mixed layers under scan
