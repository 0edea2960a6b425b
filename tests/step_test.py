"""The train step: loss normalisation, gradient accumulation, compile-once, multi-device equivalence."""

import jax
import numpy as np
import optax
import pytest

from tests import helpers
from tests.helpers import resolved
from trainer.training import experiment, modeling
from trainer.training.step import make_optimizer, make_train_step, token_loss

VOCAB, SEQ = 64, 16


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_token_loss_matches_numpy_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
    targets = rng.integers(0, 11, (3, 5))
    weights = (rng.random((3, 5)) > 0.4).astype(np.float32)
    out = jax.device_get(token_loss(logits, targets, weights))
    nll = -np.take_along_axis(_log_softmax(logits.astype(np.float64)), targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(out["loss_sum"], (nll * weights).sum(), rtol=1e-5)
    assert out["tokens"] == weights.sum()
    assert out["correct"] == ((logits.argmax(-1) == targets) * weights).sum()


def _one_step(config, batch, devices, accum=1, steps=1, sgd=False):
    config.train.grad_accum_steps = accum
    mesh, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, devices)
    if sgd:  # params - 1.0 * grads: parameters then compare the gradients themselves
        tx, schedule = optax.sgd(1.0), optax.constant_schedule(1.0)
        state_sh = experiment.state_shardings(spec, tx)
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    step = jax.jit(make_train_step(spec.graphdef, tx, schedule, accum),
                   in_shardings=(state_sh, {k: batch_sh for k in batch}),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
    ms = []
    for _ in range(steps):
        state, m = step(state, helpers.to_global(batch, batch_sh))
        ms.append(jax.device_get(m))
    return state, ms, step


def test_loss_is_token_weighted_not_mean_of_row_means():
    config = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    batch = helpers.random_batch(8, SEQ, VOCAB)
    mesh, spec, *_ = helpers.setup(config, VOCAB, jax.devices()[:1])
    params = spec.init_params(0)
    from flax import nnx
    # jitted: run op by op, the reference's small ops each compile on their own (30 s here)
    logits = jax.jit(lambda p, b: nnx.merge(spec.graphdef, p).forward_logits(
        b["inputs"], b["positions"], b["segment_ids"]))(params, batch)
    nll = -np.take_along_axis(_log_softmax(np.asarray(logits, np.float64)),
                              batch["targets"][..., None], -1)[..., 0]
    w = batch["weights"]
    token_weighted = (nll * w).sum() / w.sum()
    row_mean = np.mean((nll * w).sum(1) / w.sum(1))
    assert abs(token_weighted - row_mean) > 1e-4  # the batch discriminates the two definitions
    _, ms, _ = _one_step(config, batch, jax.devices()[:1])
    np.testing.assert_allclose(ms[0]["loss"], token_weighted, rtol=1e-5)


def test_gradient_accumulation_equals_full_batch():
    """Through SGD (update = gradient): Adam's first step, lr * sign(g), would amplify float noise."""
    batch = helpers.random_batch(8, SEQ, VOCAB, seed=1)
    one = jax.devices()[:1]
    init = _one_step(helpers.tiny_config(data=1, fsdp=1, tensor=1), batch, one, steps=0, sgd=True)[0]
    full, m_full, _ = _one_step(helpers.tiny_config(data=1, fsdp=1, tensor=1), batch, one, sgd=True)
    acc, m_acc, _ = _one_step(helpers.tiny_config(data=1, fsdp=1, tensor=1), batch, one, accum=4,
                              sgd=True)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(jax.tree.leaves(init.params), jax.tree.leaves(full.params)))
    assert moved > 1e-3  # the step really updated the parameters
    np.testing.assert_allclose(m_full[0]["loss"], m_acc[0]["loss"], rtol=1e-6)
    np.testing.assert_allclose(m_full[0]["grad_norm"], m_acc[0]["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(acc.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_step_compiles_once():
    traces = []
    batch = helpers.random_batch(8, SEQ, VOCAB)
    config = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    mesh, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:1])
    inner = make_train_step(spec.graphdef, tx, schedule)

    def counted(state, b):
        traces.append(1)
        return inner(state, b)

    step = jax.jit(counted, in_shardings=(state_sh, {k: batch_sh for k in batch}),
                   out_shardings=(state_sh, None), donate_argnums=(0,))
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    for i in range(4):
        state, _ = step(state, helpers.to_global(helpers.random_batch(8, SEQ, VOCAB, seed=i), batch_sh))
    assert len(traces) == 1
    assert step._cache_size() == 1
    assert int(state.step) == 4


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_sharded_mesh_matches_single_device():
    """data=2 x fsdp=2 x tensor=2 on 8 devices gives the same losses and params as one device."""
    batch = helpers.random_batch(8, SEQ, VOCAB, seed=2)
    one, m1, _ = _one_step(helpers.tiny_config(data=1, fsdp=1, tensor=1), batch, jax.devices()[:1],
                           steps=3)
    eight, m8, _ = _one_step(helpers.tiny_config(data=2, fsdp=2, tensor=2), batch, jax.devices()[:8],
                             steps=3)
    q = eight.params["layers"][0]["attn"]["q"]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    for a, b in zip(m1, m8):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    # Adam normalises each update (m / sqrt(v)), so an element whose gradient is ~0 moves by a fraction
    # of a whole step that depends on the last bits of its gradient, i.e. on the reduction order of
    # 8 sharded devices vs 1 (measured: 1 element of 2,048 off by 5.2e-5 after 3 steps, on some CPUs).
    # 1e-4 is 3% of one step (lr 3e-3); a sharding bug (a wrong sum or a dropped shard) moves whole
    # steps. The losses above agree to 1e-5.
    lr = helpers.tiny_config(data=1, fsdp=1, tensor=1).optimizer.learning_rate
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(eight.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=lr / 30)


