"""The launch scripts' own logic, with the cluster's commands faked on ``PATH``: SLURM's time-limit
signal checkpoints the run and requeues the job (and only then)."""

import os
import signal
import stat
import subprocess
import sys

import pytest

from tests.cli_test import ROOT
from tests.fault_tolerance_test import metric_steps, wait_for_step

# srun: runs the command on this machine (its own options and --distributed=auto dropped: one task).
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
args=(); for a in "$@"; do [[ "$a" == --distributed=auto ]] || args+=("$a"); done
exec "${args[@]}"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
echo "$@" >> "$SCONTROL_LOG"
"""


def _slurm(tmp_path, *extra):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(stat.S_IRWXU)
    env = {**os.environ, "PYTHONPATH": ROOT, "SLURM_JOB_ID": "4242", "SLURM_SUBMIT_DIR": ROOT,
           "SCONTROL_LOG": str(tmp_path / "scontrol.log"),
           "PATH": f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"}
    wd = tmp_path / "run"
    p = subprocess.Popen(["bash", "launch/slurm.sh", "configs/tiny.py", str(wd), *extra], cwd=ROOT,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return p, wd


def test_slurm_time_limit_checkpoints_then_requeues(tmp_path):
    p, wd = _slurm(tmp_path, "--config.train.num_steps=10000", "--config.train.log_every=1",
                   "--config.train.checkpoint_every=10000", "--config.train.eval_every=10000")
    wait_for_step(wd, 2, p)
    p.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends the batch script
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    stopped = max(metric_steps(wd))
    assert os.path.isdir(wd / "checkpoints" / str(stopped)), err[-3000:]
    assert (tmp_path / "scontrol.log").read_text() == "requeue 4242\n"


@pytest.mark.slow
def test_slurm_run_that_finishes_is_not_requeued(tmp_path):
    p, wd = _slurm(tmp_path, "--config.train.num_steps=2")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    assert not (tmp_path / "scontrol.log").exists()


def test_tpu_pod_print_shows_the_pinned_detached_command():
    env = {**os.environ, "TPU_NAME": "pod", "ZONE": "us-east5-a", "HF_MODEL": "/mnt/disks/models/Llama 3",
           "COMMIT": "0123abc"}
    r = subprocess.run(["bash", "launch/tpu_pod.sh", "--print", "configs/llama3_8b_tpu.py", "gs://b/runs/x",
                        "--config.train.num_steps=5"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "git checkout -q --detach 0123abc" in out  # every host runs the same commit
    assert "pip install -q -c launch/constraints.txt -e '.[gcs,tpu-aot]'" in out  # gs://; the tested versions
    assert "export JAX_COMPILATION_CACHE_DIR=gs://b/runs/x/compile_cache;" in out
    assert r"export HF_MODEL=/mnt/disks/models/Llama\ 3;" in out  # the run's environment, quoted
    assert "setsid nohup .venv/bin/python -m trainer.train --config configs/llama3_8b_tpu.py " \
        "--workdir gs://b/runs/x --distributed=auto --config.train.num_steps=5 > ~/flax-ift.log" in out
    assert "< /dev/null &" in out  # detached from the ssh session


def test_constraints_pin_every_dependency_the_project_declares():
    """launch/constraints.txt is the lock every install uses: a dependency added to pyproject.toml
    without a pinned version would float on the pod's hosts (torch is pinned by launch/test.sh)."""
    import re  # noqa: PLC0415
    import tomllib  # noqa: PLC0415
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    declared = [*project["dependencies"], *(d for ds in project["optional-dependencies"].values() for d in ds)]
    norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()  # noqa: E731 (PEP 503 names)
    names = {norm(re.match(r"[A-Za-z0-9_.-]+", d).group()) for d in declared} - {"torch"}
    with open(os.path.join(ROOT, "launch", "constraints.txt")) as f:
        pinned = {norm(line.split("==")[0]) for line in f if "==" in line and not line.startswith("#")}
    assert names - pinned == set()
    assert names <= pinned and "libtpu" in pinned and "jaxlib" in pinned
