"""Orbax checkpoints: the train state, the data iterator position, and which step is best.

Layout: ``workdir/checkpoints/<step>/{params,opt_state,data}``. The manager saves asynchronously and keeps the
last ``keep`` checkpoints *plus* the best one by ``checkpoint.best_metric`` (validation loss unless the
config names an in-training eval metric such as ``val/exact_match``), so ``--checkpoint best`` always
resolves.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import threading
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as cm

from trainer import console
from trainer.errors import UserError
from trainer.io import paths

VAL_METRIC = "val/loss"  # the default checkpoint.best_metric
_LEGACY = {"val/loss": "val_loss"}  # the key workdirs written before best_metric existed carry


def best_mode_fn(metric: str, mode: str = "auto") -> str:
    """``min`` for losses and perplexities, ``max`` for every other metric (``mode=auto``)."""
    if mode != "auto":
        return mode
    return "min" if metric.endswith(("loss", "perplexity")) else "max"


def metric_fn(metric: str, mode: str):
    """Reads ``metric`` from a checkpoint's saved metrics; a missing or non-finite value ranks last, so
    a NaN step is never "best"."""
    worst = float("inf") if mode == "min" else float("-inf")

    def get(m: dict[str, Any]) -> float:
        v = m.get(metric, m.get(_LEGACY.get(metric, ""), None)) if m else None
        try:
            v = float(v)
        except (TypeError, ValueError):
            return worst
        return v if np.isfinite(v) else worst
    return get


class _Dropped(logging.Filter):
    """Drops the log records whose message starts with ``prefix``; every other message passes."""

    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


# Orbax's "Given directory is read only" warning: eval and export open the checkpoints read-only on
# purpose, so the line tells the user nothing.
_READ_ONLY_NOTICE = _Dropped("Given directory is read only")


class _NoTraceback(logging.Filter):
    """Keeps Orbax's error records to their message line: a failed async save logs its traceback
    from the writer thread, and the loop reports the same failure as one line at the next step
    (``Checkpointer.save_error``), so the traceback only buried that line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
            record.exc_info, record.exc_text = None, None
        return True


_NO_TRACEBACK = _NoTraceback()


def checkpoint_dir(workdir: str) -> str:
    """Where a run's checkpoints live: ``WORKDIR/checkpoints/<step>``."""
    return paths.join(paths.abspath(workdir), "checkpoints")


@functools.cache
def _whole_shards_on_cpu() -> None:
    """On the CPU, each replicated array is saved whole by its first replica, not split across replicas.

    Orbax's default (replica-parallel saving) has each of R replicas copy 1/R of an array to the host
    and write it: on a TPU pod that spreads the device-to-host copies. CPU devices already live in host
    memory, so there it only adds work: each replica's part is cut out by a program compiled per
    device and per array shape (the tiny config's 4-step run over 8 CPU devices: 56 of its 69
    compiles, and about 2 s of 8.5). Orbax itself turns it off on GPUs (``JAX_PLATFORMS``).
    Registered once per process, for every ``jax.Array``, with a metadata store as orbax's default
    handler has one."""
    if jax.default_backend() != "cpu":
        return
    from orbax.checkpoint._src.metadata import array_metadata_store  # noqa: PLC0415 (no public name)
    handler = ocp.type_handlers.ArrayHandler(use_replica_parallel=False,
                                             array_metadata_store=array_metadata_store.Store())
    quiet = _Dropped("Type handler registry type")  # orbax warns of any override: noise on every run
    absl_logging.get_absl_logger().addFilter(quiet)
    try:
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)
    finally:
        absl_logging.get_absl_logger().removeFilter(quiet)


def _manager(workdir: str, keep: int = 2, read_only: bool = False, best_metric: str = VAL_METRIC,
             mode: str = "auto") -> ocp.CheckpointManager:
    _whole_shards_on_cpu()
    mode = best_mode_fn(best_metric, mode)
    get = metric_fn(best_metric, mode)
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=keep),
        cm.BestN(get_metric_fn=get, reverse=mode == "min", n=1, keep_checkpoints_without_metrics=False),
    ])
    # best_fn also makes orbax write the metrics next to each step, so best_step() survives restarts.
    options = ocp.CheckpointManagerOptions(
        preservation_policy=policy, best_fn=get, best_mode=mode,
        enable_async_checkpointing=True, read_only=read_only, create=not read_only,
        save_interval_steps=0 if read_only else 1, cleanup_tmp_directories=not read_only)
    absl_logging.get_absl_logger().addFilter(_NO_TRACEBACK)  # (a set: added once however often)
    if read_only:
        absl_logging.get_absl_logger().addFilter(_READ_ONLY_NOTICE)
    return ocp.CheckpointManager(checkpoint_dir(workdir),
                                 options=options, item_names=("params", "opt_state", "data", "base"))


