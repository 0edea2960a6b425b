"""Ahead-of-time fit check: compile the run's programs from abstract shapes and say whether they fit.

    python -m trainer.train --config configs/llama3_8b_tpu.py --dry_run --topology v5p:4x4x4
    python -m trainer.train --config C --dry_run [--dry_run_devices 32] [--device_memory_gb 16]

``--topology`` compiles with the real TPU compiler for a slice this machine does not have
(``trainer.benchmarks.topology``): the mesh spans the slice's chips, the attention backend is the one
those chips get (splash), and the memory, FLOPs and collectives are the TPU executable's own.

No weights are read and no data is touched: the mesh is built (``--dry_run_devices N`` rehearses an
N-device mesh on virtual CPU devices), the state and batch exist only as ``ShapeDtypeStruct``s with
their shardings, and the train step, the eval step and generation are lowered and compiled. XLA then
reports per-device memory (arguments, outputs, temporaries), FLOPs and the collectives each program
runs; next to them, the 6N + attention formula of ``trainer.models.flops``.

A preset whose checkpoint is not on this machine dry-runs from the architecture kept beside it
(``model.arch_json``, e.g. ``configs/hf/llama3_1_8b.json``). Without ``--topology`` the numbers are
the CPU compiler's: buffer assignment follows the same shardings, but fusion (and so temporaries)
differs from a TPU's or GPU's -- a rehearsal that catches an unshardable or grossly oversized
config before paying for the pod, not a guarantee to the last gigabyte.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from trainer import sharding as sharding_lib
from trainer.benchmarks.memory import compiled_memory, state_bytes
from trainer.benchmarks.topology import collective_bytes
from trainer.errors import UserError
from trainer.evaluation.generate import make_generate_fn, model_gather_plan
from trainer.io import base_checkpoint as base_ckpt
from trainer.models import flops as flops_lib
from trainer.models.attention_kernels import splash_block
from trainer.models.flops import flops_per_token, peak_flops
from trainer.settings import checks as config_checks
from trainer.settings.spec import RunSpec
from trainer.training import experiment, modeling
from trainer.training.step import make_optimizer

GB = 1e9


def dry_run(config: RunSpec, devices: list[Any] | int | None = None,
            device_memory_gb: float | None = None, quiet: bool = False) -> dict[str, Any]:
    """Compiles the train step, the eval step and generation for ``config`` over ``devices`` (this
    machine's when None, its first N for an int; a TPU topology's from ``topology.tpu_devices``) from
    abstract shapes; prints
    and returns parameters, FLOPs, per-device memory, collectives and a verdict per program."""
    devices = jax.devices()[:devices] if isinstance(devices, int) else list(devices or jax.devices())
    processes = len({d.process_index for d in devices})
    problems = config_checks.problems(config, len(devices), processes, check_paths=False)
    if problems:
        raise UserError("the config has problems:\n  " + "\n  ".join(problems))
    hf_config, source = modeling.architecture(config)
    try:
        mesh = sharding_lib.make_mesh(dataclasses.asdict(config.mesh), devices)
    except ValueError as e:
        raise UserError(str(e)) from e
    vocab = int(hf_config["vocab_size"]) if hf_config else int(config.tokenizer.vocab_size)
    spec = modeling.model_spec(config, vocab, mesh, hf_config)
    t, seq = config.train, config.data.max_length
    tx, schedule = make_optimizer(config.optimizer, t.num_steps)
    state_sh = experiment.state_shardings(spec, tx)
    batch_sh = sharding_lib.batch_sharding(mesh, modeling.rules(config))
    abstract = experiment.abstract_state(spec, tx, state_sh)
    chunk = experiment.loss_chunk_tokens(config, batch_sh)

    memory_gb = device_memory_gb or flops_lib.device_memory_gb(devices[0])
    programs = {
        "train_step": _compile(experiment.jit_train_step(
            spec, tx, schedule, t.grad_accum_steps, state_sh, batch_sh, chunk), abstract,
            experiment.abstract_batch(t.batch_size, seq, batch_sh)),
        "eval_step": _compile(experiment.jit_eval_step(spec, batch_sh, chunk), abstract.model_params,
                              experiment.abstract_batch(t.eval_batch_size, seq, batch_sh)),
        "generate": _compile_generate(config, spec, abstract.model_params,
                                      memory_gb * GB if memory_gb else None),
    }
    trainable = sum(x.size for x in jax.tree.leaves(abstract.params))
    params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(spec.init_params_fn(0))))  # + adapters
    formula = flops_per_token(spec.cfg, seq) * t.batch_size * seq
    out = {
        "devices": len(devices), "processes": processes, "device_kind": devices[0].device_kind,
        "platform": devices[0].platform, "mesh": dict(mesh.shape),
        "architecture": source or "config.model (from scratch)", "parameters": params,
        "trainable_parameters": trainable, "state_bytes_per_device": state_bytes(abstract),
        "batch": t.batch_size, "seq": seq, "grad_accum_steps": t.grad_accum_steps,
        "dtype": spec.cfg.dtype, "scan_layers": spec.cfg.scan_layers, "remat": spec.cfg.remat,
        "attention": spec.cfg.attention_impl, "flops_per_step_formula": formula,
        "splash": ({"block": splash_block(spec.cfg, seq), "fused_backward": spec.cfg.splash_fused_backward}
                   if spec.cfg.attention_impl == "splash" else None),
        "programs": programs,
        # the train step's figures at the top level, as before programs were listed
        "compile_s": programs["train_step"]["compile_s"],
        "flops_per_step_xla_per_device": programs["train_step"]["flops"],
        "memory_per_device_bytes": programs["train_step"]["memory"],
    }
    base = spec.abstract_base()
    out["base_bytes"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(base))
    out["base_read_per_process_bytes"] = max(base_ckpt.bytes_read_per_process(base).values())
    # During training, the eval step and generation run beside the optimizer state (their arguments
    # are the parameters, which the state holds anyway): with generation's gathered weights (and a
    # small slice's shards) that is what decides whether an in-training eval fits.
    beside = out["state_bytes_per_device"]["opt_state"]
    out["in_training_bytes"] = {n: p["memory"]["total"] + (beside if n != "train_step" else 0)
                                for n, p in programs.items() if p["memory"] is not None}
    if memory_gb:
        out["device_memory_gb"] = memory_gb
        out["fits"] = (len(out["in_training_bytes"]) == len(programs)
                       and max(out["in_training_bytes"].values()) <= memory_gb * GB)
    if peak := peak_flops(devices[0]):
        out["seconds_per_step_at_peak"] = formula / (peak * len(devices))
        out["seconds_per_step_at_40pct_mfu"] = out["seconds_per_step_at_peak"] / 0.4
    if not quiet:
        print(report(out), flush=True)
    return out


def _refusal(message: str) -> dict[str, Any]:
    """What the compiler's RESOURCE_EXHAUSTED says, in a line: out of the chip's memory (HBM), or of a
    Pallas kernel's on-chip scratch (VMEM: its blocks, not the model, are too large)."""
    vmem = re.search(r"Scoped allocation with size ([0-9.]+)M and limit ([0-9.]+)M exceeded", message)
    if vmem:
        # The limit is a compiler flag. Given just the space asked for, the compiler plans for more (a
        # v5p's 2,048-token blocks needed 29.73 MiB under 16, 31.88 under 30), so the hint doubles it.
        kib = 1024 * 2 ** math.ceil(math.log2(2 * float(vmem.group(1))))
        return {"error": f"a Pallas kernel needs {vmem.group(1)} MiB of the chip's VMEM (on-chip scratch), "
                         f"over the compiler's {vmem.group(2)} MiB limit: smaller blocks "
                         f"(model.splash_block_size), or a higher limit "
                         f"(LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib={kib})",
                "vmem": True}
    return {"error": (message.strip().splitlines() or [""])[0][:300]}


