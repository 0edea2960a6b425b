r"""Train-step throughput: tokens/s and MFU of our jitted step, and the PyTorch reference in the same run.

    python -m trainer.bench --config configs/demo.py [--batch 16 --seq 256 --steps 10] [--json out.json]

The logic is ``trainer.benchmark``; this module imports only absl until the flags are parsed.
"""

from __future__ import annotations

import json

from absl import flags

from trainer import cli
from trainer.cli import config_flag, launch

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    from ml_collections import config_flags  # noqa: PLC0415
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    flags.DEFINE_integer("batch", 16, "Global batch (rows).")
    flags.DEFINE_integer("seq", 256, "Tokens per row.")
    flags.DEFINE_integer("steps", 10, "Timed steps (after 2 warm-up steps).")
    flags.DEFINE_integer("vocab", 32000, "Vocabulary of a from-scratch model (no model.hf_path).")
    flags.DEFINE_bool("torch", True, "Also time the PyTorch reference (CPU only).")
    flags.DEFINE_string("json", "", "Write the numbers as JSON here.")
    flags.adopt_module_key_flags(cli)


def run() -> None:
    _define_flags()

    def body():
        from trainer.benchmark import bench  # noqa: PLC0415
        row = bench(config_flag(), FLAGS.batch, FLAGS.seq, FLAGS.steps, use_torch=FLAGS.torch,
                    vocab=FLAGS.vocab)
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(row, f, indent=2)
    launch(body, required=())


if __name__ == "__main__":
    run()
