"""Every config in configs/ loads, passes validation and has exactly the demo's keys (no drift)."""

import glob
import importlib
import os

import pytest

from configs import demo
from tests.helpers import resolved
from trainer.settings import checks as config_checks

NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(
    os.path.dirname(__file__), "..", "configs", "*.py")) if not p.endswith("__init__.py"))


def keys(d, prefix=""):
    out = set()
    for k, v in d.items():
        if k == "sources":  # named by the user; each source has the full source() key set
            for name, src in v.items():
                out |= {f"{prefix}sources.*.{x}" for x in keys(src)}
        elif isinstance(v, dict):
            out |= keys(v, f"{prefix}{k}.")
        else:
            out.add(prefix + k)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_config_loads_validates_and_has_the_demo_keys(name):
    c = importlib.import_module(f"configs.{name}").get_config()
    # Away from its checkpoint and its pod: every check but files and the device count.
    assert config_checks.problems(resolved(c), device_count=None, check_paths=False) == []
    assert keys(c.to_dict()) == keys(demo.get_config().to_dict())


def test_presets_point_at_hf_checkpoints():
    for name in ("qwen2_5_0_5b_gpu", "gemma2_2b_gpu", "llama3_8b_tpu"):
        c = importlib.import_module(f"configs.{name}").get_config()
        assert c.model.hf_path and c.tokenizer.kind == "hf" and c.model.dtype == "bfloat16"


def test_every_problem_is_reported_at_once():
    c = demo.get_config()
    c.train.batch_size = 0
    c.optimizer.learning_rate = -1e-3
    c.train.eval_batch_size = 12
    c.data.packing = "tight"
    c.model.hf_path = "/nonexistent/model"
    c.eval.max_new_tokens = 0
    c.eval.gather_weights = "never"
    c.model.splash_block_size = 100
    out = config_checks.problems(resolved(c), device_count=8, process_count=1)
    assert out == [
        "train.batch_size must be at least 1, got 0",
        "optimizer.learning_rate must be positive, got -0.001",
        "data.packing must be one of none, best_fit, first_fit, got 'tight'",
        "model.hf_path: '/nonexistent/model' is not a directory",
        "model.splash_block_size must be 0 (auto) or a multiple of 128, got 100",
        "eval.max_new_tokens must be at least 1, got 0",
        "eval.gather_weights must be auto, once or per_step, got 'never'",
        "train.eval_batch_size=12 must be divisible by the data-parallel size 8 and the process count 1 "
        "(rows would be dropped)"]


def test_divisibility_by_mesh_and_processes_and_base_positions():
    c = demo.get_config()
    c.mesh.data, c.mesh.fsdp = 2, 2  # 4 devices, batch split 4 ways
    c.data.max_length = 36
    c.train.batch_size, c.train.grad_accum_steps = 12, 2
    c.train.eval_batch_size = 6
    out = config_checks.problems(resolved(c), device_count=4, process_count=2, base_positions=128)
    assert "train.batch_size=12 must be divisible by the data-parallel size 4 x train.grad_accum_steps=2" in out
    assert any(p.startswith("train.eval_batch_size=6 must be divisible by the data-parallel size 4") for p in out)
    assert any(p.startswith("eval prompts (144 tokens") for p in out)  # 36 x (3 + 1) + 12 > 128
    assert config_checks.problems(resolved(c), device_count=3) == ["mesh: {'data': 2, 'fsdp': 2, 'tensor': 1} needs 4 "
                                                         "devices, but 3 are available"]


@pytest.mark.parametrize("impl", ["auto", "xla", "cudnn", "flash", "splash"])
def test_every_attention_backend_the_model_offers_passes_the_config_check(impl):
    """``flash`` (the Pallas GPU kernel) is offered by the model, the demo config and the README; the
    config check used to refuse it, so only ``trainer.bench`` (which skips the checks) could use it."""
    from trainer.models import attention  # noqa: PLC0415
    assert set(attention.BACKENDS) | {"auto"} == {"auto", "xla", "cudnn", "flash", "splash"}
    c = demo.get_config()
    c.model.attention_impl = impl
    assert not [p for p in config_checks.problems(resolved(c), device_count=None, check_paths=False)
                if "attention" in p]
    c.model.attention_impl = "fast"
    assert config_checks.problems(resolved(c), device_count=None, check_paths=False) == [
        "model.attention_impl must be one of auto, xla, cudnn, flash, splash, got 'fast'"]


def test_a_splash_block_that_does_not_divide_the_rows_is_one_line():
    """``model.splash_block_size`` must divide ``data.max_length`` once splash is the backend (on TPU):
    one line naming both keys, not a kernel error at the first step."""
    from trainer.errors import UserError  # noqa: PLC0415
    from trainer.training.modeling import model_config  # noqa: PLC0415
    c = demo.get_config()
    c.data.max_length, c.model.splash_block_size = 384, 256
    with pytest.raises(UserError) as e:
        model_config(resolved(c), 512, platform="tpu")
    assert str(e.value) == ("splash attention's block (256) must divide the sequence length (384): "
                            "data.max_length=384, model.splash_block_size=256 (or set model.attention_impl=xla)")
    c.model.splash_block_size = 128
    assert model_config(resolved(c), 512, platform="tpu").splash_block_size == 128
    assert model_config(resolved(c), 512, platform="cpu").attention_impl == "xla"  # no splash, no check
