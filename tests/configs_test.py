"""Every config in configs/ loads, passes validation and has exactly the demo's keys (no drift)."""

import glob
import importlib
import os

import pytest

from configs import demo
from trainer import experiment

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
    experiment.validate_config(c)
    assert keys(c.to_dict()) == keys(demo.get_config().to_dict())


def test_presets_point_at_hf_checkpoints():
    for name in ("qwen2_5_0_5b_gpu", "gemma2_2b_gpu", "llama3_8b_tpu"):
        c = importlib.import_module(f"configs.{name}").get_config()
        assert c.model.hf_path and c.tokenizer.kind == "hf" and c.model.dtype == "bfloat16"
