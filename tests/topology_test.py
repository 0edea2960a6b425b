"""Compiling for TPU slices this machine does not have (``--dry_run --topology``): the real TPU
compiler through libtpu, the attention backend chosen for the target chips, and the collectives read
back from the compiled HLO."""

import os
import re
import subprocess
import sys

import pytest

from tests import helpers
from tests.conftest import reference
from tests.helpers import resolved
from trainer.benchmarks import topology
from trainer.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A scan of 3 iterations holding one all-gather of bf16[4,8] (64 bytes), an all-reduce of two f32[2]
# results (16 bytes) in the entry, an async all-gather whose tuple is (operand, result), and a custom
# call whose backend config runs over lines (one of them starts with "}}").
HLO = """\
HloModule m

%body (p: (s32[], bf16[4,8])) -> (s32[], bf16[4,8]) {
  %p = (s32[], bf16[4,8]) parameter(0)
  %ag = bf16[4,8]{1,0} all-gather(%x), channel_id=1, dimensions={0}
  ROOT %t = (s32[], bf16[4,8]) tuple(%i, %ag)
}

%cond (p: (s32[], bf16[4,8])) -> pred[] {
  %c = s32[]{:T(128)} constant(3)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (a: f32[2]) -> f32[2] {
  %k = f32[2]{0} custom-call(%a), custom_call_target="tpu_custom_call", backend_config={"a":
"{\\"x\\": 1
}}, metadata={op_name="x"}
  %w = (s32[], bf16[4,8]) while(%init), condition=%cond, body=%body
  %ar = (f32[2]{0}, f32[2]{0}) all-reduce(%a, %k), channel_id=2, to_apply=%add
  %ags = (f32[2]{0}, f32[8]{0}) all-gather-start(%a), channel_id=3, dimensions={0}
  ROOT %r = f32[2] add(%a, %a)
}
"""


def test_collective_bytes_counts_each_loop_iteration():
    got = topology.collective_bytes(HLO)
    assert got == {"all-gather": 3 * 64 + 32, "reduce-scatter": 0, "all-reduce": 16, "all-to-all": 0,
                   "collective-permute": 0}


def test_unknown_topology_is_one_line():
    reference("libtpu")
    with pytest.raises(UserError, match="does not know this topology") as e:
        topology.tpu_devices("v9z:1x1")
    assert "\n" not in str(e.value)


def _tiny():
    config = helpers.tiny_config(data=-1, fsdp=1, tensor=1)
    config.data.max_length = 128  # splash's block
    return config


def test_tiny_model_compiles_for_a_v5p_slice_with_splash():
    reference("libtpu")
    from trainer.benchmarks import dry_run  # noqa: PLC0415
    devices = topology.tpu_devices("v5p:2x2x1")
    r = dry_run.dry_run(resolved(_tiny()), devices, quiet=True)
    assert (r["devices"], r["device_kind"], r["platform"]) == (4, "TPU v5", "tpu")
    # "auto" is resolved for the target chips, and the kernel is lowered natively for them (a Mosaic
    # custom call), not in the interpret mode a CPU host would pick for itself.
    assert r["attention"] == "splash"
    train = r["programs"]["train_step"]
    assert "tpu_custom_call" in train["custom_calls"], train["custom_calls"]
    assert r["device_memory_gb"] == 95 and r["fits"]
    # Gradients are summed over the 4-way data axis: at least one all-reduce of every trainable
    # parameter (float32) per step. An account independent of the HLO parser: the parameter count.
    assert train["collective_bytes"]["all-reduce"] >= 4 * r["trainable_parameters"]
    assert set(r["programs"]) == {"train_step", "eval_step", "generate"}
    for p in r["programs"].values():
        assert p["memory"]["total"] > 0 and p["flops"] > 0


