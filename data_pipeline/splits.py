"""Hash-stable split assignment.

A row's split is a function of its content (and a salt) alone, so it keeps its split when the dataset
grows, shrinks or is reordered -- unlike ``train_test_split`` with a seed, where adding one row
reshuffles everything and silently leaks old test rows into train.
"""

from __future__ import annotations

import hashlib


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