def test_schedule_first_update_is_not_zero_and_last_reaches_end():
    from configs import tiny
    cfg = tiny.get_config().optimizer
    cfg.warmup_steps = 4
    _, schedule = make_optimizer(cfg, 10)
    assert float(schedule(0)) == pytest.approx(cfg.learning_rate / 4)
    assert float(schedule(3)) == pytest.approx(cfg.learning_rate)
    assert float(schedule(9)) == pytest.approx(cfg.learning_rate * cfg.end_lr_ratio)


def _loss_under_remat(mode: str, rows: int, attention_impl: str = "auto"):
    """The tiny model's loss_sum as a function of its parameters under ``model.remat=mode``, on one
    device and a fixed random batch; and the initial parameters."""
    import jax.numpy as jnp  # noqa: PLC0415

    from trainer.training.step import make_forward  # noqa: PLC0415
    config = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    config.model.remat, config.model.attention_impl = mode, attention_impl
    _, spec, *_ = helpers.setup(config, devices=jax.devices()[:1])
    fwd = make_forward(spec.graphdef)
    batch = {k: jnp.asarray(v) for k, v in helpers.random_batch(rows, 16, 64).items()}
    return (lambda p: fwd(p, batch)["loss_sum"]), spec.init_params(0)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_with_context"])
