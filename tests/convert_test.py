"""``trainer.convert``: a base model converted once into the run's layout (sharded Orbax) loads into
the same parameters, bitwise, as the Hugging Face import it came from, in the target shardings."""

import json
import os
import pathlib

import jax
import pytest

from tests import helpers
from tests.cli_test import run
from tests.helpers import resolved
from tests.hf_run_test import (
    hf_dir,  # noqa: F401 (the tiny Qwen2 checkpoint fixture)
    qwen2_checkpoint,
)
from tests.multiprocess_test import finish, start_processes
from trainer import sharding as sharding_lib
from trainer.errors import UserError
from trainer.training import modeling


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


@pytest.fixture(scope="module")
def bigger_hf_dir(tmp_path_factory):
    """A 4M-parameter Qwen2 (15 MB in float32): big enough that a chunk is a small part of an array."""
    return qwen2_checkpoint(str(tmp_path_factory.mktemp("qwen2_4m")), hidden_size=256,
                            intermediate_size=1024, num_hidden_layers=4)


def _convert_on_one_device(hf_path, out, chunk_mb):
    """As on a workstation: one device, so Orbax's write shards are whole arrays."""
    r = run("trainer.convert", "--config", "configs/tiny.py", "--config.model.scan_layers=True",
            "--hf_path", hf_path, "--out", out, "--chunk_mb", str(chunk_mb),
            env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return sum(f.stat().st_size for f in pathlib.Path(out, "params").rglob("*") if f.is_file())


@pytest.mark.slow
def test_four_processes_each_read_about_a_quarter_of_a_converted_base(bigger_hf_dir, tmp_path):
    """A base converted on one device, restored by 4 processes x 2 devices under FSDP over all 8:
    each process reads (TensorStore's byte counter, around the restore) about its quarter of the stored
    bytes, rounded up to the chunks its slices touch, plus the index every process reads, and its
    parameters equal the HF import's bitwise. The control is the same base stored the way Orbax
    stores it by default (one chunk per write shard, here the whole array): every process reads it all.
    The chunk is scaled to this model (64 KiB of 0.5-4 MiB arrays; 4 MiB of an 8B model's 0.1-3.8 GB
    ones): the chunks these slices touch are 25.6% of the bytes."""
    chunked = _convert_on_one_device(bigger_hf_dir, str(tmp_path / "chunked"), 0.0625)
    whole = _convert_on_one_device(bigger_hf_dir, str(tmp_path / "whole"), 1024)
    procs = start_processes(["-m", "tests.base_read_probe", bigger_hf_dir, str(tmp_path / "chunked"),
                             str(tmp_path / "whole"), f"--chunk_bytes={64 << 10}"], [], 4,
                            21000 + os.getpid() % 9000)
    codes, outs = finish(procs)
    assert codes == [0] * 4, outs[0][-3000:]
    probes = [json.loads(next(ln for ln in out.splitlines() if ln.startswith("PROBE "))[6:])
              for out in outs]
    print({"stored": (chunked, whole), "read": [(p["read_0"], p["read_1"]) for p in probes],
           "predicted": probes[0]["predicted"]})
    for p in probes:
        assert p["equal_0"] and p["equal_1"]
        read, control = p["read_0"]["tensorstore"], p["read_1"]["tensorstore"]
        assert read < 0.35 * chunked, (p, chunked)  # a quarter, rounded up to chunks, + the index
        # what the dry run prints: the chunks' bytes (compression and the index move it a little)
        assert abs(read - p["predicted"]) < 0.1 * chunked, p
        assert p["read_0"]["rchar"] < 0.5 * chunked  # the kernel's count: this and every other read
        # each process reads the whole control once: without the restore's chunk cache, a chunk two of
        # its devices' slices touch was read twice when the reads did not overlap (1.15x, and a CI run
        # whose chunked read came to 37.5%, not 25%)
        assert 0.95 * whole < control < 1.03 * whole, (p, whole)
