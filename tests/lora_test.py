"""LoRA and QLoRA: the adapters against independent references (a merged-weight model for gradients,
Hugging Face PEFT for the adapter format, transformers for the merged export), resume, sharding, and
one clear line for each bad input."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests import helpers
from tests.helpers import resolved
from trainer.errors import UserError
from trainer.models import lora, quant
from trainer.models.transformer import LORA_TARGETS, Transformer
from trainer.training import experiment
from trainer.training.step import make_forward

VOCAB, SEQ = 64, 36
ALL = tuple(LORA_TARGETS)


def lora_config(rank=4, mesh=None, **extra):
    c = helpers.tiny_config(**(mesh or dict(data=1, fsdp=1, tensor=1)))
    c.lora.rank = rank
    c.lora.alpha = 8.0
    for k, v in extra.items():
        c.lora[k] = v
    return c


def randomize_b(params, seed=1):
    """Non-zero B everywhere (a trained adapter), so the LoRA branch matters."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    rng = np.random.default_rng(seed)
    out = [jnp.asarray(rng.normal(0, 0.3, x.shape), x.dtype) if str(p[-1].key).endswith("_lora_b") else x
           for p, x in leaves]
    return jax.tree_util.tree_unflatten(treedef, out)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_zero_init_is_the_base_and_a_step_changes_only_adapters():
    config = lora_config()
    _, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:1])
    plain_cfg = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    _, plain, *_ = helpers.setup(plain_cfg, VOCAB, jax.devices()[:1])
    base = plain.init_params(0)
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    tokens = helpers.random_batch(2, SEQ, VOCAB)["inputs"]
    np.testing.assert_array_equal(helpers.our_logits(spec.graphdef, state.model_params, tokens),
                                  helpers.our_logits(plain.graphdef, base, tokens))
    assert helpers.tree_equal(state.frozen, base)  # the same seed gives the same base
    # optimizer state exists for the adapters only
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
    n_adapters = sum(x.size for x in jax.tree.leaves(state.params))
    assert all(lora.is_adapter(tuple(k.key for k in p)) for p, _ in
               jax.tree_util.tree_flatten_with_path(state.params)[0])
    assert n_opt <= 2 * n_adapters + 8
    frozen_before, adapters_before = jax.device_get(state.frozen), jax.device_get(state.params)
    step = experiment.jit_train_step(spec, tx, schedule, 1, state_sh, batch_sh)
    state, m = step(state, helpers.to_global(helpers.random_batch(8, SEQ, VOCAB), batch_sh))
    assert helpers.tree_equal(jax.device_get(state.frozen), frozen_before)  # bitwise
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), adapters_before, state.params)
    assert all(jax.tree.leaves(changed)) and float(m["grad_norm"]) > 0


