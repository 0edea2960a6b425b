"""``ModelConfig``: the switches one decoder implementation needs for every supported family.

Built from a base model's ``config.json`` (``trainer.io.hf.model_config_from_hf``) or from the run
spec's ``model`` section for a model trained from scratch (``modeling.model_config``); pure data,
no JAX, so the config checks and the HF readers can import it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

# How a model runs (dtypes, attention backend, remat, layer scanning) and its adapters are the run
# spec's keys: their defaults are read from there, so each is written once.
from trainer.settings.spec import LoraConfig
from trainer.settings.spec import Model as RunModel

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
    dtype: str = RunModel.dtype              # compute dtype
    param_dtype: str = RunModel.param_dtype  # storage dtype
    attention_impl: str = RunModel.attention_impl  # auto | xla | cudnn | flash | splash (``resolve_attention``)
    # Whether rows pack several segments (data.packing): picks the GPU kernel that takes segment ids.
    packed_inputs: bool = False
    # The most segments a packed row holds (data.max_segments_per_row; 0: no bound): cuDNN's attention
    # over packed rows needs one.
    max_segments: int = 0
    # Query block of the XLA attention path: blocks above the causal diagonal are skipped (0: dense);
    # raised to 2 x head_dim and to s / 8 where smaller (``attention._xla_attention``).
    attention_block_size: int = RunModel.attention_block_size
    # Splash's query/key block (0: the largest of 512, 256, 128 dividing the sequence) and whether its
    # backward is the one fused kernel (see ``attention_kernels.splash_attention``).
    splash_block_size: int = RunModel.splash_block_size
    splash_fused_backward: bool = RunModel.splash_fused_backward
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
    remat: str = RunModel.remat
    # Layers as one Block with stacked [layers, ...] params under ``lax.scan``: program size and
    # compile time independent of depth (the accelerator presets turn it on).
    scan_layers: bool = RunModel.scan_layers
    # ---- LoRA (trainer.models.lora): low-rank adapters beside the block projections ----------------
    # out = x W + (alpha / rank) * dropout(x) A B, with A [in..., rank], B [rank, out...]
    # (``nnx.LoRAParam``s, so a filter tells them from the frozen base). rank 0: none.
    lora_rank: int = 0
    lora_alpha: float = LoraConfig.alpha
    lora_dropout: float = LoraConfig.dropout
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