def _compile(fn, *args) -> dict[str, Any]:
    """Lowers and compiles ``fn`` for ``args`` (abstract, with shardings): per-device memory, FLOPs,
    collective bytes and the compile time."""
    t0 = time.perf_counter()
    try:
        compiled = fn.lower(*args).compile()
    except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses a program that cannot fit
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return {"compile_s": time.perf_counter() - t0, "memory": None, "flops": 0.0,
                "collective_bytes": {}, "custom_calls": {}, **_refusal(str(e))}
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {"compile_s": compile_s, "memory": compiled_memory(compiled),
            "flops": float((cost or {}).get("flops", 0.0)),
            "collective_bytes": collective_bytes(compiled.as_text()),
            # each target's call count: kernels (a Mosaic TPU kernel is "tpu_custom_call") and how
            # often the step runs them -- a remat policy that recomputes attention runs its forward twice
            "custom_calls": dict(collections.Counter(re.findall(r'custom_call_target="([^"]+)"',
                                                                 compiled.as_text())))}


def _compile_generate(config: RunSpec, spec: modeling.ModelSpec, params: Any, memory_bytes: float | None
                      ) -> dict[str, Any]:
    """Generation as ``trainer.eval`` runs it: ``eval.batch_size`` prompts of ``data.max_length``
    tokens (a fine-tuned model's zero-shot prompt is at most a training row), ``eval.max_new_tokens``,
    the weights gathered as ``eval.gather_weights`` decides for the target's memory."""
    e = config.eval
    generate = make_generate_fn(spec.graphdef, max_new_tokens=e.max_new_tokens, eos_ids=[0], pad_id=0,
                                mesh=spec.mesh, param_shardings=spec.param_shardings,
                                gather=e.gather_weights, memory_bytes=memory_bytes)
    rows = jax.ShapeDtypeStruct((e.batch_size, config.data.max_length), jnp.int32)
    valid = jax.ShapeDtypeStruct(rows.shape, jnp.bool_)
    out = _compile(generate, params, rows, valid, jax.ShapeDtypeStruct((2,), jnp.uint32))
    gathered, size = model_gather_plan(params, spec.param_shardings, spec.cfg, spec.mesh, e.gather_weights,
                                       memory_bytes)
    out["weights"] = (f"gathered once per batch ({size / GB:.2f} GB per device)" if gathered is not None
                      else "split as in training, gathered where used")
    return out


