"""What the user reads on the terminal: a progress or warning line, printed once (by process 0)."""

import jax


def log(msg: str) -> None:
    """Prints a progress message on process 0 only."""
    if jax.process_index() == 0:
        print(msg, flush=True)
