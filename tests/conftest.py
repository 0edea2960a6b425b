"""Test setup: 8 virtual CPU devices, so sharding tests run on a real multi-device mesh.

Must run before jax is imported anywhere; single-device tests build a mesh over ``jax.devices()[:1]``.
The device count is added to (or replaces the count in) a user's own ``XLA_FLAGS``: their other flags
stay, and the 8-device tests never turn into skips because some flags were already set.

``reference(name)``: the independent references (torch, transformers, peft, accelerate, gguf) are
imported through it. ``launch/test.sh`` -- CI's command -- sets ``IFT_REQUIRE_REFERENCES=1``: there a
missing reference is an error, never a quietly skipped tier; elsewhere it skips, with the reason.
"""

import importlib
import os
import re
import sys

import pytest

_COUNT = "--xla_force_host_platform_device_count=8"
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags.strip()} {_COUNT}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.tpu_env import quiet_libtpu  # noqa: E402 (imports no JAX)

quiet_libtpu()  # the tpu-aot extra's libtpu, off a TPU VM: no page of warnings in every subprocess


def reference(name: str):
    """Imports the test reference ``name``: an error under ``IFT_REQUIRE_REFERENCES=1``, else a skip."""
    if os.environ.get("IFT_REQUIRE_REFERENCES") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)
