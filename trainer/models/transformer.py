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
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from trainer.settings import options

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
    attention_impl: str = "auto"  # auto | xla | cudnn | flash | splash (see ``resolve_attention``)
    # Whether rows pack several segments (data.packing): picks the GPU kernel that takes segment ids.
    packed_inputs: bool = False
    # Query block of the XLA attention path: blocks above the causal diagonal are skipped (0: dense).
    attention_block_size: int = 128
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
    # Layers as one Block with stacked [layers, ...] params under ``lax.scan``: program size and
    # compile time independent of depth (the accelerator presets turn it on).
    scan_layers: bool = False
    # ---- LoRA (trainer.models.lora): low-rank adapters beside the block projections ----------------
    # out = x W + (alpha / rank) * dropout(x) A B, with A [in..., rank], B [rank, out...]
    # (``nnx.LoRAParam``s, so a filter tells them from the frozen base). rank 0: none.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ()  # of LORA_TARGETS

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
        for key in ("layer_types", "attention_batch_axes", "attention_head_axes", "lora_targets"):
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


# The projections LoRA can adapt, with how many leading axes of each weight are its input (``o`` is
# [heads, head_dim, embed]: two). Names follow our params; PEFT's are ``<name>_proj``.
LORA_TARGETS = {"q": 1, "k": 1, "v": 1, "o": 2, "gate": 1, "up": 1, "down": 1}
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
    key = rngs.lora() if "lora" in rngs else rngs.params()
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
    out = jnp.einsum(spec, x, getattr(module, name)[...].astype(dt))
    if not hasattr(module, f"{name}_lora_a"):
        return checkpoint_name(out, "projection")
    n_in = LORA_TARGETS[name]
    if cfg.lora_dropout and rng is not None:
        keep = jax.random.bernoulli(jax.random.fold_in(rng, _LORA_IDS[name]), 1.0 - cfg.lora_dropout,
                                    x.shape)
        x = jnp.where(keep, x / (1.0 - cfg.lora_dropout), 0).astype(x.dtype)
    a = getattr(module, f"{name}_lora_a")[...].astype(dt)
    b = getattr(module, f"{name}_lora_b")[...].astype(dt)
    low = jnp.tensordot(x, a, axes=n_in)  # [b, s, rank]
    out = out + jnp.tensordot(low, b, axes=1) * jnp.asarray(cfg.lora_alpha / cfg.lora_rank, dt)
    # Named for remat="dots" with LoRA: keep this sum, as full fine-tuning keeps the projection's
    # output, and not each of its two matmuls' outputs (which doubled the saved activations).
    return checkpoint_name(out, "projection")


def _activation(name: str):
    return {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
            "gelu": lambda x: jax.nn.gelu(x, approximate=False)}[name]


