"""Weighted mixtures of sources: ``mixture_weights`` reads them from ``data.sources.*.weight``,
``mix`` re-samples each source's train examples to its share (applied after the length policy, so
the weights hold for the examples that survive it)."""

from __future__ import annotations

import random
from typing import Any

from data_pipeline.errors import DataError


def mix(train_by_source: dict[str, list[Any]], weights: dict[str, float], total: int, seed: int
        ) -> dict[str, list[Any]]:
    """Re-samples each source's train rows (or examples) to ``total * weight / sum(weights)``.

    An up-weighted source repeats its rows (every row once per pass, a seeded order); a down-weighted
    one contributes a seeded subset. The mixture is fixed for the run (it is packed once).
    """
    wsum = sum(w for name, w in weights.items() if train_by_source[name])  # empty sources get none
    out = {}
    for name, rows in train_by_source.items():
        want = round(total * weights[name] / wsum)
        if not rows or want == 0:
            out[name] = []
            continue
        rng = random.Random(f"{seed}:{name}")
        picked: list[Any] = []
        while len(picked) < want:
            order = list(rows)
            rng.shuffle(order)
            picked += order[: want - len(picked)]
        out[name] = picked
    return out


def mixture_weights(data_cfg: Any) -> dict[str, float] | None:
    """``{source: weight}`` when the sources form a weighted mixture, else None."""
    weights = {name: float(spec.weight) for name, spec in dict(data_cfg.sources).items()}
    if not any(w > 0 for w in weights.values()):
        return None
    if any(w <= 0 for w in weights.values()):
        raise DataError(f"data.sources: either every source has a weight > 0 or none does, got {weights}")
    return weights
