"""Device mesh and logical-axis sharding rules.

Model code names axes logically (``embed``, ``mlp``, ``batch``...); the config maps each logical name to
mesh axes. Changing parallelism (pure data parallel on one GPU, FSDP + tensor on a TPU pod) is a config
change, never a model change.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

Rules = Sequence[tuple[str, Any]]


def mesh_sizes(axes: dict[str, int], device_count: int) -> dict[str, int]:
    """``{axis: size}`` with the one -1 resolved to the remaining devices; a ``ValueError`` saying why
    when the sizes cannot cover ``device_count`` devices exactly. (The config check and ``make_mesh``
    both resolve here.)"""
    if any(not isinstance(v, int) or (v < 1 and v != -1) for v in axes.values()):
        raise ValueError(f"mesh: axis sizes must be positive integers or -1, got {axes}")
    if list(axes.values()).count(-1) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got {axes}")
    known = int(np.prod([v for v in axes.values() if v != -1]))
    if -1 in axes.values():
        if device_count % known:
            raise ValueError(f"mesh: {axes} does not divide the {device_count} devices")
        axes = {k: (device_count // known if v == -1 else v) for k, v in axes.items()}
    if int(np.prod(list(axes.values()))) != device_count:
        raise ValueError(f"mesh: {axes} needs {int(np.prod(list(axes.values())))} devices, but "
                         f"{device_count} are available")
    return dict(axes)


def make_mesh(axes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a mesh from ``{axis_name: size}``; one size may be -1 (= all remaining devices).

    A mesh exists even on one device, so the same shardings and code run everywhere.
    """
    devices = list(devices if devices is not None else jax.devices())
    sized = mesh_sizes(dict(axes), len(devices))
    names, sizes = list(sized), list(sized.values())
    from jax.experimental import mesh_utils
    try:  # topology-aware device order on TPU/GPU; falls back for CPU and odd shapes
        dev = mesh_utils.create_device_mesh(sizes, devices)
    except Exception:  # noqa: BLE001 - any failure here only costs locality, not correctness
        dev = np.asarray(devices).reshape(sizes)
    return Mesh(dev, tuple(names))


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> P:
    """Maps logical axis names to a PartitionSpec through ``rules`` (unknown names: replicated)."""
    table = dict(rules)
    return P(*(table.get(n) if n is not None else None for n in names))


def _on_mesh(spec: P, mesh: Mesh) -> NamedSharding:
    """Drops mesh axes the mesh does not have, so one rule set serves every mesh shape
    (e.g. the default rules name ``fsdp`` and ``tensor``; a ``data``-only mesh just replicates)."""

    def keep(entry):
        if entry is None:
            return None
        axes = tuple(a for a in ((entry,) if isinstance(entry, str) else entry) if a in mesh.shape)
        return axes[0] if len(axes) == 1 else (axes or None)

    return NamedSharding(mesh, P(*(keep(e) for e in spec)))


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
    """NamedShardings for an ``nnx.State`` whose Params carry logical ``out_sharding`` metadata."""
    with nnx.logical_axis_rules(list(rules)):
        specs = nnx.get_partition_spec(abstract_state)
    return jax.tree.map(lambda p: _on_mesh(p, mesh), specs, is_leaf=lambda x: isinstance(x, P))


def without_axes(shardings: Any, axes: Sequence[str]) -> Any:
    """``shardings`` (a tree of NamedSharding) with the mesh ``axes`` dropped from every spec: the same
    arrays whole along those axes (e.g. FSDP-split weights gathered, tensor-parallel splits kept)."""

    def drop(sh: NamedSharding) -> NamedSharding:
        def keep(entry):
            rest = tuple(a for a in _axes(entry) if a not in axes)
            return rest[0] if len(rest) == 1 else (rest or None)
        return NamedSharding(sh.mesh, P(*(keep(e) for e in sh.spec)))

    return jax.tree.map(drop, shardings, is_leaf=lambda x: isinstance(x, NamedSharding))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Sharding of a ``[batch, seq]`` array: batch over the mesh axes that ``batch`` maps to."""
    return _on_mesh(logical_to_spec(("batch", None), rules), mesh)


def batch_shards(batch_sh: NamedSharding) -> int:
    """How many ways ``batch_sh`` splits the batch dimension (the mesh sizes of its batch axes)."""
    axes = _axes(batch_sh.spec[0]) if len(batch_sh.spec) else ()
    return int(np.prod([batch_sh.mesh.shape[a] for a in axes])) if axes else 1


@functools.lru_cache(maxsize=64)  # called for every batch: the answer depends on the sharding only
def process_rows(batch_sh: NamedSharding) -> tuple[int, int]:
    """``(index, count)``: this process feeds block ``index`` of ``count`` equal blocks of every global
    batch -- the rows its devices hold under ``batch_sh``.

    Usually the batch axes span the hosts and this is ``(process_index, process_count)``. Where a
    mesh axis that the batch is *not* split over spans hosts (tensor parallelism wider than a host),
    several processes hold the same rows: they get the same block and load the same rows, so devices
    that must agree do. Raises ``ValueError`` for a layout where a process's rows are not one block.
    """
    shards = batch_shards(batch_sh)
    held = sorted({idx[0].start or 0 for idx in
                   batch_sh.addressable_devices_indices_map((shards, 1)).values()})
    lo, k = held[0], len(held)
    if held != list(range(lo, lo + k)) or lo % k or shards % k:
        raise ValueError(f"this process's devices hold batch blocks {held} of {shards}: not one "
                         "contiguous block; reorder config.mesh so the batch axes span the hosts")
    return lo // k, shards // k


def _axes(entry) -> tuple[str, ...]:
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def spec_axes(spec: P) -> list[str]:
    """Every mesh axis a PartitionSpec names, over all its dimensions."""
    return [a for entry in spec for a in _axes(entry)]


def shard_count(sh: NamedSharding) -> int:
    """Into how many pieces ``sh`` splits an array (the sizes of the mesh axes its spec names)."""
    return int(np.prod([sh.mesh.shape[a] for a in spec_axes(sh.spec)]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class with_mesh:  # noqa: N801 (used like the function it replaced)
    """``fn`` called (and so traced) with ``mesh`` as the current mesh, for the model's
    ``shard_map``-wrapped kernels (splash attention) and sharding constraints, which read it with
    ``get_abstract_mesh``. ``.lower`` (ahead-of-time compilation) runs under the mesh too."""

    def __init__(self, mesh: Mesh, fn):
        self.mesh, self.fn = mesh, fn

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)

    def _cache_size(self) -> int:
        return self.fn._cache_size()
