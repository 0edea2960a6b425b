"""Sampling filters, stop strings, prompt buckets and the decode loop's compiled form (greedy decoding
is checked against transformers in model_test.py)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from trainer.evaluation.generate import _pick, bucket_length, cut_at_stop, left_pad, make_generate_fn
from trainer.models.config import ModelConfig
from trainer.models.transformer import Transformer

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


def test_greedy_takes_the_first_of_equal_maxima_like_argmax():
    logits = jnp.asarray([[0.0, 2.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0], [-1.0, -2.0, -3.0, -0.5]])
    assert _pick(logits, jax.random.key(0), 0.0, 0).tolist() == [1, 0, 3]
    many = jax.random.normal(jax.random.key(1), (16, 1000))
    assert (_pick(many, jax.random.key(0), 0.0, 0) == jnp.argmax(many, -1)).all()


def test_bucket_lengths_pad_by_under_a_third():
    """16 x 1, 2, 3, 4, 6, 8, 12, ...: a batch whose longest prompt has 33 tokens is padded to 48,
    not 64 (plain powers of two nearly doubled a short batch's prefill)."""
    got = {n: bucket_length(n) for n in (1, 16, 17, 32, 33, 48, 49, 64, 65, 96, 97, 128, 129, 193, 300)}
    assert got == {1: 16, 16: 16, 17: 32, 32: 32, 33: 48, 48: 48, 49: 64, 64: 64, 65: 96, 96: 96,
                   97: 128, 128: 128, 129: 192, 193: 256, 300: 384}
    assert bucket_length(9, multiple=4) == 12


def test_decode_steps_copy_no_layer_of_the_cache():
    """The decode loop of an unrolled model writes each layer's keys/values in place and reads them
    where they lie: no op in the loop makes a copy of a layer's [batch, kv_heads, slots, head_dim]
    (a stacked cache read layer by layer, or one stored slots-first, cost a copy of every layer per
    step, a third of a small model's decode step on CPU)."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    toks, valid = left_pad([np.arange(3, 10, dtype=np.int32)] * 3, 16, 0)
    gen = make_generate_fn(graphdef, max_new_tokens=5, eos_ids=[], pad_id=0)
    hlo = gen.lower(params, toks, valid, jax.random.key(0)).compile().as_text()
    layer = re.compile(r"%(?P<name>\S+) = f32\[3,(2,21|21,2),8\]\S* (?P<op>[\w-]+)\(")
    copies = []
    for line in hlo.splitlines():
        m = layer.search(line)
        if m and "while/body" in line and (m["op"] in ("copy", "transpose", "slice", "dynamic-slice")
                                           or re.search("copy|transpose|slice_bitcast", m["name"])):
            copies.append(line.strip()[:160])
    assert copies == []
