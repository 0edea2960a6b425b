"""The train step compiled ahead (``experiment.CompiledAhead``) while a run builds its state."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers
from tests.helpers import resolved
from trainer.evaluation.in_training import scheduled_evals
from trainer.training import experiment
from trainer.training.loop import train

# jax logs each compile (and each load from the persistent cache) at DEBUG, from the compiling thread
FINISHED = "Finished XLA compilation of jit(train_step)"


def _train_step_compiles(caplog, config, workdir, **kw) -> list[str]:
    """The threads that compiled the train step while ``config`` trained in ``workdir``."""
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jax._src.dispatch"):
        train(resolved(config), workdir, evaluators=scheduled_evals, **kw)
    return [r.threadName for r in caplog.records if r.getMessage().startswith(FINISHED)]


@pytest.mark.parametrize("run", ["full", "qlora"])
def test_the_train_step_compiles_once_ahead_and_a_resume_too(tmp_path, caplog, run):
    """The step compiles once, on the ahead thread, for a fresh start and for a resume from a checkpoint
    (and not at all for a run already at its last step):
    the abstract state and batch are what ``init_train_state``, the checkpoint restore and the loader
    give the first call. Compiled in the loop instead (no ``CompiledAhead``), the thread is the main
    one; abstract arguments that differed from the real ones would compile twice."""
    c = helpers.tiny_config()  # data-parallel over the 8 virtual devices
    if run == "qlora":
        c.lora.rank, c.lora.base_quant = 4, "nf4"
    c.train.num_steps, c.train.checkpoint_every, c.train.eval_every = 2, 1, 100
    assert _train_step_compiles(caplog, c, str(tmp_path), stop_at=1) == ["compile-ahead"]
    assert _train_step_compiles(caplog, c, str(tmp_path)) == ["compile-ahead"]  # resumed at step 1
    assert _train_step_compiles(caplog, c, str(tmp_path)) == []  # at its last step: nothing to compile


def test_a_call_unlike_the_ahead_compile_still_runs():
    """Abstract arguments that do not match the call (another shape) cost a second compile, not a wrong
    result; an ahead compile that fails leaves the call to compile, and to raise, on its own thread."""
    f = jax.jit(lambda x: 2 * x)
    step = experiment.CompiledAhead(f, jax.ShapeDtypeStruct((3,), jnp.float32))
    np.testing.assert_array_equal(step(jnp.arange(5.0)), 2 * np.arange(5.0))

    def shapes_must_be_five(x):
        if x.shape != (5,):
            raise ValueError(f"shape {x.shape}")
        return x + 1

    step = experiment.CompiledAhead(jax.jit(shapes_must_be_five), jax.ShapeDtypeStruct((3,), jnp.float32))
    np.testing.assert_array_equal(step(jnp.zeros(5)), np.ones(5))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        step(jnp.zeros(4))


def test_abstract_batch_matches_the_loader():
    """The ahead compile's batch has the loader's fields, dtypes and shape."""
    config = helpers.tiny_config()
    *_, batch_sh = helpers.setup(config, 64)
    real = helpers.to_global(helpers.random_batch(8, 36, 64), batch_sh)
    abstract = experiment.abstract_batch(8, 36, batch_sh)
    assert {k: (v.shape, v.dtype, v.sharding) for k, v in abstract.items()} == {
        k: (v.shape, v.dtype, v.sharding) for k, v in real.items()}
