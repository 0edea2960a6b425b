"""The loss owns the LM head: cross-entropy from final hidden states, a chunk of tokens at a time.

``[batch, seq, vocab]`` float32 logits are never materialised: for a Llama-3 vocabulary (128,256) at
16k tokens a step that is 8.4 GB, and as much again for their gradient. Within each row the
supervised positions are moved to the front, and a ``lax.scan`` walks tiles of a few positions of
every row (``[batch, width, vocab]``, ``batch x width`` = the chunk): logits in float32,
soft-capping, log-sum-exp, the target's logit. A tile with no supervised token is skipped by a
``lax.cond`` -- in instruction tuning most prompt tokens carry no loss, so most of their tiles cost
nothing.

The gradient has a custom VJP: when the loss is differentiated, each tile computes its logits'
gradient (``w * (softmax - onehot)``) while it has the logits, and with it the tile's share of the
hidden states' and the head's gradients. The backward pass only scales them by the incoming
cotangent. That is three head matmuls per tile (logits, d hidden, d head) where autodiff with a
rematerialised tile needs four (the logits again in the backward), and no ``[tokens, vocab]``
array is kept between the passes. Not differentiated (the eval step), the loss computes only its
sums.

Token accuracy needs no extra pass over the vocabulary: a token is "correct" when its logit equals
the row's maximum, which the log-sum-exp computes anyway (ties count as correct; argmax would pick
one of them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from trainer.models.transformer import softcap_logits

SUMS = ("loss_sum", "tokens", "correct")

# Tokens per tile over the whole batch, for a caller that names none (tests, a library user). A run
# names its own: ``train.loss_chunk_tokens`` per device (``experiment.loss_chunk_tokens``).
CHUNK_TOKENS = 1024


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
                       chunk: int = CHUNK_TOKENS, softcap: float = 0.0) -> dict[str, jax.Array]:
    """``token_loss(softcap(hidden @ head), targets, weights)`` without the full logits.

    Args:
      hidden: [batch, seq, embed], the model's final hidden states (compute dtype).
      head: [embed, vocab], the output projection (compute dtype).
      targets: [batch, seq] int32; weights: [batch, seq] float32.
      chunk: tokens per tile over the whole batch: each tile is ``[batch, chunk // batch]``
        positions, so its float32 logits are ``chunk x vocab`` (divided among the batch's devices).
      softcap: final-logit soft-capping (Gemma 2), 0 for none.

    Returns:
      The sums of ``token_loss``. Equal to it, and so are the gradients of ``loss_sum`` with respect
      to ``hidden`` and ``head`` (tested to 1e-6 in float32); ``weights`` get no gradient.

    Tiles run along the sequence, never across rows: every row stays on the device that holds it
    (sorting or flattening across the batch would make XLA gather rows between devices). Within each
    row the supervised positions are moved to the front, so the tail tiles of a completion-only
    batch hold no supervised token in any row and are skipped.
    """
    b, s, _ = hidden.shape
    w = jax.lax.stop_gradient(weights.astype(jnp.float32))
    width = max(1, min(s, chunk // max(b, 1)))
    sums = _sums(hidden, head, targets, w, width, softcap)
    return {"loss_sum": sums[0], "tokens": jnp.sum(w), "correct": sums[1]}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sums(hidden, head, targets, w, width: int, softcap: float) -> jax.Array:
    """[loss_sum, correct], float32."""
    return _walk(hidden, head, targets, w, width, softcap, grads=False)[0]


def _sums_fwd(hidden, head, targets, w, width, softcap):
    sums, d_hidden, d_head = _walk(hidden, head, targets, w, width, softcap, grads=True)
    return sums, (d_hidden, d_head, jnp.zeros((), head.dtype))


def _sums_bwd(width, softcap, residuals, g):
    """The gradients of ``g[0] * loss_sum`` (``correct`` is a count: no gradient)."""
    d_hidden, d_head, head_dtype = residuals
    return (d_hidden * g[0].astype(d_hidden.dtype), (d_head * g[0]).astype(head_dtype.dtype),
            None, None)


_sums.defvjp(_sums_fwd, _sums_bwd)


def _tile(h_c, head, t_c, w_c, softcap: float, grads: bool):
    """One tile's [loss_sum, correct]; with ``grads`` also d loss_sum / d h_c (h_c's dtype) and
    / d head (float32)."""
    logits = softcap_logits(jnp.einsum("bse,ev->bsv", h_c, head, preferred_element_type=jnp.float32),
                            softcap)
    top = jnp.max(logits, axis=-1)
    shifted = jnp.exp(logits - top[..., None])
    total = jnp.sum(shifted, axis=-1)
    lse = top + jnp.log(total)
    target = jnp.take_along_axis(logits, t_c[..., None], axis=-1)[..., 0]
    sums = jnp.stack([jnp.sum((lse - target) * w_c), jnp.sum((target >= top) * w_c).astype(jnp.float32)])
    if not grads:
        return sums, None, None
    onehot = jax.nn.one_hot(t_c, logits.shape[-1], dtype=jnp.float32)
    d_logits = (shifted / total[..., None] - onehot) * w_c[..., None]
    if softcap:  # d(cap * tanh(x / cap)) / dx = 1 - tanh^2
        d_logits = d_logits * (1.0 - jnp.square(logits / softcap))
    d_logits = d_logits.astype(h_c.dtype)  # the matmuls run in the compute dtype, as autodiff's do
    d_h = jnp.einsum("bsv,ev->bse", d_logits, head, preferred_element_type=jnp.float32)
    d_head = jnp.einsum("bse,bsv->ev", h_c, d_logits, preferred_element_type=jnp.float32)
    return sums, d_h.astype(h_c.dtype), d_head


def _walk(hidden, head, targets, w, width: int, softcap: float, grads: bool):
    """The sums over every tile (and with ``grads`` the gradients, d hidden in ``hidden``'s order)."""
    b, s, e = hidden.shape
    if width >= s:  # the batch is one tile: plain logits (no scan or sort to pay for)
        return _tile(hidden, head, targets, w, softcap, grads)
    order = jnp.argsort(w == 0, axis=1, stable=True)  # per row: supervised positions first
    h = jnp.take_along_axis(hidden, order[..., None], axis=1)
    t = jnp.take_along_axis(targets, order, axis=1)
    ws = jnp.take_along_axis(w, order, axis=1)
    pad = -s % width
    n = (s + pad) // width

    def tiles(x):  # [b, s, ...] -> [n, b, width, ...]: the scan walks the sequence
        x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
        return jnp.swapaxes(x.reshape((b, n, width) + x.shape[2:]), 0, 1)

    def body(carry, xs):
        acc, d_head = carry
        h_c, t_c, w_c = xs

        def run(acc, d_head):
            sums, d_h, d_head_c = _tile(h_c, head, t_c, w_c, softcap, grads)
            return acc + sums, (d_head + d_head_c if grads else d_head), d_h

        def skip(acc, d_head):
            return acc, d_head, (jnp.zeros_like(h_c) if grads else None)

        acc, d_head, d_h = jax.lax.cond(jnp.any(w_c != 0), run, skip, acc, d_head)
        return (acc, d_head), d_h

    d_head0 = jnp.zeros(head.shape, jnp.float32) if grads else None
    (sums, d_head), d_h = jax.lax.scan(body, (jnp.zeros(2, jnp.float32), d_head0),
                                       (tiles(h), tiles(t), tiles(ws)))
    if not grads:
        return sums, None, None
    d_h = jnp.swapaxes(d_h, 0, 1).reshape(b, n * width, e)[:, :s]  # [b, s, e], sorted order
    d_hidden = jnp.take_along_axis(d_h, jnp.argsort(order, axis=1)[..., None], axis=1)
    return sums, d_hidden, d_head
