"""The ahead-of-time fit check: every preset compiles from abstract shapes on this machine (no
checkpoint, no data), and the report's numbers are consistent."""

import glob
import os

import jax
import pytest

from tests import helpers
from tests.helpers import resolved
from trainer.benchmarks import dry_run
from trainer.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not p.endswith("__init__.py"))


def _load(name):
    import importlib  # noqa: PLC0415
    return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_dry_runs_without_its_checkpoint(name, monkeypatch, capsys):
    monkeypatch.setenv("SMOLLM2_GGUF", "/nonexistent/SmolLM2.gguf")  # the preset's arch_json instead
    monkeypatch.setenv("HF_MODEL", "/nonexistent/model")
    config = _load(name)
    if config.model.get("gguf_path"):
        config.model.gguf_path = "/nonexistent/SmolLM2.gguf"
    devices = 8 if config.mesh.get("fsdp", 1) == -1 else 1  # the TPU preset rehearses an 8-chip slice
    # Judged against the chip each preset targets (v5p: 95 GB; the GPU presets: 80 GB). This is the
    # CPU compiler's estimate, not the target's: for the 1B and 2B GPU presets it says 83 GB (52 GB of
    # temporaries), where the H200's compiler measured 37.9 GB for the 1B step. So the verdict is
    # checked for consistency, not asserted to be "fits".
    target_gb = 95 if "tpu" in name else 80
    r = dry_run.dry_run(resolved(config), devices, device_memory_gb=target_gb)
    out = capsys.readouterr().out
    m, state = r["memory_per_device_bytes"], r["state_bytes_per_device"]
    # every program fits, eval and generation with the optimizer state beside them (in training)
    need = [p["memory"]["total"] + (state["opt_state"] if n != "train_step" else 0)
            for n, p in r["programs"].items()]
    assert "dry run:" in out and r["fits"] == (max(need) <= target_gb * dry_run.GB)
    assert max(need) >= m["total"]
    assert ("verdict: fits" in out) == r["fits"], out
    assert r["parameters"] > 0 and r["flops_per_step_formula"] > 0
    # Two independent accounts of one device's state: ours, from each leaf's shape and sharding, and
    # XLA's buffer assignment of the compiled step's arguments (the state and the batch).
    assert m["arguments"] >= sum(state.values()) > 0, (m, state)
    assert m["total"] >= m["arguments"]


def test_verdict_and_missing_architecture():
    config = helpers.tiny_config(data=1, fsdp=1, tensor=1)
    r = dry_run.dry_run(resolved(config), 1, device_memory_gb=1e-6)
    assert r["fits"] is False
    # A device that holds every program alone but not generation beside the optimizer state, as it
    # runs during training (a long eval batch makes generation the largest program here).
    config.eval.batch_size, config.eval.max_new_tokens = 256, 64
    r = dry_run.dry_run(resolved(config), 1, quiet=True)
    totals = {n: p["memory"]["total"] for n, p in r["programs"].items()}
    opt = r["state_bytes_per_device"]["opt_state"]
    assert max(totals.values()) == totals["generate"] and opt > 0
    assert r["in_training_bytes"]["generate"] == totals["generate"] + opt
    assert r["in_training_bytes"]["train_step"] == totals["train_step"]
    between = (totals["generate"] + opt / 2) / dry_run.GB
    assert dry_run.dry_run(resolved(config), 1, device_memory_gb=between, quiet=True)["fits"] is False
    roomy = (totals["generate"] + opt + 1) / dry_run.GB
    assert dry_run.dry_run(resolved(config), 1, device_memory_gb=roomy, quiet=True)["fits"] is True
    config.model.hf_path = "/nonexistent/model"
    with pytest.raises(UserError, match="arch_json"):
        dry_run.dry_run(resolved(config), 1)
