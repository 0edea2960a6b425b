"""The median time of a jitted, stateless call -- the loss and attention benchmarks' measure."""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np


def median_seconds(fn, *args, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls of ``fn(*args)`` after one untimed call (the compile), each
    waited for; and that first call's output."""
    out = jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), out
