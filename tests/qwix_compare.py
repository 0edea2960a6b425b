"""qwix (Google's JAX quantisation library) against ``trainer.models.quant`` for an NF4 frozen base, on
one 4,096 x 4,096 projection: stored bytes, the quantiser's temporaries and time, and the
dequantised values. A script, not a test (qwix is no dependency):

    pip install --no-deps qwix==0.1.8 && python tests/qwix_compare.py
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from qwix._src.core import numerics

from trainer.models import quant

IN = OUT = 4096
w = np.random.default_rng(0).standard_normal((IN, OUT)).astype(np.float32) * 0.02


def qwix_nf4(x):
    """qwix's NF4 codes with our blocking (absmax per 64 inputs), so the values are comparable."""
    blocks = x.reshape(IN // 64, 64, OUT)
    scale = jnp.max(jnp.abs(blocks), axis=1, keepdims=True)
    return numerics.fp_to_nf4(blocks / scale), scale


compiled = jax.jit(qwix_nf4).lower(jnp.asarray(w)).compile()
t0 = time.perf_counter()
codes, scale = jax.block_until_ready(compiled(jnp.asarray(w)))
seconds = time.perf_counter() - t0
temps = compiled.memory_analysis().temp_size_in_bytes
print(f"qwix {getattr(__import__('qwix'), '__version__', '')}: codes {codes.dtype} {codes.nbytes / 2**20:.1f} MiB + "
      f"scales {scale.nbytes / 2**20:.1f} MiB on {jax.devices()[0].platform}; quantising takes "
      f"{temps / 2**20:.0f} MiB of device temporaries for a {w.nbytes / 2**20:.0f} MiB weight, {seconds:.2f} s")
t0 = time.perf_counter()
ours = quant.quantize(w, "nf4", (-2,))
seconds = time.perf_counter() - t0
print(f"ours: codes {ours.codes.dtype} (two per byte) {ours.codes.nbytes / 2**20:.1f} MiB + scales "
      f"{ours.scale.nbytes / 2**20:.1f} MiB, quantised on the host before placement, {seconds:.2f} s")
back_qwix = np.asarray(numerics.nf4_to_fp(codes).reshape(IN // 64, 64, OUT) * scale).reshape(IN, OUT)
back_ours = np.asarray(quant.dequantize(ours))
print(f"dequantised: {np.sum(back_qwix != back_ours)} of {w.size} values differ (a tie between two levels); "
      "max |ours - qwix| "
      f"{np.max(np.abs(back_ours - back_qwix)):.2e}; max |w - ours| {np.max(np.abs(w - back_ours)):.2e}")
