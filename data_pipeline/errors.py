"""Bad input: one clear error naming the file and line, or a counted skip when the user asked for it."""

from __future__ import annotations

from collections import Counter


class UserError(Exception):
    """Something the user can fix (bad config, wrong workdir, missing checkpoint...).

    Entry points print ``error: <message>`` and exit with status 2, without a traceback.
    """


class DataError(ValueError):
    """Input data or a data setting the pipeline cannot use. The message names file and line."""


class BadRows:
    """Decides what a bad row does: raise (``on_bad_row="error"``) or skip and count (``"skip"``).

    Nothing is dropped silently: every skip is counted by reason, and the first few locations are kept
    for the pre-flight report.
    """

    def __init__(self, on_bad_row: str = "error", keep_examples: int = 5):
        if on_bad_row not in ("error", "skip"):
            raise DataError(f"data.on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
        self.mode = on_bad_row
        self.counts: Counter = Counter()
        self.examples: list[str] = []
        self._keep = keep_examples

    def __call__(self, where: str, problem: str, reason: str | None = None) -> None:
        """Reports a bad row at ``where`` (``file:line``); raises unless skipping."""
        if self.mode == "error":
            raise DataError(f"{where}: {problem} (set data.on_bad_row=skip to skip and count such rows)")
        self.counts[reason or problem] += 1
        if len(self.examples) < self._keep:
            self.examples.append(f"{where}: {problem}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())
