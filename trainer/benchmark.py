r"""Train-step throughput: tokens/s and MFU of our jitted step, and the PyTorch reference in the same run
(the CLI is ``trainer.bench``).

Both sides train the same architecture (``config.model``, or ``model.hf_path``'s config.json) with
AdamW on the same random full-length batches: ours is ``make_train_step`` under ``jax.jit`` with the
run's shardings and donated state; the reference is the transformers PyTorch model with
``torch.optim.AdamW`` on the CPU (skipped when torch is not installed, or with ``--no_torch``). MFU is
printed where the device's peak bf16 FLOP/s is known (GPUs, TPUs), never for CPUs.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import jax
import numpy as np

from trainer import experiment, hf_io, sharding as sharding_lib
from trainer.flops import flops_per_token, peak_flops
from trainer.model import resolve_attention
from trainer.step import make_optimizer

def batches(n: int, batch: int, seq: int, vocab: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        ids = rng.integers(3, vocab, (batch, seq + 1)).astype(np.int32)
        out.append({"inputs": ids[:, :-1], "targets": ids[:, 1:],
                    "weights": np.ones((batch, seq), np.float32),
                    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
                    "segment_ids": np.ones((batch, seq), np.int32)})
    return out


def bench_ours(config, vocab: int, data: list[dict[str, np.ndarray]], warmup: int) -> dict[str, Any]:
    mesh = experiment.make_mesh(config)
    hf_config, _ = experiment.architecture(config)
    spec = experiment.model_spec(config, vocab, mesh, hf_config)
    if spec.hf_path and not os.path.exists(spec.hf_path):  # a preset's architecture, random weights
        spec = dataclasses.replace(spec, hf_path="")
    tx, schedule = make_optimizer(config.optimizer, len(data))
    state_sh = experiment.state_shardings(spec, tx)
    batch_sh = sharding_lib.batch_sharding(mesh, experiment.rules(config))
    step = experiment.jit_train_step(spec, tx, schedule, config.train.grad_accum_steps, state_sh,
                                     batch_sh, config.train.get("loss_chunk_tokens", 1024))
    state = experiment.init_train_state(spec, tx, config.seed, state_sh)
    device_data = [experiment.global_batch(b, batch_sh) for b in data]
    for b in device_data[:warmup]:  # compile + warm up
        state, m = step(state, b)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for b in device_data[warmup:]:
        state, m = step(state, b)
    jax.block_until_ready(m)
    stats = jax.devices()[0].memory_stats() or {}
    return {"seconds": time.perf_counter() - t0, "cfg": spec.cfg, "loss": float(m["loss"]),
            "peak_bytes": stats.get("peak_bytes_in_use")}


def bench_torch(hf_config: dict[str, Any], data: list[dict[str, np.ndarray]], warmup: int,
                lr: float, dtype: str = "float32") -> dict[str, Any] | None:
    """The transformers model, built in ``dtype`` -- the run's compute dtype, never the checkpoint's
    ``torch_dtype`` (SmolLM2's config says bfloat16: a bf16 reference on a CPU is slow, and the "win"
    against it was not real)."""
    try:
        import torch  # noqa: PLC0415 (test-time/benchmark reference only)
        import transformers  # noqa: PLC0415
    except ImportError:
        return None
    cfg = transformers.AutoConfig.for_model(**hf_config)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model = model.to(getattr(torch, dtype))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)

    def step(b):
        logits = model(input_ids=torch.from_numpy(b["inputs"]).long()).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 torch.from_numpy(b["targets"]).long().flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for b in data[:warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in data[warmup:]:
        loss = step(b)
    return {"seconds": time.perf_counter() - t0, "loss": float(loss), "threads": torch.get_num_threads(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}


def bench(config, batch: int, seq: int, steps: int, warmup: int = 2, use_torch: bool = True,
          vocab: int = 32000) -> dict[str, Any]:
    """Runs both sides; returns tokens/s, MFU and the ratio (also printed as a Markdown table).

    ``vocab`` is used for a model trained from scratch (an imported model keeps its own)."""
    data = batches(steps + warmup, batch, seq, vocab)
    ours = bench_ours(config, vocab, data, warmup)
    cfg = ours["cfg"]
    tokens = batch * seq * steps
    row = {"batch": batch, "seq": seq, "steps": steps, "devices": jax.device_count(),
           "device": jax.devices()[0].device_kind, "dtype": cfg.dtype,
           "ours_tokens_per_s": tokens / ours["seconds"], "attention": resolve_attention(cfg),
           "scan_layers": cfg.scan_layers, "remat": cfg.remat}
    if ours["peak_bytes"]:
        row["peak_memory_gb"] = ours["peak_bytes"] / 1e9
    peak = peak_flops(jax.devices()[0])
    row["mfu"] = (row["ours_tokens_per_s"] * flops_per_token(cfg, seq) / (peak * jax.device_count())
                  if peak else None)
    ref = None
    if use_torch and jax.default_backend() == "cpu":  # same machine, same cores: a fair comparison
        hf_config = experiment.architecture(config)[0] or hf_io.hf_config_from_model(cfg)
        ref = bench_torch({**hf_config, "vocab_size": cfg.vocab_size}, data, warmup,
                          config.optimizer.learning_rate, cfg.dtype)
    if ref:
        row["torch_tokens_per_s"] = tokens / ref["seconds"]
        row["ratio_vs_torch"] = row["ours_tokens_per_s"] / row["torch_tokens_per_s"]
        row["torch_threads"] = ref["threads"]
        row["torch_dtype"] = ref["dtype"]
    lines = ["| device | batch x seq | ours tokens/s (dtype) | MFU | PyTorch tokens/s (dtype) | ratio |",
             "|---|---|---:|---:|---:|---:|",
             f"| {row['devices']} x {row['device']} | {batch} x {seq} | "
             f"{row['ours_tokens_per_s']:,.0f} ({row['dtype']}) | "
             + (f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a") + " | "
             + (f"{row['torch_tokens_per_s']:,.0f} ({row['torch_dtype']}) | {row['ratio_vs_torch']:.2f}x |"
                if ref else "- | - |")]
    print("\n".join(lines), flush=True)
    return row
