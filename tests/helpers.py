"""Small builders shared by tests."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from data_pipeline.loader import FIELD_DTYPES, FIELDS
from trainer import sharding as sharding_lib
from trainer.io import hf as hf_io
from trainer.settings.spec import RunSpec
from trainer.training import experiment, modeling
from trainer.training.step import make_optimizer


def tiny_config(**mesh):
    c = tiny.get_config()
    if mesh:
        c.mesh = dict(mesh)
    return c


def resolved(config) -> RunSpec:
    """A test's ConfigDict (a preset it edited) as the entry points pass it on: the typed run spec."""
    return config if isinstance(config, RunSpec) else RunSpec.from_config(config)


def setup(config, vocab_size: int = 64, devices=None, num_steps: int = 10):
    """Mesh, model spec, optimizer and state shardings for ``config`` on ``devices``."""
    config = resolved(config)
    mesh = sharding_lib.make_mesh(dataclasses.asdict(config.mesh), devices)
    spec = modeling.model_spec(config, vocab_size, mesh)
    tx, schedule = make_optimizer(config.optimizer, num_steps)
    state_sh = experiment.state_shardings(spec, tx)
    batch_sh = sharding_lib.batch_sharding(mesh, modeling.rules(config))
    return mesh, spec, tx, schedule, state_sh, batch_sh


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Rows of different real lengths (rest padding) with different numbers of supervised tokens."""
    rng = np.random.default_rng(seed)
    out = {k: np.zeros((batch, seq), FIELD_DTYPES[k]) for k in FIELDS}
    for i in range(batch):
        n = int(rng.integers(seq // 2, seq + 1))
        out["inputs"][i, :n] = rng.integers(1, vocab, n)
        out["targets"][i, :n] = rng.integers(1, vocab, n)
        start = int(rng.integers(1, n))  # supervised suffix of varying length
        out["weights"][i, start:n] = 1.0
        out["positions"][i, :n] = np.arange(n)
        out["segment_ids"][i, :n] = 1
    return out


def to_global(batch, batch_sh):
    return {k: jax.device_put(v, batch_sh) for k, v in batch.items()}


def tree_equal(a, b) -> bool:
    """Bitwise equality of two pytrees: the same structure (so the same number of leaves), and per
    leaf the same shape, dtype and bits (NaN equals NaN only with the same payload)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    if jax.tree.structure(a) != jax.tree.structure(b) or len(la) != len(lb):
        return False
    for x, y in zip(la, lb):
        x, y = np.asarray(x), np.asarray(y)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if x.dtype.kind in "fc" or x.dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
            # bits, not values: -0.0 != 0.0, NaN == NaN (flattened first: a 0-d array has no view)
            x, y = (np.ascontiguousarray(v).reshape(-1).view(np.uint8) for v in (x, y))
        if not np.array_equal(x, y):
            return False
    return True


def load_base(path: str):
    """``(graphdef, params, cfg)`` of an HF directory or GGUF file, through our import."""
    return hf_io.load_model(path)


def our_logits(graphdef, params, tokens, segment_ids=None, positions=None) -> np.ndarray:
    """float32 logits [batch, seq, vocab] of our model (segment ids: all 1 when omitted)."""
    tokens = np.asarray(tokens)
    segment_ids = np.ones(tokens.shape, np.int32) if segment_ids is None else segment_ids
    positions = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
    logits = nnx.merge(graphdef, params).forward_logits(
        jnp.asarray(tokens, jnp.int32), jnp.asarray(positions, jnp.int32),
        jnp.asarray(segment_ids, jnp.int32))
    return np.asarray(logits)
