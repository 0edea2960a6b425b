"""Stopping on request: SIGTERM (a preemptible VM's or SLURM's notice), SIGINT (Ctrl-C), and on TPU
JAX's preemption sync point, all turned into "finish this step, checkpoint it, exit".

A signal only sets a flag (a handler must not run JAX or Orbax); the loop asks ``stop_requested(step)``
at every step boundary. With several processes the answer is agreed on (an all-gather of the flags),
so every host stops after the same step and saves the same checkpoint. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
import numpy as np

EXIT_CODES = {"SIGTERM": 0, "SIGINT": 130, "preemption": 0}


class Preempted(SystemExit):
    """Raised by the loop after the checkpoint of the last finished step is committed."""

    def __init__(self, reason: str, step: int):
        super().__init__(EXIT_CODES.get(reason, 0))
        self.reason, self.step = reason, step


class StopRequests:
    """Context manager installing the SIGTERM/SIGINT handlers (main thread only; restored on exit)."""

    def __init__(self, grace_s: float = 15.0):
        self.reason: str | None = None
        self._wakeup: tuple[int, int, int] | None = None
        self._lock = threading.Lock()
        self.grace_s = grace_s  # multi-process: how long the agreed stop may take (< heartbeat timeout)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
            if jax.process_count() > 1:
                # A Python handler runs in the main thread, and only once it is back in Python: not
                # while it waits in a collective for a peer that died. The C-level handler writes the
                # signal number to this pipe at once; a thread reading it starts the grace timer.
                r, w = os.pipe()
                os.set_blocking(w, False)
                self._wakeup = (signal.set_wakeup_fd(w, warn_on_full_buffer=False), r, w)
                threading.Thread(target=self._watch, args=(r,), daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._wakeup is not None:
            signal.set_wakeup_fd(self._wakeup[0])
            self._wakeup = None

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 1)
            except OSError:
                return
            if not data:
                return
            if data[0] in (signal.SIGTERM, signal.SIGINT):
                self._note(data[0])

    def _handle(self, signum: int, frame) -> None:
        if self._wakeup is None:  # one process: the Python handler is the only path
            self._note(signum)    # (several: the pipe's reader thread has already noted it)

    def _note(self, signum: int) -> None:
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
            if jax.process_count() > 1:
                # With several processes the stop is agreed on in a collective. If a peer is gone
                # (it died, or was stopped first), that collective never returns and JAX's heartbeat
                # check would abort this process (SIGABRT) a while later: leave first, in one line.
                timer = threading.Timer(self.grace_s, self._give_up)
                timer.daemon = True
                timer.start()

    def _give_up(self) -> None:
        print(f"error: {self.reason}: the other processes did not join the stop within "
              f"{self.grace_s:.0f} s (one of them died?); exiting without a new checkpoint; rerunning "
              "resumes from the last one", file=sys.stderr, flush=True)
        os._exit(1)

    def stop_requested(self, step: int) -> str | None:
        """The reason to stop after ``step`` (the same on every process), or None."""
        reason = self.reason
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils  # noqa: PLC0415
            code = {None: 0, "SIGTERM": 1, "SIGINT": 2}.get(reason, 1)
            codes = np.asarray(multihost_utils.process_allgather(np.int32(code)))
            agreed = int(codes.max())
            reason = {0: None, 1: "SIGTERM", 2: "SIGINT"}[agreed]
            if reason is None:
                try:  # TPU maintenance events and the coordination service's own notice
                    if multihost_utils.reached_preemption_sync_point(step):
                        reason = "preemption"
                except Exception:  # noqa: BLE001 -- no preemption service on this platform
                    pass
        return reason
