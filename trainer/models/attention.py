"""Attention: one interface (``attention``), several backends -- XLA (blockwise), cuDNN, the Pallas
GPU flash kernel and TPU splash -- and the choice among them for the target devices
(``resolve_attention``). The kernels run under ``shard_map`` over the mesh axes the model config
names for the batch and the heads (``attention_batch_axes``/``attention_head_axes``): this module
never names a mesh axis itself.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

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
# The name remat="dots_with_context" keeps (``context_saveable``): what a backend's backward pass needs
# of its forward, so the forward is not run again. The XLA path's output (its backward recomputes only
# the scores), and the kernels' residuals -- output and log-sum-exp -- named by splash itself and by
# our wrapper of the Pallas GPU kernel (naming splash's output again after the kernel's transpose kept
# it twice: the 8B preset's train step on a v5p-64 needed 73.1 GB per chip that way, 68.8 named once,
# 64.4 under "dots"). cuDNN's residuals are kept by their primitive (``CUDNN_FORWARD``).
CONTEXT = "context"
CUDNN_FORWARD = "dot_product_attention_fwd_wrapper"  # the primitive of cuDNN's forward call (jax 0.10, 0.11)


def kernel_platform() -> str:
    """The platform the program being traced is compiled for: the current mesh's devices (a TPU
    topology compiled ahead of time from a CPU host is "tpu"), else JAX's default backend. Pallas
    kernels run natively there and in interpret mode anywhere else."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def resolve_attention(cfg: ModelConfig, platform: str | None = None) -> str:
    """The attention backend ``cfg.attention_impl`` means on ``platform`` (the target devices'; the
    run resolves it once from its mesh, so ``auto`` never reaches the traced model there).

    ``auto``: splash (Pallas, segment ids) on TPU; on GPU for bf16/fp16 without soft-capping, cuDNN
    flash attention -- causal for unpacked rows, and for packed rows with a bound on their segments
    (``max_segments``) on Hopper or later -- else the Pallas GPU flash kernel (segment ids) for
    packed ones; otherwise XLA (blockwise, skipping blocks above the diagonal). An explicit choice the
    model cannot use raises ``ValueError`` naming the reason.
    """
    platform = platform or kernel_platform()
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
            return "cudnn" if cfg.max_segments > 0 and _hopper_or_later() else "flash"
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


def _hopper_or_later() -> bool:
    """Whether this host's GPUs are Hopper or later (compute capability 9.0): cuDNN takes packed rows
    from there on."""
    try:
        return float(jax.devices("gpu")[0].compute_capability) >= 9.0
    except (RuntimeError, AttributeError, ValueError, IndexError):
        return False


def segment_layout(segment_ids: Array, max_segments: int) -> tuple[Array, Array]:
    """cuDNN's packed layout of rows whose segments are contiguous and numbered 1, 2, ... from the
    row's start (padding, id 0, last): each segment's length and first slot, -1 past a row's last one.

    segment_ids: [b, s] int32. Returns lengths [b, max_segments] and offsets [b, max_segments + 1].
    """
    ids = jnp.arange(1, max_segments + 1, dtype=segment_ids.dtype)
    lengths = jnp.sum(segment_ids[:, :, None] == ids, axis=1, dtype=jnp.int32)
    starts = jnp.cumsum(lengths, axis=1) - lengths
    present = lengths > 0
    offsets = jnp.concatenate([jnp.where(present, starts, -1),
                               jnp.full((segment_ids.shape[0], 1), -1, jnp.int32)], axis=1)
    return jnp.where(present, lengths, -1), offsets


def _cudnn_packed_attention(q: Array, k: Array, v: Array, segment_ids: Array, max_segments: int,
                            scale: float) -> Array:
    """cuDNN flash attention over packed rows (Hopper or later), causal within each segment, through
    JAX's cuDNN module (``jax.nn.dot_product_attention`` does not take segment offsets). GQA natively.
    q: [b, s, heads, d]; k/v: [b, s, kv_heads, d]; segment_ids: [b, s] with at most ``max_segments``
    segments a row (the packer's bound: more would be dropped, so the loader never makes them)."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # noqa: PLC0415
    lengths, offsets = segment_layout(segment_ids, max_segments)
    out = cudnn.dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=offsets,
                                      kv_offsets=offsets, scale=scale,
                                      mask_type=cudnn.MaskType.PADDING_CAUSAL)
    # padding slots belong to no segment, so the packed layout does not define their outputs, and a
    # NaN there would survive the loss's zero weight (0 x NaN is NaN): they are set to 0
    return jnp.where((segment_ids > 0)[:, :, None, None], out, jnp.zeros((), out.dtype))


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
    out = checkpoint_name(out, CONTEXT)
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


def _head_shards(cfg: ModelConfig) -> int:
    """How many ways the current mesh splits attention's head dimension (1 outside a mesh)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    return math.prod(mesh.shape[a] for a in cfg.attention_head_axes if a in mesh.axis_names)