def report(r: dict[str, Any]) -> str:
    lines = [
        f"dry run: {r['devices']} x {r['device_kind']} ({r['processes']} processes), mesh {r['mesh']}",
        f"  model: {r['parameters'] / 1e6:,.1f}M parameters ({r['architecture']}), "
        f"{r['trainable_parameters'] / 1e6:,.1f}M trained, {r['dtype']} compute, "
        f"scan_layers={r['scan_layers']}, remat={r['remat']}, attention={r['attention']}"
        + (f" (block {r['splash']['block']}, "
           f"{'fused backward' if r['splash']['fused_backward'] else 'dK/dV and dQ kernels'})"
           if r.get("splash") else ""),
        f"  train step: {r['batch']} x {r['seq']} tokens, grad_accum_steps={r['grad_accum_steps']}; "
        f"{r['flops_per_step_formula'] / 1e12:,.2f} TFLOPs by 6N + attention "
        f"({r['flops_per_step_formula'] / r['devices'] / 1e12:,.2f} T per device)",
    ]
    for name, p in r["programs"].items():
        if p.get("error"):
            lines.append(f"  {name}: the compiler refused it: {p['error']}")
            continue
        m = p["memory"]
        moved = ", ".join(f"{k} {v / GB:.3f}" for k, v in p["collective_bytes"].items() if v)
        lines += [f"  {name}: compiled in {p['compile_s']:.1f}s; XLA: {p['flops'] / 1e12:,.2f} TFLOPs per "
                  f"device; memory per device: arguments {m['arguments'] / GB:.2f} GB, outputs "
                  f"{m['outputs'] / GB:.2f} GB (aliased {m['aliased'] / GB:.2f}), temporaries "
                  f"{m['temporaries'] / GB:.2f} GB -> {m['total'] / GB:.2f} GB",
                  f"    collectives per device (GB): {moved or 'none'}"]
        if "weights" in p:
            lines.append(f"    weights: {p['weights']}")
        if name != "train_step":
            lines.append(f"    during training, with the optimizer state beside it: "
                         f"{r['in_training_bytes'][name] / GB:.2f} GB")
    if "base_bytes" in r:
        lines.append(f"  a converted base (trainer.convert, {base_ckpt.CHUNK_BYTES >> 20} MiB chunks): each "
                     f"process reads at most {r['base_read_per_process_bytes'] / GB:.2f} GB of the base's "
                     f"{r['base_bytes'] / GB:.2f} GB (a 1/{r['processes']} share is "
                     f"{r['base_bytes'] / r['processes'] / GB:.2f} GB)")
    if "seconds_per_step_at_peak" in r:
        lines.append(f"  train step at the chip's peak FLOP/s: {r['seconds_per_step_at_peak']:.3f} s "
                     f"({r['seconds_per_step_at_40pct_mfu']:.3f} s at 40% MFU)")
    if any(p.get("vmem") for p in r["programs"].values()):
        lines.append("  verdict: does NOT compile: a kernel's blocks exceed the chip's VMEM (above)")
    elif "fits" in r:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"  verdict: {verdict} in {r['device_memory_gb']:g} GB per device")
    return "\n".join(lines)
