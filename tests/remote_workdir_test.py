"""A ``gs://`` workdir against a GCS emulator on 127.0.0.1 (not a mock): the real gcsfs client (config,
lock, tokenizer, metrics, TensorBoard, reports, exports through ``trainer.io.paths``) and TensorStore's
GCS driver (Orbax checkpoints). A run trains, checkpoints, is SIGKILLed, resumes, evaluates and
exports there, and nothing lands on the local disk under a mangled ``gs:`` name."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gcsfs")
pytest.importorskip("gcp_storage_emulator")

from tests.cli_test import ROOT  # noqa: E402

pytestmark = pytest.mark.slow  # trainer processes, each compiling: `-m "not slow"` skips them


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gcs_env():
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.gcs_emulator", str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    # GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs's newer file system first asks the storage-control
    # gRPC API for the bucket's layout, which an emulator does not serve (each call waits 60 s).
    env = {**os.environ, "PYTHONPATH": ROOT, "STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    yield env
    server.kill()


def _fs(env):
    from gcsfs.core import GCSFileSystem  # noqa: PLC0415 (the plain one: see gcs_env)
    return GCSFileSystem(endpoint_url=env["STORAGE_EMULATOR_HOST"], token="anon")


def _cmd(*args):
    return [sys.executable, "-m", *args]


def test_a_run_in_a_bucket_trains_is_killed_resumes_evaluates_and_exports(gcs_env, tmp_path):
    wd = "gs://bkt/runs/tiny"
    train = _cmd("trainer.train", "--config", os.path.join(ROOT, "configs", "tiny.py"), "--workdir", wd,
                 "--config.train.num_steps=20", "--config.train.checkpoint_every=10",
                 "--config.train.eval_every=10", "--config.train.log_every=1", "--jax_log_compiles")
    # the compilation cache where a pod's run keeps it, in the workdir (trainer.compile_cache), rather
    # than the tests' own; the tiny model compiles under JAX's 1-second threshold for writing one
    train_env = {k: v for k, v in gcs_env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    train_env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    fs = _fs(gcs_env)
    proc = subprocess.Popen(train, cwd=tmp_path, env=train_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:  # kill once the first checkpoint is there
        fs.invalidate_cache()
        if fs.exists("bkt/runs/tiny/checkpoints/10/commit_success.txt"):  # Orbax's commit, on a bucket
            break
        time.sleep(0.2)
    alive = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate()
    assert alive, out[-2000:] + err[-3000:]  # killed mid-run, not ended on its own
    fs.invalidate_cache()
    assert fs.exists("bkt/runs/tiny/config.json") and fs.exists("bkt/runs/tiny/tokenizer")

    r = subprocess.run(train, cwd=tmp_path, env=train_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from the checkpoint at step" in r.stdout, r.stdout[:3000]
    # the killed run's compiled train step, read back from the bucket by the resumed one
    assert any("/jit_train_step-" in p for p in fs.ls("bkt/runs/tiny/compile_cache"))
    assert "Persistent compilation cache hit for 'jit_train_step'" in r.stderr, r.stderr[-3000:]
    assert "took over the lock" in r.stdout  # the killed run's lock, in the bucket
    fs.invalidate_cache()
    rows = [json.loads(line) for line in fs.cat("bkt/runs/tiny/metrics.jsonl").decode().splitlines()]
    steps = [row["step"] for row in rows if "train/loss" in row]
    assert steps == list(range(1, 21))  # every step once, across the kill
    assert fs.ls("bkt/runs/tiny/tensorboard") and not fs.exists("bkt/runs/tiny/run.lock")
    assert "20" in {p.rsplit("/", 1)[-1] for p in fs.ls("bkt/runs/tiny/checkpoints")}

    r = subprocess.run(_cmd("trainer.eval", "--workdir", wd, "--checkpoint", "latest", "--baselines",
                            "zero_shot"), cwd=tmp_path, env=gcs_env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fs.invalidate_cache()
    assert "| fine-tuned (step 20) |" in fs.cat("bkt/runs/tiny/eval/test_step20/report.md").decode()
    assert fs.exists("bkt/runs/tiny/eval/test_step20/training.png")

    r = subprocess.run(_cmd("trainer.export", "--workdir", wd, "--checkpoint", "latest", "--out",
                            "gs://bkt/exports/tiny"), cwd=tmp_path, env=gcs_env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    fs.invalidate_cache()
    assert json.loads(fs.cat("bkt/exports/tiny/config.json"))["model_type"] == "llama"
    assert fs.exists("bkt/exports/tiny/model.safetensors")
    assert not os.path.exists(tmp_path / "gs:")  # nothing under a mangled local name


from tests.hf_run_test import hf_dir  # noqa: E402, F401 (the tiny Qwen2 checkpoint fixture)


def test_a_base_converted_into_a_bucket_trains_like_its_hf_directory(gcs_env, hf_dir, tmp_path):  # noqa: F811
    """``trainer.convert --out gs://...`` then ``model.hf_path=gs://...``: config and tokenizer come
    through a local copy, the sharded parameters straight from the bucket; the losses equal a run
    from the HF directory itself."""
    base = "gs://bkt/bases/qwen2_tiny"
    r = subprocess.run(_cmd("trainer.convert", "--config", "configs/tiny.py", "--hf_path", hf_dir,
                            "--out", base), cwd=ROOT, env=gcs_env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _fs(gcs_env).exists("bkt/bases/qwen2_tiny/params") and _fs(gcs_env).exists(
        "bkt/bases/qwen2_tiny/config.json")
    losses = []
    for name, path in (("bucket", base), ("hf", hf_dir)):
        wd = tmp_path / name
        r = subprocess.run(_cmd("trainer.train", "--config", "configs/tiny.py", "--workdir", str(wd),
                                f"--config.model.hf_path={path}", "--config.tokenizer.kind=hf",
                                "--config.train.num_steps=2"), cwd=ROOT, env=gcs_env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        losses.append([json.loads(x).get("train/loss") for x in open(wd / "metrics.jsonl")])
    assert losses[0] == losses[1] and losses[0][0] is not None
