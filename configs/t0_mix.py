"""Multi-task mixture (T0 style): one source per task file, equal sampling weights.

Every T0 completion ends with the literal text ``<|endoftext|>`` (an export artefact): ``strip_suffix``
removes it. Each row's task is its file's name, so eval reports per task. Rows are split by content
hash (the files have no splits of their own) and packed into 512-token rows.

    python -m data_pipeline.inspect --config configs/t0_mix.py
"""

import glob
import os

from configs import gsm8k

T0 = os.path.join(gsm8k.DATA, "self_instruct", "t0")


def get_config():
    c = gsm8k.get_config()
    # trec_what_category_best_describe's completions are all empty (only the suffix): a source with
    # no usable row is an error, so it is left out here.
    files = [f for f in sorted(glob.glob(os.path.join(T0, "*.jsonl")))
             if not os.path.basename(f).startswith("trec_what_category_best_describe")]
    common = dict(strip_suffix="<|endoftext|>", task_from="file", weight=1.0)
    if files:
        c.data.sources = {os.path.basename(f).split(".")[0]: gsm8k.sources.source(path=f, **common)
                          for f in files}
    else:  # data absent: one glob source, so the config still loads (reading it will say no file)
        c.data.sources = {"t0": gsm8k.sources.source(path=os.path.join(T0, "*.jsonl"), **common)}
    c.data.on_bad_row = "skip"  # stray bad rows are counted, not fatal
    c.eval.max_new_tokens = 64
    c.eval.answer_pattern = ""
    return c
