r"""Supervised instruction fine-tuning (entry point; the loop is ``trainer.loop.train``).

    python -m trainer.train --config configs/demo.py --workdir runs/demo [--config.train.num_steps=100]

Resumes from the latest checkpoint when ``--workdir`` already has one. Only absl is imported until the
flags are parsed, so ``--help`` answers at once.
"""

from __future__ import annotations

from absl import flags

from trainer import cli
from trainer.cli import config_flag, launch

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
    flags.adopt_module_key_flags(cli)  # --distributed & co. show in --help


def run() -> None:
    """Entry point (``python -m trainer.train`` and the ``ift-train`` console script)."""
    _define_flags()
    def body():
        from trainer.loop import train  # noqa: PLC0415 (JAX & co. only once the flags are parsed)
        config = config_flag()
        if FLAGS.hf_path:
            config.model.hf_path = FLAGS.hf_path
        if FLAGS.gguf:
            config.model.gguf_path = FLAGS.gguf
        return train(config, FLAGS.workdir)
    launch(body)


if __name__ == "__main__":
    run()
