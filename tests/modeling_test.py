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
