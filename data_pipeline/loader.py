"""Tokenised examples -> fixed-shape batches, through grain.

Every example is shifted once here (``inputs = ids[:-1]``, ``targets = ids[1:]``) so the train step never
slices, and carries ``positions`` and ``segment_ids`` so padded and packed rows look the same to the
model (padding is segment 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np

from data_pipeline.packing import pack

FIELDS = ("inputs", "targets", "weights", "positions", "segment_ids")
# Each field's dtype in every batch: the loss weights are float32, the rest token ids and indices. The
# train step's ahead-of-time compile (``trainer.training.experiment.abstract_batch``) builds its
# shapes from this table, so a batch that differs from it would compile the step a second time.
FIELD_DTYPES = {k: np.dtype(np.float32 if k == "weights" else np.int32) for k in FIELDS}


@dataclasses.dataclass
class Example:
    """One tokenised row: ``ids`` [n] int32, ``loss_mask`` [n] 0/1 (see ``templating.encode_messages``);
    from the pipeline, both are views into a split's memory-mapped arrays, the mask int8."""

    ids: np.ndarray
    loss_mask: np.ndarray
    meta: dict[str, Any]


def _stack(items: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {k: np.stack([it[k] for it in items]) for k in FIELDS}


def pack_examples(exs: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """Shifts and concatenates examples into one ``[seq_len]`` row.

    Example ``k`` gets ``segment_ids == k + 1`` and positions restarting at 0; the model attends only
    within a segment, so each example's loss is what it would be alone in a padded row.
    """
    out = {k: np.zeros(seq_len, FIELD_DTYPES[k]) for k in FIELDS}
    out["inputs"][:] = pad_id
    at = 0
    for k, ex in enumerate(exs):
        n = len(ex.ids) - 1
        if at + n > seq_len:
            raise ValueError(f"packed examples need {at + n} tokens, more than the row's {seq_len}")
        out["inputs"][at:at + n] = ex.ids[:-1]
        out["targets"][at:at + n] = ex.ids[1:]
        out["weights"][at:at + n] = ex.loss_mask[1:]
        out["positions"][at:at + n] = np.arange(n)
        out["segment_ids"][at:at + n] = k + 1
        at += n
    return out


def row_bins(examples: Sequence[Example], seq_len: int, packing: str, max_segments: int = 0
             ) -> list[list[int]]:
    """Example indices per row, for training and for the teacher-forced eval alike: one each
    (``packing="none"``) or packed bins (of at most ``max_segments`` examples when > 0)."""
    if packing == "none":
        return [[i] for i in range(len(examples))]
    return pack([len(ex.ids) - 1 for ex in examples], seq_len, packing, max_segments)


def train_dataset(examples: Sequence[Example], *, seq_len: int, pad_id: int, batch_size: int,
                  seed: int, packing: str = "none", max_segments: int = 0, process_index: int = 0,
                  process_count: int = 1,
                  read_threads: int = 2, prefetch: int = 8, worker_count: int = 0
                  ) -> grain.IterDataset:
    """An endless, shuffled stream of this process's share of the global batch.

    Rows (single examples, or packed bins of them) are shuffled by a seeded permutation that changes
    every epoch; process ``i`` of ``n`` reads every n-th row of that stream, so the union over
    processes is exactly the single-process stream. ``iter(ds)`` has ``get_state()``/``set_state()``
    for checkpointing.

    Args:
      batch_size: the *global* batch size in rows; each process yields ``batch_size // process_count``.
      packing: ``none`` | ``best_fit`` | ``first_fit`` (see ``packing.pack``).
      max_segments: > 0: at most this many examples in a packed row.
      worker_count: > 0 runs the row assembly in that many background processes (grain
        ``mp_prefetch``); 0 uses ``read_threads`` threads.
    """
    if batch_size % process_count:
        raise ValueError(f"global batch size {batch_size} is not divisible by {process_count} processes")
    if not examples:
        raise ValueError("the training split is empty after tokenisation; see the data report")
    bins = row_bins(examples, seq_len, packing, max_segments)
    exs = list(examples)
    ds = grain.MapDataset.source(bins).shuffle(seed=seed).repeat(None)
    ds = ds[process_index::process_count]
    ds = ds.map(lambda b: pack_examples([exs[i] for i in b], seq_len, pad_id))
    ds = ds.batch(batch_size // process_count, drop_remainder=True, batch_fn=_stack)
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
    if worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return it


def eval_batches(examples: Sequence[Example], *, seq_len: int, pad_id: int, batch_size: int,
                 packing: str = "none", max_segments: int = 0, process_index: int = 0,
                 process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """Every example exactly once, in fixed-shape batches of rows: one example a row, or packed as
    training packs them (``packing``, ``max_segments``: see ``row_bins``). Each packed example is
    its own segment, so its loss is what it would be alone in a padded row, and a split of short
    examples takes as many rows as their tokens fill, not one row each (SmolLM2's first example,
    about 40-token test rows in rows of 128, spent about 70% of the eval step's tokens on padding).

    The last batch is filled with all-padding rows (weight 0), so summed metrics are exact and the
    eval step compiles once. Each process yields its share; every process yields the same number of
    batches (so collective ops line up across hosts). The rows are the same for any number of
    processes: packing sees every example.
    """
    bins = row_bins(examples, seq_len, packing, max_segments)
    local_bs = batch_size // process_count
    num_batches = max(1, -(-len(bins) // batch_size))
    empty = {k: np.zeros(seq_len, FIELD_DTYPES[k]) for k in FIELDS}
    empty["inputs"][:] = pad_id
    for b in range(num_batches):
        rows = []
        for j in range(local_bs):
            i = b * batch_size + process_index * local_bs + j
            rows.append(pack_examples([examples[e] for e in bins[i]], seq_len, pad_id) if i < len(bins)
                        else empty)
        yield _stack(rows)
