"""Sampling filters and stop strings (greedy decoding is checked against transformers elsewhere)."""

import jax
import jax.numpy as jnp
import numpy as np

from trainer.evaluation.generate import _pick, cut_at_stop

LOGITS = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]], jnp.float32))


def sample(n, **kw):
    keys = jax.random.split(jax.random.key(0), n)
    return np.array([int(_pick(LOGITS, k, 1.0, **kw)[0]) for k in keys])


def test_top_p_keeps_the_nucleus_and_at_least_the_argmax():
    assert set(sample(200, top_k=0, top_p=0.7)) == {0, 1}  # 0.5 + 0.3 covers 0.7
    assert set(sample(50, top_k=0, top_p=1e-6)) == {0}
    assert set(sample(400, top_k=0, top_p=1.0)) == {0, 1, 2, 3}
    assert set(sample(200, top_k=2, top_p=1.0)) == {0, 1}


def test_greedy_and_stop_strings():
    assert int(_pick(LOGITS, jax.random.key(1), 0.0, 0)[0]) == 0
    assert cut_at_stop("42\n\nQuestion: next", ("\n\n", "Question:")) == "42"
    assert cut_at_stop("no stop here", ("\n\n",)) == "no stop here"
    assert cut_at_stop("x", ()) == "x"
