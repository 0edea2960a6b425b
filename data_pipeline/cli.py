"""Entry-point plumbing shared by ``data_pipeline.inspect`` and the trainer's entry points.

User errors become one ``error:`` line with exit status 2, not a traceback. Entry points define their
absl flags in ``run()``/``__main__`` rather than on import, so modules such as ``trainer.train`` and
``trainer.eval`` can be imported into one process (the tests) without a duplicate-flag error. (Lives in
``data_pipeline`` because the data pipeline must not import trainer code; ``trainer.cli`` re-exports it.)
"""

from __future__ import annotations

import re
import sys
from typing import Any

from absl import flags

from data_pipeline.errors import UserError


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with one-line errors (``app.run(main, flags_parser=parse_flags)``).

    ``config_flags`` reports an unknown ``--config.a.b`` key or a bad value as an exception from deep
    inside ml_collections; here it becomes ``error: ...`` naming the key, with exit status 2.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        msg = str(e)
    except (AttributeError, KeyError, ValueError, TypeError) as e:
        detail = re.sub(r"\\n|\n", " ", str(e)).replace("\\'", "'")
        detail = " ".join(detail.replace("'", "").split()).replace(" Did you mean", ". Did you mean")
        msg = f"unknown or invalid --config key: {detail}"
    print(f"error: {msg}\nRun with --help for the flags; config keys are listed in the --config file.",
          file=sys.stderr, flush=True)
    sys.exit(2)


def config_flag() -> Any:
    """``FLAGS.config``, with a missing or broken config file reported as a ``UserError``."""
    try:
        config = flags.FLAGS.config
        if config is None:
            raise UserError("--config is required, e.g. --config configs/demo.py")
        config.get("train")  # config_flags loads lazily: touch it so a load error surfaces here
    except OSError as e:
        raise UserError(" ".join(str(e).split())) from None
    return config
