"""One line, not a native stack dump, when JAX's distributed runtime aborts a process.

When a peer of a multi-process run dies -- process 0 included, which hosts JAX's coordination
service -- the survivors' coordination clients log a fatal error and ``abort()`` from a native thread:
a check-failure stack trace and Python's fault handler dump, ~200 lines, on the terminal. Nothing in
Python runs first: jaxlib 0.10's ``missed_heartbeat_callback`` cannot be used from Python (the status
it passes has no Python conversion and the call itself aborts with ``std::bad_cast``).

So, with several processes (``divert_native_stderr``, called before ``jax.distributed.initialize``):

* file descriptor 2 -- where XLA, gloo, gRPC and the fault handler write -- goes to a diagnostics
  file (``$IFT_NATIVE_LOG``, else ``<tmp>/flax_ift_native_<pid>.log``), while Python's ``sys.stderr``
  (our own error lines, progress, warnings) stays on the terminal;
* a small watcher process (this module's ``main``; it imports nothing from JAX) waits on a pipe
  whose write end only the trainer holds. The pipe closes when the trainer ends, however it ends; if
  the diagnostics file then shows a native abort, the watcher prints the one line that says what
  happened, on the trainer's terminal -- unless the trainer has already printed its own ``error:``
  line (a peer's death seen from Python: the grace timer of an agreed stop, a failed collective),
  which it tells the watcher through the same pipe: one line on the terminal, not two. After a run
  that ended with neither, the watcher removes the default diagnostics file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

# What a native abort leaves in the diagnostics file (any one of them marks one).
FATAL_MARKS = ("detected fatal errors", "Check failure stack trace", "Fatal Python error",
               "terminate called")
_identity: list[int] = []  # the write end of the watcher's pipe


def divert_native_stderr(process_id: int = -1) -> str:
    """Native stderr to a diagnostics file, Python's ``sys.stderr`` kept on the terminal, and the
    watcher started. Returns the diagnostics file's path."""
    path = os.environ.get("IFT_NATIVE_LOG") or os.path.join(
        tempfile.gettempdir(), f"flax_ift_native_{os.getpid()}.log")
    terminal = os.dup(2)
    r, w = os.pipe()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stderr.flush()
    sys.stderr = SaysWhy(os.fdopen(terminal, "w", buffering=1, closefd=False), w)
    try:  # absl's Python log handler holds the stream it was built with (now the diagnostics file)
        from absl import logging as absl_logging  # noqa: PLC0415
        absl_logging.get_absl_handler().python_handler.stream = sys.stderr
    except Exception:  # noqa: BLE001 -- absl not set up: nothing to re-point
        pass
    os.set_inheritable(r, True)
    subprocess.Popen(  # noqa: S603 -- our own module, with the running interpreter
        [sys.executable, "-m", "trainer.exit_watch", str(r), path, str(process_id)],
        pass_fds=(r,), stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal,
        start_new_session=True,  # a Ctrl-C to the trainer's group does not stop the watcher
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.close(r)
    _identity.append(w)
    return path


class SaysWhy:
    """The trainer's ``sys.stderr`` on the terminal. The first ``error:`` line written through it
    also writes ``said`` to the watcher's pipe: the trainer has said why it ends, so the watcher
    stays quiet even when the diagnostics file shows a native abort as well (a SIGKILLed peer: the
    survivor's grace timer printed its line, and the coordination service logged the peer's death)."""

    def __init__(self, stream, pipe_fd: int):
        self._stream, self._pipe, self._told = stream, pipe_fd, False

    def write(self, text: str) -> int:
        if not self._told and text.startswith("error: "):
            self._told = True
            try:
                os.write(self._pipe, b"said\n")
            except OSError:  # the watcher is gone: nothing to tell
                pass
        return self._stream.write(text)

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def identify(process_index: int, process_count: int) -> None:
    """Tells the watcher which process this is (known only after ``jax.distributed.initialize``)."""
    for w in _identity:
        os.write(w, f"{process_index} {process_count}\n".encode())


def diagnosis(native_log: str) -> str | None:
    """What the diagnostics file says killed the process, or None when it shows no native abort."""
    try:
        with open(native_log, errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    if not any(m in text for m in FATAL_MARKS):
        return None
    if "detected fatal errors" in text or "coordination service" in text.lower():
        # The service itself (alive, in process 0) saying a task went quiet: another process died.
        # Checked first: its message also says UNAVAILABLE.
        if "stopped sending heartbeats" in text or "heartbeat timeout" in text:
            return ("JAX's coordination service stopped hearing from another process (it died or "
                    "hangs)")
        if "Socket closed" in text or "UNAVAILABLE" in text or "Connection refused" in text:
            return ("process 0, which hosts JAX's coordination service, is gone (it died or was "
                    "stopped)")
        return "JAX's coordination service reported that another process failed"
    return "the process aborted in native code"


def main(argv: list[str]) -> None:
    fd, native_log, who = int(argv[1]), argv[2], argv[3]
    count, said = "", False
    with os.fdopen(fd, "rb") as pipe:
        for line in pipe:  # until the trainer's end closes the pipe
            words = line.decode().split()
            if words == ["said"]:  # the trainer printed its own error line (SaysWhy)
                said = True
            elif len(words) == 2:
                who, count = words
    what = diagnosis(native_log)
    if what is not None and not said:
        name = f"process {who}" + (f" of {count}" if count else "") if who != "-1" else "this process"
        print(f"error: {name}: {what}; it exited (rerunning the same command resumes from the last "
              f"checkpoint; JAX's own diagnostics: {native_log})", file=sys.stderr, flush=True)
    elif what is None and not said and not os.environ.get("IFT_NATIVE_LOG"):
        # A run that ended without an error leaves nothing behind: every process of every
        # multi-process run made one such file in the temp directory (474 of them here in a day of
        # tests, 422 empty), which no line ever named. One that the user named is theirs to keep.
        try:
            os.remove(native_log)
        except OSError:
            pass


if __name__ == "__main__":
    main(sys.argv)
