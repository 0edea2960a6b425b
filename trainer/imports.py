"""Imports a library without the optional heavy modules it tries at import time and we never use.

Two of the libraries every training run imports spend most of a run's start-up importing modules for
features this project does not call, each inside ``try: import X / except ImportError``:

- ``tensorboardX.writer`` imports ``torch`` to accept torch tensors (we log floats). torch is in
  every PyTorch user's environment and in the tests': 4.4-5.6 s of a tiny run's 28 s with warm
  compiled programs, on the 2-core machine of the README (``python -X importtime``). Its
  ``record_writer`` imports ``google.cloud.storage`` (0.13 s) for ``gs://`` event files: ours are
  written locally and uploaded with the rest of the workdir (``trainer.training.metrics``).
- ``rouge_score`` imports ``nltk``, whose ``nltk.metrics.association`` imports ``scipy.stats`` for
  Fisher's exact test (ROUGE does not use it): 1.5-3.1 s.

``import_without`` hides those modules while the library is imported (``sys.modules[name] = None``
makes ``import name`` raise ImportError, the library's own fallback), then unhides them, so a later
``import torch`` anywhere in the process works as usual. A module already imported is not hidden.
Meant for start-up: another thread importing a hidden module at that moment would find it absent.
"""

from __future__ import annotations

import importlib
import sys
import types


def import_without(module: str, *hidden: str) -> types.ModuleType:
    """``importlib.import_module(module)`` while the modules ``hidden`` (not yet imported) look absent."""
    absent = [name for name in hidden if name not in sys.modules]
    for name in absent:
        sys.modules[name] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        return importlib.import_module(module)
    finally:
        for name in absent:
            if name in sys.modules and sys.modules[name] is None:
                del sys.modules[name]