# ---------------------------------------------------------------------------------------------
# Attention: one interface, several backends
# ---------------------------------------------------------------------------------------------
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
    flash attention (causal) for unpacked rows and the Pallas GPU flash kernel (segment ids) for packed
    ones; otherwise XLA (blockwise, skipping blocks above the diagonal). An explicit choice the model
    cannot use raises ``ValueError`` naming the reason.
    """
    platform = platform or kernel_platform()
    impl = cfg.attention_impl
    low_precision = cfg.dtype in ("bfloat16", "float16")
    if impl == "auto":
        if platform == "tpu":
            return "splash"
        if platform == "gpu" and low_precision and not cfg.attn_logit_softcap:
            if cfg.packed_inputs:
                return "flash" if not cfg.sliding_window else "xla"
            return "cudnn"
        return "xla"
    if impl not in BACKENDS:
        raise ValueError(f"attention_impl must be auto, {', '.join(BACKENDS)}, got {impl!r}")
    if impl == "cudnn":
        if not low_precision or cfg.attn_logit_softcap:
            raise ValueError("attention_impl='cudnn' needs model.dtype bfloat16/float16 and no attention "
                             "soft-capping (Gemma 2); use 'xla' or 'auto'")
        if cfg.packed_inputs:
            raise ValueError("attention_impl='cudnn' is causal only and cannot keep packed segments "
                             "apart; use 'flash' (segment ids) or 'auto', or data.packing='none'")
    if impl == "flash" and (cfg.attn_logit_softcap or cfg.sliding_window):
        raise ValueError("attention_impl='flash' (the Pallas GPU kernel) has no soft-capping or sliding "
                         "window; use 'xla' or 'auto'")
    return impl


def _dense_attention(q: Array, k: Array, v: Array, q_seg: Array, kv_seg: Array, q_pos: Array,
                     kv_pos: Array, q_slot: Array, kv_slot: Array, window: int | None,
                     scale: float, softcap: float) -> Array:
    """Reference attention with the mask built here. q: [b, s, h, d]; k/v: [b, t, kh, d];
    *_seg/*_pos: [b, s] and [b, t]; q_slot [s], kv_slot [t]: slot indices. Softmax in float32.

    Grouped-query heads are handled by a [kh, group] split of the query heads, never by copying k/v.
    """
    b, s, h, d = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, s, kh, h // kh, d)
    logits = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * scale
    if softcap:
        logits = softcap * jnp.tanh(logits / softcap)
    mask = ((kv_slot[None, None, :] <= q_slot[None, :, None])
            & (q_seg[:, :, None] == kv_seg[:, None, :]) & (kv_seg[:, None, :] != 0))
    if window is not None:
        mask = mask & (q_pos[:, :, None] - kv_pos[:, None, :] < window)
    logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
    return out.reshape(b, s, h, d)


def _xla_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, q_offset, window, scale, softcap,
                   block: int) -> Array:
    """Blockwise causal attention in plain XLA: query block i only meets key blocks 0..i (and, on a
    sliding layer with a static window, only the blocks the window reaches), so the fully masked
    upper triangle is never computed or stored -- about half the FLOPs and memory of a dense mask.

    Used when the queries start at slot 0 (training, scoring, prefill); a decode step (one query at
    slot ``q_offset``) takes the dense path over the whole cache.
    """
    s, t = q.shape[1], k.shape[1]
    slots = jnp.arange(max(s, t), dtype=jnp.int32)
    # At most 8 query blocks: each block is its own ops in the program, and 32 blocks of 128 at 4k
    # tokens made compiles 4x longer for little more skipping (7/16 of the square instead of 1/2).
    block = max(block, s // 8) if block else 0
    if isinstance(q_offset, int) and q_offset == 0 and block and s > block and s % block == 0:
        outs = []
        for i in range(s // block):
            q0, q1 = i * block, (i + 1) * block
            k0 = 0
            if window is not None:  # keys more than ``window`` slots back are out of reach
                k0 = max(0, (q0 - window + 1) // block * block)
            sl = slice(k0, min(q1, t))
            outs.append(_dense_attention(
                q[:, q0:q1], k[:, sl], v[:, sl], q_seg[:, q0:q1], kv_seg[:, sl], q_pos[:, q0:q1],
                kv_pos[:, sl], slots[q0:q1], slots[sl], window, scale, softcap))
        return jnp.concatenate(outs, axis=1)
    return _dense_attention(q, k, v, q_seg, kv_seg, q_pos, kv_pos, slots[:s] + q_offset, slots[:t],
                            window, scale, softcap)


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
    if s % 128:
        raise ValueError(f"splash attention needs the sequence length ({s}) to be a multiple of 128")
    block = next(n for n in (512, 256, 128) if s % n == 0)

    def local(q, k, v, seg):
        shape = (s, s)
        base = (sm.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window
                else sm.CausalMask(shape))
        kernel = sk.make_splash_mha(
            sm.MultiHeadMask([base] * q.shape[2]), head_shards=1, q_seq_shards=1,
            block_sizes=sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                                      block_q_dkv=block, block_kv_dkv=block,
                                      block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block),
            attn_logits_soft_cap=cfg.attn_logit_softcap or None,
            interpret=kernel_platform() != "tpu")
        heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
        out = jax.vmap(lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sk.SegmentIds(q=s1, kv=s1)))(
            heads_first(q * scale), heads_first(k), heads_first(v), seg)
        return heads_first(out)

    return _shard_mapped(local, cfg, 3, 1)(q, k, v, segment_ids)


def _flash_gpu_attention(q: Array, k: Array, v: Array, segment_ids: Array, cfg: ModelConfig,
                         scale: float) -> Array:
    """The Pallas GPU flash kernel (Triton): causal, segment ids, so packed rows stay apart.
    q/k/v: [b, s, heads, d] (k/v repeated to all heads). Interpret mode off GPU (tests)."""
    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu  # noqa: PLC0415
    s = q.shape[1]
    block = next((n for n in (128, 64, 32, 16) if s % n == 0), 0)
    if not block:
        raise ValueError(f"the Pallas GPU attention kernel needs the sequence length ({s}) to be a "
                         "multiple of 16")
    sizes = pallas_gpu.BlockSizes(block_q=block, block_k=block, block_q_dkv=block, block_kv_dkv=block,
                                  block_q_dq=block, block_kv_dq=block)

    def local(q, k, v, seg):
        return pallas_gpu.mha(q, k, v, seg, sm_scale=scale, causal=True, block_sizes=sizes,
                              interpret=kernel_platform() != "gpu")

    return _shard_mapped(local, cfg, 3, 1)(q, k, v, segment_ids)


def attention(q: Array, k: Array, v: Array, *, q_segment_ids: Array, kv_segment_ids: Array,
              q_positions: Array, kv_positions: Array, q_offset: Array | int, sliding: Array | bool,
              cfg: ModelConfig) -> Array:
    """The one attention entry point (see the rules above).

    Args:
      q: [batch, s, heads, head_dim]; k, v: [batch, t, kv_heads, head_dim].
      q_segment_ids, q_positions: [batch, s] int32; kv_segment_ids, kv_positions: [batch, t] int32.
      q_offset: the slot of the first query (0 without a cache; the cache index when decoding).
      sliding: whether this is a sliding-window layer (a Python bool, or a traced bool under scan).

    Returns:
      [batch, s, heads, head_dim] in the compute dtype.
    """
    scale = (cfg.query_pre_attn_scalar or cfg.head_size) ** -0.5
    softcap = cfg.attn_logit_softcap
    W = cfg.sliding_window or None
    full_sequence = isinstance(q_offset, int) and q_offset == 0 and q.shape[1] == k.shape[1]
    impl = resolve_attention(cfg) if full_sequence else "xla"  # decoding: dense over the cache

    def run(window: int | None) -> Array:
        if impl == "xla":
            return _xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_positions, kv_positions,
                                  q_offset, window, scale, softcap, cfg.attention_block_size)
        groups = cfg.num_attention_heads // cfg.num_key_value_heads
        if impl == "splash" and cfg.num_key_value_heads % _head_shards(cfg) == 0:
            # GQA natively: each query head reads its group's k/v block (forward and backward), so the
            # [b, s, heads, d] copies of k and v (and their gradients) are never made.
            return _splash_attention(q, k, v, q_segment_ids, cfg, scale, window)
        kr, vr = jnp.repeat(k, groups, 2), jnp.repeat(v, groups, 2)
        if impl == "splash":
            return _splash_attention(q, kr, vr, q_segment_ids, cfg, scale, window)
        if impl == "flash":
            return _flash_gpu_attention(q, kr, vr, q_segment_ids, cfg, scale)
        # cuDNN: causal only (unpacked, right-padded rows: padding keys come after every real query).
        return jax.nn.dot_product_attention(
            q, k, v, scale=scale, is_causal=True, implementation="cudnn",
            local_window_size=(window - 1, 0) if window else None)

    if W is None or sliding is False:
        return run(None)
    if sliding is True:
        return run(W)
    return jax.lax.cond(sliding, lambda: run(W), lambda: run(None))  # mixed layers under scan


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------

@struct.dataclass
class KVCache:
    """Keys and values of every layer, and what attention needs to know of each slot.

    Rows are left-padded to a common prompt length so that all rows write the same slot each step.
    """

    k: Array            # [layers, batch, slots, kv_heads, head_dim]
    v: Array            # [layers, batch, slots, kv_heads, head_dim]
    segment_ids: Array  # [batch, slots] int32: 1 where a real token's key was written, else 0
    positions: Array    # [batch, slots] int32
    index: Array        # int32 scalar: the slot the next call's first token is written to

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, slots: int) -> KVCache:
        shape = (cfg.num_hidden_layers, batch, slots, cfg.num_key_value_heads, cfg.head_size)
        zeros = jnp.zeros(shape, jnp.dtype(cfg.dtype))
        # index 0 as a Python int: the prefill then knows statically that its queries start at slot 0
        # (and takes the blockwise attention path); it becomes an array after the first call.
        return cls(zeros, zeros, jnp.zeros((batch, slots), jnp.int32),
                   jnp.zeros((batch, slots), jnp.int32), 0)


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
                 rng: Array | None = None) -> tuple[Array, tuple[Array, Array] | None]:
        """x: [b, s, e]; positions, segment_ids: [b, s] int32; sliding: this layer's type.

        With ``cache=(k_all, v_all, layer, meta)`` -- every layer's ``[layers, b, slots, kv_heads,
        head_dim]`` keys/values, this layer's index and the cache's slot table (already holding this
        call's tokens) -- the new keys/values are written at ``[layer, :, meta.index]`` and attention
        runs over this layer's slots; the updated stacks are returned. Writing into the stack itself
        (not into a per-layer slice that is then put back) keeps the update in place: the put-back
        form made XLA copy the whole cache twice per layer, 2/3 of a SmolLM2-135M decode step.

        ``rng``: the LoRA dropout key of this layer (training only; None: no dropout).
        """
        cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
        q = _project(self, "q", x, "bse,ehd->bshd", rng)
        k = _project(self, "k", x, "bse,ehd->bshd", rng)
        v = _project(self, "v", x, "bse,ehd->bshd", rng)
        if cfg.qkv_bias:
            q, k, v = (q + self.q_bias[...].astype(dt), k + self.k_bias[...].astype(dt),
                       v + self.v_bias[...].astype(dt))
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cfg.position_embedding == "rope":  # (numpy constants: an array attribute would be state)
            inv_freq = rope_inv_freq(cfg, cfg.head_size)
            if cfg.rope_local_theta and sliding is not False:
                local = rope_inv_freq(cfg, cfg.head_size, local=True)
                inv_freq = local if sliding is True else jnp.where(sliding, local, inv_freq)
            q = rope(q, positions, inv_freq)
            k = rope(k, positions, inv_freq)
        if cache is None:
            out = attention(q, k, v, q_segment_ids=segment_ids, kv_segment_ids=segment_ids,
                            q_positions=positions, kv_positions=positions, q_offset=0,
                            sliding=sliding, cfg=cfg)
            new = None
        else:
            k_all, v_all, layer, meta = cache
            at = (layer, 0, meta.index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k[None].astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, v[None].astype(v_all.dtype), at)
            ck = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False)
            cv = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False)
            out = attention(q, ck.astype(dt), cv.astype(dt), q_segment_ids=segment_ids,
                            kv_segment_ids=meta.segment_ids, q_positions=positions,
                            kv_positions=meta.positions, q_offset=meta.index, sliding=sliding, cfg=cfg)
            new = (k_all, v_all)
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

    def __call__(self, x, positions, segment_ids, sliding, cache=None, rng=None):
        h, cache = self.attn(self.attn_norm(x), positions, segment_ids, sliding, cache, rng)
        x = x + (self.post_attn_norm(h) if self.post_norms else h)
        h = self.mlp(self.mlp_norm(x), rng)  # (each projection folds its own id into ``rng``)
        return x + (self.post_mlp_norm(h) if self.post_norms else h), cache


def _layer_rng(rng: Array | None, layer: Array | int) -> Array | None:
    return None if rng is None else jax.random.fold_in(rng, layer)


REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def _policy(remat: str, lora: bool = False):
    """The checkpoint policy of ``remat``. ``dots`` keeps the outputs of the block's projections
    (matmuls without batch dims); with LoRA each adapted projection is two such matmuls plus a
    low-rank one, so there the policy keeps each projection's summed output by name instead -- the
    same tensors full fine-tuning keeps, not twice as many."""
    if remat not in REMAT_POLICIES:
        raise ValueError(f"model.remat must be one of {', '.join(options.REMAT)}, got {remat!r}")
    if remat == "dots" and lora:
        return jax.checkpoint_policies.save_only_these_names("projection")
    return REMAT_POLICIES[remat]


def _remat(fn, remat: str, lora: bool = False):
    """``fn`` rematerialised in the backward pass as ``remat`` asks (none | full | dots)."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=_policy(remat, lora), prevent_cse=False)


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
                 cache: KVCache | None = None, dropout_rng: Array | None = None
                 ) -> tuple[Array, KVCache | None]:
        """Args:
          tokens: [batch, seq] int32.
          positions: [batch, seq] int32 (restart at 0 per packed segment).
          segment_ids: [batch, seq] int32, 0 = padding; attention never crosses segments.
          cache: optional ``KVCache``; this call's tokens are written at ``cache.index``.
          dropout_rng: key for LoRA dropout (training); None (eval, generation): no dropout.

        Returns:
          hidden states [batch, seq, embed] (after the final norm, compute dtype) and the updated
          cache (None without one).
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
            x, kv = self._scan(x, positions, segment_ids, kinds, meta, remat, dropout_rng)
        else:
            x, kv = self._unrolled(x, positions, segment_ids, kinds, meta, remat, dropout_rng)
        new_cache = None
        if cache is not None:
            new_cache = meta.replace(k=kv[0], v=kv[1],
                                     index=jnp.asarray(cache.index + tokens.shape[1], jnp.int32))
        return self.final_norm(x), new_cache

    def _unrolled(self, x, positions, segment_ids, kinds, meta, remat, rng=None):
        kv = None if meta is None else (meta.k, meta.v)
        for i, layer in enumerate(self.layers):
            if meta is None:
                def call(blk, x_, sliding=kinds[i], rng_i=_layer_rng(rng, i)):
                    return blk(x_, positions, segment_ids, sliding, None, rng_i)[0]
                x = (call if remat == "none" else nnx.remat(call, policy=_policy(remat, bool(self.cfg.lora_rank))))(layer, x)
                continue
            x, kv = layer(x, positions, segment_ids, kinds[i], (*kv, i, meta))
        return x, kv

    def _scan(self, x, positions, segment_ids, kinds, meta, remat, rng=None):
        graphdef, state = nnx.split(self.layers)
        uniform = all(kinds) or not any(kinds)
        flags = jnp.asarray(kinds) if not uniform else None

        def body(carry, xs):
            x, kv = carry
            layer_state, i, flag = xs
            sliding = kinds[0] if uniform else flag
            block = nnx.merge(graphdef, layer_state)
            if kv is None:
                return (block(x, positions, segment_ids, sliding, None, _layer_rng(rng, i))[0], None), None
            x, kv = block(x, positions, segment_ids, sliding, (*kv, i, meta))
            return (x, kv), None

        body = _remat(body, remat, bool(self.cfg.lora_rank))
        kv = None if meta is None else (meta.k, meta.v)
        xs = (state, jnp.arange(self.cfg.num_hidden_layers, dtype=jnp.int32), flags)
        (x, kv), _ = jax.lax.scan(body, (x, kv), xs)
        return x, kv

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
