r"""Train-step throughput: tokens/s and MFU of our jitted step, and the PyTorch reference in the same run.

    python -m trainer.bench --config configs/demo.py [--batch 16 --seq 256 --steps 10] [--json out.json]
    python -m trainer.bench --config configs/smollm2_135m.py --lora [--lora_rank 16] [--dry]

The logic is ``trainer.benchmarks.train_step``; this module imports only absl until the flags are parsed.
"""

from __future__ import annotations

import json

from absl import flags

from trainer import cli
from trainer.cli import launch, run_spec

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    from ml_collections import config_flags  # noqa: PLC0415
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    flags.DEFINE_integer("batch", 16, "Global batch (rows).")
    flags.DEFINE_integer("seq", 256, "Tokens per row.")
    flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
    flags.DEFINE_integer("rounds", 1, "Time the steps this many times per side, the sides taking turns: "
                         "tokens/s are medians, a ratio the median of the rounds' ratios.", lower_bound=1)
    flags.DEFINE_integer("vocab", 32000, "Vocabulary of a from-scratch model (no model.hf_path).")
    flags.DEFINE_bool("torch", True, "Also time the PyTorch reference (CPU only).")
    flags.DEFINE_bool("tunix", False, "Also time Tunix's PeftTrainer step on the same model shape and batches, "
                      "and both sides' model build + first step (Tunix is installed by launch/tunix_bench.sh).")
    flags.DEFINE_string("json", "", "Write the numbers as JSON here.")
    flags.DEFINE_bool("lora", False, "Full fine-tuning vs LoRA vs QLoRA (int8, nf4) on the same model: "
                      "step time and per-device bytes of params, optimizer state and frozen base.")
    flags.DEFINE_integer("lora_rank", 16, "The LoRA rank of --lora.")
    flags.DEFINE_bool("dry", False, "With --lora: compile only (trainer.benchmarks.dry_run), for a model too large "
                      "to step here.")
    flags.DEFINE_integer("dry_devices", 0, "With --dry: this many (virtual) devices (0: all).")
    flags.adopt_module_key_flags(cli)


def run() -> None:
    _define_flags()

    def body():
        from trainer.benchmarks.train_step import bench, bench_lora  # noqa: PLC0415
        if FLAGS.lora:
            row = bench_lora(run_spec(), FLAGS.batch, FLAGS.seq, FLAGS.steps, FLAGS.lora_rank,
                             FLAGS.dry, FLAGS.vocab, FLAGS.dry_devices or None)
        else:
            row = bench(run_spec(), FLAGS.batch, FLAGS.seq, FLAGS.steps, use_torch=FLAGS.torch,
                        vocab=FLAGS.vocab, tunix=FLAGS.tunix, rounds=FLAGS.rounds)
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(row, f, indent=2)
    launch(body, required=(), compile_cache=False)


if __name__ == "__main__":
    run()
