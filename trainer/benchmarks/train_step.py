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

from trainer import host_memory
from trainer import sharding as sharding_lib
from trainer.benchmarks.memory import compiled_memory, state_bytes
from trainer.benchmarks.timing import host_cpu, timed_rounds
from trainer.benchmarks.torch_reference import TorchProcess, batches
from trainer.io import hf as hf_io
from trainer.models.attention import resolve_attention
from trainer.models.flops import flops_per_token, peak_flops
from trainer.settings.spec import RunSpec
from trainer.training import experiment, modeling
from trainer.training.step import make_optimizer


def bench_ours(config: RunSpec, vocab: int, data: list[dict[str, np.ndarray]], warmup: int) -> dict[str, Any]:
    t_build = time.perf_counter()
    mesh = modeling.make_mesh(config)
    hf_config, _ = modeling.architecture(config)
    spec = modeling.model_spec(config, vocab, mesh, hf_config)
    if spec.hf_path and not os.path.exists(spec.hf_path):  # a preset's architecture, random weights
        spec = dataclasses.replace(spec, hf_path="")
    tx, schedule = make_optimizer(config.optimizer, len(data))
    state_sh = experiment.state_shardings(spec, tx)
    batch_sh = sharding_lib.batch_sharding(mesh, modeling.rules(config))
    step = experiment.jit_train_step(spec, tx, schedule, config.train.grad_accum_steps, state_sh,
                                     batch_sh, experiment.loss_chunk_tokens(config, batch_sh))
    # as a run starts (``trainer.training.loop``): the step compiles while the state is built, so the
    # compile is split between build_s and first_step_s; their sum is the start's
    step = experiment.compile_train_step_ahead(step, experiment.abstract_state(spec, tx, state_sh),
                                               *data[0]["inputs"].shape, batch_sh)
    state = experiment.init_train_state(spec, tx, config.seed, state_sh)
    jax.block_until_ready(state)
    build_s = time.perf_counter() - t_build
    device_data = [experiment.global_batch(b, batch_sh) for b in data]
    t0 = time.perf_counter()
    state, m = step(state, device_data[0])  # compile + the first step
    jax.block_until_ready(m)
    first_step_s = time.perf_counter() - t0
    for b in device_data[1:warmup]:  # warm up
        state, m = step(state, b)
    jax.block_until_ready(m)
    live = {"state": state}

    def untimed() -> None:
        live["state"], m = step(live["state"], device_data[0])
        jax.block_until_ready(m)

    def timed() -> float:
        """Seconds for the timed batches, after untimed steps until one makes no page faults
        (``timed_rounds``); the state trains on (it is donated)."""
        host_memory.settle(untimed)
        state = live["state"]
        t0 = time.perf_counter()
        for b in device_data[warmup:]:
            state, m = step(state, b)
        jax.block_until_ready(m)
        live.update(state=state, loss=m["loss"])
        return time.perf_counter() - t0

    seconds = timed()
    state = live["state"]
    stats = jax.devices()[0].memory_stats() or {}
    # The step's own footprint per device, from XLA's buffer assignment (the executable is cached:
    # no second compile): state and batch + temporaries, less what donation lets outputs reuse.
    mem = compiled_memory(step.lower(state, device_data[0]).compile())
    step_bytes = mem["total"] if mem is not None else None
    return {"seconds": seconds, "timed": timed, "cfg": spec.cfg, "loss": float(live["loss"]),
            "step_bytes": step_bytes, "build_s": build_s, "first_step_s": first_step_s,
            "peak_bytes": stats.get("peak_bytes_in_use"), "state_bytes": state_bytes(state),
            "trainable": sum(x.size for x in jax.tree.leaves(state.params))}


# ``trainer.bench --lora``: the same model and batches under each of these, smallest state first.
# "step GB" is XLA's buffer assignment for the step (state + batch + temporaries): per variant, exact.
# "peak GB" is the device's peak counter, which only grows within a process and here includes the
# random init (a float base quantised on the device; a real run quantises HF weights on the host):
# "<=" marks a reading that did not grow past the previous variant's.
LORA_VARIANTS = (("QLoRA nf4", {"base_quant": "nf4"}), ("QLoRA int8", {"base_quant": "int8"}),
                 ("LoRA, bf16 base", {"base_dtype": "bfloat16"}), ("LoRA", {}), ("full fine-tuning", None))


def lora_variant(config: RunSpec, rank: int, extra: dict[str, Any] | None) -> RunSpec:
    return config.replace(lora=dataclasses.replace(config.lora, rank=0 if extra is None else rank,
                                                   **(extra or {})))


