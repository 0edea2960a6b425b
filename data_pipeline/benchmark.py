r"""Data pipeline throughput, stage by stage (the CLI is ``data_pipeline.bench``).

From a file to packed batches, as ``trainer.train`` does it: read + map + split (``sources``), the
tokenizer (an HF tokenizer directory or GGUF file, or the demo BPE trained on a bounded sample),
template + tokenise (``pipeline.tokenize``, cache off), then packing and one epoch of batches (``loader``).
Prints rows/s per stage and the total. The data is written first (not timed): N synthetic short
prompt/completion rows, or a real file (``--file``, e.g. GSM8K's train.jsonl).
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from typing import Any

from ml_collections import ConfigDict

WORDS = ("apple river stone cloud quick brown lazy fox jumps over the dog paints seven blue small "
         "house light night green table water music happy bright").split()


def write_synthetic(path: str, n: int, seed: int = 0) -> None:
    """``n`` short rows (5-15 word prompts, 1-6 word completions), all distinct."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(5, 15)))
            completion = " ".join(rng.choices(WORDS, k=rng.randint(1, 6)))
            f.write(json.dumps({"prompt": f"{prompt} ({i})", "completion": completion}) + "\n")


def _config(defaults: ConfigDict, path: str, fields: dict[str, str] | None, max_length: int) -> ConfigDict:
    from data_pipeline import sources  # noqa: PLC0415
    c = ConfigDict(defaults.to_dict())
    c.data.sources = ConfigDict({"bench": sources.source(path=path, fields=fields or {})})
    c.data.cache = False
    c.data.max_length = max_length
    return c


def run(defaults: ConfigDict, rows: int = 200_000, file: str = "", fields: dict[str, str] | None = None,
        tokenizer: str = "", max_length: int = 256, batch_size: int = 32) -> dict[str, Any]:
    """``defaults``: the data settings to start from (the entry point passes configs/demo.py's)."""
    from data_pipeline import loader, pipeline, sources  # noqa: PLC0415
    from data_pipeline import tokenizer as tokenizer_lib
    tmp = None
    if not file:
        tmp = tempfile.mkdtemp(prefix="data_bench_")
        file = os.path.join(tmp, "rows.jsonl")
        write_synthetic(file, rows)
    config = _config(defaults, file, fields, max_length)
    times: dict[str, float] = {}
    t_all = time.perf_counter()

    t0 = time.perf_counter()
    splits, reports = sources.build_splits(config.data)
    times["read"] = time.perf_counter() - t0
    n = sum(len(v) for v in splits.values())

    t0 = time.perf_counter()
    if tokenizer:
        tok = tokenizer_lib.load_tokenizer(tokenizer)
        config.data.template = "chatml" if "<|im_start|>" in tok.get_vocab() else "plain"
    else:
        tok = tokenizer_lib.build_tokenizer(config.tokenizer, (r["messages"] for r in splits["train"]))
    times["tokenizer"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = pipeline.tokenize(config.data, tok, splits, reports, config.seed)
    times["template+tokenise"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train = data.examples["train"]
    ds = loader.train_dataset(train, seq_len=max_length, pad_id=tok.pad_token_id, batch_size=batch_size,
                              seed=0, packing="best_fit")
    bins = len(loader.train_rows(train, max_length, "best_fit"))
    it = iter(ds)
    batches = bins // batch_size
    for _ in range(batches):
        next(it)
    times["pack+batches"] = time.perf_counter() - t0
    total = time.perf_counter() - t_all

    result = {"rows": n, "file": file, "tokenizer": tokenizer or "demo BPE (trained on a sample)",
              "seconds": times, "total_seconds": total,
              "rows_per_s": {k: n / v for k, v in times.items()}, "total_rows_per_s": n / total,
              "train_examples": len(train), "packed_rows": bins, "batches": batches}
    print(f"{n:,} rows from {os.path.basename(file)}, tokenizer: {result['tokenizer']}")
    for k, v in times.items():
        print(f"  {k:<18} {v:7.1f} s  {n / v:>10,.0f} rows/s")
    print(f"  {'total':<18} {total:7.1f} s  {n / total:>10,.0f} rows/s  ({len(train):,} train examples "
          f"-> {bins:,} packed rows of {max_length} -> {batches:,} batches of {batch_size})", flush=True)
    return result
