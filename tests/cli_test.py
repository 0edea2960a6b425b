"""The entry points as a user runs them: a 2-step smoke run, the eval report, and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT})


def assert_clean_error(r, *needles):
    assert r.returncode != 0
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("runs") / "tiny")
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", wd)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return wd


def test_train_smoke_run_writes_metrics_checkpoint_and_tokenizer(workdir):
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    for r in train_rows:
        assert math.isfinite(r["train/loss"]) and r["train/loss"] > 0
        assert r["train/tokens_per_s"] > 0 and r["train/learning_rate"] > 0
    assert any("val/loss" in r for r in rows)
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
    assert os.path.exists(os.path.join(workdir, "tokenizer", "tokenizer.json"))
    assert os.path.exists(os.path.join(workdir, "config.json"))
    assert os.listdir(os.path.join(workdir, "tensorboard"))


def test_eval_writes_report(workdir):
    r = run("trainer.eval", "--workdir", workdir, "--checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "| fine-tuned (step 2) | zero-shot |" in r.stdout
    report = json.load(open(os.path.join(workdir, "eval", "test_step2.json")))
    assert [row["prompting"] for row in report["rows"]] == ["zero-shot", "1-shot", "zero-shot"]
    assert report["num_examples"] == 16 and math.isfinite(report["finetuned_loss"]["loss"])
    assert os.path.exists(os.path.join(workdir, "eval", "test_step2.md"))


def test_rerun_of_finished_workdir_resumes_and_stops(workdir):
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", workdir)
    assert r.returncode == 0 and "already trained to step 2" in r.stdout


def test_help_lists_flags():
    r = run("trainer.train", "--help")  # absl exits 1 after printing help
    assert "--workdir" in r.stdout and "--config" in r.stdout and "--distributed" in r.stdout


def test_unknown_config_key_is_one_clear_error(tmp_path):
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", str(tmp_path),
            "--config.train.num_stepz=3")
    assert_clean_error(r, "num_stepz")


def test_workdir_from_another_config_is_refused(workdir):
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", workdir,
            "--config.model.hidden_size=64")
    assert_clean_error(r, "model.hidden_size", "different config")


def test_missing_checkpoint_step(workdir):
    r = run("trainer.eval", "--workdir", workdir, "--checkpoint", "7")
    assert_clean_error(r, "no checkpoint at step 7", "available steps: 2")


def test_eval_of_a_directory_that_is_not_a_run(tmp_path):
    r = run("trainer.eval", "--workdir", str(tmp_path))
    assert_clean_error(r, "not a trainer.train workdir")
