"""Hugging Face Llama <-> our parameters (layout mapping only; file I/O builds on this).

HF stores linear weights as ``[out, in]``; we store ``[in, out]`` with attention split per head
(``q: [embed, heads, head_dim]``), so every mapping is a transpose plus a reshape. Both sides use the
"rotate half" RoPE layout, so q/k need no permutation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from trainer.model import ModelConfig


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """Our ``ModelConfig`` from a Llama ``config.json`` dict."""
    if hf.get("model_type") not in ("llama",):
        raise ValueError(f"unsupported model_type {hf.get('model_type')!r}; supported: llama")
    if hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        raise ValueError("RoPE scaling is not supported yet")
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta,
        tie_word_embeddings=hf.get("tie_word_embeddings", False),
        max_position_embeddings=hf.get("max_position_embeddings", 2048), **overrides)


def llama_params_from_hf(sd: Mapping[str, np.ndarray], cfg: ModelConfig) -> dict[str, Any]:
    """Maps an HF Llama state dict (numpy arrays, ``model.`` prefix) to our pure param dict."""
    e, h, k, d = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size

    def get(name: str) -> np.ndarray:
        return np.asarray(sd[name], np.float32)

    layers = {}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        layers[i] = {
            "attn_norm": {"scale": get(p + "input_layernorm.weight")},
            "attn": {
                "q": get(p + "self_attn.q_proj.weight").T.reshape(e, h, d),
                "k": get(p + "self_attn.k_proj.weight").T.reshape(e, k, d),
                "v": get(p + "self_attn.v_proj.weight").T.reshape(e, k, d),
                "o": get(p + "self_attn.o_proj.weight").T.reshape(h, d, e),
            },
            "mlp_norm": {"scale": get(p + "post_attention_layernorm.weight")},
            "mlp": {
                "gate": get(p + "mlp.gate_proj.weight").T,
                "up": get(p + "mlp.up_proj.weight").T,
                "down": get(p + "mlp.down_proj.weight").T,
            },
        }
    params = {"embed": get("model.embed_tokens.weight"), "layers": layers,
              "final_norm": {"scale": get("model.norm.weight")}}
    if not cfg.tie_word_embeddings:
        params["lm_head"] = get("lm_head.weight").T
    return params
