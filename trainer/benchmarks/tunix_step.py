"""Tunix's ``PeftTrainer`` train step on the same model shape and batches as ours (``trainer.bench --tunix``).

Tunix (``google-tunix``, bench-only: ``launch/tunix_bench.sh`` installs it) is the JAX fine-tuning
library this project is measured against: same JAX, same XLA, same machine, same process. Its Llama 3
model is built at our model's dimensions with random weights, and its own jitted step
(``PeftTrainer.jit_train_and_eval_step``: ``nnx.value_and_grad`` of its default loss, the global norm,
``optimizer.update``, the optimizer donated) is timed on the same token batches with our optimizer
(``make_optimizer``: global-norm clip, AdamW, the schedule, weight decay by parameter name). Tunix
computes dense attention with a ``[batch, seq, seq]`` mask and the full ``[batch, seq, vocab]``
logits with a one-hot; that is what it does, so that is what is timed.

Only Llama-shaped models compare like for like (no biases, RMSNorm, gated SiLU MLP, RoPE); the
entry point refuses others. Never imported by the trainer: Tunix is not a runtime dependency.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from trainer import host_memory
from trainer.models.config import ModelConfig


def llama_shaped(cfg: ModelConfig) -> str:
    """Why Tunix's Llama 3 is not the same model as ``cfg`` ("" when it is)."""
    differences = [name for name, ok in (
        ("biases", not (cfg.qkv_bias or cfg.o_bias or cfg.mlp_bias)), ("qk_norm", not cfg.qk_norm),
        ("LayerNorm", cfg.norm == "rms"), ("plain MLP", cfg.mlp == "gated"),
        (cfg.activation, cfg.activation == "silu"), ("learned positions", cfg.position_embedding == "rope"),
        ("softcapping", not (cfg.attn_logit_softcap or cfg.final_logit_softcap)),
        ("sliding window", not cfg.sliding_window), ("Gemma norms", not (cfg.post_norms or cfg.norm_offset)))
        if not ok]
    return ", ".join(differences)


def build(cfg: ModelConfig, tx, seed: int = 0):
    """Tunix's Llama 3 at ``cfg``'s dimensions and a ``PeftTrainer`` with ``tx``; returns its jitted step."""
    from flax import nnx  # noqa: PLC0415
    from tunix.models.llama3 import model as llama3  # noqa: PLC0415 (bench-only extra)
    from tunix.sft import peft_trainer  # noqa: PLC0415
    from tunix.sft import utils as sft_utils  # noqa: PLC0415

    config = llama3.ModelConfig(
        num_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size, embed_dim=cfg.hidden_size,
        hidden_dim=cfg.intermediate_size, num_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads,
        num_kv_heads=cfg.num_key_value_heads, rope_theta=int(cfg.rope_theta), norm_eps=cfg.rms_norm_eps,
        weight_tying=cfg.tie_word_embeddings)
    model = llama3.Llama3(config, rngs=nnx.Rngs(seed))
    trainer = peft_trainer.PeftTrainer(model, tx, peft_trainer.TrainingConfig(eval_every_n_steps=10**9))

    def model_inputs(x: dict[str, Any]) -> dict[str, Any]:  # what Tunix's SFT examples pass
        return {"input_tokens": x["input_tokens"], "input_mask": x["input_mask"],
                "positions": sft_utils.build_positions_from_mask(x["input_mask"]),
                "attention_mask": sft_utils.make_causal_attn_mask(x["input_mask"])}

    trainer = trainer.with_gen_model_input_fn(model_inputs)
    step, _ = trainer.jit_train_and_eval_step()
    return step


def bench_tunix(cfg: ModelConfig, data: list[dict[str, np.ndarray]], warmup: int, tx) -> dict[str, Any]:
    """Seconds for ``data[warmup:]``, and for building the model and its first step.

    Each batch's ``inputs`` (``[batch, seq]``) are Tunix's ``input_tokens``: the model runs on the same
    ``seq`` tokens as ours (its loss then has ``seq - 1`` targets a row). ``seconds``: under this
    process's settings (on CPU ours keep freed memory, ``trainer.host_memory``). ``timed`` times the
    same steps again under whatever settings are in force: ``trainer.bench --tunix`` has it take turns
    with ours, and also runs it under glibc's malloc settings, as Tunix runs on its own."""
    if cfg.dtype != "float32":
        raise ValueError(f"Tunix's Llama 3 computes in float32; this model's dtype is {cfg.dtype}")
    t0 = time.perf_counter()
    step = build(cfg, tx)
    build_s = time.perf_counter() - t0
    inputs = [{"input_tokens": jnp.asarray(b["inputs"]), "input_mask": jnp.ones(b["inputs"].shape, bool)}
              for b in data]
    t0 = time.perf_counter()
    loss, _, _ = step(inputs[0])
    jax.block_until_ready(loss)
    first_step_s = time.perf_counter() - t0
    for x in inputs[1:warmup]:
        loss, _, _ = step(x)
    jax.block_until_ready(loss)

    last = {}

    def timed() -> float:
        """Seconds for the timed batches, after untimed steps until one makes no page faults
        (``timing.timed_rounds``)."""
        host_memory.settle(lambda: jax.block_until_ready(step(inputs[0])[0]))
        t0 = time.perf_counter()
        for x in inputs[warmup:]:
            last["loss"], _, _ = step(x)
        jax.block_until_ready(last["loss"])
        return time.perf_counter() - t0

    seconds = timed()
    return {"seconds": seconds, "timed": timed, "loss": float(last["loss"]), "build_s": build_s,
            "first_step_s": first_step_s}


def median_table(outdir: str) -> str:
    """The README's table from ``launch/tunix_bench.sh``'s JSON rows: medians over the processes (each
    row's own numbers are already medians of its rounds)."""
    import glob  # noqa: PLC0415
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415
    shapes: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(glob.glob(os.path.join(outdir, "*_*.json"))):
        with open(path) as f:
            shapes.setdefault(os.path.basename(path).rsplit("_", 1)[0], []).append(json.load(f))
    lines = ["| shape | batch x seq | ours tokens/s | Tunix tokens/s | ours / Tunix | Tunix, glibc's malloc: "
             "tokens/s, ours / it | build + first step: ours | Tunix | processes x rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, rows in shapes.items():
        med = {k: float(np.median([r.get(k, np.nan) for r in rows])) for k in (
            "ours_tokens_per_s", "tunix_tokens_per_s", "ratio_vs_tunix", "ours_build_s", "ours_first_step_s",
            "tunix_build_s", "tunix_first_step_s", "tunix_glibc_tokens_per_s", "ratio_vs_tunix_glibc")}
        lines.append(f"| {name} | {rows[0]['batch']} x {rows[0]['seq']} | {med['ours_tokens_per_s']:,.0f} | "
                     f"{med['tunix_tokens_per_s']:,.0f} | {med['ratio_vs_tunix']:.2f}x | "
                     f"{med['tunix_glibc_tokens_per_s']:,.0f}, {med['ratio_vs_tunix_glibc']:.2f}x | "
                     f"{med['ours_build_s']:.1f} + {med['ours_first_step_s']:.1f} s | "
                     f"{med['tunix_build_s']:.1f} + {med['tunix_first_step_s']:.1f} s | "
                     f"{len(rows)} x {rows[0].get('rounds', 1)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys  # noqa: PLC0415
    print(median_table(sys.argv[1] if len(sys.argv) > 1 else "runs/tunix_bench"))
