"""Compiling for a TPU slice this machine does not have: its devices from libtpu's topology
description, and what the compiled program says it will move between chips.

``jax.experimental.topologies.get_topology_desc(platform="tpu", topology_name="v5p:4x4x4")`` gives the
64 devices of a v5p-64 (16 hosts) without any TPU attached; ``jit(...).lower(...).compile()`` over a mesh
of them runs the real TPU compiler (MaxText's ``train_compile.py`` does the same). It needs libtpu
(``pip install -e ".[tpu-aot]"``); ``trainer.tpu_env.quiet_libtpu`` keeps it quiet off a TPU VM.
"""

from __future__ import annotations

import collections
import re
from typing import Any

from trainer.errors import UserError
from trainer.tpu_env import quiet_libtpu

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")


def tpu_devices(name: str) -> list[Any]:
    """The devices of the TPU topology ``name`` (e.g. ``v5p:4x4x4``, ``v6e:16x16``), for compiling
    only. One line naming the problem when libtpu is missing or the name is unknown."""
    quiet_libtpu()
    from jax.experimental import topologies  # noqa: PLC0415
    try:
        import libtpu  # noqa: F401, PLC0415
    except ImportError:
        raise UserError("--topology compiles with libtpu, which is not installed: "
                        "pip install -e '.[tpu-aot]'") from None
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=name).devices)
    except Exception as e:  # noqa: BLE001 (libtpu raises XlaRuntimeError/ValueError with a long text)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "lockfile" in first:
            raise UserError(f"--topology {name!r}: libtpu is in use by another process ({first})"
                            ) from None
        raise UserError(f"--topology {name!r}: libtpu does not know this topology ({first}); "
                        "names look like v5p:2x2x1, v5p:4x4x4, v5e:2x2, v6e:2x4, v6e:16x16, v4:2x2x1"
                        ) from None


# ---------------------------------------------------------------------------------------------
# Collectives in compiled HLO
# ---------------------------------------------------------------------------------------------
_HEADER = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e\w+|bf16|f16|f32|f64|c64|c128)"
                    r"\[([0-9,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
          "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_OP = re.compile(r"^\s*(?:ROOT )?%\S+ = (.*?) (" + "|".join(COLLECTIVES) + r")(-start)?\(")
_WHILE = re.compile(r"condition=%([\w.\-]+), body=%([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|branch_computations)=\{?%([\w.\-]+(?:, %[\w.\-]+)*)\}?")


def _array_bytes(type_text: str) -> list[float]:
    out = []
    for dtype, dims in _ARRAY.findall(type_text):
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        out.append(n * _BYTES.get(dtype, 1 if dtype.startswith("f8") else 4))
    return out


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps, entry, name = {}, "", None
    for line in hlo.splitlines():
        if (m := _HEADER.match(line)) is not None:
            name = m.group(1)
            comps[name] = []
            entry = name if line.startswith("ENTRY") else entry
        elif line.rstrip() == "}":  # (a custom call's backend config may span lines starting "}}")
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps, entry


def _trip_count(cond: list[str]) -> int:
    """A scan's loop condition compares the counter with one integer constant: that is the count
    (1 where the condition is anything else: the figure is then a lower bound)."""
    consts = [int(c) for c in re.findall(r"s32\[\]\{?[^ ]*\}? constant\((\d+)\)", "\n".join(cond))]
    return consts[0] if len(consts) == 1 else 1


def collective_bytes(hlo: str) -> dict[str, float]:
    """Bytes per device each collective kind produces in one run of the compiled program
    (``compiled.as_text()``): every op's result, ops inside loops counted once per iteration."""
    comps, entry = _computations(hlo)
    memo: dict[str, collections.Counter] = {}

    def walk(name: str) -> collections.Counter:
        if name in memo:
            return memo[name]
        memo[name] = total = collections.Counter()
        for line in comps.get(name, ()):
            if (op := _OP.match(line)) is not None:
                sizes = _array_bytes(op.group(1))
                if op.group(3) and op.group(2) in ("all-gather", "collective-permute"):
                    sizes = [s for s in sizes if s > 4]  # (operands, results, scalar contexts)
                    sizes = sizes[len(sizes) // 2:]
                total[op.group(2)] += sum(sizes)
            if (w := _WHILE.search(line)) is not None:
                n = _trip_count(comps.get(w.group(1), []))
                for k, v in walk(w.group(2)).items():
                    total[k] += n * v
            elif (c := _CALLS.search(line)) is not None:
                for callee in c.group(1).replace("%", "").split(", "):
                    total.update(walk(callee))
        return total

    found = walk(entry)
    return {k: float(found.get(k, 0)) for k in COLLECTIVES}
