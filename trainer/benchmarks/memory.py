"""Memory accounting shared by the dry run and the benchmarks: the bytes a state's shards take on one
device, and what XLA's buffer assignment says a compiled step needs."""

from __future__ import annotations

import jax
import numpy as np


def state_bytes(state) -> dict[str, int]:
    """Bytes of the state's parts on device 0 (its shards): trainable params, optimizer, frozen base.
    Works on arrays and on ShapeDtypeStructs with shardings."""
    def per_device(tree) -> int:
        total = 0
        for x in jax.tree.leaves(tree):
            shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
            total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
        return total
    return {"params": per_device(state.params), "opt_state": per_device(state.opt_state),
            "frozen": per_device(state.frozen)}


def compiled_memory(compiled) -> dict[str, int] | None:
    """Per-device bytes of a compiled step: arguments, outputs, aliased (donated state whose outputs
    reuse the arguments' buffers), temporaries, and their total (None where XLA gives no analysis)."""
    mem = compiled.memory_analysis()
    if mem is None:
        return None
    args, outs = mem.argument_size_in_bytes, mem.output_size_in_bytes
    temps, alias = mem.temp_size_in_bytes, mem.alias_size_in_bytes
    return {"arguments": args, "outputs": outs, "aliased": alias, "temporaries": temps,
            "total": args + outs - alias + temps}
