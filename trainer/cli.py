"""Entry-point plumbing: user errors become one clear message, not a traceback."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from absl import app, flags, logging

from data_pipeline.cli import UserError, config_flag, parse_flags  # noqa: F401 (re-exported)
from trainer import compile_cache as compile_cache_lib
from trainer import exit_watch, host_memory, tpu_env

flags.DEFINE_enum("distributed", "off", ["off", "auto", "explicit"],
                  "Multi-process JAX: off | auto (TPU pod, SLURM...) | explicit (flags below).")
flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (--distributed=explicit).")
flags.DEFINE_integer("num_processes", 0, "Number of processes (--distributed=explicit).")
flags.DEFINE_integer("process_id", -1, "This process's index (--distributed=explicit).")
flags.DEFINE_integer("initialization_timeout", 600, "Seconds to wait for every process to join "
                     "(long enough for a loaded machine or a slow pod start).")
flags.DEFINE_integer("heartbeat_timeout", 30, "Seconds without a heartbeat before a process counts "
                     "as dead (JAX's default is 100).")
flags.DEFINE_integer("shutdown_timeout", 30, "Seconds the exit barrier waits for the other processes.")


def run_spec(config: Any = None) -> Any:
    """The preset of ``--config`` (or ``config``, edited by the caller) resolved, once, into the typed
    ``RunSpec`` library code reads; a key or value the spec refuses is a ``UserError``."""
    from trainer.settings.spec import RunSpec, SpecError  # noqa: PLC0415 (--help stays quick)
    try:
        return RunSpec.from_config(config if config is not None else config_flag())
    except SpecError as e:
        raise UserError("the config does not fit the run spec: " + "; ".join(str(e).splitlines())) from e


def run_main(fn: Callable[[], Any]) -> Any:
    """Common start of every entry point, then ``fn()``; a ``UserError`` exits with one message.

    absl logging defaults to WARNING here (Orbax logs every file it writes at INFO); pass
    ``--verbosity=0`` for everything. Progress and results are printed, not logged.
    """
    f = flags.FLAGS
    if not f["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    try:
        init_distributed(f.distributed, f.coordinator_address, f.num_processes, f.process_id,
                         timeouts=(f.initialization_timeout, f.heartbeat_timeout, f.shutdown_timeout))
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        _exit(2, f.distributed)
    except Exception as e:  # noqa: BLE001 -- only with several processes, see _exit
        if f.distributed == "off":
            raise
        import jax  # noqa: PLC0415
        first = (str(e).strip().splitlines() or [""])[0][:400]
        gone = dead_peers()
        hint = ("" if not gone else f" (process {', '.join(map(str, gone))} is gone: this is the "
                "collective that waited for it; its own log says why; rerunning resumes from the "
                "last checkpoint)")
        print(f"error: process {jax.process_index()} of {jax.process_count()} stopped: "
              f"{type(e).__name__}: {first}{hint}", file=sys.stderr, flush=True)
        _exit(1, f.distributed)


def _exit(code: int, distributed: str) -> None:
    """Exits with ``code``. With several processes, without JAX's exit barrier: after a peer has died
    that barrier waits for it (``--shutdown_timeout``) and then aborts the process (SIGABRT)."""
    if distributed == "off":
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def dead_peers() -> list[int]:
    """The processes the coordination service no longer counts as alive ([0] when the service
    itself, which process 0 runs, cannot be reached); [] with one process or when all are alive."""
    import jax  # noqa: PLC0415
    from jax._src import distributed  # noqa: PLC0415 (the client JAX connected with)
    client, n = distributed.global_state.client, jax.process_count()
    if client is None or n == 1:
        return []
    answer: list = []

    def ask():  # in a thread: an RPC to a dead service may take its own time to fail
        try:
            answer.append(set(client.get_live_nodes(list(range(n)))))
        except Exception:  # noqa: BLE001 -- the service is unreachable: process 0 is gone
            answer.append(None)
    t = threading.Thread(target=ask, daemon=True)
    t.start()
    t.join(10)
    live = answer[0] if answer else None
    return [0] if live is None else sorted(set(range(n)) - live)


def init_distributed(mode: str, coordinator: str = "", num_processes: int = 0, process_id: int = -1,
                     timeouts: tuple[int, int, int] = (600, 30, 30)) -> None:
    """Starts multi-process JAX before any device is touched.

    Args:
      mode: ``off`` (single process), ``auto`` (TPU pods, SLURM, ... detected by jax), or
        ``explicit`` (use the other arguments; e.g. the local multi-process rehearsal).
    """
    import jax

    if mode == "off":
        return
    # CPU processes need a collectives implementation to talk to each other (harmless elsewhere).
    # Not jax.default_backend(): that would start the backend before initialize(), which must be first.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    init, heartbeat, shutdown = timeouts
    kw = dict(initialization_timeout=init, heartbeat_timeout_seconds=heartbeat,
              shutdown_timeout_seconds=shutdown)
    if mode == "explicit":
        if not coordinator or num_processes <= 0 or process_id < 0:
            raise UserError("--distributed=explicit needs --coordinator_address, --num_processes "
                            "and --process_id")
        kw.update(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    elif mode != "auto":
        raise UserError(f"--distributed must be off, auto or explicit, got {mode!r}")
    exit_watch.divert_native_stderr(process_id)
    jax.distributed.initialize(**kw)
    exit_watch.identify(jax.process_index(), jax.process_count())


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A background thread's exception (Orbax's async writer on a full disk, say) in one line: the
    main thread reports what it means in its own line, and a page of traceback from another thread
    printed over it hid that line."""
    first = (str(args.exc_value).strip().splitlines() or [""])[0][:300]
    name = args.thread.name if args.thread is not None else "?"
    print(f"warning: background thread {name}: {args.exc_type.__name__}: {first}", file=sys.stderr,
          flush=True)


def launch(body: Callable[[], Any], required: tuple[str, ...] = ("workdir",), compile_cache: bool = True) -> None:
    """Runs an entry point: absl flags (clean errors), required-flag checks, then ``run_main(body)``.

    ``--help`` is answered without importing JAX (seconds on a busy machine); otherwise JAX's own
    flags (``--jax_...``) are registered with absl first, as ``jax.config.config_with_absl`` does.
    ``compile_cache``: keep compiled programs between runs (``trainer.compile_cache``; the
    benchmarks and the dry run, which report compile times and analyses, say False).
    """
    threading.excepthook = _thread_failed
    if not any(a in ("--help", "-h", "-?", "--helpfull", "--helpshort") for a in sys.argv[1:]):
        tpu_env.quiet_libtpu()  # before JAX starts a backend (and, where installed, libtpu)
        host_memory.keep_freed_memory()  # before JAX allocates: a CPU run's steps reuse their memory
        import jax  # noqa: PLC0415
        jax.config.config_with_absl()

    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        missing = [f"--{name}" for name in required if not flags.FLAGS[name].value]
        if missing:
            raise app.UsageError(f"{' and '.join(missing)} required")
        if compile_cache:
            workdir = flags.FLAGS["workdir"].value if "workdir" in flags.FLAGS else ""
            compile_cache_lib.configure(workdir or "")
        run_main(body)

    app.run(main, flags_parser=parse_flags)
