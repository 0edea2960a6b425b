"""Two processes (2 CPU devices each, gloo collectives) train exactly like one process with 4 devices:
per-process loader shards, global batch assembly, token-weighted sums across hosts."""

import json
import os
import subprocess
import sys

from tests.cli_test import ROOT

ARGS = ["--config.train.num_steps=4", "--config.train.checkpoint_every=4", "--config.train.eval_every=4",
        "--config.data.packing=best_fit"]


def metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_equal_one(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT, "LOGDIR": str(tmp_path)}
    multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
    r = subprocess.run(["bash", "launch/local_multiprocess.sh", "configs/tiny.py", multi, *ARGS], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    env1 = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "trainer.train", "--config", "configs/tiny.py", "--workdir",
                        single, *ARGS], cwd=ROOT, env=env1, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = metrics(multi), metrics(single)
    assert len(a) == len(b) == 5  # 4 train rows + 1 validation row
    for x, y in zip(a, b):
        for k in (k for k in x if k.endswith("loss") or k.endswith("accuracy")):
            assert abs(x[k] - y[k]) <= 1e-6 * max(1.0, abs(y[k])), (x["step"], k, x[k], y[k])
