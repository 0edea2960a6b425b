"""Where rows come from: ``build_splits(data_cfg) -> {split: [row]}``.

A row is a dict with at least ``prompt`` and ``completion`` (strings) and optionally ``task``/``source``
for per-task reporting. The data spec lives in the config (saved in the workdir), so ``trainer.eval``
rebuilds exactly the same splits from the workdir alone.
"""

from __future__ import annotations

from typing import Any

from data_pipeline.synthetic import synthetic_splits

SOURCES = ("synthetic",)


def build_splits(data_cfg: Any) -> dict[str, list[dict[str, Any]]]:
    """Builds the train/validation/test rows described by ``config.data``."""
    if data_cfg.source == "synthetic":
        return synthetic_splits(
            data_cfg.synthetic.num_rows, data_cfg.synthetic.seed, dict(data_cfg.split_fractions),
            salt=data_cfg.split_salt, min_len=data_cfg.synthetic.min_word_len,
            max_len=data_cfg.synthetic.max_word_len, alphabet=data_cfg.synthetic.alphabet,
            max_first_addend=data_cfg.synthetic.max_first_addend,
            max_second_addend=data_cfg.synthetic.max_second_addend,
            task_weights=dict(data_cfg.synthetic.task_weights))
    raise ValueError(f"unknown data.source {data_cfg.source!r}; supported: {', '.join(SOURCES)}")