def bench_lora(config: RunSpec, batch: int, seq: int, steps: int, rank: int = 16, dry: bool = False,
               vocab: int = 32000, num_devices: int | None = None, warmup: int = 2) -> list[dict[str, Any]]:
    """Full fine-tuning vs LoRA vs QLoRA on one model: trainable parameters, bytes per device of the
    trainable params, optimizer state and frozen base, and (unless ``dry``) step time and peak memory.
    ``dry``: the ahead-of-time compile of ``trainer.benchmarks.dry_run`` instead of steps (a model too large to
    run here), with XLA's per-device total."""
    from trainer.benchmarks import dry_run as dry_lib  # noqa: PLC0415
    rows = []
    data = None if dry else batches(steps + warmup, batch, seq, vocab)
    for name, extra in LORA_VARIANTS:
        c = lora_variant(config, rank, extra)
        row: dict[str, Any] = {"variant": name, "rank": 0 if extra is None else rank}
        if dry:
            c = c.replace(train=dataclasses.replace(c.train, batch_size=batch),
                          data=dataclasses.replace(c.data, max_length=seq))
            r = dry_lib.dry_run(c, num_devices, quiet=True)
            row.update(trainable=r["trainable_parameters"], state_bytes=r["state_bytes_per_device"],
                       total_bytes=r["memory_per_device_bytes"]["total"])
        else:
            o = bench_ours(c, vocab, data, warmup)
            row.update(trainable=o["trainable"], state_bytes=o["state_bytes"], loss=o["loss"],
                       step_s=o["seconds"] / steps, tokens_per_s=batch * seq * steps / o["seconds"],
                       peak_bytes=o["peak_bytes"], step_bytes=o["step_bytes"])
        rows.append(row)
    for prev, r in zip(rows, rows[1:]):
        r["peak_is_upper_bound"] = bool(r.get("peak_bytes")) and r["peak_bytes"] == prev.get("peak_bytes")
    gb = 1e9
    head = ("| variant | trainable params | params GB/device | optimizer GB/device | frozen base GB/device | "
            + ("XLA total GB/device |" if dry else "step s | tokens/s | step GB/device (XLA) | peak GB |"))
    lines = [head, "|---|" + "---:|" * (head.count("|") - 2)]
    for r in rows:
        b = r["state_bytes"]
        cells = [r["variant"] + (f" (r={r['rank']})" if r["rank"] else ""), f"{r['trainable'] / 1e6:,.2f}M",
                 f"{b['params'] / gb:.3f}", f"{b['opt_state'] / gb:.3f}", f"{b['frozen'] / gb:.3f}"]
        if dry:
            cells.append(f"{r['total_bytes'] / gb:.2f}")
        else:
            cells += [f"{r['step_s']:.3f}", f"{r['tokens_per_s']:,.0f}",
                      f"{r['step_bytes'] / gb:.2f}" if r["step_bytes"] else "n/a",
                      ("<= " if r.get("peak_is_upper_bound") else "") + f"{r['peak_bytes'] / gb:.2f}"
                      if r["peak_bytes"] else "n/a"]
        lines.append("| " + " | ".join(cells) + " |")
    print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, batch {batch} x {seq}"
          + ("" if dry else f", {steps} timed steps"), flush=True)
    print("\n".join(lines), flush=True)
    return rows


def bench(config: RunSpec, batch: int, seq: int, steps: int, warmup: int = 2, use_torch: bool = True,
          vocab: int = 32000, tunix: bool = False, rounds: int = 1) -> dict[str, Any]:
    """Runs both sides; returns tokens/s, MFU and the ratio (also printed as a Markdown table).

    ``vocab`` is used for a model trained from scratch (an imported model keeps its own). ``tunix``:
    also Tunix's ``PeftTrainer`` step (``trainer.benchmarks.tunix_step``), and both sides' model build
    and first step (compile). ``rounds``: each side times its ``steps`` this many times, the sides
    taking turns in alternating order (``timed_rounds``); tokens/s are the medians of the rounds, a
    ratio is the median of the rounds' ratios -- both sides measured on the same minutes, so a
    machine whose speed drifts moves both."""
    data = batches(steps + warmup, batch, seq, vocab)
    ours = bench_ours(config, vocab, data, warmup)
    cfg = ours["cfg"]
    tokens = batch * seq * steps
    row = {"batch": batch, "seq": seq, "steps": steps, "devices": jax.device_count(),
           "ours_build_s": ours["build_s"], "ours_first_step_s": ours["first_step_s"],
           "device": jax.devices()[0].device_kind, "dtype": cfg.dtype,
           "attention": resolve_attention(cfg), "scan_layers": cfg.scan_layers, "remat": cfg.remat,
           "cpu": host_cpu()}
    sides = {"ours": (ours["seconds"], ours["timed"])}
    processes: list[TorchProcess] = []
    try:
        if use_torch and jax.default_backend() == "cpu":  # same machine, same cores: a fair comparison
            facts, processes = _torch_sides(config, cfg, (len(data), batch, seq, vocab), warmup, sides)
            row.update(facts)
        if tunix:
            row.update(_tunix_sides(config, cfg, data, warmup, sides))
        seconds = timed_rounds(sides, rounds)
    finally:
        for p in processes:
            p.close()
    row.update(rounds=rounds, seconds_per_round=seconds)
    for name, s in seconds.items():
        row[f"{name}_tokens_per_s"] = tokens / float(np.median(s))
        if name != "ours":
            row[f"ratio_vs_{name}"] = float(np.median(np.asarray(s) / np.asarray(seconds["ours"])))
    if ours["peak_bytes"]:
        row["peak_memory_gb"] = ours["peak_bytes"] / 1e9
    peak = peak_flops(jax.devices()[0])
    row["mfu"] = (row["ours_tokens_per_s"] * flops_per_token(cfg, seq) / (peak * jax.device_count())
                  if peak else None)
    print("\n".join(_table(row, batch, seq)), flush=True)
    return row


