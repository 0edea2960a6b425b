"""Test setup: 8 virtual CPU devices, so sharding tests run on a real multi-device mesh.

Must run before jax is imported anywhere; single-device tests build a mesh over ``jax.devices()[:1]``.
The device count is added to (or replaces the count in) a user's own ``XLA_FLAGS``: their other flags
stay, and the 8-device tests never turn into skips because some flags were already set.

``reference(name)``: the independent references (torch, transformers, peft, accelerate, gguf) are
imported through it. ``launch/test.sh`` -- CI's command -- sets ``IFT_REQUIRE_REFERENCES=1``: there a
missing reference is an error, never a quietly skipped tier; elsewhere it skips, with the reason.
"""

import atexit
import importlib
import os
import re
import shutil
import sys
import tempfile

import pytest

_COUNT = "--xla_force_host_platform_device_count=8"
_flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
os.environ["XLA_FLAGS"] = f"{_flags.strip()} {_COUNT}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the whole run -- both xdist workers and every trainer process
# the tests start inherit it: the suite compiles the same small programs again and again (each
# resumed, killed or multi-process run recompiled what the run before it had just compiled; a tiny
# run took 35 s cold and 19 s warm). It lives as long as the run (made by the first process to load
# this file, removed when that process exits), so no test reads programs from an earlier run, and a
# cache of your own (JAX_COMPILATION_CACHE_DIR already set) is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flax_ift_test_jax_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.tpu_env import quiet_libtpu  # noqa: E402 (imports no JAX)

quiet_libtpu()  # the tpu-aot extra's libtpu, off a TPU VM: no page of warnings in every subprocess


def reference(name: str):
    """Imports the test reference ``name``: an error under ``IFT_REQUIRE_REFERENCES=1``, else a skip."""
    if os.environ.get("IFT_REQUIRE_REFERENCES") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)
