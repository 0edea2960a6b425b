"""The embedded default: a small Llama trained from scratch on the built-in synthetic tasks.

Needs no network and no files outside the repo; trains in a few minutes on 2 CPU cores.

    python -m trainer.train --config configs/demo.py --workdir runs/demo
    python -m trainer.eval --workdir runs/demo

It is every key at its default: ``trainer/settings/spec.py`` declares each key once, with its type,
its default and what it means. Every other preset starts from this one and changes what differs.
"""

from ml_collections import ConfigDict

from trainer.settings.spec import default_config


def get_config() -> ConfigDict:
    return default_config()
