r"""Every preset on every TPU slice, compiled by the TPU compiler (README, "Scaling out").

    python -m trainer.benchmarks.topology_table [--configs configs/llama3_8b_tpu.py,...] \
        [--topologies v5p:2x2x1,v5p:4x4x2,v6e:2x4,v6e:16x16] [--remat none,dots,full] [--json table.json]
        [--variant model.splash_block_size=1024 --variant model.splash_block_size=1024,model.splash_fused_backward=true]

For each pair: the dry run of ``--dry_run --topology`` (train step, eval step and generation) with the
preset as it ships, or once per ``--remat`` policy (what each costs in memory and in XLA's FLOPs,
against the formula's: the recompute), or once per ``--variant`` (config keys set on top of the
preset; the preset as it ships first); a pair that does not divide or fit says so in its row. Needs
the tpu-aot extra.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from absl import app, flags

SLICES = {"v5p:2x2x1": "v5p-8", "v5p:4x4x2": "v5p-64", "v6e:2x4": "v6e-8", "v6e:16x16": "v6e-256"}
PRESETS = ("configs/llama3_8b_tpu.py", "configs/llama3_2_1b_gpu.py", "configs/gemma2_2b_gpu.py",
           "configs/qwen2_5_0_5b_gpu.py", "configs/smollm2_135m.py")
GB = 1e9

flags.DEFINE_list("configs", list(PRESETS), "Config files.")
flags.DEFINE_list("topologies", list(SLICES), "TPU topologies (get_topology_desc names).")
flags.DEFINE_list("remat", [], "model.remat policies to compile each pair with (default: the preset's).")
flags.DEFINE_multi_string("variant", [], "Config keys to set on top of the preset, as section.key=value "
                          "pairs separated by commas; one row per variant and pair, after the preset's own.")
flags.DEFINE_string("json", "", "Also write the rows here.")


def apply_variant(config, variant: str) -> None:
    """Sets ``section.key=value,...`` on ``config`` (a preset's ConfigDict), each value parsed as the
    key's type; an unknown key or a value of the wrong type is a ``ValueError`` naming it."""
    for item in filter(None, variant.split(",")):
        key, sep, value = item.partition("=")
        section, _, name = key.strip().partition(".")
        if not sep or section not in config or name not in config[section]:
            raise ValueError(f"--variant: {item!r} is not section.key=value for a key the config has")
        old = config[section][name]
        if not isinstance(old, (bool, int, float, str)):  # a tuple from "a,b" would be its characters
            raise ValueError(f"--variant: {key} is a {type(old).__name__}; only bool, int, float and str "
                             "keys can be set here")
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"--variant: {key} takes true or false, got {value!r}")
            config[section][name] = value.lower() in ("true", "1")
        else:
            try:
                config[section][name] = type(old)(value)
            except ValueError:
                raise ValueError(f"--variant: {key} is {type(old).__name__}, got {value!r}") from None


def preset(config_path: str):
    """A preset file's ``get_config()``."""
    from trainer.settings.spec import load_config_file  # noqa: PLC0415
    return load_config_file(config_path, "--configs")


def row(config_path: str, topology: str, remat: str = "", variant: str = "") -> dict[str, Any]:
    """One pair's dry run, as a table row (an ``error`` where it does not divide or compile)."""
    from trainer.benchmarks.dry_run import dry_run  # noqa: PLC0415
    from trainer.benchmarks.topology import tpu_devices  # noqa: PLC0415
    from trainer.errors import UserError  # noqa: PLC0415
    from trainer.settings.spec import RunSpec  # noqa: PLC0415
    out: dict[str, Any] = {"config": config_path, "topology": topology,
                           "slice": SLICES.get(topology, topology)}
    config = preset(config_path)
    if remat:
        config.model.remat = remat
    apply_variant(config, variant)
    if variant:
        out["variant"] = variant
    try:
        r = dry_run(RunSpec.from_config(config), tpu_devices(topology), quiet=True)
    except UserError as e:
        return {**out, "error": str(e).replace("\n", " ")}
    train = r["programs"]["train_step"]
    return {**out, "chips": r["devices"], "mesh": r["mesh"], "attention": r["attention"],
            "remat": r["remat"], "batch": r["batch"], "seq": r["seq"],
            "memory_gb": {k: p["memory"]["total"] / GB if p["memory"] else None
                          for k, p in r["programs"].items()},
            "refused": {k: p["error"] for k, p in r["programs"].items() if p.get("error")},
            "device_memory_gb": r.get("device_memory_gb"), "fits": r.get("fits"),
            "train_tflops_per_chip_formula": r["flops_per_step_formula"] / r["devices"] / 1e12,
            "train_tflops_per_chip_xla": train["flops"] / 1e12, "scan_layers": r["scan_layers"],
            "seconds_per_step_at_peak": r.get("seconds_per_step_at_peak"),
            "train_collectives_gb": {k: v / GB for k, v in train["collective_bytes"].items() if v},
            "hosts": r["processes"], "base_gb": r["base_bytes"] / GB,
            "base_read_per_host_gb": r["base_read_per_process_bytes"] / GB,
            "compile_s": {k: p["compile_s"] for k, p in r["programs"].items()}}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | slice (chips) | mesh | train / eval / generate, GB per chip | fits | "
             "train step at peak | train-step collectives per chip | converted base read per host |",
             "|---|---|---|---|---|---:|---|---|"]
    for r in rows:
        name = os.path.basename(r["config"])[:-3]
        if "error" in r:
            lines.append(f"| {name} | {r['slice']} | | {r['error'][:160]} | no | | | |")
            continue
        m = {k: "refused" if v is None else f"{v:.1f}" for k, v in r["memory_gb"].items()}
        mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1) or "1"
        moved = ", ".join(f"{k} {v:,.1f} GB" for k, v in r["train_collectives_gb"].items())
        lines.append(f"| {name} | {r['slice']} ({r['chips']}) | {mesh} | {m['train_step']} / "
                     f"{m['eval_step']} / {m['generate']} of {r['device_memory_gb']:g} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['seconds_per_step_at_peak']:.3f} s | {moved} | "
                     f"{r['base_read_per_host_gb']:.2f} of {r['base_gb']:.2f} GB ({r['hosts']} "
                     f"host{'s' if r['hosts'] > 1 else ''}) |")
    return "\n".join(lines)


