"""The errors a user sees as one line. ``UserError``: something the user can fix (bad config, wrong
workdir, missing checkpoint); entry points print ``error: <message>`` and exit with status 2.
``DataError``: input data the pipeline cannot use, naming file and line. Both are defined in
``data_pipeline.errors`` (the pipeline raises them too and imports no trainer code); library code
imports them from here, never from the entry points' flag module ``trainer.cli``."""

from data_pipeline.errors import DataError, UserError

__all__ = ["DataError", "UserError"]
