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
# cache of your own (JAX_COMPILATION_CACHE_DIR already set) is left alone. In a multi-process run
# only process 0 reads from it: on the CPU each process's key differs (trainer/compile_cache.py).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="flax_ift_test_jax_cache_")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trainer.host_memory import keep_freed_memory  # noqa: E402 (imports no JAX)
from trainer.tpu_env import quiet_libtpu  # noqa: E402 (imports no JAX)

quiet_libtpu()  # the tpu-aot extra's libtpu, off a TPU VM: no page of warnings in every subprocess
keep_freed_memory()  # as every entry point does: the tests run the programs the way a run does


def reference(name: str):
    """Imports the test reference ``name``: an error under ``IFT_REQUIRE_REFERENCES=1``, else a skip."""
    if os.environ.get("IFT_REQUIRE_REFERENCES") == "1":
        return importlib.import_module(name)
    return pytest.importorskip(name)


# The files that took longest in a `--durations=0` run (2026-12-06: 655, 542, 218, 213, 183, 159, 158,
# 149, 135, 126, 111, 97, 88 and 83 s), run first. `launch/test.sh` hands out whole files in collection
# order (`--dist loadfile --no-loadscope-reorder`), so each worker takes the next-longest file and the
# short ones fill the end; xdist's default order is by number of tests per file, which puts a file of
# a few long tests (the multi-process ones) wherever its count falls, possibly last.
SLOW_FILES_FIRST = ("multiprocess_test.py", "fault_tolerance_test.py", "gguf_test.py", "hf_run_test.py",
                    "dry_run_test.py", "lora_test.py", "cli_test.py", "topology_test.py", "attention_test.py",
                    "families_test.py", "real_data_test.py", "generate_test.py", "lora_peft_test.py",
                    "scan_test.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file keeps its order