def remat_markdown(rows: list[dict[str, Any]]) -> str:
    """The ``--remat`` table: per chip, the train step's memory and XLA's FLOPs for each policy (a
    scanned model's loop body counted once by XLA: compare policies with each other, not with the
    formula)."""
    lines = ["| preset | slice (chips) | remat | train step, GB per chip | fits | XLA TFLOPs per chip "
             "(train step) | formula TFLOPs per chip |", "|---|---|---|---:|---|---:|---:|"]
    for r in rows:
        name = os.path.basename(r["config"])[:-3]
        if "error" in r:
            lines.append(f"| {name} | {r['slice']} | | {r['error'][:160]} | no | | |")
            continue
        train = r["memory_gb"]["train_step"]
        lines.append(f"| {name} | {r['slice']} ({r['chips']}) | {r['remat']} | "
                     f"{'refused' if train is None else f'{train:.1f}'} of {r['device_memory_gb']:g} | "
                     f"{'yes' if r['fits'] else 'no'} | {r['train_tflops_per_chip_xla']:.2f} | "
                     f"{r['train_tflops_per_chip_formula']:.2f} |")
    return "\n".join(lines)


def variant_markdown(rows: list[dict[str, Any]]) -> str:
    """The ``--variant`` table: per chip, each program's memory, and what the compiler refused."""
    lines = ["| preset | slice (chips) | variant | train / eval / generate, GB per chip | fits | refused |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        name, variant = os.path.basename(r["config"])[:-3], r.get("variant", "(as it ships)")
        if "error" in r:
            lines.append(f"| {name} | {r['slice']} | {variant} | {r['error'][:160]} | no | |")
            continue
        m = {k: "refused" if v is None else f"{v:.2f}" for k, v in r["memory_gb"].items()}
        refused = "; ".join(f"{k}: {v}" for k, v in r["refused"].items())
        lines.append(f"| {name} | {r['slice']} ({r['chips']}) | {variant} | {m['train_step']} / "
                     f"{m['eval_step']} / {m['generate']} of {r['device_memory_gb']:g} | "
                     f"{'yes' if r['fits'] else 'no'} | {refused} |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    rows = []
    variants = [""] + flags.FLAGS.variant if flags.FLAGS.variant else [""]
    for config in flags.FLAGS.configs:  # a mistyped key is one line before anything compiles
        for variant in variants:
            try:
                apply_variant(preset(config), variant)
            except ValueError as e:
                sys.exit(f"error: {e}")
    for config in flags.FLAGS.configs:
        for topology in flags.FLAGS.topologies:
            for remat in flags.FLAGS.remat or [""]:
                for variant in variants:
                    rows.append(row(config, topology, remat, variant))
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print(variant_markdown(rows) if flags.FLAGS.variant
          else remat_markdown(rows) if flags.FLAGS.remat else markdown(rows))
    if flags.FLAGS.json:
        with open(flags.FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    from trainer.tpu_env import quiet_libtpu
    quiet_libtpu()
    os.environ["JAX_PLATFORMS"] = "cpu"  # the slices' devices come from libtpu; nothing runs here
    app.run(main)