RESTORE_ATTEMPTS = 3  # tries of one checkpoint on one process before it counts as failed there


class Checkpointer:
    """Saves/restores ``TrainState`` (sharded, async) and the loader state for one workdir."""

    def __init__(self, workdir: str, keep: int = 2, read_only: bool = False,
                 best_metric: str = VAL_METRIC, best_mode: str = "auto", timeout_s: float = 1800.0,
                 base: dict[str, str] | None = None):
        """``best_metric`` (``checkpoint.best_metric``, e.g. ``val/exact_match``) ranks the saved steps
        for ``best``; ``best_mode`` min | max | auto (min for losses). ``base``: the frozen base's
        identity (``{"path", "fingerprint"}``) of a LoRA run, saved with every step and checked on
        restore: adapters only mean something on the base they were trained on."""
        self.workdir = workdir
        self.base = base
        self.timeout_s = timeout_s  # checkpoint.timeout_s: the longest a save may block the loop
        self._agreements = 0  # decisions taken with the other processes (unique key-value names)
        self.best_metric = best_metric
        self.mode = best_mode_fn(best_metric, best_mode)
        self.mgr = _manager(workdir, keep, read_only, best_metric, best_mode)

    @classmethod
    def for_run(cls, config: Any, workdir: str, base: dict[str, str] | None = None,
                read_only: bool = False) -> Checkpointer:
        """The run's checkpointer, with its policy read from the config in this one place: how many
        steps are kept (``train.keep_checkpoints``), which step is ``best`` (``checkpoint.best_metric``
        and ``best_mode``) and how long a save may block (``checkpoint.timeout_s``). The training loop,
        ``trainer.eval`` and ``trainer.export`` all build it here, so they agree on ``best``."""
        ccfg = config.checkpoint  # (a RunSpec: trainer.io does not import the settings above it)
        return cls(workdir, keep=config.train.keep_checkpoints, read_only=read_only,
                   best_metric=ccfg.best_metric, best_mode=ccfg.best_mode, timeout_s=ccfg.timeout_s,
                   base=base)

    def latest_step(self) -> int | None:
        return self.mgr.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.mgr.all_steps())

    def best_step(self) -> int | None:
        """The saved step with the best ``best_metric`` (None if no step has a finite one)."""
        mode = self.mode
        get = metric_fn(self.best_metric, mode)
        scored = [(get(self.mgr.metrics(s) or {}), s) for s in self.all_steps()]
        scored = [(v, s) for v, s in scored if np.isfinite(v)]
        if not scored:
            return None
        return (min if mode == "min" else max)(scored, key=lambda vs: (vs[0], -vs[1]))[1]

    def save(self, step: int, state: Any, data_state: dict[str, Any] | None,
             metrics: dict[str, float] | None = None) -> None:
        """Saves asynchronously; params and optimizer state are separate items so that eval/export
        read the params alone.

        First checks that the disk has room for it: Orbax's async writer does not report a full
        disk (the write task's error is dropped and the save never finishes), so a save that cannot
        fit is refused here, in one line, with the previous checkpoints intact.
        """
        self._check_space(step, state)
        with self.watchdog(f"saving the checkpoint of step {step}", step):
            self._save(step, state, data_state, metrics)

    def _save(self, step, state, data_state, metrics) -> None:
        items = dict(params=ocp.args.StandardSave(state.params),
                     opt_state=ocp.args.StandardSave(state.opt_state),
                     data=ocp.args.JsonSave(data_state or {}))
        if self.base:
            items["base"] = ocp.args.JsonSave(self.base)
        args = ocp.args.Composite(**items)
        self.mgr.save(step, args=args, metrics=metrics, force=True)

    def _check_space(self, step: int, state: Any) -> None:
        local_bytes = sum(x.nbytes for x in jax.tree.leaves((state.params, state.opt_state))
                          if hasattr(x, "nbytes")) / max(jax.process_count(), 1)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:  # not a local filesystem (a bucket): nothing to check
            return
        need = 1.2 * local_bytes + (1 << 20)  # metadata, and a margin
        if free < need:
            raise UserError(
                f"not enough free space to save the checkpoint of step {step} in {self.directory}: "
                f"it needs about {need / 1e6:.1f} MB and {free / 1e6:.1f} MB are free (the write would "
                "fail with OSError 28, No space left on device). Training stopped; the previous "
                "checkpoints are intact.")

    def check_base(self, step: int) -> None:
        """Refuses (one line) to restore adapters trained on another base than ``self.base``."""
        if not self.base:
            return
        saved = None
        if paths.isdir(paths.join(self.directory, str(step), "base")):
            saved = self.mgr.restore(step, args=ocp.args.Composite(base=ocp.args.JsonRestore()))["base"]
        if not saved or saved.get("fingerprint") != self.base.get("fingerprint"):
            what = (f"{saved.get('path') or '(init)'} ({saved.get('fingerprint')})" if saved
                    else "a full fine-tuning run (no LoRA base)")
            raise UserError(
                f"the checkpoint of step {step} in {self.directory} holds LoRA adapters for base "
                f"{what}, but this run's base is {self.base.get('path') or '(init)'} "
                f"({self.base.get('fingerprint')}); adapters only fit the base they were trained on: "
                "use that base or a new --workdir")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restores a TrainState into the shardings carried by ``abstract_state`` (ShapeDtypeStructs;
        its ``frozen`` part, the LoRA base, is taken as it is)."""
        self.check_base(step)
        out = self.mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state.params),
            opt_state=ocp.args.StandardRestore(abstract_state.opt_state), data=ocp.args.JsonRestore()))
        step_arr = jax.device_put(np.int32(step), abstract_state.step.sharding)
        return abstract_state.replace(step=step_arr, params=out["params"],
                                      opt_state=out["opt_state"]), out["data"]

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict[str, Any]] | None:
        """The newest checkpoint that restores: ``(step, state, data_state)``; None without any.

        A committed step that fails to restore on *every* process (a truncated array file, an emptied
        ``_METADATA``, missing optimizer data, ...) is reported in one line, set aside as
        ``<step>.corrupt-<time>`` (so every later run skips it too, and the files stay for a
        post-mortem) and the previous step is tried. The processes agree on each outcome first: a
        failure on some processes only (a transient storage error) is retried, together, and never
        renames anything. Which steps count as committed stays Orbax's decision.
        """
        failures = []
        for step in reversed(self.all_steps()):
            restored, reason = self._restore_agreed(step, abstract_state)
            if restored is not None:
                return (step, *restored)
            failures.append(f"step {step}: {reason}")
            aside = self.set_aside(step)
            console.log(f"warning: the checkpoint of step {step} cannot be restored ({reason}); "
                        f"moved to {aside}; trying the previous one")
        if failures:
            raise UserError(f"no checkpoint in {self.directory} can be restored ({'; '.join(failures)}); "
                            "the bad ones were set aside: delete them or use a new --workdir")
        return None

    def _restore_agreed(self, step: int, abstract_state: Any, attempts: int = RESTORE_ATTEMPTS
                        ) -> tuple[tuple[Any, dict[str, Any]] | None, str]:
        """``((state, data), "")`` when ``step`` restores on every process; ``(None, reason)`` when it
        fails on every one; a failure on some processes only stops the run in one line, with nothing
        renamed.

        A failed attempt is retried here first, alone: Orbax's restore is itself collective (its
        barrier waits for every process), so this process re-enters it where its peers are waiting.
        The outcomes are then compared through the coordination service's key-value store, not a
        device collective, which a peer still inside Orbax's barrier could answer by mistake.
        """
        reason = ""
        for attempt in range(1, attempts + 1):
            try:
                restored = self.restore(step, abstract_state)
                break
            except UserError:  # not a damaged checkpoint: a different run's (another LoRA base)
                raise
            except Exception as e:  # noqa: BLE001 -- Orbax/TensorStore/JSON raise many types
                restored = None
                reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:240]}"
                if attempt < attempts:
                    print(f"warning: process {jax.process_index()}: step {step} did not restore "
                          f"({reason}); retrying ({attempt}/{attempts})", file=sys.stderr, flush=True)
                    time.sleep(attempt)
        ok = self._agree(f"restore/{step}", restored is not None)
        if all(ok):
            return restored, ""
        if not any(ok):
            return None, reason
        bad = [i for i, x in enumerate(ok) if not x]
        raise UserError(f"the checkpoint of step {step} restores on some processes but not on {bad} "
                        f"({reason or 'see their logs'}); it is left in place (a storage problem on "
                        "those hosts?): rerun once it is readable")

    def _agree(self, name: str, flag: bool) -> list[bool]:
        """Every process's ``flag`` in process order, exchanged through the coordination service
        (waiting at most ``timeout_s`` for the slowest); ``[flag]`` with one process."""
        if jax.process_count() == 1:
            return [flag]
        from jax._src import distributed  # noqa: PLC0415 (the client jax.distributed made)
        client, key = distributed.global_state.client, f"ift/{name}/{self._agreements}"
        self._agreements += 1
        client.key_value_set(f"{key}/{jax.process_index()}", "1" if flag else "0")
        ms = int(self.timeout_s * 1000)
        try:
            return [client.blocking_key_value_get(f"{key}/{i}", ms) == "1"
                    for i in range(jax.process_count())]
        except Exception as e:  # noqa: BLE001 -- a peer that never answers (stuck, or gone)
            raise UserError(f"checkpoint: the processes did not agree on {name!r} within "
                            f"{self.timeout_s:.0f} s ({type(e).__name__}); this process "
                            f"{'restored it' if flag else 'could not restore it'}") from None

    @property
    def directory(self) -> str:
        return checkpoint_dir(self.workdir)

    def set_aside(self, step: int) -> str:
        """Renames ``<step>`` to ``<step>.corrupt-<time>`` (process 0) and forgets it."""
        src = paths.join(self.directory, str(step))
        dst = f"{src}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and paths.exists(src):
            paths.rename(src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"set_aside_{step}")
        self.mgr.reload()
        return dst

    def check_async_error(self, pending_step: int | None) -> None:
        """Raises a one-line UserError if an asynchronous save has failed (called at step
        boundaries): which step, where, the OS error and the free space there."""
        try:
            self.mgr.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self.save_error(pending_step, e) from None

    def save_error(self, step: int | None, e: BaseException) -> UserError:
        free = paths.free_space(self.directory)
        cause = e
        while cause.__cause__ is not None or cause.__context__ is not None:  # the OS error under it
            if isinstance(cause, OSError):
                break
            cause = cause.__cause__ or cause.__context__
        msg = (str(cause).strip().splitlines() or [type(cause).__name__])[0][:300]
        return UserError(f"saving the checkpoint of step {step} to {self.directory} failed: "
                         f"{type(cause).__name__}: {msg} (free space there: {free}). Training stopped: "
                         "without checkpoints a preemption would lose every step since the last one.")

    def restore_params(self, step: int, abstract_params: Any) -> Any:
        """Restores only the parameters (for eval/export): optimizer moments are never read."""
        return self.mgr.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_params)))["params"]

    def resolve(self, which: str) -> int:
        """``latest`` | ``best`` | a step number -> a step that exists, or a UserError that says why."""
        steps = self.all_steps()
        where = self.directory
        if not steps:
            raise UserError(f"no checkpoint in {where}; train first (trainer.train --workdir ...)")
        if which == "latest":
            return steps[-1]
        if which == "best":
            best = self.best_step()
            if best is None:
                raise UserError(f"no checkpoint in {where} has a finite {self.best_metric}; "
                                f"use --checkpoint latest or one of {steps}")
            return best
        try:
            step = int(which)
        except ValueError:
            raise UserError(f"--checkpoint must be latest, best or a step number, got {which!r}") from None
        if step not in steps:
            raise UserError(f"no checkpoint at step {step} in {where}; available steps: "
                            f"{', '.join(map(str, steps))} (or use latest / best)")
        return step

    def wait(self) -> None:
        with self.watchdog("finishing the last checkpoint save"):
            self.mgr.wait_until_finished()

    def watchdog(self, what: str, step: int | None = None):
        """Bounds a blocking Orbax call by ``timeout_s``: Orbax's async writer can hang instead of
        failing (a full disk mid-write), and a run that hangs holds its machine and its lock forever.
        On timeout: one line -- what, where, the free space -- and exit status 2."""
        ckpt = self

        class _Watchdog:
            def __enter__(self):
                def fire():
                    msg = ckpt.save_error(step, TimeoutError(f"{what} did not finish in "
                                                             f"{ckpt.timeout_s:.0f} s"))
                    print(f"error: {msg}", file=sys.stderr, flush=True)
                    os._exit(2)
                self.timer = threading.Timer(ckpt.timeout_s, fire)
                self.timer.daemon = True
                self.timer.start()

            def __exit__(self, *exc):
                self.timer.cancel()
        return _Watchdog()

    def close(self) -> None:
        self.mgr.close()
