"""``trainer.convert``: a base model converted once into the run's layout (sharded Orbax) loads into
the same parameters, bitwise, as the Hugging Face import it came from, in the target shardings."""

import jax
import pytest

from tests import helpers
from tests.cli_test import run
from tests.hf_run_test import hf_dir  # noqa: F401 (the tiny Qwen2 checkpoint fixture)
from trainer import sharding as sharding_lib
from trainer.errors import UserError
from trainer.training import modeling
from tests.helpers import resolved


def _params(path, scan_layers, lora_rank=0):
    config = helpers.tiny_config(data=2, fsdp=2, tensor=2)
    config.model.hf_path, config.model.scan_layers = path, scan_layers
    if lora_rank:
        config.lora.rank = lora_rank
    spec = modeling.model_spec(resolved(config), 300, sharding_lib.make_mesh(dict(config.mesh)))
    return spec, spec.init_params(0)


@pytest.fixture(scope="module")
def converted(hf_dir, tmp_path_factory):  # noqa: F811
    out = str(tmp_path_factory.mktemp("converted") / "base")
    r = run("trainer.convert", "--config", "configs/tiny.py", "--config.model.scan_layers=True",
            "--hf_path", hf_dir, "--out", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "converted" in r.stdout and "scan_layers=True" in r.stdout
    return out


def test_converted_base_equals_the_hf_import_bitwise(hf_dir, converted):  # noqa: F811
    spec, ours = _params(converted, scan_layers=True)
    _, reference = _params(hf_dir, scan_layers=True)
    assert helpers.tree_equal(jax.device_get(ours), jax.device_get(reference))
    for x, sh in zip(jax.tree.leaves(ours), jax.tree.leaves(spec.param_shardings)):
        assert x.sharding == sh  # restored straight into the target shardings


def test_lora_freezes_a_converted_base_like_the_hf_import(hf_dir, converted):  # noqa: F811
    _, ours = _params(converted, scan_layers=True, lora_rank=4)
    _, reference = _params(hf_dir, scan_layers=True, lora_rank=4)
    assert helpers.tree_equal(jax.device_get(ours), jax.device_get(reference))


def test_a_layout_mismatch_is_one_line(converted):
    with pytest.raises(UserError, match="another layout .scan_layers=True there, False in this run") as e:
        _params(converted, scan_layers=False)
    assert "\n" not in str(e.value) and "trainer.convert" in str(e.value)
