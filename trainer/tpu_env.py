"""libtpu on a machine without TPU chips (the tpu-aot extra, for compiling for TPU slices here).

Installed, libtpu is loaded by every JAX process that starts its backends: its initialisation looks
for a TPU VM's metadata and prints a page of warnings about ``TPU_ACCELERATOR_TYPE`` and
``TPU_WORKER_HOSTNAMES``, and it writes log files to ``/tmp/tpu_logs`` (two or three a process, kept
forever: 620 files there after 18 hours of this project's tests). ``quiet_libtpu`` gives it values
that mean "no TPU here" and no log files before it starts. Imports nothing, so an entry point can
call it before JAX.
"""

import os


def quiet_libtpu() -> None:
    """Keeps libtpu from probing for a TPU VM's metadata (and printing a page of warnings) on a
    machine without TPU chips. Called before JAX starts a backend; a TPU VM is left as it is."""
    if any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")):
        return
    # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu takes a machine-wide lock file, which would keep a second
    # compile-only process (a test's subprocess, a dry run beside another) from starting.
    # TPU_LOG_DIR=disabled: no log files (the compiler's errors still reach stderr).
    for k, v in {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": "v5p-8",
                 "TPU_WORKER_HOSTNAMES": "localhost", "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
                 "TPU_LOG_DIR": "disabled"}.items():
        os.environ.setdefault(k, v)
