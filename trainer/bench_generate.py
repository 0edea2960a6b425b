r"""Generation speed against ``transformers.generate`` (torch, same greedy settings, KV cache on).

    python -m trainer.bench_generate --model demo --batch 1,8,32 [--prompt_len 64 --new_tokens 32] [--rounds 3]
    python -m trainer.bench_generate --model smollm2 --batch 1,8 [--split]
    python -m trainer.bench_generate --hf_path DIR

The logic is ``trainer.benchmarks.generation``; this module imports only absl until the flags are parsed.
"""

from __future__ import annotations

import json

from absl import flags

from trainer import cli
from trainer.cli import launch

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_enum("model", "demo", ["demo", "smollm2"], "Random-weight Llama of this shape.")
    flags.DEFINE_string("hf_path", "", "Or an HF model directory (its weights).")
    flags.DEFINE_list("batch", ["1", "8", "32"], "Batch sizes (one line each).")
    flags.DEFINE_integer("prompt_len", 64, "Prompts are uniform in [prompt_len/2, prompt_len] tokens.")
    flags.DEFINE_integer("new_tokens", 32, "Tokens generated per row (no early stop).")
    flags.DEFINE_integer("num_batches", 2, "Batches per batch size.")
    flags.DEFINE_integer("threads", 0, "torch threads (0: torch's default).")
    flags.DEFINE_integer("rounds", 1, "Generate this many times per side, the sides taking turns: "
                         "tokens/s are medians, the ratio the median of the rounds' ratios.", lower_bound=1)
    flags.DEFINE_bool("split", False, "Also generate one token per row, in the same rounds, and print "
                      "each side's prefill and decode step apart (and the step 2x would need).")
    flags.DEFINE_string("json", "", "Write the numbers as JSON here.")
    flags.adopt_module_key_flags(cli)


def run() -> None:
    _define_flags()

    def body():
        from trainer.benchmarks.generation import bench  # noqa: PLC0415
        rows = bench(FLAGS.model, FLAGS.hf_path, tuple(int(b) for b in FLAGS.batch), FLAGS.prompt_len,
                     FLAGS.new_tokens, FLAGS.num_batches, FLAGS.threads, rounds=FLAGS.rounds,
                     split=FLAGS.split)
        if FLAGS.json:
            with open(FLAGS.json, "w") as f:
                json.dump(rows, f, indent=2)
    launch(body, required=(), compile_cache=False)


if __name__ == "__main__":
    run()
