"""Ahead-of-time fit check: compile the train step from abstract shapes and say whether it fits.

    python -m trainer.train --config configs/llama3_1_8b_tpu.py --dry_run [--dry_run_devices 32] \
        [--device_memory_gb 16]

No weights are read and no data is touched: the mesh is built (``--dry_run_devices N`` rehearses an
N-device mesh on virtual CPU devices), the state and batch exist only as ``ShapeDtypeStruct``s with
their shardings, and the step is lowered and compiled. XLA then reports per-device memory (arguments,
outputs, temporaries) and FLOPs; next to them, the 6N + attention formula of ``trainer.models.flops``.

A preset whose checkpoint is not on this machine dry-runs from the architecture kept beside it
(``model.arch_json``, e.g. ``configs/hf/llama3_1_8b.json``). On virtual CPU devices the numbers are
the CPU compiler's: buffer assignment follows the same shardings, but fusion (and so temporaries)
differs from a TPU's or GPU's -- a rehearsal that catches an unshardable or grossly oversized
config before paying for the pod, not a guarantee to the last gigabyte.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from data_pipeline import loader
from trainer import sharding as sharding_lib
from trainer.settings import checks as config_checks
from trainer.training import experiment
from trainer.errors import UserError
from trainer.models.flops import flops_per_token, peak_flops
from trainer.benchmarks.memory import compiled_memory, state_bytes
from trainer.training.step import make_optimizer

GB = 1e9


def dry_run(config: ml_collections.ConfigDict, num_devices: int | None = None,
            device_memory_gb: float | None = None, quiet: bool = False) -> dict[str, Any]:
    """Compiles the train step for ``config`` on ``num_devices`` devices (all when None) from
    abstract shapes; prints and returns parameters, FLOPs, per-device memory and a verdict."""
    devices = jax.devices()[:num_devices] if num_devices else jax.devices()
    problems = config_checks.problems(config, len(devices), 1, check_paths=False)
    if problems:
        raise UserError("the config has problems:\n  " + "\n  ".join(problems))
    hf_config, source = experiment.architecture(config)
    try:
        mesh = sharding_lib.make_mesh(dict(config.mesh), devices)
    except ValueError as e:
        raise UserError(str(e)) from e
    vocab = int(hf_config["vocab_size"]) if hf_config else int(config.tokenizer.vocab_size)
    spec = experiment.model_spec(config, vocab, mesh, hf_config)
    t = config.train
    tx, schedule = make_optimizer(config.optimizer, t.num_steps)
    state_sh = experiment.state_shardings(spec, tx)
    batch_sh = sharding_lib.batch_sharding(mesh, experiment.rules(config))
    abstract = experiment.abstract_state(spec, tx, state_sh)
    seq = config.data.max_length
    batch = {k: jax.ShapeDtypeStruct((t.batch_size, seq), jnp.float32 if k == "weights" else jnp.int32,
                                     sharding=batch_sh) for k in loader.FIELDS}
    step = experiment.jit_train_step(spec, tx, schedule, t.grad_accum_steps, state_sh, batch_sh,
                                     experiment.loss_chunk_tokens(config))
    t0 = time.perf_counter()
    lowered = step.lower(abstract, batch)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0

    memory = compiled_memory(compiled)
    total = memory["total"]
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float((cost or {}).get("flops", 0.0))
    trainable = sum(x.size for x in jax.tree.leaves(abstract.params))
    params = sum(x.size for x in jax.tree.leaves(jax.eval_shape(spec.init_params_fn(0))))  # + adapters
    tokens = t.batch_size * seq
    formula = flops_per_token(spec.cfg, seq) * tokens
    out = {
        "devices": len(devices), "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "architecture": source or "config.model (from scratch)", "parameters": params,
        "trainable_parameters": trainable, "state_bytes_per_device": state_bytes(abstract),
        "batch": t.batch_size, "seq": seq, "grad_accum_steps": t.grad_accum_steps,
        "dtype": spec.cfg.dtype, "scan_layers": spec.cfg.scan_layers, "remat": spec.cfg.remat,
        "compile_s": compile_s,
        "flops_per_step_formula": formula, "flops_per_step_xla_per_device": xla_flops,
        "memory_per_device_bytes": memory,
    }
    if device_memory_gb:
        out["device_memory_gb"] = device_memory_gb
        out["fits"] = total <= device_memory_gb * GB
    peak = peak_flops(devices[0])
    if peak:
        out["seconds_per_step_at_40pct_mfu"] = formula / (0.4 * peak * len(devices))
    if not quiet:
        print(report(out), flush=True)
    return out


def report(r: dict[str, Any]) -> str:
    m = r["memory_per_device_bytes"]
    lines = [
        f"dry run: {r['devices']} x {r['device_kind']}, mesh {r['mesh']}",
        f"  model: {r['parameters'] / 1e6:,.1f}M parameters ({r['architecture']}), "
        f"{r['trainable_parameters'] / 1e6:,.1f}M trained, {r['dtype']} compute, "
        f"scan_layers={r['scan_layers']}, remat={r['remat']}",
        f"  step: {r['batch']} x {r['seq']} tokens, grad_accum_steps={r['grad_accum_steps']}; "
        f"compiled in {r['compile_s']:.1f}s",
        f"  FLOPs per step: {r['flops_per_step_formula'] / 1e12:,.2f} T (6N + attention), "
        f"XLA cost analysis {r['flops_per_step_xla_per_device'] / 1e12:,.2f} T per device",
        f"  memory per device: arguments {m['arguments'] / GB:.2f} GB, outputs {m['outputs'] / GB:.2f} GB "
        f"(aliased {m['aliased'] / GB:.2f}), temporaries {m['temporaries'] / GB:.2f} GB "
        f"-> {m['total'] / GB:.2f} GB",
    ]
    if "fits" in r:
        verdict = "fits" if r["fits"] else "does NOT fit"
        lines.append(f"  verdict: {verdict} in {r['device_memory_gb']:g} GB per device")
    return "\n".join(lines)
