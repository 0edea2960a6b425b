"""Scanned layers (``model.scan_layers``): the same logits, gradients and generations as the unrolled
model; HF import/export through the stacked layout; a program whose size does not grow with depth."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from trainer.evaluation.generate import generate_all, make_generate_fn
from trainer.io import hf as hf_io
from trainer.models.config import ModelConfig
from trainer.models.transformer import Transformer, stack_layers, unstack_layers
from trainer.training.step import make_forward

LLAMA = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8)
QWEN2 = dataclasses.replace(LLAMA, qkv_bias=True)
# Gemma 3-like: mixed sliding/full layers with their own RoPE theta, q/k norms, post-norms, soft-caps.
GEMMA = dataclasses.replace(
    LLAMA, num_hidden_layers=4, sliding_window=4, qk_norm=True, norm_offset=1.0, post_norms=True,
    embed_scale=True, attn_logit_softcap=20.0, final_logit_softcap=15.0, rope_local_theta=100.0,
    layer_types=("sliding_attention", "full_attention", "sliding_attention", "sliding_attention"))


def _pair(cfg):
    """(unrolled graphdef, unrolled params, scanned graphdef, the same params stacked)."""
    g1, p1 = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    p1 = p1.to_pure_dict()
    scanned = dataclasses.replace(cfg, scan_layers=True)
    g2, _ = nnx.split(nnx.eval_shape(lambda: Transformer(scanned, rngs=nnx.Rngs(0))), nnx.Param)
    return g1, p1, g2, stack_layers(p1, cfg.num_hidden_layers, stack=jnp.stack)


def _batch(b=2, s=12, vocab=61):
    rng = np.random.default_rng(0)
    seg = np.array([[1] * 5 + [2] * 5 + [0] * 2, [1] * 12])[:b]
    pos = np.array([list(range(5)) * 2 + [0, 0], list(range(12))])[:b]
    toks = rng.integers(1, vocab, (b, s)) * (seg > 0)
    return {"inputs": jnp.asarray(toks, jnp.int32), "targets": jnp.asarray(np.roll(toks, -1, 1), jnp.int32),
            "weights": jnp.asarray(seg > 0, jnp.float32), "positions": jnp.asarray(pos, jnp.int32),
            "segment_ids": jnp.asarray(seg, jnp.int32)}


@pytest.mark.parametrize("cfg", [LLAMA, QWEN2, GEMMA], ids=["llama", "qwen2", "gemma3_mixed"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_scanned_logits_and_gradients_equal_unrolled(cfg, remat):
    cfg = dataclasses.replace(cfg, remat=remat)
    g1, p1, g2, p2 = _pair(cfg)
    b = _batch()
    l1 = nnx.merge(g1, p1).forward_logits(b["inputs"], b["positions"], b["segment_ids"])
    l2 = nnx.merge(g2, p2).forward_logits(b["inputs"], b["positions"], b["segment_ids"])
    np.testing.assert_allclose(np.asarray(l2), np.asarray(l1), atol=1e-5, rtol=0)
    grads1 = jax.grad(lambda p: make_forward(g1)(p, b)["loss_sum"])(p1)
    grads2 = jax.grad(lambda p: make_forward(g2)(p, b)["loss_sum"])(p2)
    for a, c in zip(jax.tree.leaves(stack_layers(grads1, cfg.num_hidden_layers, stack=jnp.stack)),
                    jax.tree.leaves(grads2), strict=True):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), atol=1e-4, rtol=1e-4)  # float order


@pytest.mark.parametrize("cfg", [LLAMA, GEMMA], ids=["llama", "gemma3_mixed"])
def test_scanned_generation_equals_unrolled(cfg):
    g1, p1, g2, p2 = _pair(cfg)
    prompts = [np.array([3, 4, 5], np.int32), np.array([7, 8, 9, 10, 11, 12, 13], np.int32)]
    outs = []
    for g, p in ((g1, p1), (g2, p2)):
        gen = make_generate_fn(g, max_new_tokens=6, eos_ids=[], pad_id=0)
        outs.append(generate_all(gen, p, prompts, batch_size=2, pad_id=0, eos_ids=[]))
    assert outs[0] == outs[1]


def test_stack_and_unstack_are_inverse():
    _, p1, _, p2 = _pair(QWEN2)
    back = unstack_layers(p2, QWEN2.num_hidden_layers)
    assert jax.tree.structure(back) == jax.tree.structure(p1)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p1)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_hf_import_and_export_through_the_stacked_layout():
    """HF tensors -> stacked params (one leaf kind at a time) -> HF tensors, bit for bit."""
    cfg = GEMMA
    _, p1, _, p2 = _pair(cfg)
    tensors = hf_io.params_to_hf(jax.tree.map(np.asarray, p1), cfg, "gemma3_text")
    scanned = dataclasses.replace(cfg, scan_layers=True)
    placed = []
    imported = hf_io.params_from_hf(tensors.__getitem__, scanned, "gemma3_text",
                                    place=lambda path, x: placed.append(path) or x)
    assert ("layers", "attn", "q") in placed and not any(isinstance(p[1], int) for p in placed
                                                         if p[0] == "layers")
    for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(p2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    again = hf_io.params_to_hf(imported, scanned, "gemma3_text")
    assert set(again) == set(tensors)
    for k in tensors:
        np.testing.assert_array_equal(again[k], tensors[k])


def test_program_size_does_not_grow_with_depth():
    """The scanned step's HLO is the same size at 2 and 16 layers; the unrolled one grows ~8x."""
    def hlo_size(layers, scan):
        cfg = dataclasses.replace(LLAMA, num_hidden_layers=layers, scan_layers=scan)
        g, p = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        fwd = jax.grad(lambda p: make_forward(g)(p, _batch())["loss_sum"])
        return len(jax.jit(fwd).lower(p.to_pure_dict()).as_text())
    scanned = hlo_size(2, True), hlo_size(16, True)
    unrolled = hlo_size(2, False), hlo_size(16, False)
    assert scanned[1] < 1.1 * scanned[0]
    assert unrolled[1] > 4 * unrolled[0]
