"""Tokenised examples -> fixed-shape batches, through grain.

Every example is shifted once here (``inputs = ids[:-1]``, ``targets = ids[1:]``) so the train step never
slices, and carries ``positions`` and ``segment_ids`` so padded and packed rows look the same to the
model (padding is segment 0).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")


@dataclasses.dataclass
class Example:
    """One tokenised row. ``ids``/``loss_mask``: [n] int32 (see ``templating.encode_messages``)."""

    ids: np.ndarray
    loss_mask: np.ndarray
    meta: dict[str, Any]


@dataclasses.dataclass
class TokenizeReport:
    """What happened to the rows of one split: nothing is dropped without being counted here."""

    rows: int = 0
    kept: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    supervised_tokens: int = 0
    max_len: int = 0

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        return f"{self.kept}/{self.rows} rows kept (dropped: {drops}); max length {self.max_len}"


def tokenize_rows(rows: Sequence[dict[str, Any]], encode, max_length: int
                  ) -> tuple[list[Example], TokenizeReport]:
    """Encodes rows with ``encode(row) -> (ids, loss_mask)``; drops (and counts) rows that do not fit.

    A row is dropped if it is longer than ``max_length + 1`` tokens (one more than the model's sequence
    length, because of the shift) or if it has no supervised token (which would give a 0/0 loss).
    """
    report = TokenizeReport(rows=len(rows))
    out = []
    for row in rows:
        ids, mask = encode(row)
        if len(ids) > max_length + 1:
            report.dropped[f"longer than data.max_length={max_length}"] += 1
            continue
        if mask[1:].sum() == 0:
            report.dropped["no supervised token"] += 1
            continue
        report.kept += 1
        report.supervised_tokens += int(mask[1:].sum())
        report.max_len = max(report.max_len, len(ids))
        out.append(Example(ids, mask, {k: v for k, v in row.items() if k in ("task", "source")}))
    return out, report


def pad_example(ex: Example, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Shifts and right-pads one example to ``[seq_len]`` arrays (see module docstring)."""
    n = len(ex.ids) - 1
    out = {
        "inputs": np.full(seq_len, pad_id, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "weights": np.zeros(seq_len, np.float32),
        "positions": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
    }
    out["inputs"][:n] = ex.ids[:-1]
    out["targets"][:n] = ex.ids[1:]
    out["weights"][:n] = ex.loss_mask[1:]
    out["positions"][:n] = np.arange(n)
    out["segment_ids"][:n] = 1
    return out


def _stack(items: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([it[k] for it in items]) for k in FIELDS}


def train_dataset(examples: Sequence[Example], *, seq_len: int, pad_id: int, batch_size: int,
                  seed: int, process_index: int = 0, process_count: int = 1,
                  read_threads: int = 2, prefetch: int = 8) -> grain.IterDataset:
    """An endless, shuffled stream of this process's share of the global batch.

    Shuffling is a seeded permutation, re-seeded every epoch (a new order each epoch); process ``i``
    of ``n`` reads every n-th element of that stream, so the union over processes is exactly the
    single-process stream. ``iter(ds)`` has ``get_state()``/``set_state()`` for checkpointing.

    Args:
      batch_size: the *global* batch size; each process yields ``batch_size // process_count`` rows.
    """
    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} processes")
    if not examples:
        raise ValueError("the training split is empty after tokenisation; see the data report")
    ds = grain.MapDataset.source(list(examples)).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.map(lambda ex: pad_example(ex, seq_len, pad_id))
    ds = ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=_stack)
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                                prefetch_buffer_size=prefetch))


def eval_batches(examples: Sequence[Example], *, seq_len: int, pad_id: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in order, in fixed-shape batches.

    The last batch is filled with all-padding rows (weight 0), so summed metrics are exact and the
    eval step compiles once. Each process yields its share; every process yields the same number of
    batches (so collective ops line up across hosts).
    """
    local_bs = batch_size // process_count
    num_batches = max(1, -(-len(examples) // batch_size))
    empty = {k: np.zeros(seq_len, np.float32 if k == "weights" else np.int32) for k in FIELDS}
    empty["inputs"][:] = pad_id
    for b in range(num_batches):
        rows = []
        for j in range(local_bs):
            i = b * batch_size + process_index * local_bs + j
            rows.append(pad_example(examples[i], seq_len, pad_id) if i < len(examples) else empty)
        yield _stack(rows)
