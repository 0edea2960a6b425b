"""GSM8K (grade-school math) through the file pipeline: the dataset's own train/test files.

Validation is carved out of train by content hash (GSM8K ships no validation split). The fields are
mapped (``question``/``answer``), rows are packed into 512-token rows. The model here is the demo's
small from-scratch Llama with a BPE learned on the data -- a pipeline check, not a GSM8K solver; point
``tokenizer``/``model`` at a real base model for that.

    python -m data_pipeline.inspect --config configs/gsm8k.py
    python -m trainer.train --config configs/gsm8k.py --workdir runs/gsm8k

Set ``FLAX_IFT_DATA`` (default ``../shared/data`` next to the repo) or override the paths.
"""

import os

from configs import demo
from data_pipeline import sources

DATA = os.environ.get("FLAX_IFT_DATA", os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data")))


def get_config():
    c = demo.get_config()
    c.data.sources = {"gsm8k": sources.source(
        splits={"train": os.path.join(DATA, "gsm8k", "train.jsonl"),
                "test": os.path.join(DATA, "gsm8k", "test.jsonl")},
        fields={"prompt": "question", "completion": "answer"})}
    c.data.max_length = 512
    c.data.length_policy = "truncate"
    c.data.packing = "best_fit"
    c.tokenizer.vocab_size = 4096
    c.tokenizer.min_frequency = 2
    c.model.hidden_size = 256
    c.model.intermediate_size = 768
    c.train.num_steps = 500
    c.train.batch_size = 16
    c.train.eval_every = 100
    c.train.checkpoint_every = 100
    c.train.eval_batch_size = 32
    c.eval.max_new_tokens = 256
    c.eval.batch_size = 32
    c.eval.few_shot_k = 2
    c.eval.answer_pattern = r"####\s*([-0-9.,]+)"  # the final answer; the reasoning may differ
    return c
