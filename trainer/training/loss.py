"""The loss owns the LM head: cross-entropy from final hidden states, a chunk of tokens at a time.

``[batch, seq, vocab]`` float32 logits are never materialised: for a Llama-3 vocabulary (128,256) at
16k tokens a step that is 8.4 GB, and as much again for their gradient. Within each row the
supervised positions are moved to the front, and a ``lax.scan`` walks tiles of a few positions of
every row (``[batch, width, vocab]``, ``batch x width`` = the chunk): logits in float32, soft-capping, log-sum-exp, the target's logit. Each tile is rematerialised in the backward
pass (only the hidden states are kept), and a tile with no supervised token is skipped by a
``lax.cond`` -- in instruction tuning most prompt tokens carry no loss, so most of their tiles cost
nothing.

Token accuracy needs no extra pass over the vocabulary: a token is "correct" when its logit equals
the row's maximum, which the log-sum-exp computes anyway (ties count as correct; argmax would pick
one of them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trainer.models.transformer import softcap_logits

SUMS = ("loss_sum", "tokens", "correct")


def token_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> dict[str, jax.Array]:
    """The unchunked reference: masked cross-entropy sums from full logits, in float32.

    Args:
      logits: [batch, seq, vocab].
      targets: [batch, seq] int32.
      weights: [batch, seq] float32, 0 on tokens that are not supervised.

    Returns:
      ``loss_sum``, ``tokens`` (sum of weights), ``correct`` (weighted count of tokens whose target
      has the largest logit) -- float32 scalars, summed across batches before dividing.
    """
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    hit = (target >= jnp.max(logits, axis=-1)).astype(jnp.float32)
    return {"loss_sum": jnp.sum((lse - target) * weights), "tokens": jnp.sum(weights),
            "correct": jnp.sum(hit * weights)}


def chunked_token_loss(hidden: jax.Array, head: jax.Array, targets: jax.Array, weights: jax.Array, *,
                       chunk: int = 1024, softcap: float = 0.0) -> dict[str, jax.Array]:
    """``token_loss(softcap(hidden @ head), targets, weights)`` without the full logits.

    Args:
      hidden: [batch, seq, embed], the model's final hidden states (compute dtype).
      head: [embed, vocab], the output projection (compute dtype).
      targets: [batch, seq] int32; weights: [batch, seq] float32.
      chunk: tokens per tile over the whole batch: each tile is ``[batch, chunk // batch]``
        positions, so its float32 logits are ``chunk x vocab`` (divided among the batch's devices).
      softcap: final-logit soft-capping (Gemma 2), 0 for none.

    Returns:
      The sums of ``token_loss``. Equal to it, and so are the gradients (tested to 1e-6 in float32).

    Tiles run along the sequence, never across rows: every row stays on the device that holds it
    (sorting or flattening across the batch would make XLA gather rows between devices). Within each
    row the supervised positions are moved to the front, so the tail tiles of a completion-only
    batch hold no supervised token in any row and are skipped.
    """
    b, s, e = hidden.shape
    w = weights.astype(jnp.float32)
    width = max(1, min(s, chunk // max(b, 1)))

    def tile(h_c, t_c, w_c):
        logits = jnp.einsum("bse,ev->bsv", h_c, head, preferred_element_type=jnp.float32)
        logits = softcap_logits(logits.astype(jnp.float32), softcap)
        top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
        lse = top + jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1))
        target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
        return jnp.stack([jnp.sum((lse - target) * w_c),
                          jnp.sum(((target >= top) * w_c).astype(jnp.float32))])

    if width >= s:  # the batch is one tile: plain logits (no scan, sort or remat to pay for)
        loss_sum, correct = tile(hidden, targets, w)
        return {"loss_sum": loss_sum, "tokens": jnp.sum(w), "correct": correct}

    order = jnp.argsort(w == 0, axis=1, stable=True)  # per row: supervised positions first
    h = jnp.take_along_axis(hidden, order[..., None], axis=1)
    t = jnp.take_along_axis(targets, order, axis=1)
    w = jnp.take_along_axis(w, order, axis=1)
    pad = -s % width
    n = (s + pad) // width

    def tiles(x):  # [b, s, ...] -> [n, b, width, ...]: the scan walks the sequence
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((b, n, width) + x.shape[2:]), 0, 1)

    tile = jax.checkpoint(tile, prevent_cse=False)  # keep only the hidden states for the backward

    def body(acc, xs):
        h_c, t_c, w_c = xs
        sums = jax.lax.cond(jnp.any(w_c != 0), tile, lambda *_: jnp.zeros(2, jnp.float32),
                            h_c, t_c, w_c)
        return acc + sums, None

    (loss_sum, correct), _ = jax.lax.scan(body, jnp.zeros(2, jnp.float32), (tiles(h), tiles(t), tiles(w)))
    return {"loss_sum": loss_sum, "tokens": jnp.sum(weights.astype(jnp.float32)), "correct": correct}
