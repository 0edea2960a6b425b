"""A base model converted once into the run's layout and saved as a sharded Orbax checkpoint.

An HF directory is read tensor by tensor on every host, each converted to float32 on the host and
sliced there (``trainer.io.hf``): on a pod every host reads the whole checkpoint. A converted base
(``python -m trainer.convert``) holds the parameters as the run keeps them -- stacked layers for
scanned models, ``model.param_dtype`` -- in Orbax's sharded format, so a restore with the target
shardings has each process read only the chunks its devices hold (TensorStore reads by chunk).

The directory is a whole base model: ``config.json``, the tokenizer and generation files copied from
the source, ``params/`` (Orbax) and ``flax_ift_base.json`` (the layout). ``model.hf_path`` takes it
like an HF directory; local paths and ``gs://`` both work (``trainer.io.paths``).
"""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

# how Orbax cuts an array into chunks (not exported; bytes_read_per_process must agree with it)
from orbax.checkpoint._src.arrays.subchunking import choose_chunk_shape

from trainer.io import paths

MARKER = "flax_ift_base.json"
PARAMS = "params"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf", ".safetensors.index.json", ".bin.index.json")


SKIP_IN_LOCAL_COPY = (PARAMS,)  # Orbax reads these from where they are
# Orbax stores each written shard as one compressed chunk, read whole: a base converted on one
# device would be one chunk per array, and every host of a pod would read all of it. Chunks of at
# most this many bytes (Orbax splits the largest dimensions first, so every large axis is cut) let a
# host read about its share of each array, rounded up to the chunks it touches.
CHUNK_BYTES = 4 << 20


def is_converted(path: str) -> bool:
    return bool(path) and not path.endswith(".gguf") and paths.exists(paths.join(path, MARKER))


def write(params: Any, out: str, source: str, layout: dict[str, Any],
          chunk_bytes: int = CHUNK_BYTES) -> None:
    """Saves ``params`` (sharded arrays, the run's layout) under ``out/params`` in chunks of at most
    ``chunk_bytes`` and copies the source directory's other files (config, tokenizer, generation
    config) beside them. Every process calls this (Orbax writes each process's shards)."""
    ckptr = ocp.StandardCheckpointer()
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=chunk_bytes), params)
    ckptr.save(paths.abspath(paths.join(out, PARAMS)), params, save_args=save_args)
    ckptr.wait_until_finished()
    if jax.process_index() == 0:
        if paths.isdir(source):
            for name in paths.listdir(source):
                src = paths.join(source, name)
                if not name.endswith(WEIGHT_SUFFIXES) and paths.isfile(src):
                    paths.write_bytes(paths.join(out, name), paths.path(src).read_bytes())
        paths.write_text(paths.join(out, MARKER), json.dumps({**layout, "source": source}, indent=1))


def layout_problem(path: str, layout: dict[str, Any]) -> str:
    """"" when the converted base at ``path`` has ``layout`` (scan_layers, param_dtype), else one line
    saying what differs."""
    saved = json.loads(paths.read_text(paths.join(path, MARKER)))
    diff = {k: (saved.get(k), v) for k, v in layout.items() if saved.get(k) != v}
    if not diff:
        return ""
    what = ", ".join(f"{k}={a!r} there, {b!r} in this run" for k, (a, b) in diff.items())
    return (f"the converted base {path} has another layout ({what}); convert it again with this "
            f"config: python -m trainer.convert --hf_path {saved.get('source', '...')} --out DIR "
            "--config C")


# Orbax reads each distinct slice of a process's devices on its own, and TensorStore keeps no array
# chunks by default, so a chunk two of its slices touch (one that straddles a shard boundary) was read
# twice unless the two reads overlapped in time. A chunk cache for the length of the restore makes
# it once; it is freed with the restore's context.
CHUNK_CACHE_BYTES = 1 << 30


class _ChunkCachedArrays(ocp.type_handlers.ArrayHandler):
    """Orbax's array handler, restoring through Orbax's own TensorStore context with a chunk cache
    added (a child context: everything else is Orbax's)."""

    async def deserialize(self, infos, args=None):
        if infos:
            context = ts.Context(ts.Context.Spec({"cache_pool": {"total_bytes_limit": CHUNK_CACHE_BYTES}}),
                                 parent=infos[0].ts_context)
            for info in infos:
                info.ts_context = context
        return await super().deserialize(infos, args)


def read(path: str, target: Any) -> Any:
    """The parameters at ``path``, restored straight into ``target``'s shardings
    (``ShapeDtypeStruct``s with shardings): each process reads only its devices' chunks, once."""
    where = paths.join(paths.source_of(path), PARAMS)  # a local copy of a gs:// base: the bucket's
    registry = ocp.type_handlers.create_type_handler_registry((jax.Array, _ChunkCachedArrays()))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)) as ckptr:
        return ckptr.restore(paths.abspath(where), args=ocp.args.PyTreeRestore(
            target, restore_args=ocp.checkpoint_utils.construct_restore_args(target)))


def bytes_read_per_process(abstract: Any, chunk_bytes: int = CHUNK_BYTES) -> dict[int, int]:
    """Bytes each process reads to restore a base converted on one device with ``chunk_bytes``
    chunks into ``abstract``'s shardings (``ShapeDtypeStruct``s): every chunk its devices' slices
    touch, once (``read``'s chunk cache), uncompressed, not counting Orbax's index. The chunk shapes
    are the ones Orbax picks."""
    total: dict[int, int] = {}
    for x in jax.tree.leaves(abstract):
        chunk = choose_chunk_shape(x.shape, x.shape, np.dtype(x.dtype), chunk_bytes)
        touched: dict[int, set] = {}
        for device, index in x.sharding.devices_indices_map(x.shape).items():
            spans = [range((s.start or 0) // c, ((n if s.stop is None else s.stop) - 1) // c + 1)
                     for s, c, n in zip(index, chunk, x.shape)]
            touched.setdefault(device.process_index, set()).update(itertools.product(*spans))
        for process, chunks in touched.items():
            total[process] = total.get(process, 0) + len(chunks) * math.prod(chunk) * x.dtype.itemsize
    return total