def _under_glibc(timed):
    """``timed`` run under glibc's malloc settings (``host_memory.glibc_defaults``)."""
    def run() -> float:
        with host_memory.glibc_defaults():
            return timed()
    return run


def _torch_sides(config: RunSpec, cfg: Any, shape: tuple[int, int, int, int], warmup: int,
                 sides: dict[str, tuple[float, Any]]) -> tuple[dict[str, Any], list[TorchProcess]]:
    """Adds PyTorch to ``sides``, in a process of its own (``torch_reference``): as it runs on its own
    (glibc's malloc settings), and, where ours changed them (``trainer.host_memory``: a CPU run keeps
    freed memory), in a second process under ours -- they spare PyTorch's step its page faults too.
    ``shape``: ``batches``' arguments for the same data. Returns the row's PyTorch facts and the
    processes (``bench`` ends them)."""
    hf_config = modeling.architecture(config)[0] or hf_io.hf_config_from_model(cfg)
    args = ({**hf_config, "vocab_size": cfg.vocab_size}, shape, warmup, config.optimizer.learning_rate, cfg.dtype)
    ref = TorchProcess(*args, keep_freed_memory=False)
    if ref.first is None:  # no torch installed
        ref.close()
        return {}, []
    sides["torch"] = (ref.first["seconds"], ref.timed)
    processes = [ref]
    if host_memory.applied():
        kept = TorchProcess(*args, keep_freed_memory=True)
        sides["torch_kept_memory"] = (kept.first["seconds"], kept.timed)
        processes.append(kept)
    return {"torch_threads": ref.first["threads"], "torch_dtype": ref.first["dtype"]}, processes


def _tunix_sides(config: RunSpec, cfg: Any, data: list[dict[str, np.ndarray]], warmup: int,
                 sides: dict[str, tuple[float, Any]]) -> dict[str, Any]:
    """Adds Tunix's step to ``sides``, under ours settings and under glibc's (as it runs on its own);
    returns its build and first-step seconds."""
    from trainer.benchmarks.tunix_step import bench_tunix, llama_shaped  # noqa: PLC0415 (bench-only extra)
    if why := llama_shaped(cfg):
        raise ValueError(f"--tunix compares with Tunix's Llama 3, and this model is not Llama-shaped ({why})")
    t = bench_tunix(cfg, data, warmup, make_optimizer(config.optimizer, len(data))[0])
    sides["tunix"] = (t["seconds"], t["timed"])
    glibc = _under_glibc(t["timed"])  # as Tunix runs on its own, malloc-wise
    sides["tunix_glibc"] = (glibc(), glibc)
    return {"tunix_build_s": t["build_s"], "tunix_first_step_s": t["first_step_s"]}


def _table(row: dict[str, Any], batch: int, seq: int) -> list[str]:
    lines = [f"host CPU: {row['cpu']}", "",
             "| device | batch x seq | ours tokens/s (dtype) | MFU | PyTorch tokens/s (dtype) | ratio |",
             "|---|---|---:|---:|---:|---:|",
             f"| {row['devices']} x {row['device']} | {batch} x {seq} | "
             f"{row['ours_tokens_per_s']:,.0f} ({row['dtype']}) | "
             + (f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a") + " | "
             + (f"{row['torch_tokens_per_s']:,.0f} ({row['torch_dtype']}) | {row['ratio_vs_torch']:.2f}x |"
                if "torch_tokens_per_s" in row else "- | - |")]
    if row.get("rounds", 1) > 1:
        lines += ["", f"(medians of {row['rounds']} rounds, the sides taking turns; a ratio is the median of "
                  "the rounds' ratios)"]
    if "torch_kept_memory_tokens_per_s" in row:
        lines += ["", "PyTorch with our malloc settings (trainer.host_memory): "
                  f"{row['torch_kept_memory_tokens_per_s']:,.0f} tokens/s, ours / it "
                  f"{row['ratio_vs_torch_kept_memory']:.2f}x"]
    if "tunix_tokens_per_s" in row:
        lines += ["", "| Tunix PeftTrainer tokens/s | ours / Tunix | Tunix, glibc's malloc: tokens/s, ours / it "
                  "| build + first step: ours | Tunix |",
                  "|---:|---:|---:|---:|---:|",
                  f"| {row['tunix_tokens_per_s']:,.0f} | {row['ratio_vs_tunix']:.2f}x | "
                  f"{row['tunix_glibc_tokens_per_s']:,.0f}, {row['ratio_vs_tunix_glibc']:.2f}x | "
                  f"{row['ours_build_s']:.1f} + {row['ours_first_step_s']:.1f} s | "
                  f"{row['tunix_build_s']:.1f} + {row['tunix_first_step_s']:.1f} s |"]
    return lines
