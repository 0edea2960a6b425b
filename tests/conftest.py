"""Test setup: 8 virtual CPU devices, so sharding tests run on a real multi-device mesh.

Must run before jax is imported anywhere; single-device tests build a mesh over ``jax.devices()[:1]``.
"""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
