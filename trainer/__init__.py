"""Models (Flax NNX), sharding, the train step, checkpoints, generation and the entry points."""

import data_pipeline as _data_pipeline  # noqa: F401 (its import silences transformers' torch advisory)
