"""The accelerator kernels attention calls (``trainer.models.attention`` chooses among them): TPU splash,
the Pallas GPU flash kernel (grouped-query attention native, with a VJP of its own) and cuDNN's call
for packed rows. Each Pallas kernel runs under ``shard_map`` over the mesh axes the model config names
for the batch and the heads (``attention_batch_axes``/``attention_head_axes``): this module never names
a mesh axis itself. Off its own platform a Pallas kernel runs in interpret mode, which is how the CPU
tests check it against the XLA path (``tests/attention_test.py``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from trainer.models.config import ModelConfig

Array = jax.Array

# The name remat="dots_with_context" keeps (``attention.context_saveable``): what a backend's backward
# pass needs of its forward, so the forward is not run again. The XLA path's output (its backward
# recomputes only the scores), and the kernels' residuals -- output and log-sum-exp -- named by splash
# itself and by our wrapper of the Pallas GPU kernel (naming splash's output again after the kernel's
# transpose kept it twice: the 8B preset's train step on a v5p-64 needed 73.1 GB per chip that way,
# 68.8 named once, 64.4 under "dots"). cuDNN's residuals are kept by their primitive (``CUDNN_FORWARD``).
CONTEXT = "context"
CUDNN_FORWARD = "dot_product_attention_fwd_wrapper"  # the primitive of cuDNN's forward call (jax 0.10, 0.11)


def kernel_platform() -> str:
    """The platform the program being traced is compiled for: the current mesh's devices (a TPU
    topology compiled ahead of time from a CPU host is "tpu"), else JAX's default backend. Pallas
    kernels run natively there and in interpret mode anywhere else."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def hopper_or_later() -> bool:
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


def cudnn_packed_attention(q: Array, k: Array, v: Array, segment_ids: Array, max_segments: int,
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


def head_shards(cfg: ModelConfig) -> int:
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


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, cfg: ModelConfig, scale: float,
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


def flash_gpu_attention(q: Array, k: Array, v: Array, segment_ids: Array, cfg: ModelConfig,
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
