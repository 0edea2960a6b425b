"""Hash-stable split assignment.

A row's split is a function of its content (and a salt) alone, so it keeps its split when the dataset
grows, shrinks or is reordered -- unlike ``train_test_split`` with a seed, where adding one row
reshuffles everything and silently leaks old test rows into train.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from data_pipeline.source_spec import SPLITS

Row = dict[str, Any]


def hash_split(key: str, fractions: dict[str, float], salt: str = "") -> str:
    """Returns the split name for ``key`` given ``fractions`` (name -> fraction, summing to 1).

    Args:
      key: the content that decides the split (e.g. the prompt, or a task's input).
      fractions: ordered mapping of split name to fraction; must sum to 1 within 1e-6.
      salt: changes the assignment without changing the fractions.
    """
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6 or any(f < 0 for f in fractions.values()):
        raise ValueError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64  # uniform in [0, 1)
    acc = 0.0
    for name, frac in fractions.items():
        acc += frac
        if u < acc:
            return name
    return list(fractions)[-1]


def content_key(messages: list[dict[str, str]]) -> str:
    """What makes two rows "the same": their roles and texts (not the file they came from)."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def assign_splits(rows: dict[str, list[Row]], fractions: dict[str, float], salt: str
                  ) -> dict[str, list[Row]]:
    """Own splits kept; rows without one (and splits a dataset lacks) assigned by content hash."""
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    own = {s: r for s, r in rows.items() if s}
    if own:
        missing = {s: fractions.get(s, 0.0) for s in SPLITS if s not in own and s != "train"}
        carve = {**missing, "train": max(0.0, 1.0 - sum(missing.values()))}
        for s, rs in own.items():
            if s != "train":
                out[s] += rs
        for r in own.get("train", []):
            out[hash_split(content_key(r["messages"]), carve, salt)].append(r)
    for r in rows.get("", []):
        out[hash_split(content_key(r["messages"]), fractions, salt)].append(r)
    return out


def remove_cross_split_duplicates(splits: dict[str, list[Row]]) -> dict[str, list[Row]]:
    """Drops validation/test rows whose content is already in an earlier split (train > validation >
    test); returns the removed rows per split (for the per-source counts)."""
    seen: set[str] = set()
    removed: dict[str, list[Row]] = {}
    for s in SPLITS:
        keys = [content_key(r["messages"]) for r in splits[s]]
        dup = [s != "train" and k in seen for k in keys]
        removed[s] = [r for r, d in zip(splits[s], dup) if d]
        splits[s] = [r for r, d in zip(splits[s], dup) if not d]
        seen.update(keys)
    return removed
