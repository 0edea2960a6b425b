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
import shutil
import tempfile
import threading
import time
from typing import Any

import numpy as np
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


def write_conversations(path: str, n: int, min_words: int = 145, max_words: int = 1450, seed: int = 0
                        ) -> None:
    """``n`` chat rows (``messages`` format) of ``min_words``-``max_words`` words each (1.37 tokens a
    word with SmolLM2's tokenizer: about 200-2,000 tokens): 1-4 user/assistant exchanges, a system
    message in a quarter of them, the words split at random among the turns. A million rows (4.7 GB)
    took about four minutes here."""
    rng = np.random.default_rng(seed)
    vocab = WORDS + [w.capitalize() for w in WORDS] + [f"{w}," for w in WORDS] + ["."] * 8
    with open(path, "w") as f:
        for i in range(n):
            words = [vocab[j] for j in rng.integers(0, len(vocab), rng.integers(min_words, max_words + 1))]
            turns = int(rng.integers(1, 5))
            cuts = [0, *sorted(rng.choice(len(words) - 1, 2 * turns - 1, replace=False) + 1), len(words)]
            parts = [" ".join(words[a:b]) for a, b in zip(cuts, cuts[1:])]
            messages = [{"role": "system", "content": f"You are assistant {i}."}] if i % 4 == 0 else []
            messages += [{"role": "user" if k % 2 == 0 else "assistant", "content": p}
                         for k, p in enumerate(parts)]
            f.write(json.dumps({"messages": messages}) + "\n")


class MemoryPeak:
    """Samples, every ``every`` s while it is open, this process tree's anonymous memory (``RssAnon``
    of this process and any tokenising workers: RAM that cannot be paged out; a page a forked worker
    still shares is counted in each) and the machine's used memory (``MemTotal - MemAvailable``, so
    the page cache of memory-mapped files does not count). ``/proc/PID/status``, not ``smaps_rollup``:
    reading the latter walks the page tables, 0.3 s for a 13 GB process, and sampling it twice a
    second slowed the tokenising it measured from 528 to 325 rows/s. Linux only; elsewhere both stay 0."""

    def __init__(self, every: float = 1.0):
        self.every, self.anon_gb, self.used_gb, self._stop = every, 0.0, 0.0, threading.Event()

    @staticmethod
    def _tree(pid: int) -> list[int]:
        out = [pid]
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as f:
                    out += [p for c in f.read().split() for p in MemoryPeak._tree(int(c))]
        except OSError:  # a thread or worker that just exited
            pass
        return out

    @staticmethod
    def _kb(path: str, key: str) -> int:
        with open(path) as f:
            return next(int(line.split()[1]) for line in f if line.startswith(key))

    def _sample(self) -> None:
        from data_pipeline.pipeline import anon_gb  # noqa: PLC0415 (0 for a worker that just exited)
        anon = sum(anon_gb(pid) for pid in self._tree(os.getpid()))
        used = self._kb("/proc/meminfo", "MemTotal:") - self._kb("/proc/meminfo", "MemAvailable:")
        self.anon_gb = max(self.anon_gb, anon)
        self.used_gb = max(self.used_gb, (used - self._base) / 2**20)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def __enter__(self) -> MemoryPeak:
        if os.path.exists("/proc/self/status"):
            self._base = self._kb("/proc/meminfo", "MemTotal:") - self._kb("/proc/meminfo", "MemAvailable:")
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if hasattr(self, "_thread"):
            self._thread.join()
            self._sample()


def _config(defaults: ConfigDict, path: str, fields: dict[str, str] | None, max_length: int,
            fmt: str = "prompt_completion") -> ConfigDict:
    from data_pipeline import sources  # noqa: PLC0415
    c = ConfigDict(defaults.to_dict())
    c.data.sources = ConfigDict({"bench": sources.source(path=path, fields=fields or {}, format=fmt)})
    c.data.cache = False
    c.data.max_length = max_length
    return c


def _stages(config: ConfigDict, tokenizer: str, max_length: int, batch_size: int
            ) -> tuple[dict[str, float], dict[str, int]]:
    """Runs and times each stage, as ``trainer.train`` runs them."""
    from data_pipeline import loader, pipeline, sources  # noqa: PLC0415
    from data_pipeline import tokenizer as tokenizer_lib
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    splits, reports = sources.build_splits(config.data)
    times["read"] = time.perf_counter() - t0

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
    bins = len(loader.row_bins(train, max_length, "best_fit"))
    it = iter(ds)
    for _ in range(bins // batch_size):
        next(it)
    times["pack+batches"] = time.perf_counter() - t0
    rep = data.reports["train"]
    return times, {"rows": sum(len(v) for v in splits.values()), "train_examples": len(train),
                   "train_tokens": sum(rep.lengths), "train_dropped": sum(rep.dropped.values()),
                   "packed_rows": bins, "batches": bins // batch_size}


def run(defaults: ConfigDict, rows: int = 200_000, file: str = "", fields: dict[str, str] | None = None,
        tokenizer: str = "", max_length: int = 256, batch_size: int = 32, conversations: int = 0,
        fmt: str = "prompt_completion") -> dict[str, Any]:
    """``defaults``: the data settings to start from (the entry point passes configs/demo.py's).
    ``conversations``: that many long chat rows (``write_conversations``) instead of ``rows`` short ones."""
    tmp = None
    if not file:
        tmp = tempfile.mkdtemp(prefix="data_bench_")
        file = os.path.join(tmp, "rows.jsonl")
        if conversations:
            print(f"writing {conversations:,} conversations of ~200-2,000 tokens (not timed) ...", flush=True)
            write_conversations(file, conversations)
            fmt = "messages"
        else:
            write_synthetic(file, rows)
    config = _config(defaults, file, fields, max_length, fmt)
    with MemoryPeak() as memory:
        times, counts = _stages(config, tokenizer, max_length, batch_size)
    total = sum(times.values())
    n = counts["rows"]
    result = {"file": file, "tokenizer": tokenizer or "demo BPE (trained on a sample)", **counts,
              "seconds": times, "total_seconds": total,
              "rows_per_s": {k: n / v for k, v in times.items()}, "total_rows_per_s": n / total,
              "peak_anon_gb": memory.anon_gb, "peak_used_gb": memory.used_gb}
    print(f"{n:,} rows from {os.path.basename(file)}, tokenizer: {result['tokenizer']}")
    for k, v in times.items():
        print(f"  {k:<18} {v:7.1f} s  {n / v:>10,.0f} rows/s")
    print(f"  {'total':<18} {total:7.1f} s  {n / total:>10,.0f} rows/s  ({counts['train_examples']:,} train "
          f"examples of {counts['train_tokens']:,} tokens -> {counts['packed_rows']:,} packed rows of "
          f"{max_length} -> {counts['batches']:,} batches of {batch_size})")
    print(f"  peak memory: {memory.anon_gb:.2f} GB anonymous (this process and its workers), "
          f"{memory.used_gb:.2f} GB more of the machine in use than at the start", flush=True)
    if tmp:
        shutil.rmtree(tmp)
    return result
