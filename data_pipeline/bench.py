r"""Data pipeline throughput: rows/s for reading, templating + tokenising, and packing.

    python -m data_pipeline.bench --rows 200000 [--tokenizer DIR_OR_GGUF]
    python -m data_pipeline.bench --file ../shared/data/gsm8k/train.jsonl \
        --fields prompt=question,completion=answer

The logic is ``data_pipeline.benchmark``.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_integer("rows", 200_000, "Synthetic short rows (when no --file).")
    flags.DEFINE_integer("conversations", 0, "Synthetic chat rows of ~200-2,000 tokens instead (messages format).")
    flags.DEFINE_string("format", "prompt_completion", "The --file's format: prompt_completion | alpaca | messages.")
    flags.DEFINE_string("file", "", "A real data file instead (JSONL/JSON/CSV/Parquet).")
    flags.DEFINE_list("fields", [], "Field mapping for --file, e.g. prompt=question,completion=answer.")
    flags.DEFINE_string("tokenizer", "", "An HF tokenizer directory or GGUF file (default: the demo BPE).")
    flags.DEFINE_integer("max_length", 256, "data.max_length.")
    flags.DEFINE_string("json", "", "Write the numbers as JSON here.")


def main(argv: list[str]) -> None:
    del argv
    from configs import demo  # noqa: PLC0415 (the data settings the benchmark starts from)
    from data_pipeline.benchmark import run  # noqa: PLC0415
    from data_pipeline.errors import DataError  # noqa: PLC0415
    try:
        result = run(demo.get_config(), FLAGS.rows, FLAGS.file, dict(kv.split("=", 1) for kv in FLAGS.fields),
                     FLAGS.tokenizer, FLAGS.max_length, conversations=FLAGS.conversations, fmt=FLAGS.format)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