def test_cli_dry_run_on_a_topology_is_quiet():
    reference("libtpu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "trainer.train", "--config", "configs/tiny.py", "--dry_run",
         "--topology", "v6e:2x2", "--config.data.max_length=128", "--config.mesh.data=-1"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "dry run: 4 x TPU v6 lite" in stdout and "attention=splash" in stdout
    assert "verdict: fits in 32 GB per device" in stdout
    # libtpu's VM-metadata warnings (TPU_ACCELERATOR_TYPE, TPU_WORKER_HOSTNAMES) are kept quiet.
    assert "TPU_ACCELERATOR_TYPE" not in stderr and "TPU_WORKER_HOSTNAMES" not in stderr, stderr[-3000:]
    # ... and it leaves no log files: libtpu names its files in /tmp/tpu_logs after the process id.
    logs = "/tmp/tpu_logs"
    left = [f for f in (os.listdir(logs) if os.path.isdir(logs) else []) if f.endswith(f".{proc.pid}")]
    assert not left, left


@pytest.mark.slow
def test_remat_dots_with_context_runs_splash_forward_once():
    """remat="dots_with_context" keeps attention's output and log-sum-exp (splash names its residuals
    "context"), so the TPU program runs each layer's splash kernels as often as without remat --
    forward, dK/dV, dQ -- where "dots" runs the forward a second time in the backward pass."""
    reference("libtpu")
    from trainer.benchmarks import dry_run  # noqa: PLC0415
    devices = topology.tpu_devices("v5p:2x2x1")
    kernels = {}
    for remat in ("none", "dots", "dots_with_context"):
        config = _tiny()
        config.model.remat = remat
        r = dry_run.dry_run(resolved(config), devices, quiet=True)
        kernels[remat] = r["programs"]["train_step"]["custom_calls"].get("tpu_custom_call", 0)
    layers = _tiny().model.num_hidden_layers
    assert kernels == {"none": 3 * layers, "dots": 4 * layers, "dots_with_context": 3 * layers}, kernels


@pytest.mark.slow
def test_splash_fused_backward_runs_two_kernels_a_layer():
    """``model.splash_fused_backward``: the TPU program runs each layer's splash forward and one
    backward kernel (dQ beside dK/dV, from the same scores) instead of forward, dK/dV and dQ; with
    ``model.splash_block_size`` the kernels take that block (128 here: the same count)."""
    reference("libtpu")
    from trainer.benchmarks import dry_run  # noqa: PLC0415
    devices = topology.tpu_devices("v5p:2x2x1")
    kernels = {}
    for fused in (False, True):
        config = _tiny()
        config.model.splash_fused_backward = fused
        config.model.splash_block_size = 128
        r = dry_run.dry_run(resolved(config), devices, quiet=True)
        kernels[fused] = r["programs"]["train_step"]["custom_calls"].get("tpu_custom_call", 0)
    layers = _tiny().model.num_hidden_layers
    assert kernels == {False: 3 * layers, True: 2 * layers}, kernels


@pytest.mark.slow
def test_a_splash_block_over_the_chips_vmem_is_said_so():
    """2,048-token splash blocks need ~30 MiB of a v5p's on-chip VMEM (the compiler's scoped limit is
    16 MiB): the dry run says so, not that the model does not fit in 95 GB, and the limit it names
    makes the same config compile (a fresh process: libtpu reads its flags once)."""
    reference("libtpu")
    from trainer.benchmarks import dry_run  # noqa: PLC0415
    config = _tiny()
    config.data.max_length, config.model.splash_block_size = 2048, 2048
    r = dry_run.dry_run(resolved(config), topology.tpu_devices("v5p:2x2x1"), quiet=True)
    train = r["programs"]["train_step"]
    assert train["vmem"] and re.fullmatch(
        r"a Pallas kernel needs ([0-9.]+) MiB of the chip's VMEM \(on-chip scratch\), over the compiler's "
        r"16.00 MiB limit: smaller blocks \(model.splash_block_size\), or a higher limit "
        r"\(LIBTPU_INIT_ARGS=--xla_tpu_scoped_vmem_limit_kib=65536\)", train["error"]), train["error"]
    assert "verdict: does NOT compile: a kernel's blocks exceed the chip's VMEM" in dry_run.report(r)
    assert not r["fits"]
    flag = re.search(r"LIBTPU_INIT_ARGS=([^\s)]+)", train["error"]).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")} | {"LIBTPU_INIT_ARGS": flag}
    out = subprocess.run(
        [sys.executable, "-m", "trainer.train", "--config", "configs/tiny.py", "--dry_run", "--topology",
         "v5p:2x2x1", "--config.data.max_length=2048", "--config.model.splash_block_size=2048",
         "--config.mesh.data=-1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and "verdict: fits in 95 GB per device" in out.stdout, out.stdout + out.stderr[-2000:]


def test_variants_are_set_with_their_types_and_tabled():
    """``topology_table --variant``: keys set on the preset with the key's type (a mistyped key or
    value is one line before anything compiles); refused programs named in their row."""
    from trainer.benchmarks.topology_table import apply_variant, preset, variant_markdown  # noqa: PLC0415
    config = preset("configs/llama3_8b_tpu.py")
    apply_variant(config, "model.splash_block_size=1024,model.splash_fused_backward=true,optimizer.learning_rate=2e-5")
    assert (config.model.splash_block_size, config.model.splash_fused_backward) == (1024, True)
    assert config.optimizer.learning_rate == 2e-5
    for bad, said in [("model.splash_blok=1", "is not section.key=value for a key the config has"),
                      ("model.splash_fused_backward=maybe", "takes true or false, got 'maybe'"),
                      ("model.splash_block_size=big", "model.splash_block_size is int, got 'big'"),
                      ("lora.targets=q", "lora.targets is a tuple; only bool, int, float and str keys")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            apply_variant(preset("configs/llama3_8b_tpu.py"), bad)
    base = {"config": "configs/llama3_8b_tpu.py", "slice": "v5p-64", "chips": 32, "device_memory_gb": 95}
    rows = [{**base, "memory_gb": {"train_step": 68.79, "eval_step": 13.98, "generate": 21.24}, "fits": True,
             "refused": {}},
            {**base, "variant": "model.splash_block_size=2048", "fits": False,
             "memory_gb": {"train_step": None, "eval_step": None, "generate": 21.24},
             "refused": {"train_step": "a Pallas kernel needs 16.07MB", "eval_step": "... 31.69MB"}}]
    lines = variant_markdown(rows).splitlines()
    assert lines[2] == "| llama3_8b_tpu | v5p-64 (32) | (as it ships) | 68.79 / 13.98 / 21.24 of 95 | yes |  |"
    assert lines[3] == ("| llama3_8b_tpu | v5p-64 (32) | model.splash_block_size=2048 | refused / refused / 21.24 "
                        "of 95 | no | train_step: a Pallas kernel needs 16.07MB; eval_step: ... 31.69MB |")


def test_remat_table_rows():
    """``topology_table --remat``: one row per policy, refused programs and non-dividing pairs said so."""
    from trainer.benchmarks.topology_table import remat_markdown  # noqa: PLC0415
    base = {"config": "configs/llama3_8b_tpu.py", "slice": "v5p-64", "chips": 32, "device_memory_gb": 95,
            "train_tflops_per_chip_formula": 764.13}
    rows = [{**base, "remat": "none", "memory_gb": {"train_step": None}, "fits": False,
             "train_tflops_per_chip_xla": 0.0},
            {**base, "remat": "full", "memory_gb": {"train_step": 23.1}, "fits": True,
             "train_tflops_per_chip_xla": 27.5},
            {**base, "error": "the config has problems: train.batch_size=8 must be divisible"}]
    lines = remat_markdown(rows).splitlines()
    assert lines[2] == "| llama3_8b_tpu | v5p-64 (32) | none | refused of 95 | no | 0.00 | 764.13 |"
    assert lines[3] == "| llama3_8b_tpu | v5p-64 (32) | full | 23.1 of 95 | yes | 27.50 | 764.13 |"
    assert lines[4].startswith("| llama3_8b_tpu | v5p-64 | | the config has problems") and len(lines) == 5
