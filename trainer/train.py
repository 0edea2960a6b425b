r"""Supervised instruction fine-tuning (entry point; the loop is ``trainer.training.loop.train``).

    python -m trainer.train --config configs/demo.py --workdir runs/demo [--config.train.num_steps=100]

Resumes from the latest checkpoint when ``--workdir`` already has one. Only absl is imported until the
flags are parsed, so ``--help`` answers at once.

    python -m trainer.train --config configs/llama3_8b_tpu.py --dry_run --topology v5p:4x4x4
    python -m trainer.train --config configs/llama3_8b_tpu.py --dry_run --dry_run_devices 32

compile the train step, the eval step and generation from abstract shapes only -- with the TPU compiler
for a slice this machine does not have, or on virtual CPU devices -- and report memory, FLOPs and
collectives per device (``trainer.benchmarks.dry_run``).
"""

from __future__ import annotations

from absl import flags

from trainer import cli
from trainer.cli import config_flag, launch, run_spec

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    from ml_collections import config_flags  # noqa: PLC0415
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory: config, tokenizer, checkpoints, metrics.")
    flags.DEFINE_string("hf_path", "", "Shorthand for --config.model.hf_path (start from this HF "
                        "checkpoint directory).")
    flags.DEFINE_string("gguf", "", "Shorthand for --config.model.gguf_path (start from this GGUF "
                        "file).")
    flags.DEFINE_bool("dry_run", False, "Compile the step from abstract shapes (no weights, no data) "
                      "and report per-device memory and FLOPs; no --workdir needed.")
    flags.DEFINE_integer("dry_run_devices", 0, "With --dry_run: rehearse a mesh of this many virtual "
                         "CPU devices (0: this machine's devices).")
    flags.DEFINE_string("topology", "", "With --dry_run: compile with the TPU compiler for this TPU "
                        "slice (e.g. v5p:4x4x4, v6e:16x16; needs the tpu-aot extra) instead of this "
                        "machine's devices.")
    flags.DEFINE_float("device_memory_gb", 0.0, "With --dry_run: the per-device memory to judge the "
                       "fit against (default: the target chip's, where known).")
    flags.adopt_module_key_flags(cli)  # --distributed & co. show in --help


def run() -> None:
    """Entry point (``python -m trainer.train`` and the ``ift-train`` console script)."""
    _define_flags()
    import sys  # noqa: PLC0415
    dry = "--dry_run" in sys.argv or "--dry_run=true" in sys.argv
    if dry:
        _virtual_devices(sys.argv)

    def body():
        # JAX & co. are imported only once the flags are parsed.
        from trainer.evaluation.in_training import scheduled_evals  # noqa: PLC0415
        from trainer.training.loop import train  # noqa: PLC0415
        config = config_flag()
        if FLAGS.hf_path:
            config.model.hf_path = FLAGS.hf_path
        if FLAGS.gguf:
            config.model.gguf_path = FLAGS.gguf
        config = run_spec(config)
        if FLAGS.dry_run:
            from trainer.benchmarks.dry_run import dry_run  # noqa: PLC0415
            devices = FLAGS.dry_run_devices or None
            if FLAGS.topology:
                from trainer.benchmarks.topology import tpu_devices  # noqa: PLC0415
                devices = tpu_devices(FLAGS.topology)
            return dry_run(config, devices, FLAGS.device_memory_gb or None)
        return train(config, FLAGS.workdir, evaluators=scheduled_evals)
    # A dry run reports its compiles (time, memory, FLOPs): it compiles afresh, uncached.
    launch(body, required=() if dry else ("workdir",), compile_cache=not dry)


def _virtual_devices(argv: list[str]) -> None:
    """``--dry_run_devices N``: N virtual CPU devices, set before JAX is imported (it reads the flag
    once, when its CPU backend starts); ``--topology``: the CPU backend, libtpu kept quiet."""
    import os  # noqa: PLC0415
    n = 0
    for i, a in enumerate(argv):
        if a.startswith("--dry_run_devices="):
            n = int(a.split("=", 1)[1])
        elif a == "--dry_run_devices" and i + 1 < len(argv):
            n = int(argv[i + 1])
    if any(a == "--topology" or a.startswith("--topology=") for a in argv):
        # The slice's devices come from libtpu's topology description; nothing runs here, so JAX's
        # own backend stays the CPU's (no TPU runtime is started, even on a TPU VM).
        os.environ["JAX_PLATFORMS"] = "cpu"
    if n > 0:
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={n}").strip()


if __name__ == "__main__":
    run()
