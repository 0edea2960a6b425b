r"""Attention's forward + backward alone, per backend and per Pallas GPU block sizes, in one process.

    python -m trainer.benchmarks.attention_kernels [--batch 8 --seq 4096 --heads 32 --kv_heads 8
        --head_dim 64] [--repeats 5] [--json out.json]

Times ``jax.grad`` of a scalar of ``attention.attention`` (packed rows of two segments each) under
``jax.jit``, the median of ``--repeats`` calls after one warm-up: the XLA path, cuDNN on unpacked rows
(one segment a row) and on packed ones (its packed layout with a bound of 16, 64 and 256 segments a
row), and the Pallas GPU flash kernel with each block-size choice in ``BLOCKS`` (forward query/key
blocks, then the backward's), and with ours and k/v repeated to every query head first (what the
model did before the kernel read each group's k/v head itself). Prints milliseconds and the useful
FLOP/s: 2 x heads x head_dim x the causal (query, key) pairs within segments a matmul pass, 2 passes
forward and 5 backward (a kernel that also computes pairs across segments gets no credit for them).
Off a GPU only the XLA row runs.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from trainer.benchmarks.timing import median_seconds
from trainer.models import attention as attention_lib
from trainer.models import attention_kernels as kernels
from trainer.models.config import ModelConfig

# (block_q, block_k, block_q_dkv, block_kv_dkv, block_q_dq, block_kv_dq) of the Pallas GPU kernel;
# the first is ours (``attention_kernels.flash_gpu_attention`` at 128), the second the library's default
BLOCKS = ((128, 128, 64, 128, 128, 64), (128, 128, 32, 32, 32, 32), (128, 128, 128, 128, 128, 128),
          (128, 64, 64, 64, 64, 64), (64, 64, 64, 64, 64, 64))


def _inputs(b: int, s: int, h: int, kv: int, d: int):
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (b, s, h, d), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, s, kv, d), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, s, kv, d), jnp.bfloat16)
    seg = np.ones((b, s), np.int32)
    seg[:, s // 2:] = 2  # two packed segments a row
    pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)])[None].repeat(b, 0).astype(np.int32)
    return q, k, v, jnp.asarray(seg), jnp.asarray(pos)


def _grad_fn(impl: str, cfg: ModelConfig, seg, pos, blocks=None):
    def loss(q, k, v):
        if blocks is None:  # impl: a backend, or ("cudnn", max_segments) for cuDNN on packed rows
            name, m = impl if isinstance(impl, tuple) else (impl, 0)
            c = dataclasses.replace(cfg, attention_impl=name, packed_inputs=m > 0 or name != "cudnn",
                                    max_segments=m)
            out = attention_lib.attention(q, k, v, q_segment_ids=seg, kv_segment_ids=seg, q_positions=pos,
                                          kv_positions=pos, q_offset=0, sliding=False, cfg=c)
        else:  # the Pallas GPU kernel with these block sizes; k/v as the model passes them (its
            # k/v heads), or repeated to every query head first (impl "repeat": the model before GQA
            # was native)
            from jax.experimental.pallas.ops.gpu import attention as pallas_gpu  # noqa: PLC0415
            groups = q.shape[2] // k.shape[2] if impl == "repeat" else 1
            sizes = pallas_gpu.BlockSizes(*blocks)
            out = kernels.pallas_gpu_mha(q, jnp.repeat(k, groups, 2), jnp.repeat(v, groups, 2), seg,
                                         q.shape[-1] ** -0.5, sizes, False)
        return jnp.sum(out.astype(jnp.float32) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def run(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, repeats: int) -> list[dict]:
    """Times each variant this backend has and prints the table; returns its rows."""
    b, s, h, kv, d = batch, seq, heads, kv_heads, head_dim
    q, k, v, seg, pos = _inputs(b, s, h, kv, d)
    cfg = ModelConfig(vocab_size=8, hidden_size=h * d, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=h, num_key_value_heads=kv, head_dim=d, dtype="bfloat16")
    variants = [("xla", "xla", None, seg)]
    if jax.default_backend() == "gpu":
        variants.append(("cudnn, unpacked", "cudnn", None, jnp.ones_like(seg)))
        variants += [(f"cudnn, packed, <= {m} segments", ("cudnn", m), None, seg) for m in (16, 64, 256)]
        variants += [(f"flash {'/'.join(map(str, bl))}", "flash", bl, seg) for bl in BLOCKS]
        variants.append((f"flash {'/'.join(map(str, BLOCKS[0]))}, k/v repeated", "repeat", BLOCKS[0], seg))
    rows = []
    print(f"{jax.devices()[0].device_kind}: batch {b} x {s}, {h}/{kv} heads of {d}, bfloat16")
    print("| variant | ms (forward + backward) | useful TFLOP/s |\n|---|---:|---:|")
    for name, impl, blocks, segment_ids in variants:
        try:
            ms = 1e3 * median_seconds(_grad_fn(impl, cfg, segment_ids, pos, blocks), q, k, v, repeats=repeats)[0]
        except Exception as e:  # noqa: BLE001 -- a block size the kernel refuses is a row, not the end
            print(f"| {name} | failed: {str(e).splitlines()[0][:100]} | |")
            continue
        rows.append({"variant": name, "ms": ms, "tflops": useful_flops(segment_ids, h, d) / ms / 1e9})
        print(f"| {name} | {ms:.2f} | {rows[-1]['tflops']:.0f} |", flush=True)
    return rows


def useful_flops(segment_ids, heads: int, head_dim: int) -> float:
    """2 x heads x head_dim x the causal pairs within each row's segments, a matmul pass; 2 passes
    forward and 5 backward."""
    seg = np.asarray(segment_ids)
    pairs = sum(float(np.sum(np.unique(row, return_counts=True)[1].astype(np.float64) ** 2 / 2)) for row in seg)
    return 14 * heads * head_dim * pairs


def main(argv) -> None:
    del argv
    F = flags.FLAGS
    rows = run(F.batch, F.seq, F.heads, F.kv_heads, F.head_dim, F.repeats)
    if F.json:
        with open(F.json, "w") as f:
            json.dump({"batch": F.batch, "seq": F.seq, "heads": F.heads, "kv_heads": F.kv_heads,
                       "head_dim": F.head_dim, "rows": rows}, f, indent=1)


def _define_flags() -> None:
    """At run time only: the other benchmarks' modules (imported in one test process) define some of
    the same flag names."""
    flags.DEFINE_integer("batch", 8, "Rows.")
    flags.DEFINE_integer("seq", 4096, "Tokens per row.")
    flags.DEFINE_integer("heads", 32, "Query heads.")
    flags.DEFINE_integer("kv_heads", 8, "Key/value heads.")
    flags.DEFINE_integer("head_dim", 64, "Head size.")
    flags.DEFINE_integer("repeats", 5, "Timed calls per variant.")
    flags.DEFINE_string("json", "", "Write the rows here too.")


if __name__ == "__main__":
    _define_flags()
    app.run(main)