def test_adapter_gradients_equal_those_of_the_merged_weight_model():
    """Reference: a plain model (no LoRA) whose weights are ``W + (alpha/r) A B`` -- differentiated
    through that merge by JAX. Our step differentiates the LoRA branch instead."""
    config = lora_config(rank=3)
    _, spec, *_ = helpers.setup(config, VOCAB, jax.devices()[:1])
    params = randomize_b(spec.init_params(0))
    adapters, frozen = spec.split(params)
    plain_cfg = dataclasses.replace(spec.cfg, lora_rank=0)
    plain_graph, _ = nnx.split(nnx.eval_shape(lambda: Transformer(plain_cfg, rngs=nnx.Rngs(0))))
    batch = jax.tree.map(jnp.asarray, helpers.random_batch(4, SEQ, VOCAB))

    def ours(ad):
        return make_forward(spec.graphdef)(lora.combine(frozen, ad), batch)["loss_sum"]

    def reference(ad):
        merged = jax.tree.map(lambda x: x, frozen)
        for i, layer in ad["layers"].items():
            for part, leaves in layer.items():
                for name in ALL:
                    if f"{name}_lora_a" in leaves:
                        a, b = leaves[f"{name}_lora_a"], leaves[f"{name}_lora_b"]
                        w = merged["layers"][i][part][name]
                        merged["layers"][i][part][name] = w + jnp.tensordot(a, b, axes=1) * (8.0 / 3)
        return make_forward(plain_graph)(merged, batch)["loss_sum"]

    np.testing.assert_allclose(float(jax.jit(ours)(adapters)), float(jax.jit(reference)(adapters)), rtol=1e-6)
    g_ours, g_ref = jax.jit(jax.grad(ours))(adapters), jax.jit(jax.grad(reference))(adapters)
    for x, y in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=2e-5, rtol=1e-4)
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g_ours)) > 1e-3


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_sharded_lora_run_equals_one_device():
    """data x fsdp x tensor = 2 x 2 x 2, dropout on, 2 micro-batches: the same adapters as on one
    device after 3 steps; adapters shard like their projections."""
    batches = [helpers.random_batch(8, SEQ, VOCAB, seed=s) for s in range(3)]
    out = []
    for mesh, devices in ((dict(data=1, fsdp=1, tensor=1), jax.devices()[:1]),
                          (dict(data=2, fsdp=2, tensor=2), jax.devices()[:8])):
        config = lora_config(mesh=mesh, dropout=0.1)
        _, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, devices)
        state = experiment.init_train_state(spec, tx, 0, state_sh)
        step = experiment.jit_train_step(spec, tx, schedule, 2, state_sh, batch_sh, seed=0)
        for b in batches:
            state, _ = step(state, helpers.to_global(b, batch_sh))
        out.append((jax.device_get(state.params), state))
    for x, y in zip(jax.tree.leaves(out[0][0]), jax.tree.leaves(out[1][0])):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=1e-5)
    q_b = out[1][1].params["layers"][0]["attn"]["q_lora_b"]  # [rank, heads, head_dim]: heads on tensor
    assert q_b.addressable_shards[0].data.shape == (4, 2, 8)


@pytest.mark.slow
def test_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """Adapters, optimizer state and every logged loss: stopped at step 2 and resumed vs straight
    through (dropout on, so its keys must follow the step too)."""
    from trainer.evaluation.in_training import scheduled_evals  # noqa: PLC0415
    from trainer.training import loop  # noqa: PLC0415

    def config():
        c = lora_config(dropout=0.1, mesh=dict(data=-1, fsdp=1, tensor=1))
        c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 4, 2, 2
        return c

    straight = loop.train(resolved(config()), str(tmp_path / "a"), evaluators=scheduled_evals)
    loop.train(resolved(config()), str(tmp_path / "b"), evaluators=scheduled_evals, stop_at=2)
    resumed = loop.train(resolved(config()), str(tmp_path / "b"), evaluators=scheduled_evals)
    assert helpers.tree_equal(jax.device_get(straight.params), jax.device_get(resumed.params))
    assert helpers.tree_equal(jax.device_get(straight.opt_state), jax.device_get(resumed.opt_state))
    losses = [[json.loads(line) for line in open(tmp_path / w / "metrics.jsonl")] for w in "ab"]
    pick = lambda rows: [(r["step"], r.get("train/loss")) for r in rows if "train/loss" in r]  # noqa: E731
    assert pick(losses[0]) == pick(losses[1]) and len(pick(losses[0])) == 4
    saved = os.listdir(tmp_path / "b" / "checkpoints" / "4")
    assert "base" in saved and "params" in saved  # the base's identity, not its weights
    params_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in
                       os.walk(tmp_path / "b" / "checkpoints" / "4" / "params") for f in fs)
    assert params_bytes < 200_000  # adapters only (the frozen base would add its 160 kB + more)


