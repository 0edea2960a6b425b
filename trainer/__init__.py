"""Models (Flax NNX), sharding, the train step, checkpoints, generation and the entry points."""
