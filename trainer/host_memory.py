"""Host memory on a CPU-only run: freed buffers stay with the process for the next step.

XLA:CPU allocates each execution's temporary buffer (the gradients and the activations: about 2 GB a
step at the SmolLM2-135M shape) with ``malloc`` and frees it when the step ends. glibc serves every
allocation over 32 MB with a fresh ``mmap`` and hands it back with ``munmap``, so each step writes
to pages the kernel has to find and zero-fill again, one fault per 4 KB page. Measured on the 2-core
machine of the README: 495k faults a step at the SmolLM2 shape (3.18 s a step; 2.71 s without them),
39k at the demo's (143 against 108 ms). Transparent huge pages (``glibc.malloc.hugetlb=1``) cut the
fault count 250-fold and saved no time: the cost is the zero-filling, not the count.

``keep_freed_memory`` (called by every entry point and the tests before JAX starts):

- glibc: one arena, no ``mmap``, no trimming (``mallopt``). Freed memory goes back to the process's
  heap, and the next step's buffers are carved from pages that are already there. One arena: a
  thread's own (64 MB at most) falls back to ``mmap`` for a large block whatever the settings, and
  XLA's worker threads presumably allocate too. Without the cap the SmolLM2 step was as fast (2.54
  against 2.59 s), but ``trainer.bench``'s smaller shapes lost 15-30% (the demo 10,114-13,205
  tokens/s against 12,453-16,773).
- JAX: CPU programs are dispatched synchronously. With asynchronous dispatch the next step's
  buffers are allocated while the current one runs, and since the heap now keeps what it is given,
  two steps' temporaries would stay resident (8.0 GB at the SmolLM2 shape against 4.3 GB). Run one at
  a time, the peak resident memory is what it was with ``mmap`` (4.2 GB; the demo's 0.67 GB).

Only where JAX computes on the CPU: ``JAX_PLATFORMS`` is ``cpu``, or unset on a machine with no
accelerator device file. An accelerator's memory has its own allocator, and a host that feeds one
keeps glibc's defaults (a large checkpoint read through host memory is then returned to the OS).
``FLAX_IFT_KEEP_FREED_MEMORY=0`` turns it off. Not glibc (macOS, musl): nothing to do.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from typing import Any

# /dev entries of the accelerators JAX drives: NVIDIA, AMD (ROCm), TPU (v4 and older; v5 and newer)
ACCELERATOR_DEVICES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/accel0", "/dev/vfio/0")
# mallopt(3) parameters
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -3, -4, -8
OURS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
# glibc's defaults as its dynamic thresholds settle once a program has freed a large block: mmap
# above 32 MB. glibc would also trim a free top above 64 MB; not here: a process has one heap, and a
# reference's frees trimmed the pages ours' steps keep there (ours ran 9,500-17,500 tokens/s over the
# rounds of one `trainer.bench` at the demo shape, 15,700-17,000 without the trim). Spared its own
# trims a reference runs faster than on its own (PyTorch's train step at vocabulary 32,000: 4,914
# tokens/s against 2,989), so the benchmarks run PyTorch and transformers.generate in processes of
# their own (benchmarks/reference_process.py); these settings serve the one reference that shares
# ours' process (Tunix's step, a JAX program too), to its advantage if anything. The arena count
# cannot be raised again in a process.
GLIBC = ((M_MMAP_MAX, 65536), (M_MMAP_THRESHOLD, 32 << 20))
_applied = False


def cpu_only() -> bool:
    """True when JAX will compute on the CPU: ``JAX_PLATFORMS`` names only ``cpu``, or is unset and
    this machine has none of the accelerator devices JAX would pick first."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return set(platforms) == {"cpu"}
    return not any(os.path.exists(p) for p in ACCELERATOR_DEVICES)


def keep_freed_memory() -> bool:
    """On a CPU-only run, before JAX starts: glibc keeps freed memory in one heap and JAX runs CPU
    programs one at a time (see the module docstring). Returns whether glibc's settings changed.
    Imports nothing heavy: an entry point calls it before JAX."""
    if os.environ.get("FLAX_IFT_KEEP_FREED_MEMORY", "1") == "0" or not cpu_only():
        return False
    global _applied
    _applied = _mallopt(OURS)  # -1 as the trim threshold: never trim the heap's top
    if _applied:  # synchronous dispatch is for the kept heap's sake only (module docstring)
        os.environ.setdefault("JAX_CPU_ENABLE_ASYNC_DISPATCH", "false")
    return _applied


def applied() -> bool:
    """Whether ``keep_freed_memory`` changed glibc's settings in this process."""
    return _applied


@contextlib.contextmanager
def glibc_defaults() -> Iterator[bool]:
    """glibc's settings (``GLIBC``: no trimming) for the duration, ours again after: a reference timed
    in the same process (Tunix's step in ``trainer.bench --tunix``) then runs as it does on its own,
    or faster. Yields whether anything changed (only where ``keep_freed_memory`` had)."""
    changed = _applied and _mallopt(GLIBC)
    try:
        yield changed
    finally:
        if changed:
            _mallopt(OURS)


def settle(step: Callable[[], Any], limit: int = 3) -> int:
    """Runs ``step`` (one blocking train step) until a run of it makes no minor page faults, at most
    ``limit`` times; returns how many ran. For a benchmark side timed after another side's steps in
    the same process (``trainer.bench --rounds``): it finds the heap holding the other side's blocks,
    and its own buffers fault in anew for a step or two before their layout settles -- at the demo
    shape, after PyTorch's steps, 71k faults and a timed step of 0.33 s against 0.11 s settled. A run
    of ours alone never meets that heap; a side that faults every step by design (glibc's ``mmap``
    above 32 MB) simply uses all ``limit`` runs."""
    import resource  # noqa: PLC0415 (POSIX; the benchmarks only)
    for n in range(1, limit + 1):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        if resource.getrusage(resource.RUSAGE_SELF).ru_minflt == before:
            return n
    return limit


def _mallopt(settings: tuple[tuple[int, int], ...]) -> bool:
    libc = _glibc()
    return libc is not None and all(libc.mallopt(param, value) == 1 for param, value in settings)


def _glibc() -> ctypes.CDLL | None:
    """The C library this process runs on, when it is glibc (the process's own symbols include it)."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") else None
