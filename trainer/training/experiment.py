"""What ``trainer.train`` and ``trainer.eval`` share: the config check, the tokenizer, the data, the
train state and the jitted train and eval steps. (The run's config file is ``rundir``'s, its model
``modeling``'s.)

A workdir is self-describing: ``config.json`` (the run spec) and ``tokenizer/`` are written by the
first ``trainer.train`` call, so ``trainer.eval --workdir`` needs nothing else.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

from data_pipeline import loader, pipeline, sources
from data_pipeline import tokenizer as tokenizer_lib
from data_pipeline.errors import DataError
from trainer import sharding as sharding_lib
from trainer.errors import UserError
from trainer.io import hf as hf_io
from trainer.io import paths
from trainer.settings import checks as config_checks
from trainer.settings.spec import RunSpec
from trainer.training import metrics as metrics_lib
from trainer.training.loss import CHUNK_TOKENS
from trainer.training.modeling import (
    ModelSpec,
    abstract_with_shardings,
    hf_path,
    local_base,
)
from trainer.training.step import TrainState, make_eval_step, make_train_step

TOKENIZER_DIR = "tokenizer"


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------

def validate_config(config: RunSpec) -> None:
    """Every config problem at once, before any data or model work (``trainer.settings.checks``)."""
    positions, base_problems = None, []
    path = config.model.hf_path or config.model.gguf_path  # both set: a problem below
    path = local_base(path) if path else path
    if path and os.path.exists(path):
        try:
            positions = hf_io.model_config_from_hf(hf_io.read_hf_config(path)).max_position_embeddings
        except hf_io.HFError as e:
            base_problems.append(f"base model: {e}")
    problems = base_problems + config_checks.problems(config, jax.device_count(), jax.process_count(),
                                                      positions)
    if len(problems) == 1:
        raise UserError(problems[0])
    if problems:
        raise UserError(f"the config has {len(problems)} problems:\n  " + "\n  ".join(problems))


def loss_chunk_tokens(config: RunSpec, batch_sh: NamedSharding) -> int:
    """Tokens per tile of the chunked LM-head loss over the whole batch: ``train.loss_chunk_tokens``
    is per device, times the devices the batch is split over (a global figure would shrink each
    device's tile as the slice grows: 256-way data parallelism made 64 sequential 32-token head
    matmuls, each gathering the head again). Read here only, so the training step, the eval step,
    the benchmark and the dry run use the same tile."""
    return config.train.loss_chunk_tokens * sharding_lib.batch_shards(batch_sh)


# ---------------------------------------------------------------------------------------------
# Tokenizer and data
# ---------------------------------------------------------------------------------------------

def build_or_load_tokenizer(config: RunSpec, workdir: str,
                            train_rows: list[dict[str, Any]] | None):
    """Loads ``workdir/tokenizer``; on a fresh workdir first creates it (process 0) from the config.
    (A remote workdir's tokenizer goes through a local copy: transformers reads and writes local
    directories.)"""
    path = paths.join(workdir, TOKENIZER_DIR)
    if train_rows is not None:
        # Only process 0 decides whether to build it; every process enters the barrier (one that
        # looked after process 0 had written it would otherwise skip it, and the barriers mismatch).
        if jax.process_index() == 0 and not paths.isdir(path):
            try:
                tok = tokenizer_lib.build_tokenizer(config.tokenizer,
                                                    (r["messages"] for r in train_rows),
                                                    hf_path(config))
            except (OSError, ValueError) as e:
                raise UserError(f"tokenizer: {e}") from e
            local = paths.fresh_local_dir(path)
            tok.save_pretrained(local)
            if paths.is_remote(path):
                paths.upload_dir(local, path)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("tokenizer_saved")
    try:
        if paths.is_remote(path):
            if not paths.isdir(path):
                raise OSError(f"{path} does not exist")
            path = paths.download_dir(path, paths.fresh_local_dir(path))
        return tokenizer_lib.load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the run's tokenizer from {path}: {e}") from e


def read_rows(config: RunSpec):
    """``({split: [row]}, [SourceReport])`` as ``config.data`` describes; bad data is a UserError."""
    try:
        return sources.build_splits(config.data)
    except DataError as e:
        raise UserError(str(e)) from e


def tokenize(config: RunSpec, tok, rows: dict[str, list[dict[str, Any]]],
             source_reports=None) -> pipeline.Data:
    try:
        return pipeline.tokenize(config.data, tok, rows, source_reports, config.seed)
    except DataError as e:
        raise UserError(str(e)) from e


# ---------------------------------------------------------------------------------------------
# State and the jitted steps
# ---------------------------------------------------------------------------------------------

def state_shardings(spec: ModelSpec, tx: optax.GradientTransformation) -> TrainState:
    """Shardings for the whole TrainState: optimizer moments follow their (trainable) parameter."""
    abs_trainable = spec.split(jax.eval_shape(spec.params_fn(0)))[0]
    trainable_sh, frozen_sh = spec.split(spec.param_shardings)
    abs_opt = jax.eval_shape(tx.init, abs_trainable)
    rep = NamedSharding(spec.mesh, jax.sharding.PartitionSpec())
    opt_sh = optax.tree_map_params(tx, lambda _, s: s, abs_opt, trainable_sh,
                                   transform_non_params=lambda _: rep)
    return TrainState(step=rep, params=trainable_sh, opt_state=opt_sh, frozen=frozen_sh)


def _step0(spec: ModelSpec, tx: optax.GradientTransformation, params: Any) -> TrainState:
    """A fresh TrainState at step 0: ``params`` split into trainable and frozen, new optimizer
    moments for the trainable part."""
    trainable, frozen = spec.split(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, opt_state=tx.init(trainable),
                      frozen=frozen)


def init_train_state(spec: ModelSpec, tx: optax.GradientTransformation, seed: int,
                     shardings: TrainState, params: Any = None) -> TrainState:
    """Step 0: the starting parameters (``spec.init_params``, or ``params``) and fresh optimizer
    moments."""
    params = spec.init_params(seed) if params is None else params
    return jax.jit(lambda p: _step0(spec, tx, p), in_shardings=(spec.param_shardings,),
                   out_shardings=shardings, donate_argnums=(0,))(params)


def jit_train_step(spec: ModelSpec, tx: optax.GradientTransformation, schedule: optax.Schedule,
                   grad_accum_steps: int, state_sh: TrainState, batch_sh: NamedSharding,
                   loss_chunk: int = CHUNK_TOKENS, seed: int = 0):
    """``make_train_step`` under ``jax.jit``: explicit in/out shardings, donated state, traced with
    the mesh current (for the model's shard_map kernels)."""
    rep = sharding_lib.replicated(spec.mesh)
    step = jax.jit(make_train_step(spec.graphdef, tx, schedule, grad_accum_steps, loss_chunk,
                                   batch_sh.spec, dropout_seed=seed),
                   in_shardings=(state_sh, {k: batch_sh for k in loader.FIELDS}),
                   out_shardings=(state_sh, rep), donate_argnums=(0,))
    return sharding_lib.with_mesh(spec.mesh, step)


def jit_eval_step(spec: ModelSpec, batch_sh: NamedSharding, loss_chunk: int):
    """``make_eval_step`` under ``jax.jit`` with the parameters' and the batch's shardings, returning
    replicated sums: the one eval step of the training loop, ``trainer.eval`` and the dry run."""
    step = jax.jit(make_eval_step(spec.graphdef, loss_chunk),
                   in_shardings=(spec.param_shardings, {k: batch_sh for k in loader.FIELDS}),
                   out_shardings=sharding_lib.replicated(spec.mesh))
    return sharding_lib.with_mesh(spec.mesh, step)


def abstract_state(spec: ModelSpec, tx: optax.GradientTransformation, shardings: TrainState) -> Any:
    """The TrainState's shapes, dtypes and shardings, without reading or creating any weights."""
    return abstract_with_shardings(lambda: _step0(spec, tx, spec.params_fn(0)()), shardings)


def abstract_batch(rows: int, seq: int, sharding: NamedSharding) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch's fields (``loader.FIELD_DTYPES``), each ``[rows, seq]`` and sharded along the
    batch axis: what a step compiles for before any batch exists."""
    return {k: jax.ShapeDtypeStruct((rows, seq), loader.FIELD_DTYPES[k], sharding=sharding)
            for k in loader.FIELDS}


class CompiledAhead:
    """A jitted step whose compile starts now, on a background thread, for the arguments its first
    call will have (abstract: shapes, dtypes, shardings); the first call waits for that compile, then
    finds the executable in ``jax.jit``'s cache.

    Why: the state's weights (random, a checkpoint, a base model's files) are not needed to compile
    the step, and the compile is not needed to read them, so a run start does both at once. XLA
    compiles outside Python's lock, so it overlaps even the start's Python work. (README, "Model
    build, the loss's backward, start-up, compiled programs": what it saves.)

    Only the time moves: if the ahead compile fails, the first call compiles as it would have, on the
    calling thread (and raises there, with its own context); if its arguments differ from the abstract
    ones, jit compiles for them (``tests/experiment_test.py`` checks the training loop's do not)."""

    def __init__(self, step, *abstract_args):
        """No ``abstract_args``: nothing is compiled ahead (the step as it is)."""
        self.step = step
        # A daemon thread never keeps the interpreter alive; a caller that may end before the first
        # call waits for it all the same (``wait``): jax's exit handler tears the backend down.
        self._thread = threading.Thread(target=self._compile, args=abstract_args, daemon=True,
                                        name="compile-ahead")
        if abstract_args:
            self._thread.start()

    def _compile(self, *abstract_args) -> None:
        try:
            self.step.lower(*abstract_args).compile()
        except Exception:  # noqa: BLE001 -- the first call compiles again and raises it there
            pass

    def wait(self) -> None:
        if self._thread.ident is not None:  # started
            self._thread.join()

    def __call__(self, *args, **kwargs):
        self.wait()
        return self.step(*args, **kwargs)

    def lower(self, *args, **kwargs):
        self.wait()
        return self.step.lower(*args, **kwargs)


def compile_train_step_ahead(step, abstract: TrainState, rows: int, seq: int, batch_sh: NamedSharding,
                             start: bool = True) -> CompiledAhead:
    """``jit_train_step``'s ``step`` compiling ahead for ``abstract`` (``abstract_state``: what
    ``init_train_state`` or a restore gives) and for ``[rows, seq]`` batches, while the caller builds
    that state; ``start=False``: not compiled until called (a run with nothing left to train never
    calls it)."""
    if not start:
        return CompiledAhead(step)
    return CompiledAhead(step, abstract, abstract_batch(rows, seq, batch_sh))


def global_batch(local: dict[str, Any], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Assembles this process's rows (its block, ``sharding_lib.process_rows``) into global arrays
    sharded along the batch axis."""
    count = sharding_lib.process_rows(sharding)[1]
    return {k: jax.make_array_from_process_local_data(sharding, v, (v.shape[0] * count,) + v.shape[1:])
            for k, v in local.items()}


def loader_shard(batch_sh: NamedSharding) -> dict[str, int]:
    """The loader's ``process_index``/``process_count``: this process's block of every batch."""
    index, count = sharding_lib.process_rows(batch_sh)
    return {"process_index": index, "process_count": count}


def split_loss_fn(config: RunSpec, spec: ModelSpec, examples: list[loader.Example], pad_id: int,
                  batch_sh: NamedSharding) -> Callable[[Any], dict[str, float]]:
    """``params -> split_loss(...)`` over ``examples`` with the run's one eval step (its loss tile
    sized per device): the training loop's validation loss and ``trainer.eval``'s teacher-forced
    loss are this same function."""
    eval_step = jit_eval_step(spec, batch_sh, loss_chunk_tokens(config, batch_sh))
    return functools.partial(split_loss, eval_step, examples=examples, config=config, pad_id=pad_id,
                             batch_sh=batch_sh)


def split_loss(eval_step, params: Any, examples: list[loader.Example],
               config: RunSpec,
               pad_id: int, batch_sh: NamedSharding) -> dict[str, float]:
    """Token-weighted loss/accuracy over a whole split (sums over batches, then one division)."""
    sums = [eval_step(params, global_batch(b, batch_sh)) for b in loader.eval_batches(
        examples, seq_len=config.data.max_length, pad_id=pad_id, batch_size=config.train.eval_batch_size,
        packing=config.data.packing, max_segments=config.data.max_segments_per_row, **loader_shard(batch_sh))]
    return metrics_lib.summarize(sums)
