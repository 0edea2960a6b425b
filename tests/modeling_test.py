"""The run's model as the spec describes it, wherever the command runs from."""

import pytest

from configs import llama3_8b_tpu
from trainer.settings.spec import RunSpec
from trainer.training import modeling


def test_arch_json_is_found_from_any_working_directory(tmp_path, monkeypatch):
    """A preset's ``model.arch_json`` is relative to the repository; it was tried from ``trainer/``
    after the package move, so a dry run started outside the repository root did not find it."""
    monkeypatch.chdir(tmp_path)
    spec = RunSpec.from_config(llama3_8b_tpu.get_config())
    arch, where = modeling.architecture(spec)
    assert arch["num_hidden_layers"] == 32 and where.endswith(spec.model.arch_json)


def test_a_mesh_that_does_not_divide_the_model_is_one_line_naming_the_parameters():
    """Tensor parallelism of 8 over a 60-token vocabulary: JAX's IndivisibleError came from deep inside
    the first device_put and named no parameter."""
    from tests import helpers  # noqa: PLC0415
    from trainer.errors import UserError  # noqa: PLC0415
    with pytest.raises(UserError) as e:
        helpers.setup(helpers.tiny_config(data=1, fsdp=1, tensor=8), vocab_size=60)
    assert str(e.value).startswith("the mesh does not divide the model's parameters: embed [60, 32]: "
                                   "dim 0 (60) over tensor=8; ")
    helpers.setup(helpers.tiny_config(data=2, fsdp=2, tensor=2), vocab_size=64)  # divides: no error


@pytest.mark.parametrize("lora", [{}, {"rank": 4, "targets": ("q", "v", "down")},
                                  {"rank": 4, "base_quant": "nf4"}], ids=["full", "lora", "qlora_nf4"])
@pytest.mark.slow
def test_an_unscanned_model_made_layer_by_layer_equals_one_program(lora):
    """``ModelSpec.init_params`` (from scratch) and the fresh adapters of a run from a base make an
    unscanned model's layers with one program called per layer (one per parameter per layer compiled
    for 40 s at 30 layers). Every leaf equals, bitwise and in the same sharding, what the single
    program makes: layer ``i`` draws the keys it drew there."""
    import jax  # noqa: PLC0415

    from tests import helpers  # noqa: PLC0415
    config = helpers.tiny_config(data=2, fsdp=2, tensor=2)
    config.model.num_hidden_layers = 3
    for k, v in lora.items():
        setattr(config.lora, k, v)
    _, spec, *_ = helpers.setup(config)
    one_program = jax.jit(spec.params_fn(7), out_shardings=spec.param_shardings)()
    by_layer = spec.init_params(7)
    assert helpers.tree_equal(jax.device_get(by_layer), jax.device_get(one_program))
    assert [x.sharding for x in jax.tree.leaves(by_layer)] == jax.tree.leaves(spec.param_shardings)
    if lora:  # the fresh adapters of a run from a base: the same values again
        make = lambda s, counts: lambda: s.split(s.params_fn(7, counts)())[0]  # noqa: E731
        adapters = spec._jit_by_layer(make, spec.split(spec.param_shardings)[0])
        assert helpers.tree_equal(jax.device_get(adapters), jax.device_get(spec.split(one_program)[0]))
