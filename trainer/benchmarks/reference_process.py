"""A benchmark's reference (PyTorch, transformers) in a child process of its own, asked over a pipe.

A CPU run of ours keeps its freed memory in its process's one heap, under malloc settings of its own
(``trainer.host_memory``). A reference sharing that process shared the heap and the settings: its
frees trimmed the pages ours keeps, or, with trimming off, it was spared the trims it pays on its
own; and the one-arena cap, which a process cannot undo, held its threads too. In a child process
each side has its own heap and settings. The bench and the child take turns: the bench sends a
request (a JSON line) and waits; the child works and answers (a JSON line); the other is idle.

The parent side is ``ReferenceProcess``; the child's module calls ``serve_requests`` with a generator
that takes each request and yields its answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Generator
from typing import Any

from trainer import host_memory

REPLY = "reference_process: "  # marks the child's answers among whatever else it prints on stdout
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ReferenceProcess:
    """``python -m module`` as a child; ``ask`` sends one request and returns its answer.
    ``keep_freed_memory``: the child applies ours' malloc settings (``trainer.host_memory``), not
    glibc's (a reference timed under them shows what they do for it)."""

    def __init__(self, module: str, keep_freed_memory: bool = False):
        env = dict(os.environ, FLAX_IFT_KEEP_FREED_MEMORY="1" if keep_freed_memory else "0")
        self._proc = subprocess.Popen(  # noqa: S603 -- our own module, with the running interpreter
            [sys.executable, "-m", module], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            bufsize=1, env=env, cwd=ROOT)
        self._module = module

    def ask(self, request: Any) -> Any:
        self._proc.stdin.write(json.dumps(request) + "\n")
        self._proc.stdin.flush()
        for line in self._proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        raise RuntimeError(f"the reference's process ({self._module}) ended with exit status "
                           f"{self._proc.wait()}; its error is above")

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.close()
            self._proc.wait(timeout=60)


def serve_requests(server: Generator[Any, Any, None]) -> None:
    """The child's loop: ``server`` (a generator started here) gets each request line sent in and
    yields its answer, until the parent closes the pipe. Applies ours' malloc settings first, only
    where the parent asked (``FLAX_IFT_KEEP_FREED_MEMORY``)."""
    host_memory.keep_freed_memory()
    next(server)
    for line in sys.stdin:
        answer = server.send(json.loads(line))
        print(REPLY + json.dumps(answer), flush=True)
