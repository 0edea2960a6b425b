"""The config's vocabulary and its checks, without JAX: ``options`` (every enumerated value, listed
once), ``checks`` (every problem of a config that needs no data and no device work, all reported at
once). Imports nothing else from ``trainer`` except the JAX-free scoring normaliser and LoRA config.
"""
