r"""Standalone evaluation: a fine-tuned run against zero-/few-shot prompting of its base model, or any
Hugging Face / GGUF model on any data the pipeline reads.

    python -m trainer.eval --workdir runs/demo [--checkpoint best|latest|STEP] [--split test]
    python -m trainer.eval --hf_path DIR --data configs/gsm8k.py [--limit 200]
    python -m trainer.eval --gguf FILE.gguf --data rows.jsonl --baselines zero_shot,few_shot:3

Writes ``report.md``, ``report.json``, ``predictions.jsonl`` and PNG plots into
``workdir/eval/<split>_step<N>/`` (or ``--out``) and prints the table. The logic is
``trainer.evaluation.compare``; this module imports only absl until the flags are parsed.
"""

from __future__ import annotations

from absl import flags

from trainer import cli
from trainer.cli import launch

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    flags.DEFINE_string("workdir", None, "A trainer.train run directory (its base model vs its checkpoint).")
    flags.DEFINE_string("checkpoint", "best", "With --workdir: best (checkpoint.best_metric) | latest | STEP.")
    flags.DEFINE_string("hf_path", "", "Evaluate this Hugging Face model directory (no run needed).")
    flags.DEFINE_string("gguf", "", "Evaluate this GGUF file (no run needed).")
    flags.DEFINE_string("data", "", "A configs/*.py file (its data and eval sections) or a data file "
                        "(JSONL/JSON/CSV/Parquet; split by content hash as in training).")
    flags.DEFINE_string("split", "", "Split to evaluate (default: eval.split).")
    flags.DEFINE_integer("limit", -1, "Evaluate a seeded sample of at most N rows (-1: eval.max_examples, 0: all).")
    flags.DEFINE_integer("max_examples", None, "Deprecated spelling of --limit.")
    flags.DEFINE_string("baselines", "", "Base-model prompting rows, e.g. zero_shot,few_shot:3 "
                        "(default: eval.baselines). Exemplars come from the train split only.")
    flags.DEFINE_string("out", "", "Report directory (default: WORKDIR/eval/<split>_step<N>/ or "
                        "eval/<model>_<data>_<split>/).")
    flags.DEFINE_integer("max_new_tokens", 0, "Generation length (0: eval.max_new_tokens).")
    flags.DEFINE_integer("batch_size", 0, "Generation batch (0: eval.batch_size).")
    flags.DEFINE_bool("progress", True, "Show a progress bar (rows/s) while generating.")
    flags.adopt_module_key_flags(cli)  # --distributed & co. show in --help


def run() -> None:
    """Entry point (``python -m trainer.eval`` and the ``ift-eval`` console script)."""
    _define_flags()

    def body():
        from trainer.evaluation.compare import Request, evaluate  # noqa: PLC0415
        limit = FLAGS.limit if FLAGS.max_examples is None else FLAGS.max_examples
        return evaluate(Request(
            workdir=FLAGS.workdir or "", checkpoint=FLAGS.checkpoint, hf_path=FLAGS.hf_path,
            gguf=FLAGS.gguf, data=FLAGS.data, split=FLAGS.split, limit=limit, baselines=FLAGS.baselines,
            out=FLAGS.out, max_new_tokens=FLAGS.max_new_tokens, batch_size=FLAGS.batch_size,
            progress=FLAGS.progress))
    launch(body, required=())


if __name__ == "__main__":
    run()
