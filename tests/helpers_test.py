"""The test helpers that the "bitwise equal" claims rest on must be able to say no."""

import jax.numpy as jnp
import numpy as np

from tests import helpers


def test_tree_equal_says_no_to_a_truncated_tree_a_dtype_or_one_bit():
    a = {"w": np.arange(4, dtype=np.float32), "b": np.zeros(2, np.float32)}
    assert helpers.tree_equal(a, {k: v.copy() for k, v in a.items()})
    assert not helpers.tree_equal(a, {"w": a["w"]})                      # a leaf missing
    assert not helpers.tree_equal([a["w"], a["b"]], [a["w"]])            # a truncated list
    assert not helpers.tree_equal(a, {"w": a["w"].astype(np.float64), "b": a["b"]})
    assert not helpers.tree_equal(a, {"w": a["w"], "b": -a["b"]})        # -0.0 is another bit pattern
    assert not helpers.tree_equal({"w": jnp.ones(3, jnp.bfloat16)},
                                  {"w": jnp.ones(3, jnp.bfloat16).at[0].set(1.0078125)})
    assert helpers.tree_equal({"s": np.float32(1.5)}, {"s": np.float32(1.5)})  # 0-d leaves
    assert not helpers.tree_equal({"s": np.float32(1.5)}, {"s": np.float32(-1.5)})
    nan = np.array([np.nan], np.float32)
    assert helpers.tree_equal(nan, nan.copy())
