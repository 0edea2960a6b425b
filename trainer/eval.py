r"""Standalone evaluation of a run: the fine-tuned model against zero-/few-shot prompting of the base.

    python -m trainer.eval --workdir runs/demo [--split test] [--checkpoint best|latest|STEP]

Needs only the workdir (its ``config.json`` and ``tokenizer/`` say what data, template and model were
used). Writes ``workdir/eval/<split>_step<N>.{md,json}`` and prints the Markdown table. The logic is
``trainer.evaluation``; this module imports only absl until the flags are parsed.
"""

from __future__ import annotations

from absl import flags

from trainer import cli
from trainer.cli import launch

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    flags.DEFINE_string("workdir", None, "A trainer.train run directory.")
    flags.DEFINE_string("split", "", "Split to evaluate (default: config.eval.split).")
    flags.DEFINE_string("checkpoint", "best", "best (lowest validation loss) | latest | a step number.")
    flags.DEFINE_integer("max_examples", -1, "Evaluate at most this many rows (-1: config.eval.max_examples).")
    flags.adopt_module_key_flags(cli)  # --distributed & co. show in --help


def run() -> None:
    """Entry point (``python -m trainer.eval`` and the ``ift-eval`` console script)."""
    _define_flags()
    def body():
        from trainer.evaluation import evaluate  # noqa: PLC0415
        return evaluate(FLAGS.workdir, FLAGS.split, FLAGS.checkpoint, FLAGS.max_examples)
    launch(body)


if __name__ == "__main__":
    run()
