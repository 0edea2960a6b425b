"""The source schema: the keys of a ``data.sources.NAME`` entry (``source()``, one default per key),
the split names, and ``SourceReport`` -- what reading one source did, so nothing disappears without
a count."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from ml_collections import ConfigDict

from data_pipeline.errors import BadRows

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "val": "validation", "test": "test"}
SOURCE_TYPES = ("files", "disk", "hub", "synthetic")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
Row = dict[str, Any]


def source(**overrides: Any) -> ConfigDict:
    """A source spec with every key present (so ``--config.data.sources.NAME.KEY=...`` can set any)."""
    spec = ConfigDict(dict(
        type="files",        # files | disk | hub | synthetic
        path="",             # files: a file or glob; disk: the save_to_disk directory; hub: the name
        splits=ConfigDict(dict(train="", validation="", test="")),  # files: the dataset's own splits
        hub_config="",       # hub: the dataset config name
        file_format="auto",  # auto (from the extension) | jsonl | json | csv | parquet
        format="prompt_completion",  # prompt_completion | alpaca | messages
        fields=ConfigDict(dict(prompt="prompt", completion="completion", instruction="instruction",
                               input="input", output="output", messages="messages", role="role",
                               content="content")),
        system="",           # a system prompt added to every conversation that has none
        strip_suffix="",     # e.g. "<|endoftext|>" that some exports append to every completion
        strip=True,          # strip surrounding whitespace from every message
        weight=0.0,          # mixture weight (train only); 0 everywhere = as many rows as each has
        max_rows=0,          # read at most this many rows per split (0 = all)
        task_from="",        # per-task eval label: "" = the source name | "file" = file stem | a field
    ))
    for k, v in overrides.items():
        if isinstance(v, dict):
            spec[k].update(v)
        else:
            spec[k] = v
    return spec


@dataclasses.dataclass
class SourceReport:
    """What reading one source did: nothing disappears without a count here."""

    name: str
    files: list[str] = dataclasses.field(default_factory=list)
    rows: Counter = dataclasses.field(default_factory=Counter)  # split -> rows kept
    bad: BadRows | None = None
    duplicates_removed: Counter = dataclasses.field(default_factory=Counter)  # split -> rows
    mixture_rows: int = 0  # train examples after mixture re-sampling (0: no re-sampling)


class _Attrs(dict):
    """A plain dict read as attributes: the per-row view of a source's ConfigDict."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def plain_spec(spec: Any) -> _Attrs:
    d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    return _Attrs({k: _Attrs(v) if isinstance(v, dict) else v for k, v in d.items()})
