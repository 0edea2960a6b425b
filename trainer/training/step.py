"""The hot path: a pure ``train_step(state, batch) -> (state, metrics)`` and its eval twin.

Losses are (numerator, denominator) pairs -- summed token losses and supervised-token counts -- so that
gradient accumulation, data parallelism and eval over many batches all give *exactly* the
token-weighted mean, whatever the split of tokens across micro-batches, devices or hosts.

Batch layout (from ``data_pipeline.loader``), every field ``[batch, seq]``:
  inputs int32, targets int32, weights float32 (1 on supervised target tokens),
  positions int32, segment_ids int32 (0 = padding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import PartitionSpec

from trainer.models.lora import combine
from trainer.models.transformer import Transformer
from trainer.training.loss import (  # noqa: F401 (token_loss: re-exported)
    CHUNK_TOKENS,
    SUMS,
    chunked_token_loss,
    token_loss,
)

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]


@struct.dataclass
class TrainState:
    """Everything a step reads and writes; a plain pytree (params are pure nested dicts).

    ``params`` are what trains (everything, or with LoRA the adapters) and what the optimizer holds
    moments for; ``frozen`` is the rest of the model (with LoRA the base, possibly quantised; else
    ``{}``). Checkpoints hold ``params`` and ``opt_state``; the frozen base is the run's base model.
    """

    step: jax.Array  # int32 scalar
    params: Any
    opt_state: Any
    frozen: Any = dataclasses.field(default_factory=dict)

    @property
    def model_params(self) -> Any:
        """The model's whole param dict (for eval, generation, export)."""
        return combine(self.frozen, self.params)


