"""Packing: many short examples per fixed-length row, kept apart by ``segment_ids``.

Why not grain's ``FirstFitPackIterDataset``/``BestFitPackIterDataset``: they pack a *stream* and emit
all open bins as soon as one element does not fit, which wastes 10-20% of the row on long-tailed
instruction data. Packing the whole split offline with best-fit decreasing reaches >= 97% on GSM8K and
the T0 mix at 512 tokens (``tests/packing_test.py``), and the packed rows are then a plain list that
grain shuffles per epoch and checkpoints by index, like unpacked examples.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np


def pack(lengths: Sequence[int], capacity: int, method: str = "best_fit", max_segments: int = 0
         ) -> list[list[int]]:
    """Groups example indices into bins of at most ``capacity`` tokens.

    Args:
      lengths: tokens per example (each <= capacity).
      capacity: tokens per packed row.
      method: ``best_fit`` (decreasing; the fullest bin that still fits) or ``first_fit`` (decreasing;
        the oldest bin that fits).
      max_segments: > 0 closes a bin once it holds this many examples (cuDNN's packed attention
        needs a bound on a row's segments).

    Returns:
      Bins of example indices; every index appears exactly once. Deterministic.
    """
    if method not in ("best_fit", "first_fit"):
        raise ValueError(f"data.packing must be 'none', 'best_fit' or 'first_fit', got {method!r}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    if method == "best_fit":
        # Free space -> bins with that much free space. ``caps`` (sorted, distinct, <= capacity + 1
        # values) finds the tightest fit by bisection, so this is O(n log capacity).
        caps: list[int] = []
        by_cap: dict[int, list[int]] = {}
        for i in order:
            n = lengths[i]
            if n > capacity:
                raise ValueError(f"example {i} has {n} tokens, more than the row's {capacity}")
            k = bisect.bisect_left(caps, n)
            if k < len(caps):
                free = caps[k]
                b = by_cap[free].pop()
                if not by_cap[free]:
                    del by_cap[free], caps[k]
            else:
                b, free = len(bins), capacity
                bins.append([])
            bins[b].append(i)
            left = free - n
            if len(bins[b]) == max_segments:  # full by count: no longer a candidate
                continue
            if left not in by_cap:
                by_cap[left] = []
                bisect.insort(caps, left)
            by_cap[left].append(b)
    else:
        free_space: list[int] = []
        for i in order:
            n = lengths[i]
            if n > capacity:
                raise ValueError(f"example {i} has {n} tokens, more than the row's {capacity}")
            b = next((j for j, f in enumerate(free_space) if f >= n), None)
            if b is None:
                b = len(bins)
                bins.append([])
                free_space.append(capacity)
            bins[b].append(i)
            free_space[b] = -1 if len(bins[b]) == max_segments else free_space[b] - n
    return bins


def efficiency(lengths: Sequence[int], bins: Sequence[Sequence[int]], capacity: int) -> float:
    """Useful tokens / row tokens."""
    return float(np.sum(lengths)) / (len(bins) * capacity) if bins else 0.0
