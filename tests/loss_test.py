"""The chunked loss (the loss owns the LM head) against the full-logits reference: sums and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trainer.models.transformer import softcap_logits
from trainer.training.loss import chunked_token_loss, token_loss


def _data(n_rows=3, seq=13, embed=24, vocab=53, seed=0, supervised=0.4):
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.normal(size=(n_rows, seq, embed)), jnp.float32)
    head = jnp.asarray(rng.normal(size=(embed, vocab)) / 3, jnp.float32)
    targets = jnp.asarray(rng.integers(0, vocab, (n_rows, seq)), jnp.int32)
    weights = jnp.asarray(rng.random((n_rows, seq)) < supervised, jnp.float32)
    return hidden, head, targets, weights


def _reference(hidden, head, targets, weights, softcap):
    logits = softcap_logits(jnp.einsum("bse,ev->bsv", hidden, head), softcap)
    return token_loss(logits, targets, weights)


@pytest.mark.parametrize("chunk,softcap", [(1, 0.0), (15, 0.0), (16, 30.0), (1000, 0.0)])
def test_chunked_equals_unchunked_loss_and_gradients(chunk, softcap):
    """Tiles that do not divide the row length (13), soft-capping, partial supervision."""
    hidden, head, targets, weights = _data()
    got = chunked_token_loss(hidden, head, targets, weights, chunk=chunk, softcap=softcap)
    want = _reference(hidden, head, targets, weights, softcap)
    for k in want:
        np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-6, atol=1e-6)

    def loss(fn):
        return lambda h, w: fn(h, w)["loss_sum"]
    g_got = jax.grad(loss(lambda h, w: chunked_token_loss(h, w, targets, weights, chunk=chunk,
                                                          softcap=softcap)), argnums=(0, 1))(hidden, head)
    g_want = jax.grad(loss(lambda h, w: _reference(h, w, targets, weights, softcap)),
                      argnums=(0, 1))(hidden, head)
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_correct_counts_argmax_hits():
    hidden, head, targets, weights = _data(seed=3, supervised=1.0)
    logits = np.asarray(jnp.einsum("bse,ev->bsv", hidden, head))
    targets = jnp.asarray(np.where(np.random.default_rng(1).random(targets.shape) < 0.5,
                                   logits.argmax(-1), np.asarray(targets)), jnp.int32)
    got = chunked_token_loss(hidden, head, targets, weights, chunk=7)
    assert float(got["correct"]) == float(((logits.argmax(-1) == np.asarray(targets)) * weights).sum())
    assert 0 < float(got["correct"]) < float(got["tokens"])


def test_no_supervised_token_gives_zero_not_nan():
    hidden, head, targets, _ = _data()
    got = chunked_token_loss(hidden, head, targets, jnp.zeros(targets.shape), chunk=4)
    assert float(got["loss_sum"]) == 0.0 and float(got["tokens"]) == 0.0


def test_full_logits_are_never_materialised():
    """No [tokens, vocab] array in the compiled loss: only [batch, chunk / batch, vocab] tiles."""
    hidden, head, targets, weights = _data(n_rows=4, seq=64, vocab=1000)
    fn = jax.jit(jax.grad(lambda h, w: chunked_token_loss(h, w, targets, weights, chunk=32)["loss_sum"],
                          argnums=(0, 1)))
    hlo = fn.lower(hidden, head).compile().as_text()
    assert "f32[4,8,1000]" in hlo  # 32 tokens: 8 positions of each of the 4 rows
    assert "f32[256,1000]" not in hlo and "f32[4,64,1000]" not in hlo


def _head_matmuls(jaxpr, vocab) -> int:
    """dot_generals with a vocabulary-sized operand or result, in ``jaxpr`` and every sub-jaxpr."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and any(
                vocab in getattr(v.aval, "shape", ()) for v in (*eqn.invars, *eqn.outvars)):
            n += 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    n += _head_matmuls(inner, vocab)
    return n


@pytest.mark.parametrize("chunk", [32, 1000])
def test_the_gradient_costs_three_head_matmuls_per_tile_not_four(chunk):
    """The custom VJP computes the logits' gradient while it has the logits: logits, d hidden and
    d head, where autodiff of a rematerialised tile computes the logits again in the backward."""
    hidden, head, targets, weights = _data(n_rows=4, seq=64, vocab=1000)
    loss = lambda h, w: chunked_token_loss(h, w, targets, weights, chunk=chunk)["loss_sum"]  # noqa: E731
    assert _head_matmuls(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(hidden, head).jaxpr, 1000) == 3
    assert _head_matmuls(jax.make_jaxpr(loss)(hidden, head).jaxpr, 1000) == 1  # not differentiated