def _shard_mapped(fn, cfg: ModelConfig, n_qkv: int, n_seg: int):
    """``fn(q, k, v, *segs)`` run per device under ``shard_map`` over the batch/head mesh axes (a Pallas
    kernel cannot be partitioned by GSPMD); plain ``fn`` outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn
    P = jax.sharding.PartitionSpec
    batch = tuple(a for a in cfg.attention_batch_axes if a in mesh.axis_names) or None
    heads = tuple(a for a in cfg.attention_head_axes if a in mesh.axis_names) or None
    spec = P(batch, None, heads, None)
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec,) * n_qkv + (P(batch, None),) * n_seg,
                         out_specs=spec, check_vma=False)


def splash_block(cfg: ModelConfig, s: int) -> int:
    """Splash's query/key block for ``s``-token rows: ``cfg.splash_block_size``, else the largest of
    512, 256 and 128 that divides ``s``."""
    if s % 128:
        raise ValueError(f"splash attention needs the sequence length ({s}) to be a multiple of 128")
    block = cfg.splash_block_size or next(n for n in (512, 256, 128) if s % n == 0)
    if s % block:
        raise ValueError(f"splash attention's block ({block}) must divide the sequence length ({s})")
    return block


def _splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, cfg: ModelConfig, scale: float,
                      window: int | None) -> Array:
    """Pallas splash attention (TPU): causal or sliding-window, segment ids, optional soft-capping.

    q: [b, s, heads, d]; k/v: [b, s, kv_heads, d] with kv_heads dividing heads (grouped-query
    attention: the kernel maps query head h to k/v head h // (heads // kv_heads)). Off TPU it runs in
    Pallas interpret mode, which is how the CPU tests check it.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import (  # noqa: PLC0415
        splash_attention_kernel as sk,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as sm,
    )
    s = q.shape[1]
    block = splash_block(cfg, s)
    blocks = dict(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                  block_kv_dkv=block, block_kv_dkv_compute=block)
    if cfg.splash_fused_backward:  # one backward kernel: dQ beside dK/dV, from the same scores
        blocks.update(use_fused_bwd_kernel=True)
    else:  # dK/dV and dQ in two kernels, each computing the scores again
        blocks.update(block_q_dq=block, block_kv_dq=block)

    def local(q, k, v, seg):
        shape = (s, s)
        base = (sm.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window
                else sm.CausalMask(shape))
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([base] * q.shape[2]), head_shards=1, q_seq_shards=1,
            block_sizes=sk.BlockSizes(**blocks),
            attn_logits_soft_cap=cfg.attn_logit_softcap or None,
            residual_checkpoint_name=CONTEXT,  # its output and log-sum-exp, in its own layout
            interpret=kernel_platform() != "tpu")
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
            heads_first(q * scale), heads_first(k), heads_first(v), seg)
        return heads_first(out)

    return _shard_mapped(local, cfg, 3, 1)(q, k, v, segment_ids)


