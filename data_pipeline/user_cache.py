"""The one directory flax-ift keeps what it can make again in -- tokenised splits
(``data_pipeline.pipeline``), compiled programs (``trainer.compile_cache``) -- each under its own
name: ``$XDG_CACHE_HOME/flax_ift`` as the XDG base-directory rules say (a relative value is ignored,
as they also say), else ``~/.cache/flax_ift``. Imports nothing but ``os``: the trainer reads it
before JAX starts."""

from __future__ import annotations

import os


def user_cache_dir(*parts: str) -> str:
    """``<cache root>/flax_ift/<parts...>`` (see the module docstring); nothing is created."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flax_ift", *parts)