def make_optimizer(cfg: Any, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW with linear warmup + cosine decay and global-norm clipping.

    Weight decay is applied to the weight matrices and embeddings only -- never to biases or norm
    scales, as in most LLM recipes. Chosen by the parameter's role (its name), not its rank: per-head
    biases (``q_bias: [heads, head_dim]``) are 2-D but are biases.
    """
    warmup = int(cfg.warmup_steps)
    base = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=cfg.learning_rate * cfg.end_lr_ratio)

    def schedule(count):
        # Shifted by one: update k (counted from 0) uses base(k + 1), so the first update is not a
        # wasted step at learning rate 0, and the last one lands on end_value.
        return base(count + 1)

    tx = optax.chain(
        clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                    mask=decay_mask))
    return tx, schedule


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformationExtraArgs:
    """``optax.clip_by_global_norm`` as one scalar factor, with the norm handed in by the train step.

    optax's selects, element by element, between ``t`` and ``t / norm * max_norm`` (its source has a
    TODO to go back to the faster form); XLA:CPU then writes a clipped copy of the gradients and
    reads them twice. Here the clip is a scalar that fuses into Adam's update, and the step passes
    the norm it has computed anyway (``grad_norm=``), so the gradients are read once more, not three
    times. The state is optax's (empty), so checkpoints of either load with the other.
    """
    def update(updates, state, params=None, *, grad_norm=None, **extra_args):
        del params, extra_args
        norm = optax.global_norm(updates) if grad_norm is None else grad_norm
        scale = jnp.where(norm < max_norm, 1.0, max_norm / norm)
        return jax.tree.map(lambda t: t * scale.astype(t.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def decay_mask(params: Any) -> Any:
    """True for the leaves weight decay applies to: not biases (``*_bias``), not norms (``*norm*``)."""
    def decays(path, _) -> bool:
        names = [str(getattr(k, "key", k)) for k in path]
        return not names[-1].endswith("bias") and not any("norm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_forward(graphdef: nnx.GraphDef, loss_chunk: int = CHUNK_TOKENS
                 ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """Returns ``forward(params, batch) -> loss sums`` for a model graph split once, outside the loop.
    The model returns hidden states; the loss applies the head a chunk of tokens at a time."""

    def forward(params: Any, batch: Batch, dropout_rng: jax.Array | None = None) -> dict[str, jax.Array]:
        model: Transformer = nnx.merge(graphdef, params)
        hidden, _ = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                          dropout_rng=dropout_rng)
        return chunked_token_loss(hidden, model.head(), batch["targets"], batch["weights"],
                                  chunk=loss_chunk, softcap=model.cfg.final_logit_softcap)

    return forward


def micro_batches(batch: Batch, k: int, spec: PartitionSpec | None = None) -> Batch:
    """``[B, ...]`` -> ``[k, B/k, ...]`` such that every device keeps its own rows.

    Micro-batch i is rows ``i, k + i, 2k + i, ...``: a reshape to ``(B/k, k)`` then a swap of the two
    axes. A device holding a contiguous block of the batch holds its share of every micro-batch, so no
    rows move between devices (the naive ``(k, B/k)`` reshape puts micro-batch i on D/k devices, which
    XLA answers with all-gathers and k-fold duplicated compute). ``spec``: the batch's PartitionSpec;
    the constraint pins micro-batches' rows to the batch's mesh axes.
    """
    def split(x):
        y = jnp.swapaxes(x.reshape((x.shape[0] // k, k) + x.shape[1:]), 0, 1)
        if spec is not None:
            y = jax.lax.with_sharding_constraint(y, PartitionSpec(None, *spec))
        return y
    return jax.tree.map(split, batch)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum_steps: int = 1, loss_chunk: int = CHUNK_TOKENS,
                    batch_spec: PartitionSpec | None = None, dropout_seed: int = 0
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """Builds the pure train step (to be wrapped in ``jax.jit`` by the caller with shardings).

    With ``grad_accum_steps = k`` the batch is split into k micro-batches along the batch axis and the
    *summed* gradients of the loss sums are divided once by the total supervised-token count, so the
    update equals the full-batch update exactly (up to float summation order). ``batch_spec``: the
    PartitionSpec of the ``[batch, seq]`` inputs, so that micro-batches keep each device's rows.

    Only ``state.params`` are differentiated; ``state.frozen`` (the LoRA base) goes in as a constant
    and comes out untouched. ``dropout_seed``: LoRA dropout draws from ``(seed, step, micro-batch)``,
    so a resumed run drops the same units (models without dropout ignore the key).
    """
    forward = make_forward(graphdef, loss_chunk)
    tx = optax.with_extra_args_support(tx)  # ``grad_norm=`` reaches our clip; any other tx ignores it

    def loss_sum_fn(params, frozen, micro, rng):
        out = forward(combine(frozen, params), micro, rng)
        return out["loss_sum"], out

    grad_fn = jax.grad(loss_sum_fn, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        rng = jax.random.fold_in(jax.random.key(dropout_seed), state.step)
        if grad_accum_steps == 1:
            grads, sums = grad_fn(state.params, state.frozen, batch, rng)
        else:
            micro = micro_batches(batch, grad_accum_steps, batch_spec)

            def body(carry, xs):
                mb, i = xs
                g, s = grad_fn(state.params, state.frozen, mb, jax.random.fold_in(rng, i))
                return jax.tree.map(jnp.add, carry, (g, s)), None

            zeros = (jax.tree.map(jnp.zeros_like, state.params),
                     {k: jnp.zeros((), jnp.float32) for k in SUMS})
            (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(grad_accum_steps)))
        # Normalise by the token count of the whole (global) batch. max(.,1): a batch with no
        # supervised token gives zero gradients, never NaN (the data pipeline drops such rows).
        # The norm is taken from the summed gradients and divided as a scalar; the division of
        # the gradients themselves is a multiply that fuses into the update (no normalised copy).
        denom = jnp.maximum(sums["tokens"], 1.0)
        grad_norm = optax.global_norm(grads) / denom
        # The non-finite guard: a step whose loss or gradient norm is NaN/inf leaves params and
        # optimizer moments exactly as they were and says so in ``skipped``; the loop counts runs
        # of skipped steps (train.max_bad_steps). A branch, not a select of old against new values:
        # with the state donated, a select makes XLA copy the moments first (the new ones overwrite
        # the old in place), which cost more than Adam itself on CPU.
        ok = jnp.isfinite(sums["loss_sum"]) & jnp.isfinite(grad_norm)

        def update(params, opt_state):
            scaled = jax.tree.map(lambda g: g * (1.0 / denom).astype(g.dtype), grads)
            updates, opt_state = tx.update(scaled, opt_state, params, grad_norm=grad_norm)
            return optax.apply_updates(params, updates), opt_state

        params, opt_state = jax.lax.cond(ok, update, lambda p, o: (p, o), state.params, state.opt_state)
        metrics = dict(sums)
        metrics.update(loss=sums["loss_sum"] / denom, token_accuracy=sums["correct"] / denom,
                       grad_norm=grad_norm, learning_rate=schedule(state.step),
                       skipped=(~ok).astype(jnp.float32))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(graphdef: nnx.GraphDef, loss_chunk: int = CHUNK_TOKENS
                   ) -> Callable[[Any, Batch], dict[str, jax.Array]]:
    """``eval_step(params, batch) -> {loss_sum, tokens, correct}``; sum over batches, then divide."""
    return make_forward(graphdef, loss_chunk)
