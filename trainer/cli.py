"""Entry-point plumbing: user errors become one clear message, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """Something the user can fix (bad config, wrong workdir, missing checkpoint...).

    Entry points print ``error: <message>`` and exit with status 2, without a traceback.
    """


def run_main(fn: Callable[[], Any]) -> Any:
    """Calls ``fn``; a ``UserError`` (or a data/template ``ValueError`` raised as one) exits cleanly."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
