"""Stopping on request -- SIGTERM (a preemptible VM's, SLURM's or Kubernetes' notice), SIGHUP (the
terminal or ssh session went away), SIGINT (Ctrl-C), a TPU maintenance event -- turned into "finish
the step, checkpoint it, exit".

One mechanism per kind of run:

- **One process**: a signal handler sets a flag (a handler must not run JAX or Orbax); the loop reads
  it at every step boundary.
- **Several processes**: JAX's preemption sync point. ``jax.distributed.initialize`` starts a
  preemption notifier (SIGTERM, and on TPU the VM's maintenance events); a notice reaching any
  process is spread by the coordination service, which picks the step every process stops after
  (the largest step any has reached, plus one). The loop asks ``reached_preemption_sync_point(step)``
  at every step: a local read, no collective and no host-device sync, so hosts keep running ahead.
  Its SIGTERM handler is left in place; SIGHUP and SIGINT are forwarded to it (the process sends
  itself SIGTERM), so every request takes the same agreed path.

The grace timer (several processes) covers only *agreeing*: it starts when the notice reaches the
coordination service (a thread watches for it there, since the main thread may be waiting in a
collective), and if the processes have not reached the agreed step ``grace_s`` later (one of them
died, or hangs in a collective), this one leaves in one line. Once agreed, the timer is cancelled
and the checkpoint is written to the end, however long it takes (``checkpoint.timeout_s`` bounds
it). A second Ctrl-C exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax

EXIT_CODES = {"SIGTERM": 0, "SIGHUP": 0, "SIGINT": 130, "preemption": 0}


class Preempted(SystemExit):
    """Raised by the loop after the checkpoint of the last finished step is committed."""

    def __init__(self, reason: str, step: int):
        super().__init__(EXIT_CODES.get(reason, 0))
        self.reason, self.step = reason, step


NOTICE_KEY = "RECEIVED_PREEMPTION_NOTICE"  # what JAX's preemption sync manager sets in the KV store


def _sync_manager():
    """JAX's preemption sync manager of this multi-process run (None: one process, or the service
    turned off with ``jax_enable_preemption_service=False``)."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # noqa: PLC0415 (the state jax.distributed.initialize made)
    return distributed.global_state.preemption_sync_manager


class StopRequests:
    """Context manager installing the handlers (main thread only; restored on exit)."""

    def __init__(self, grace_s: float = 15.0, poll_s: float = 1.0):
        self.reason: str | None = None
        self.grace_s, self.poll_s = grace_s, poll_s
        self._lock = threading.RLock()  # a handler may run in the main thread while it holds the lock
        self._timer: threading.Timer | None = None
        self._previous: dict[int, object] = {}
        self._agreed = _sync_manager() is not None
        self._done = threading.Event()

    def __enter__(self) -> StopRequests:
        if jax.process_count() > 1 and not self._agreed:
            print("warning: JAX's preemption service is off (jax_enable_preemption_service): the "
                  "processes cannot agree on a step to stop after, so a signal ends the run without a "
                  "new checkpoint (rerunning resumes from the last one)", file=sys.stderr, flush=True)
            return self
        if threading.current_thread() is threading.main_thread():
            # Several processes: SIGTERM stays JAX's notifier's (a C handler Python does not see).
            signals = (signal.SIGINT, signal.SIGHUP) if self._agreed else (
                signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
            for sig in signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        if self._agreed:
            threading.Thread(target=self._watch_notice, daemon=True).start()
        return self

    def _watch_notice(self) -> None:
        """Starts the grace timer once a preemption notice (from any process) is in the coordination
        service's store: a cheap RPC a second, on a thread, so no step waits for it."""
        from jax._src import distributed  # noqa: PLC0415
        client = distributed.global_state.client
        while not self._done.wait(self.poll_s):
            try:
                client.key_value_try_get(NOTICE_KEY)
            except Exception as e:  # noqa: BLE001 -- NOT_FOUND: no notice yet; else the service is gone
                if "NOT_FOUND" in str(e):
                    continue
                return
            with self._lock:
                if self._timer is None and not self._done.is_set():
                    self._timer = threading.Timer(self.grace_s, self._give_up)
                    self._timer.daemon = True
                    self._timer.start()
            return

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        self._cancel_timer()

    def _handle(self, signum: int, frame) -> None:
        with self._lock:
            if self.reason is not None:
                if signum == signal.SIGINT:
                    print("\nsecond Ctrl-C: exiting now, without a checkpoint", file=sys.stderr, flush=True)
                    os._exit(130)
                return
            name = signal.Signals(signum).name
            self.reason = name
            print(f"\n{name} received: finishing the current step, saving a checkpoint, then exiting"
                  + (" (Ctrl-C again to exit at once)" if signum == signal.SIGINT else ""),
                  file=sys.stderr, flush=True)
            if self._agreed:
                os.kill(os.getpid(), signal.SIGTERM)  # to JAX's notifier: a notice for every process

    def _give_up(self) -> None:
        print(f"error: {self.reason or 'preemption notice'}: the other processes did not reach an "
              f"agreed stop within {self.grace_s:.0f} s (one of them died or hangs?); exiting without a "
              "new checkpoint; rerunning resumes from the last one", file=sys.stderr, flush=True)
        os._exit(1)

    def _cancel_timer(self) -> None:
        with self._lock:
            self._done.set()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def stop_requested(self, step: int) -> str | None:
        """The reason to stop after ``step`` (several processes: the same step on every one), or None."""
        if not self._agreed:
            return self.reason
        from jax.experimental import multihost_utils  # noqa: PLC0415
        if not multihost_utils.reached_preemption_sync_point(step):
            return None
        self._cancel_timer()  # agreed: the checkpoint now takes as long as it takes
        return self.reason or "preemption"
