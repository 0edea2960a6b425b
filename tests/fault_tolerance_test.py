"""Fault tolerance as a user meets it: preemption signals, corrupt checkpoints, divergence, a second
run on the same workdir, resumes with other settings, logs after a resume, and a chaos test of random
kills against an uninterrupted run."""

import glob
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.cli_test import ROOT, assert_clean_error, run

pytestmark = pytest.mark.slow  # trainer processes, each compiling: `-m "not slow"` skips them

TINY = ["--config", "configs/tiny.py"]
LONG = ["--config.train.num_steps=40", "--config.train.checkpoint_every=10", "--config.train.log_every=1",
        "--config.train.eval_every=1000", "--config.train.keep_checkpoints=2"]


def train(wd, *extra):
    return run("trainer.train", *TINY, "--workdir", str(wd), *extra)


def popen(wd, *extra):
    return subprocess.Popen([sys.executable, "-m", "trainer.train", *TINY, "--workdir", str(wd), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": ROOT})


def metric_steps(wd):
    return [json.loads(x)["step"] for x in open(os.path.join(wd, "metrics.jsonl"))
            if "train/loss" in json.loads(x) or "train/skipped_steps" in json.loads(x)]


def wait_for_step(wd, step, proc, timeout=300):
    """Blocks until the run has logged ``step`` (or has ended)."""
    path = os.path.join(wd, "metrics.jsonl")
    t0 = time.time()
    while time.time() - t0 < timeout and proc.poll() is None:
        if os.path.exists(path) and any(s >= step for s in metric_steps(wd)):
            return
        time.sleep(0.05)


def final_state(wd):
    """Params and optimizer state of the latest checkpoint, as numpy."""
    from trainer.training import experiment  # noqa: PLC0415
    from trainer.training.runs import open_run  # noqa: PLC0415
    from trainer.training.step import make_optimizer  # noqa: PLC0415
    run = open_run(wd)
    tx, _ = make_optimizer(run.config.optimizer, run.config.train.num_steps)
    step = run.checkpoints.latest_step()
    state, data = run.checkpoints.restore(step, experiment.abstract_state(
        run.spec, tx, experiment.state_shardings(run.spec, tx)))
    run.close()
    import jax  # noqa: PLC0415
    return step, jax.device_get((state.params, state.opt_state)), data


def tree_equal(a, b):
    """Bitwise equal pytrees, structure and leaf count included (``helpers.tree_equal``)."""
    from tests import helpers  # noqa: PLC0415 (imports JAX: not at collection time)
    return helpers.tree_equal(a, b)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 40-step run every interrupted one must equal."""
    wd = tmp_path_factory.mktemp("ref") / "run"
    r = train(wd, *LONG)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(wd), final_state(str(wd))


# ---- preemption --------------------------------------------------------------------------------

@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 0), (signal.SIGINT, 130), (signal.SIGHUP, 0)])
def test_signal_saves_the_current_step_and_the_rerun_resumes_it(tmp_path, reference, sig, code):
    wd = tmp_path / "run"
    p = popen(wd, *LONG)
    wait_for_step(wd, 13, p)
    p.send_signal(sig)
    out, err = p.communicate(timeout=300)
    assert p.returncode == code, err[-3000:]
    stopped = max(metric_steps(wd))
    assert 13 <= stopped < 40
    assert f"stopped after step {stopped}; its checkpoint is saved in" in out and "Rerun the same command" in out
    assert "Traceback" not in err
    assert os.path.isdir(wd / "checkpoints" / str(stopped))  # zero steps lost
    r = train(wd, *LONG)
    assert r.returncode == 0 and f"resumed from the checkpoint at step {stopped}" in r.stdout, r.stderr[-2000:]
    steps = metric_steps(wd)
    assert steps == list(range(1, 41))  # every step logged once
    step, state, _ = final_state(str(wd))
    assert step == 40 and tree_equal(state, reference[1][1])


# ---- corrupt checkpoints -----------------------------------------------------------------------

def _damage(step_dir, how):
    if how == "truncated_array":
        files = [f for f in glob.glob(os.path.join(step_dir, "params", "**", "d", "*"), recursive=True)
                 if os.path.getsize(f) > 16]
        for f in files:
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
    elif how == "empty_metadata":
        open(os.path.join(step_dir, "params", "_METADATA"), "w").close()
    elif how == "missing_opt_state":
        shutil.rmtree(os.path.join(step_dir, "opt_state"))


CORRUPT_ARGS = ["--config.train.num_steps=4", "--config.train.checkpoint_every=2",
                "--config.train.keep_checkpoints=3"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One 4-step run with checkpoints 2 and 4, copied by each corruption case (not retrained)."""
    wd = tmp_path_factory.mktemp("trained") / "run"
    assert train(wd, *CORRUPT_ARGS).returncode == 0
    return wd


@pytest.mark.parametrize("how", ["truncated_array", "empty_metadata", "missing_opt_state"])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(trained_run, tmp_path, how):
    wd = tmp_path / "run"
    shutil.copytree(trained_run, wd)
    _damage(str(wd / "checkpoints" / "4"), how)
    r = train(wd, *CORRUPT_ARGS)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the checkpoint of step 4 cannot be restored" in r.stdout
    assert "resumed from the checkpoint at step 2" in r.stdout
    assert glob.glob(str(wd / "checkpoints" / "4.corrupt-*"))  # set aside, kept for a post-mortem
    assert os.path.isdir(wd / "checkpoints" / "4")  # trained again
    if how != "missing_opt_state":
        return
    # Every checkpoint corrupt: one clear error (once: it does not depend on the kind of damage).
    for d in glob.glob(str(wd / "checkpoints" / "[0-9]*")):
        if os.path.basename(d).isdigit():
            _damage(d, "missing_opt_state")
    r = train(wd, *CORRUPT_ARGS)
    assert_clean_error(r, "no checkpoint in", "can be restored")


# ---- divergence --------------------------------------------------------------------------------

def test_divergence_stops_with_one_line_and_no_non_finite_checkpoint(tmp_path):
    """Step 1 trains at learning rate 0 (the first warmup step) and is checkpointed; from step 2 on the
    rate is absurd. The run stops in one line naming the last checkpoint, which exists and holds a
    finite validation loss; no non-finite step was checkpointed after it."""
    wd = tmp_path / "run"
    r = train(wd, "--config.optimizer.learning_rate=1e30", "--config.optimizer.warmup_steps=4",
              "--config.train.num_steps=30", "--config.train.checkpoint_every=1",
              "--config.train.eval_every=1", "--config.train.max_bad_steps=3",
              "--config.train.keep_checkpoints=30")
    assert_clean_error(r, "training diverged", "steps in a row", "non-finite")
    from trainer.io.checkpoint import Checkpointer  # noqa: PLC0415
    ck = Checkpointer(str(wd), read_only=True)
    steps = ck.all_steps()
    assert 1 in steps, (steps, r.stderr[-2000:])  # without a checkpoint this test would prove nothing
    assert f"the last checkpoint is step {max(steps)}" in r.stderr, r.stderr[-2000:]
    for s in steps:  # every checkpoint written has a finite validation loss
        assert np.isfinite(ck.mgr.metrics(s)["val/loss"])
    best = ck.best_step()
    assert best is None or np.isfinite(ck.mgr.metrics(best)["val/loss"])
    ck.close()
    rows = [json.loads(x) for x in open(wd / "metrics.jsonl")]
    assert sum(x.get("train/skipped_steps", 0) for x in rows) >= 3


# ---- one run per workdir ------------------------------------------------------------------------

def test_a_second_run_is_refused_and_a_stale_lock_is_taken_over(tmp_path):
    wd = tmp_path / "run"
    wd.mkdir()
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": "pytest"}
    (wd / "run.lock").write_text(json.dumps(holder))
    r = train(wd)
    assert_clean_error(r, f"is in use by pid {os.getpid()} on {socket.gethostname()}", "run.lock")
    dead = subprocess.Popen(["true"])
    dead.wait()
    (wd / "run.lock").write_text(json.dumps({**holder, "pid": dead.pid}))
    r = train(wd)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"took over the lock of pid {dead.pid}" in r.stdout
    assert not (wd / "run.lock").exists()  # released at the end


# ---- resume identity ----------------------------------------------------------------------------

def test_resume_with_other_batch_optimizer_or_steps_is_refused(tmp_path):
    wd = tmp_path / "run"
    assert train(wd).returncode == 0
    assert_clean_error(train(wd, "--config.train.batch_size=16"), "train.batch_size: 8 in the checkpoint's run vs 16")
    assert_clean_error(train(wd, "--config.optimizer.learning_rate=0.5"), "optimizer.learning_rate")
    assert_clean_error(train(wd, "--config.train.grad_accum_steps=2"), "train.grad_accum_steps")
    assert_clean_error(train(wd, "--config.train.num_steps=4"), "train.num_steps: 2", "allow_num_steps_change")
    r = train(wd, "--config.train.num_steps=4", "--config.train.allow_num_steps_change=True")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "train.num_steps 2 -> 4 (allow_num_steps_change)" in r.stdout and "learning rate goes from" in r.stdout
    assert metric_steps(wd) == [1, 2, 3, 4]


# ---- chaos -------------------------------------------------------------------------------------

def test_chaos_random_kills_then_bitwise_equal_to_the_uninterrupted_run(tmp_path, reference):
    """SIGKILLs at random moments (during steps and async saves), one SIGTERM and one SIGINT, each
    followed by a rerun of the same command: the final params and optimizer state equal the
    uninterrupted run's bitwise, and metrics.jsonl holds every step once."""
    wd = tmp_path / "run"
    rng = random.Random(0)
    plan = [signal.SIGKILL] * 5 + [signal.SIGTERM, signal.SIGINT]
    rng.shuffle(plan)
    for sig in plan:
        done = max(metric_steps(wd)) if (wd / "metrics.jsonl").exists() and metric_steps(wd) else 0
        if done >= 38:
            break
        p = popen(wd, *LONG)
        wait_for_step(wd, done + rng.randint(1, 6), p)
        time.sleep(rng.random() * 0.3)  # land anywhere: mid-step, mid-save, mid-log
        if p.poll() is None:
            p.send_signal(sig)
        p.communicate(timeout=300)
        if sig != signal.SIGKILL:
            assert p.returncode in (0, 130)
    r = train(wd, *LONG)
    assert r.returncode == 0, r.stderr[-3000:]
    assert metric_steps(wd) == list(range(1, 41))
    step, state, data = final_state(str(wd))
    ref_step, ref_state, ref_data = reference[1]
    assert step == ref_step == 40 and data == ref_data
    assert tree_equal(state, ref_state)


# ---- disk full -------------------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_during_a_save_stops_in_one_line_and_keeps_the_previous_checkpoints(small_disk):
    wd = small_disk / "run"
    p = popen(wd, *LONG, "--config.checkpoint.timeout_s=30")
    wait_for_step(wd, 12, p)
    t0 = time.time()
    while not (wd / "checkpoints" / "10" / "commit_success.txt").exists() and time.time() - t0 < 120:
        time.sleep(0.05)  # the checkpoint of step 10 is committed
    filler = small_disk / "filler"
    try:  # the disk is full from here on (unbuffered: closing the file then has nothing to flush,
        with open(filler, "wb", buffering=0) as f:  # which raised ENOSPC again from `with` under load)
            while True:
                f.write(b"\0" * (1 << 20))
    except OSError:
        pass
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, err[-3000:]

    # Refused before writing when there is no room; if the disk fills mid-write, Orbax's hang is
    # bounded by checkpoint.timeout_s. Either way: one line naming the step and the free space.
    # (Orbax's and asyncio's threads print tracebacks at the same moment, a line at a time: once in
    # CI the error line followed another thread's half-written line, so it is found where it starts.)
    errors = [x[x.index("error: "):] for x in err.splitlines() if "error: " in x]
    assert len(errors) == 1 and any(k in errors[0] for k in ("free space", "full disk")), err[-3000:]
    os.remove(filler)
    step, _, _ = final_state(str(wd))
    assert step == 10  # the previous checkpoint is intact and restores
    r = train(wd, *LONG)
    assert r.returncode == 0 and "resumed from the checkpoint at step 10" in r.stdout, r.stderr[-3000:]
