"""A GGUF file, parsed once per process: the tokenizer (``data_pipeline.tokenizer.gguf_tokenizer``)
and the model's config and weights (``trainer.io.gguf``) share it.

Why: ``gguf.GGUFReader`` parses every metadata field when it opens a file, one small numpy read per
string: SmolLM2-135M's file (49,152 tokens and their merges) took 1.9-2.2 s on this 2-core CPU, and
a run that starts from it parsed it twice (the tokenizer, then the config and weights).
"""

from __future__ import annotations

import functools
import os
from typing import Any


def reader(path: str) -> Any:
    """``gguf.GGUFReader(path)``, parsed once per process for as long as the file is unchanged
    (its size and modification time); whatever the reader raises on a damaged file, it raises here."""
    stat = os.stat(path)
    return _read(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read(path: str, mtime_ns: int, size: int) -> Any:
    import gguf  # noqa: PLC0415 -- only runs that read a GGUF file need it
    return gguf.GGUFReader(path)
