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
    assert "read only" not in r.stderr and "PyTorch was not found" not in r.stderr  # no noise
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


@pytest.mark.parametrize("entry", ["trainer.train", "trainer.eval", "trainer.export", "trainer.bench",
                                   "data_pipeline.inspect"])
def test_help_imports_neither_jax_nor_transformers(entry):
    """--help must answer at once: nothing heavy is imported before the flags are parsed."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", entry, "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": ROOT})
    assert "--" in r.stdout
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("jax", "transformers", "datasets", "grain")}


def test_every_config_problem_is_reported_before_any_data_work(tmp_path):
    wd = tmp_path / "w"
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", str(wd),
            "--config.train.batch_size=0", "--config.optimizer.learning_rate=-1.0",
            "--config.train.eval_batch_size=12", "--config.eval.batch_size=0")
    assert_clean_error(r, "the config has 4 problems:")
    lines = r.stderr.splitlines()
    for needle in ("train.batch_size must be at least 1", "optimizer.learning_rate must be positive",
                   "train.eval_batch_size=12 must be divisible", "eval.batch_size must be at least 1"):
        assert sum(needle in line for line in lines) == 1, r.stderr
    assert not wd.exists()  # refused before the workdir, the data or the tokenizer was touched


def test_an_empty_split_is_an_error(tmp_path):
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "w"),
            "--config.data.max_length=8")  # every tiny row is longer: all dropped
    assert_clean_error(r, "the train split is empty", "longer than data.max_length=8")


def test_export_chats_in_transformers_with_three_lines(workdir, tmp_path):
    """The README's three lines, on the export of a model trained from scratch."""
    pytest.importorskip("torch")
    out = str(tmp_path / "export")
    r = run("trainer.export", "--workdir", workdir, "--out", out, "--checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "read only" not in r.stderr
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["max_position_embeddings"] == 4096  # head_dim 8: 2 pi 10000^(6/8) = 6,283 -> 4096
    assert json.load(open(os.path.join(out, "tokenizer_config.json")))["padding_side"] == "left"
    readme = open(os.path.join(ROOT, "README.md")).read()
    code = readme.split("```python\n# chat with an export\n", 1)[1].split("```", 1)[0]
    r = subprocess.run([sys.executable, "-c", code.replace("exports/demo", out)], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() != "", r.stderr[-3000:]


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
