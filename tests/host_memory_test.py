"""The CPU run's host-memory policy: freed buffers are reused without new page faults; only on CPU."""

import os
import subprocess
import sys

import pytest

from trainer import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, writes and frees a 200 MB buffer 5 times with malloc, as XLA:CPU does a step's
# temporaries (numpy is no stand-in: it asks for huge pages); prints the page faults of the last 4
# (the first grows the heap).
_PROBE = """
import ctypes, resource
from trainer import host_memory
print(host_memory.keep_freed_memory())
libc, size = ctypes.CDLL(None), 200 << 20
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def step():
    p = libc.malloc(size)
    ctypes.memset(p, 1, size)
    libc.free(p)
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


# The same, with a reference's steps in between under glibc's settings (``trainer.bench``'s PyTorch):
# small blocks come and go from the one heap, as PyTorch's do. A free there must not trim the heap
# that ours' steps keep (it did: ours then faulted its buffers in again after every PyTorch round).
_PROBE_REFERENCE_BETWEEN = _PROBE.replace("""step()
before""", """step()
with host_memory.glibc_defaults():
    for _ in range(3):
        q = libc.malloc(1 << 20)
        ctypes.memset(q, 1, 1 << 20)
        libc.free(q)
before""")


def _probe(keep: str, probe: str = _PROBE) -> tuple[str, int]:
    env = dict(os.environ, FLAX_IFT_KEEP_FREED_MEMORY=keep, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only (mallopt)")
def test_freed_buffers_are_reused_without_page_faults():
    applied, faults = _probe("1")
    assert applied == "True" and faults < 1_000, faults
    # glibc's defaults: each 200 MB buffer is a fresh mmap, 51k faults of 4 KB pages
    applied, faults = _probe("0")
    assert applied == "False" and faults > 4 * 40_000, faults


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only (mallopt)")
def test_a_reference_timed_under_glibcs_settings_leaves_the_kept_heap_alone():
    assert _PROBE_REFERENCE_BETWEEN != _PROBE
    applied, faults = _probe("1", _PROBE_REFERENCE_BETWEEN)
    assert applied == "True" and faults < 1_000, faults


@pytest.mark.parametrize("platforms, devices, want", [
    ("cpu", ["/dev/nvidia0"], True),  # asked for the CPU: the GPU is not used
    ("cuda", [], False), ("tpu,cpu", [], False),
    ("", [], True), ("", ["/dev/nvidiactl"], False), ("", ["/dev/accel0"], False), ("", ["/dev/vfio/0"], False)])
def test_only_on_cpu_runs(monkeypatch, platforms, devices, want):
    monkeypatch.setenv("JAX_PLATFORMS", platforms)
    monkeypatch.setattr(os.path, "exists", lambda p: p in devices)
    assert host_memory.cpu_only() is want


def test_off_switch_and_accelerators_leave_everything_alone(monkeypatch):
    monkeypatch.delenv("JAX_CPU_ENABLE_ASYNC_DISPATCH", raising=False)
    monkeypatch.setenv("FLAX_IFT_KEEP_FREED_MEMORY", "0")
    assert host_memory.keep_freed_memory() is False
    monkeypatch.setenv("FLAX_IFT_KEEP_FREED_MEMORY", "1")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert host_memory.keep_freed_memory() is False
    assert "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ


def test_settle_runs_steps_until_one_makes_no_page_faults():
    """``trainer.bench``'s untimed steps before a timing: until the heap has settled, at most ``limit``."""
    import mmap  # noqa: PLC0415
    calls = []

    def step(faulting: int):
        calls.append(1)
        if len(calls) <= faulting:  # fresh anonymous pages: one fault each
            with mmap.mmap(-1, 64 << 12) as m:
                m.write(b"x" * (64 << 12))

    assert host_memory.settle(lambda: step(2), limit=5) == 3 and len(calls) == 3
    calls.clear()
    assert host_memory.settle(lambda: step(10), limit=4) == 4 and len(calls) == 4