@pytest.mark.slow
def test_qlora_base_is_quantised_and_close_to_the_float_base():
    """The int8 / NF4 base's loss within 0.2% / 5% (relative) of the float base's on the same batch,
    its projections stored in int8 / packed 4-bit, and a step trains the adapters."""
    batch = helpers.random_batch(8, SEQ, VOCAB)
    losses, nbytes = {}, {}
    for kind in ("", "int8", "nf4"):
        config = lora_config(base_quant=kind)
        config.model.scan_layers = True
        _, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:1])
        state = experiment.init_train_state(spec, tx, 0, state_sh)
        out = jax.jit(make_forward(spec.graphdef))(state.model_params, jax.tree.map(jnp.asarray, batch))
        losses[kind] = float(out["loss_sum"] / out["tokens"])
        nbytes[kind] = state.frozen["layers"]["mlp"]["up"].nbytes
        if kind:
            assert isinstance(state.frozen["layers"]["mlp"]["up"], quant.QTensor)
            step = experiment.jit_train_step(spec, tx, schedule, 1, state_sh, batch_sh)
            state, m = step(state, helpers.to_global(batch, batch_sh))
            assert np.isfinite(float(m["loss"])) and float(m["skipped"]) == 0
    for kind, max_gap, max_ratio in (("int8", 2e-3, 1 / 3.5), ("nf4", 5e-2, 1 / 6)):
        assert abs(losses[kind] - losses[""]) / losses[""] < max_gap, losses
        assert nbytes[kind] < nbytes[""] * max_ratio, nbytes


def test_quantisers_round_trip_and_nf4_matches_its_levels():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 64, 4, 8)).astype(np.float32)  # stacked q: [layers, embed, heads, head_dim]
    q8 = quant.quantize(w, "int8", (-3,))
    assert q8.codes.dtype == np.int8 and q8.scale.shape == (2, 1, 4, 8)
    np.testing.assert_allclose(np.asarray(quant.dequantize(q8)), w, atol=np.abs(w).max() / 254 + 1e-6)
    q4 = quant.quantize(w, "nf4", (-3,))
    assert q4.codes.dtype == np.uint8 and q4.codes.size == w.size // 2
    d = np.asarray(quant.dequantize(q4))
    # every value is a scaled NF4 level, and the nearest one
    blocks = w.reshape(2, 1, 64, 4, 8)
    scale = np.abs(blocks).max(axis=2, keepdims=True)
    want = quant.NF4_LEVELS[np.abs(blocks[..., None] / scale[..., None] - quant.NF4_LEVELS).argmin(-1)] * scale
    np.testing.assert_allclose(d, want.reshape(w.shape), rtol=1e-6)
    # a layer's slice dequantises to that layer's weights (what lax.scan sees)
    layer1 = jax.tree.map(lambda x: jnp.asarray(x)[1], q4)
    np.testing.assert_array_equal(np.asarray(layer1[...]), d[1])


@pytest.mark.slow
def test_lora_under_remat_dots_keeps_each_projection_once(monkeypatch):
    """remat="dots" keeps each projection's output; an adapted projection is two matmuls (+ a
    low-rank one), and keeping both outputs made a LoRA step need more memory than full fine-tuning
    (1B preset on an H200: 38.98 vs 37.92 GB per device). The named policy keeps the sum only; the
    plain dots policy, patched back in, needs 20%+ more temporaries -- so this can fail."""
    from trainer.benchmarks import dry_run  # noqa: PLC0415
    from trainer.models import remat as remat_lib

    def temporaries():
        c = lora_config(rank=8)
        c.model.hidden_size, c.model.intermediate_size, c.model.head_dim = 128, 512, 32
        c.model.scan_layers, c.model.remat = True, "dots"
        c.train.batch_size, c.data.max_length = 8, 256
        return dry_run.dry_run(resolved(c), 1, quiet=True)["memory_per_device_bytes"]["temporaries"]

    named = temporaries()
    plain_policy = remat_lib.policy
    monkeypatch.setattr(remat_lib, "policy", lambda remat, lora=False: plain_policy(remat, lora=False))
    plain = temporaries()
    assert named < 0.85 * plain, (named, plain)


def test_bad_lora_config_is_one_line_each():
    from trainer.settings import checks as config_checks  # noqa: PLC0415
    c = lora_config(targets=("q", "qkv"), dropout=1.5, base_quant="int3")
    problems = config_checks.problems(resolved(c), 1)
    assert any("unknown 'qkv'; valid: q, k, v, o, gate, up, down" in p for p in problems), problems
    assert any("lora.dropout" in p for p in problems) and any("lora.base_quant" in p for p in problems)
    c = lora_config(rank=64)  # tiny: q is 32 x 32
    with pytest.raises(UserError, match=r"lora.rank=64 is larger than the projection it adapts: q \(32x32\)"):
        helpers.setup(c, VOCAB, jax.devices()[:1])