def test_remat_gives_the_same_loss_and_gradients(remat):
    grads, checkpoints = {}, {}
    for mode in ("none", remat):
        loss, params = _loss_under_remat(mode, rows=4)
        grads[mode] = jax.grad(loss)(params)
        jaxpr = str(jax.make_jaxpr(loss)(params))
        checkpoints[mode] = jaxpr.count("checkpoint") + jaxpr.count("remat")
    # it is really on: the blocks add checkpoints (to the loss tiles' own, when the loss is tiled)
    assert checkpoints[remat] > checkpoints["none"]
    for a, b in zip(jax.tree.leaves(grads["none"]), jax.tree.leaves(grads[remat]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_remat_dots_with_context_recomputes_only_the_attention_scores():
    """On the XLA path the backward pass of remat="dots" recomputes both attention matmuls (scores and
    probabilities x values); "dots_with_context" keeps attention's output, so only the scores (whose
    probabilities the backward needs) are computed again: one matmul fewer a layer."""
    import jax.numpy as jnp  # noqa: PLC0415
    matmuls = {}
    for mode in ("none", "dots", "dots_with_context"):
        loss, params = _loss_under_remat(mode, rows=2, attention_impl="xla")
        # forward and backward traced together (never run op by op): the forward's matmuls are the same
        # in every mode, so the differences are the backward's recomputation
        grad_jaxpr = jax.make_jaxpr(lambda p, ct: jax.vjp(loss, p)[1](ct))(params, jnp.float32(1))  # noqa: B023
        matmuls[mode] = str(grad_jaxpr).count("dot_general")
    layers = helpers.tiny_config(data=1, fsdp=1, tensor=1).model.num_hidden_layers
    assert matmuls["dots"] - matmuls["none"] == 2 * layers, matmuls
    assert matmuls["dots_with_context"] - matmuls["none"] == layers, matmuls


def test_weight_decay_spares_biases_and_norms_whatever_their_rank():
    """Qwen2's per-head biases are 2-D ([heads, head_dim]): a rank-based mask would decay them."""
    from flax import nnx  # noqa: PLC0415

    from trainer.models.config import ModelConfig  # noqa: PLC0415
    from trainer.models.transformer import Transformer  # noqa: PLC0415
    from trainer.training.step import decay_mask  # noqa: PLC0415
    cfg = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, qkv_bias=True, qk_norm=True)
    params = nnx.state(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param).to_pure_dict()
    mask = decay_mask(params)
    layer = mask["layers"][0]
    assert params["layers"][0]["attn"]["q_bias"].ndim == 2 and not layer["attn"]["q_bias"]
    assert not layer["attn"]["q_norm"]["scale"] and not layer["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert layer["attn"]["q"] and layer["mlp"]["down"] and mask["embed"] and mask["lm_head"]


def _compiled_accum_step(k):
    """The compiled HLO of a data=8 step with ``k`` micro-batches (abstract shapes only)."""
    config = helpers.tiny_config(data=8, fsdp=1, tensor=1)
    mesh, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:8])
    step = experiment.jit_train_step(spec, tx, schedule, k, state_sh, batch_sh)
    batch = {f: jax.ShapeDtypeStruct((32, SEQ), np.float32 if f == "weights" else np.int32,
                                     sharding=batch_sh) for f in helpers.FIELDS}
    return step.lower(experiment.abstract_state(spec, tx, state_sh), batch).compile().as_text()


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_accumulation_keeps_each_devices_rows(monkeypatch):
    """32 rows on 8 devices, 2 micro-batches: each device computes its own 2 rows per micro-batch
    (activations [2, seq, ...]) and no row moves: no all-gather. The naive (k, B/k) split, patched in,
    gathers rows across devices -- so the check can fail."""
    hlo = _compiled_accum_step(2)
    assert hlo.count("all-gather") == 0, "micro-batches moved rows between devices"
    assert f"f32[2,{SEQ},32]" in hlo  # per-device activations: 2 rows (32 / 8 devices / 2 micro-batches)
    from trainer.training import step as step_lib  # noqa: PLC0415
    monkeypatch.setattr(step_lib, "micro_batches", lambda batch, k, spec=None: jax.tree.map(
        lambda x: x.reshape((k, x.shape[0] // k) + x.shape[1:]), batch))
    assert _compiled_accum_step(2).count("all-gather") > 0


def test_non_finite_step_is_skipped_and_counted():
    """NaN in a batch: params and optimizer moments are left exactly as they were, ``skipped`` is 1;
    the next finite batch trains normally."""
    config = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    mesh, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:1])
    step = jax.jit(make_train_step(spec.graphdef, tx, schedule), out_shardings=(state_sh, None))
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    good = helpers.random_batch(8, SEQ, VOCAB)
    state, m = step(state, helpers.to_global(good, batch_sh))
    assert float(m["skipped"]) == 0.0
    before = jax.device_get((state.params, state.opt_state))
    bad = dict(good)
    bad["weights"] = good["weights"].copy()
    bad["weights"][3, -1] = np.nan  # e.g. a corrupt batch
    state, m = step(state, helpers.to_global(bad, batch_sh))
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    assert helpers.tree_equal(before, jax.device_get((state.params, state.opt_state)))
    assert int(state.step) == 2  # the step (and with it the data position) still advances
    state, m = step(state, helpers.to_global(good, batch_sh))
    assert float(m["skipped"]) == 0.0
    assert not helpers.tree_equal(before[0], jax.device_get(state.params))


def test_loss_chunk_is_per_device():
    """``train.loss_chunk_tokens`` is per device: the tile over the whole batch grows with the devices
    the batch is split over (a global figure shrank every device's tile on a big slice)."""
    from trainer import sharding as sharding_lib  # noqa: PLC0415
    from trainer.training import experiment  # noqa: PLC0415
    config = helpers.tiny_config(data=4, fsdp=2, tensor=1)
    config.train.loss_chunk_tokens = 64
    for devices, expected in ((jax.devices()[:1], 64), (jax.devices()[:8], 64 * 8)):
        mesh = sharding_lib.make_mesh(dict(config.mesh) if len(devices) == 8 else
                                      {"data": 1, "fsdp": 1, "tensor": 1}, devices)
        batch_sh = sharding_lib.batch_sharding(mesh, modeling.rules(resolved(config)))
        assert experiment.loss_chunk_tokens(resolved(config), batch_sh) == expected


@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["clipped", "not_clipped"])
def test_clip_is_optax_clip_by_global_norm(max_norm):
    """Our clip (one scalar factor; the norm handed in or not) against optax's, on and off, and the
    same (empty) state, so that checkpoints of either load with the other."""
    from trainer.training.step import clip_by_global_norm  # noqa: PLC0415
    g = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.ones(4, np.float32)}
    want, want_state = optax.clip_by_global_norm(max_norm).update(g, optax.EmptyState())
    ours = clip_by_global_norm(max_norm)
    assert jax.tree.structure(ours.init(g)) == jax.tree.structure(optax.clip_by_global_norm(1.0).init(g))
    for kwargs in ({}, {"grad_norm": optax.global_norm(g)}):
        got, _ = ours.update(g, ours.init(g), **kwargs)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


