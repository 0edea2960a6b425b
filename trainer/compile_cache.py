"""Compiled programs kept between runs: JAX's persistent compilation cache, on by default.

Every run used to compile its train step, eval step and generation programs afresh: for the large
presets minutes of the TPU compiler (36 min on this 2-core CPU for the README's 20 preset x slice
pairs), paid again by every restart of a preempted pod, though the programs are the same. On the
CPU the gain is small: XLA compiled the SmolLM2-135M train step in 6.0 s and loaded it from the
cache in 3.3 s (tracing and lowering, 2.1 s, happen either way). JAX keys each entry by the program,
the compile options, the devices and JAX/XLA's versions; our default directory adds this host's CPU
(model and instruction set) to the path, because a CPU program is machine code for the CPU that
compiled it and a home directory can be shared by machines that differ (a cluster's NFS home).
Where (``configure``):

- ``--jax_compilation_cache_dir DIR`` or ``JAX_COMPILATION_CACHE_DIR``: the user's choice, left
  alone (an empty value turns the cache off);
- a ``gs://`` workdir: ``WORKDIR/compile_cache``, where the hosts of a preempted pod find it again when
  it restarts on new machines (process 0 writes, every process reads: JAX's own rule);
  ``launch/tpu_pod.sh`` names that directory itself, for a shared-filesystem workdir too;
- else ``~/.cache/flax_ift/xla/<this CPU>`` (``$XDG_CACHE_HOME/flax_ift/...`` where that is set:
  ``data_pipeline.user_cache``), shared by the runs on this machine, at most
  ``MAX_BYTES`` (least recently used entries go first; ``--jax_compilation_cache_max_size`` sets it).

JAX writes only programs that took at least a second to compile
(``--jax_persistent_cache_min_compile_time_secs``). The benchmarks and the dry run do not use it: they
report compile times and the compiled programs' own memory and FLOP analyses.

One limit, measured with jax 0.10.2: in the CPU rehearsal of a multi-host run
(``launch/local_multiprocess.sh``) only process 0 loads programs from the cache. JAX's key includes
the devices' topology fingerprint, which on the CPU differs from process to process, and only process
0 writes: with a warm cache, 4 processes of the tiny config had 14 hits in process 0 and none in the
others, whose keys for the same train step differed in that part alone (``JAX_DEBUG_LOG_MODULES=
jax._src.cache_key``). The others compile every run.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys

from data_pipeline.user_cache import user_cache_dir

MAX_BYTES = 4 << 30


def host_fingerprint(cpuinfo: str | None = None) -> str:
    """12 hex digits naming this host's CPU: its architecture, model name and instruction-set flags
    (``/proc/cpuinfo``'s first processor; elsewhere Python's ``platform``)."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    first = cpuinfo.split("\n\n", 1)[0]
    keep = [line for line in first.splitlines()
            if line.split(":", 1)[0].strip() in ("model name", "flags", "Features", "CPU part")]
    text = "\n".join([platform.machine(), platform.processor(), *keep])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_dir(workdir: str = "") -> str:
    """The cache directory a run uses unless the user chose one (see the module docstring)."""
    from trainer.io import paths  # noqa: PLC0415 (etils, after the flags: --help stays quick)
    if paths.is_remote(workdir):
        return paths.join(workdir, "compile_cache")
    return user_cache_dir("xla", host_fingerprint())


def _chosen(flag: str) -> bool:
    """Whether the user set JAX's option ``flag`` (on the command line, or by its environment variable)."""
    from absl import flags  # noqa: PLC0415
    given = flag in flags.FLAGS and flags.FLAGS[flag].present
    return bool(given) or flag.upper() in os.environ


def configure(workdir: str = "") -> str:
    """Turns the cache on at ``default_dir(workdir)`` unless the user chose a directory; returns the
    directory in use ("": off). A directory that cannot be made is a warning, and the run compiles
    without a cache. Called by the entry points once their flags are parsed, before JAX compiles."""
    import jax  # noqa: PLC0415
    if _chosen("jax_compilation_cache_dir"):
        return jax.config.jax_compilation_cache_dir or ""
    from trainer.io import paths  # noqa: PLC0415
    path = default_dir(workdir)
    try:
        paths.makedirs(path)
    except Exception as e:  # noqa: BLE001 -- any filesystem's error: the run goes on, uncached
        print(f"warning: no compilation cache ({path}: {type(e).__name__}: {e})", file=sys.stderr, flush=True)
        return ""
    jax.config.update("jax_compilation_cache_dir", path)
    if not paths.is_remote(path) and not _chosen("jax_compilation_cache_max_size"):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
