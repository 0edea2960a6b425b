"""Checkpoints: bitwise round trip, loader position, and resumed == uninterrupted training."""

import jax
import numpy as np
import pytest

from data_pipeline import loader
from tests import helpers
from tests.helpers import resolved
from trainer.errors import UserError
from trainer.evaluation.in_training import scheduled_evals
from trainer.io.checkpoint import Checkpointer
from trainer.training import experiment
from trainer.training.loop import train
from trainer.training.step import make_train_step


def test_save_restore_is_bitwise(tmp_path):
    config = helpers.tiny_config(data=2, fsdp=2, tensor=2)
    mesh, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, 64, jax.devices()[:8])
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    step = jax.jit(make_train_step(spec.graphdef, tx, schedule), out_shardings=(state_sh, None))
    state, _ = step(state, helpers.to_global(helpers.random_batch(8, 16, 64), batch_sh))  # non-zero moments
    ckpt = Checkpointer(str(tmp_path), keep=2)
    ckpt.save(1, state, {"pos": 7}, metrics={"val_loss": 1.0})
    ckpt.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, data_state = ckpt.restore(1, abstract)
    assert helpers.tree_equal(restored.params, state.params)
    assert helpers.tree_equal(restored.opt_state, state.opt_state)
    assert int(restored.step) == 1 and data_state == {"pos": 7}
    q = restored.params["layers"][0]["attn"]["q"]
    assert q.sharding == state.params["layers"][0]["attn"]["q"].sharding
    params_only = ckpt.restore_params(1, abstract.params)
    assert helpers.tree_equal(params_only, state.params)
    ckpt.close()


def test_a_replicated_cpu_state_saves_without_a_program_per_replica(tmp_path, caplog):
    """On CPU devices each replicated array is saved whole by its first replica: orbax's default split
    across the replicas (arrays with a dimension the replicas divide) compiled a slicing program per
    device and per shape (8 x 2 here), paid by every process's first save. Shapes no other test uses,
    so no program is already compiled."""
    import types  # noqa: PLC0415
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    arrays = {"w": np.arange(40 * 24, dtype=np.float32).reshape(40, 24), "b": np.arange(56, dtype=np.float32)}
    state = types.SimpleNamespace(params={k: jax.device_put(v, replicated) for k, v in arrays.items()},
                                  opt_state={"m": jax.device_put(arrays["b"] * 2, replicated)})
    ckpt = Checkpointer(str(tmp_path), keep=1)
    with jax.log_compiles(), caplog.at_level("WARNING"):
        ckpt.save(1, state, {}, metrics={"val_loss": 1.0})
        ckpt.wait()
    compiled = [r.getMessage().split(" with ")[0] for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == [], compiled
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state.params)
    assert helpers.tree_equal(ckpt.restore_params(1, abstract), state.params)
    ckpt.close()


def test_keeps_latest_and_best(tmp_path):
    config = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    _, spec, tx, _, state_sh, _ = helpers.setup(config, 64, jax.devices()[:1])
    state = experiment.init_train_state(spec, tx, 0, state_sh)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for step, loss in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.6)]:
        ckpt.save(step, state, {}, metrics={"val_loss": loss})
        ckpt.wait()
    ckpt.close()
    ro = Checkpointer(str(tmp_path), read_only=True)
    assert ro.all_steps() == [2, 4, 5]
    assert ro.resolve("best") == 2 and ro.resolve("latest") == 5 and ro.resolve("4") == 4
    with pytest.raises(UserError, match="no checkpoint at step 3.*available steps: 2, 4, 5"):
        ro.resolve("3")


def test_loader_state_restores_the_same_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 12, 37)
    examples = [loader.Example(rng.integers(1, 50, n).astype(np.int32),
                               (np.arange(n) > 2).astype(np.int32), {}) for n in lengths]
    ds = loader.train_dataset(examples, seq_len=16, pad_id=0, batch_size=4, seed=1)
    it = iter(ds)
    for _ in range(13):  # past one epoch (37 rows / 4 per batch)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(5)]
    it2 = iter(ds)
    it2.set_state(state)
    for a in expected:
        b = next(it2)
        assert all(np.array_equal(a[k], b[k]) for k in loader.FIELDS)


def test_resumed_run_equals_uninterrupted(tmp_path):
    """Train 6 steps in one go vs 3 steps, stop (as if preempted), resume to 6: identical state.

    Fails if the loader position, optimizer moments or step counter were not restored.
    """
    c = helpers.tiny_config()  # data-parallel over all (8 virtual) devices
    c.train.num_steps = 6
    c.train.checkpoint_every = 100
    c.train.eval_every = 100
    c.optimizer.warmup_steps = 2

    whole = train(resolved(c), str(tmp_path / "whole"), evaluators=scheduled_evals)
    train(resolved(c), str(tmp_path / "split"), evaluators=scheduled_evals, stop_at=3)
    resumed = train(resolved(c), str(tmp_path / "split"), evaluators=scheduled_evals)
    assert int(whole.step) == int(resumed.step) == 6
    assert helpers.tree_equal(whole.params, resumed.params)
    assert helpers.tree_equal(whole.opt_state, resumed.opt_state)