def _flash_gpu_attention(q: Array, k: Array, v: Array, segment_ids: Array, cfg: ModelConfig,
                         scale: float) -> Array:
    """The Pallas GPU flash kernel (Triton): causal, segment ids, so packed rows stay apart.
    q: [b, s, heads, d]; k/v: [b, s, kv_heads, d] (each query head reads its group's). Interpret mode
    off GPU (tests)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu  # noqa: PLC0415
    s = q.shape[1]
    block = next((n for n in (128, 64, 32, 16) if s % n == 0), 0)
    if not block:
        raise ValueError(f"the Pallas GPU attention kernel needs the sequence length ({s}) to be a "
                         "multiple of 16")
    # Halving the backward's inner blocks (dK/dV's queries, dQ's keys) ran forward + backward in
    # 10.2-10.4 ms against 11.0-11.2 with 128 everywhere, and 18.5-18.8 with the library's default of
    # 32 (H200, 8 x 4,096, 32 heads of 64; trainer.benchmarks.attention_kernels, four runs)
    half = max(block // 2, 16)
    sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=half, block_kv_dkv=block,
                                  block_q_dq=block, block_kv_dq=half)

    def local(q, k, v, seg):
        return pallas_gpu_mha(q, k, v, seg, scale, sizes, kernel_platform() != "gpu")

    return _shard_mapped(local, cfg, 3, 1)(q, k, v, segment_ids)


def pallas_gpu_mha(q: Array, k: Array, v: Array, segment_ids: Array, scale: float, sizes,
                   interpret: bool) -> Array:
    """Causal flash attention with segment ids by the Pallas GPU library's kernels
    (``mha_forward_kernel``, ``mha_backward_kernel``: the same in jax 0.10 and 0.11), called here so
    that grouped-query attention is native: query head ``h`` reads k/v head ``h // groups`` through
    the kernels' index maps, so the ``[b, s, heads, d]`` copies of k and v that ``jnp.repeat`` wrote
    (and read back) every layer are never made. The backward's dK/dV come per query head, as the
    repeat's own gradient had them, and are summed over the group in float32.

    q: [b, s, heads, d]; k, v: [b, s, kv_heads, d] with kv_heads dividing heads; segment_ids: [b, s].
    ``tests/attention_test.py`` runs forward and backward against the XLA path."""
    return _flash(q, k, v, segment_ids, scale, sizes, interpret)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, segment_ids, scale, sizes, interpret) -> tuple[Array, Array]:
    """The forward kernel: (output [b, s, heads, d], log-sum-exp [b, heads, s] float32). A custom VJP
    of its own, as the library's ``mha`` is, so that a remat that keeps both outputs drops the call
    from its recomputation (Pallas never drops a kernel whose outputs go unused)."""
    from jax.experimental import pallas as pl  # noqa: PLC0415
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu  # noqa: PLC0415
    b, s, h, d = q.shape
    t, groups, dp = k.shape[1], h // k.shape[2], pl.next_power_of_2(d)
    kernel = functools.partial(pallas_gpu.mha_forward_kernel, sm_scale=scale, causal=True,
                               block_q=sizes.block_q, block_k=sizes.block_k, head_dim=d)
    # the library's ``mha`` with return_residuals, but for the k/v index map; the grid is
    # (query block i, batch j, query head hh)
    q_spec = pl.BlockSpec((None, sizes.block_q, None, dp), lambda i, j, hh: (j, i, hh, 0))
    kv_spec = pl.BlockSpec((None, t, None, dp), lambda _, j, hh: (j, 0, hh // groups, 0))
    return pl.pallas_call(
        kernel, grid=(s // sizes.block_q, b, h),
        in_specs=[q_spec, kv_spec, kv_spec, pl.BlockSpec((None, t), lambda _, j, hh: (j, 0))],
        out_specs=[q_spec, pl.BlockSpec((None, None, sizes.block_q), lambda i, j, hh: (j, hh, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, s), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=4 if d <= 64 else 8, num_stages=2),
        interpret=interpret, name="mha_forward")(q, k, v, segment_ids)


def _flash_fwd(q, k, v, segment_ids, scale, sizes, interpret):
    # The residuals -- output and log-sum-exp -- carry the name ``CONTEXT``, as splash names its own,
    # so remat="dots_with_context" keeps them and the backward does not run the forward kernel again.
    out, lse = _flash(q, k, v, segment_ids, scale, sizes, interpret)
    out, lse = checkpoint_name(out, CONTEXT), checkpoint_name(lse, CONTEXT)  # the output is both
    return (out, lse), (q, k, v, segment_ids, out, lse)


def _flash_bwd(scale, sizes, interpret, residuals, cotangents):
    from jax.experimental import pallas as pl  # noqa: PLC0415
    from jax.experimental.pallas import triton as plgpu  # noqa: PLC0415
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu  # noqa: PLC0415
    q, k, v, segment_ids, out, lse = residuals
    d_out = cotangents[0]  # (the log-sum-exp's is zero: only pallas_gpu_mha's output is differentiated)
    b, s, h, d = q.shape
    t, kv_heads, dp = k.shape[1], k.shape[2], pl.next_power_of_2(d)
    groups = h // kv_heads
    if s // sizes.block_q_dq != t // sizes.block_kv_dkv:
        raise ValueError("the fused backward wants as many dQ query blocks as dK/dV key blocks")
    delta = pallas_gpu._preprocess_backward(out, d_out, lse, sizes.block_q, False, interpret)
    # The library's backward call, but for the k/v index map and dK/dV per query head; its grid is
    # (batch i, query head j, block): the index maps take (i, j, _).
    per_row = lambda n: pl.BlockSpec((None, n, None, dp), lambda i, j, _: (i, 0, j, 0))  # noqa: E731
    kv_spec = pl.BlockSpec((None, t, None, dp), lambda i, j, _: (i, 0, j // groups, 0))
    stats = pl.BlockSpec((None, None, s), lambda i, j, _: (i, j, 0))
    blocks = lambda n: pl.BlockSpec((None, n, None, dp), lambda i, j, kb: (i, kb, j, 0))  # noqa: E731
    small = sizes.block_q_dkv * sizes.block_kv_dkv < 128 * 128 or sizes.block_q_dq * sizes.block_kv_dq < 128 * 128
    per_head = jax.ShapeDtypeStruct((b, t, h, d), k.dtype)
    dq, dk, dv = pl.pallas_call(
        functools.partial(pallas_gpu.mha_backward_kernel, sm_scale=scale, causal=True,
                          block_q_dkv=sizes.block_q_dkv, block_kv_dkv=sizes.block_kv_dkv,
                          block_q_dq=sizes.block_q_dq, block_kv_dq=sizes.block_kv_dq, head_dim=d),
        grid=(b, h, t // sizes.block_kv_dkv),
        in_specs=[per_row(s), kv_spec, kv_spec, pl.BlockSpec((None, t), lambda i, j, _: (i, 0)),
                  per_row(s), per_row(s), stats, stats],
        out_specs=[blocks(sizes.block_q_dq), blocks(sizes.block_kv_dkv), blocks(sizes.block_kv_dkv)],
        out_shape=[jax.ShapeDtypeStruct.like(q), per_head, per_head],
        compiler_params=plgpu.CompilerParams(num_warps=4 if small else 8, num_stages=2),
        interpret=interpret, name="mha_backward")(q, k, v, segment_ids, out, d_out, lse, delta)
    group_sum = lambda x: x.reshape(b, t, kv_heads, groups, d).sum(3, dtype=jnp.float32).astype(k.dtype)  # noqa: E731
    return dq.astype(q.dtype), group_sum(dk), group_sum(dv), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def context_saveable(prim, *_, **params) -> bool:
    """The remat policy piece that keeps what attention's backward needs of its forward: whatever
    carries the name ``CONTEXT`` (the XLA path's output; splash's and the Pallas GPU kernel's output
    and log-sum-exp), and the outputs of cuDNN's forward call (output and softmax statistics: JAX's
    rule passes them on unnamed, straight from this primitive)."""
    return (prim.name == CUDNN_FORWARD or (prim.name == "name" and params.get("name") == CONTEXT))


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
            if cfg.num_key_value_heads % _head_shards(cfg):
                groups = cfg.num_attention_heads // cfg.num_key_value_heads
                kr, vr = jnp.repeat(k, groups, 2), jnp.repeat(v, groups, 2)
            if impl == "splash":
                return _splash_attention(q, kr, vr, q_segment_ids, cfg, scale, window)
            return _flash_gpu_attention(q, kr, vr, q_segment_ids, cfg, scale)
        if impl == "cudnn" and cfg.packed_inputs:
            return _cudnn_packed_attention(q, k, v, q_segment_ids, cfg.max_segments, scale)
        if impl == "cudnn":  # unpacked rows: causal (right-padded: padding keys follow every real query)
            return jax.nn.dot_product_attention(
                q, k, v, scale=scale, is_causal=True, implementation="cudnn",
                local_window_size=(window - 1, 0) if window else None)

    if W is None or sliding is False:
        return run(None)
    if sliding is True:
        return run(W)
    return jax.lax.cond(sliding, lambda: run(W), lambda: run(None))  # mixed layers under scan
