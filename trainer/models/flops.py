"""Model FLOPs and device peaks: one formula for ``trainer.bench``, the training loop's MFU and the
ahead-of-time fit check (``--dry_run``)."""

from __future__ import annotations

from typing import Any

# Peak dense bf16 FLOP/s per chip (vendor figures), matched against ``device_kind``: the longest key
# it contains wins, so "TPU v5 lite" (v5e) is not taken for "TPU v5" (what a v5p reports).
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
              "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5": 459e12,
              "TPU v5p": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12}


# Memory per chip (HBM), GB, for the dry run's verdict (``--device_memory_gb`` overrides).
DEVICE_MEMORY_GB = {"H200": 141, "H100": 80, "A100": 80, "L4": 24, "TPU v4": 32, "TPU v5 lite": 16,
                    "TPU v5": 95, "TPU v6 lite": 32}


def _by_kind(table: dict[str, float], device: Any) -> float | None:
    """The entry whose key is the longest part of the device's kind ("TPU v5 lite" is a v5e, not the
    "TPU v5" a v5p reports), or None where unknown (CPUs)."""
    kind = getattr(device, "device_kind", "")
    keys = [k for k in table if k in kind]
    return table[max(keys, key=len)] if keys else None


def peak_flops(device: Any) -> float | None:
    """The device's peak bf16 FLOP/s, or None where unknown (CPUs)."""
    return _by_kind(PEAK_FLOPS, device)


def device_memory_gb(device: Any) -> float | None:
    """The device's memory in GB (HBM), or None where unknown."""
    return _by_kind(DEVICE_MEMORY_GB, device)


def matmul_params(cfg) -> int:
    """Parameters that take part in a matmul per token (all but norms, biases and the embedding
    lookup; the LM head counts)."""
    e, f, h, k, d, n = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                        cfg.num_key_value_heads, cfg.head_size, cfg.num_hidden_layers)
    per_layer = e * d * (2 * h + 2 * k) + e * f * (3 if cfg.mlp == "gated" else 2)
    return n * per_layer + e * cfg.vocab_size


def flops_per_token(cfg, seq: int) -> float:
    """Training FLOPs per token: 6 x matmul parameters + causal attention (6 x 2 x layers x heads x
    head_dim x seq / 2: scores and values, forward and backward, half the square)."""
    n, h, d = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size
    return 6 * matmul_params(cfg) + 12 * n * h * d * seq / 2
