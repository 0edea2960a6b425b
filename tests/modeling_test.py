"""The run's model as the spec describes it, wherever the command runs from."""

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
    import pytest  # noqa: PLC0415

    from tests import helpers  # noqa: PLC0415
    from trainer.errors import UserError  # noqa: PLC0415
    with pytest.raises(UserError) as e:
        helpers.setup(helpers.tiny_config(data=1, fsdp=1, tensor=8), vocab_size=60)
    assert str(e.value).startswith("the mesh does not divide the model's parameters: embed [60, 32]: "
                                   "dim 0 (60) over tensor=8; ")
    helpers.setup(helpers.tiny_config(data=2, fsdp=2, tensor=2), vocab_size=64)  # divides: no error
