"""The median time of a jitted, stateless call -- the loss and attention benchmarks' measure --, the
rounds in which the train-step and generation benchmarks' sides take turns, and the host CPU every
benchmark row names."""

from __future__ import annotations

import os
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


def timed_rounds(sides: dict[str, tuple[float, Any]], rounds: int) -> dict[str, list[float]]:
    """Each side's seconds over ``rounds`` rounds: round 1 is each side's first timing (``sides``:
    name -> (those seconds, a function that times the same work again)); in the later rounds the
    sides take turns, the order reversed every other round, so no side always runs first.

    ``trainer.bench``'s sides run untimed steps of their own before they start the clock, until one
    makes no page faults (``host_memory.settle``, at most 3): without one, a side's timing began right after
    another side's steps, and at the SmolLM2 shape ours ran 117 tokens/s in the round that began right
    after Tunix's steps, against 192-195 in the rounds it began; with one only, ours at the demo
    shape still page-faulted through the timed steps that followed PyTorch's (13,156-14,385 tokens/s
    against 18,969 in the round before PyTorch first ran)."""
    out = {name: [first] for name, (first, _) in sides.items()}
    names = list(sides)
    for r in range(1, rounds):
        for name in names[::-1] if r % 2 else names:
            out[name].append(sides[name][1]())
    return out


# Instruction sets that change which kernels both sides of a CPU comparison run.
_ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def host_cpu() -> str:
    """The CPU model, its cores and its wide-vector instruction sets, e.g. ``Intel(R) Xeon(R)
    Processor, 2 cores, avx2 avx512f avx512_bf16 amx_tile``: a CPU ratio holds for its machine only
    (the same generation benchmark at SmolLM2's shape, batch 1, ran PyTorch at 17.6 tokens/s and ours
    at 34.6 on one day's 2-core machine, 27.2 and 27.5 on the next day's). "" where /proc/cpuinfo is
    not there."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = " ".join(f for f in _ISA_FLAGS if f in flags)
    return f"{fields.get('model name', '?')}, {os.cpu_count()} cores" + (f", {isa}" if isa else "")