@pytest.mark.parametrize("max_norm", [0.05, 100.0], ids=["clipped", "not_clipped"])
def test_update_is_optax_adamw_on_the_mean_loss_gradient(max_norm):
    """Two steps of the train step against the textbook recipe: the gradient of the token-mean loss,
    optax's own ``clip_by_global_norm`` and ``adamw`` (same schedule, same decay mask). The step
    divides, takes the norm and clips in its own order (a scalar factor fused into the update)."""
    import jax.numpy as jnp  # noqa: PLC0415

    from trainer.training.step import decay_mask, make_forward  # noqa: PLC0415
    config = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    config.optimizer.max_grad_norm = max_norm
    # eps near the clipped gradients' size: Adam's step then depends on their scale, so a clip that
    # is off shows (with eps 1e-8 a first Adam step is g / |g| whatever the clip did)
    config.optimizer.eps = 1e-3
    mesh, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, VOCAB, jax.devices()[:1])
    step = jax.jit(make_train_step(spec.graphdef, tx, schedule), out_shardings=(state_sh, None))
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    batches = [helpers.random_batch(8, SEQ, VOCAB, seed=i) for i in range(2)]
    for b in batches:
        b["weights"][:, : SEQ // 2] = 0.0  # prompt tokens: the mean is over supervised tokens only
    params = jax.device_get(state.params)
    o = config.optimizer
    ref_tx = optax.chain(optax.clip_by_global_norm(max_norm),
                         optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                                     mask=decay_mask))
    ref_state, fwd = ref_tx.init(params), make_forward(spec.graphdef)
    # the reference jitted as well: run op by op, its small ops each compile on their own (35 s here)
    mean_loss_grad = jax.jit(jax.grad(lambda p, batch: fwd(p, batch)["loss_sum"] / jnp.sum(batch["weights"])))
    ref_update = jax.jit(ref_tx.update)
    norms = []
    for b in batches:
        state, m = step(state, helpers.to_global(b, batch_sh))
        grads = mean_loss_grad(params, {k: jnp.asarray(v) for k, v in b.items()})
        norms.append(float(optax.global_norm(grads)))
        np.testing.assert_allclose(float(m["grad_norm"]), norms[-1], rtol=1e-5)
        updates, ref_state = ref_update(grads, ref_state, params)
        params = optax.apply_updates(params, updates)
    assert (max(norms) > max_norm) == (max_norm < 1)  # the clip was (or was not) in play
    for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(params)):
        # 1e-5: 0.3% of a step (lr 3e-3); the code before this test differed from it by 3e-6
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=config.optimizer.learning_rate / 300)
