"""The entry points as a user runs them: a 2-step smoke run, the eval report, and bad input."""

import json
import math
import os
import subprocess
import sys

import pytest

from tests.conftest import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, timeout=600, env=None):
    """``python -m args`` from the repository, with ``env`` added to this process's environment."""
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": ROOT, **(env or {})})


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
    assert "overriding" not in r.stderr  # orbax's line when checkpoint.py registers its CPU handler
    assert "| fine-tuned (step 2) | zero-shot |" in r.stdout
    out = os.path.join(workdir, "eval", "test_step2")
    report = json.load(open(os.path.join(out, "report.json")))
    assert [row["prompting"] for row in report["rows"]] == ["zero-shot", "1-shot", "zero-shot"]
    assert report["num_examples"] == 16 and math.isfinite(report["rows"][-1]["loss"]["loss"])
    for row in report["rows"]:
        for m in ("exact_match", "rouge1", "rouge2", "rougeL", "chrf"):
            s = row["metrics"][m]
            assert s["low"] <= s["mean"] <= s["high"]
    assert report["gain"]["a"] == "fine-tuned (step 2), zero-shot"
    md = open(os.path.join(out, "report.md")).read()
    assert "ROUGE-L" in md and "chrF" in md and "![per_task.png](per_task.png)" in md
    preds = [json.loads(x) for x in open(os.path.join(out, "predictions.jsonl"))]
    assert len(preds) == 16 and len(preds[0]["predictions"]) == 3
    assert set(preds[0]["scores"]["fine-tuned (step 2), zero-shot"]) == {
        "exact_match", "rouge1", "rouge2", "rougeL", "chrf"}
    import matplotlib.image  # noqa: PLC0415
    for png in ("per_task.png", "training.png"):  # readable images, not empty files
        assert matplotlib.image.imread(os.path.join(out, png)).shape[0] > 100


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
    assert_clean_error(r, "rows of the train split was dropped", "longer than data.max_length=8")


def test_export_chats_in_transformers_with_three_lines(workdir, tmp_path):
    """The README's three lines, on the export of a model trained from scratch."""
    reference("torch")
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


# ---- trainer.eval without a run: any HF model on any data file ------------------------------

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny random Llama with its tokenizer (no chat template: the eval falls back to `plain`)."""
    transformers = reference("transformers")
    torch = reference("torch")
    from data_pipeline.synthetic import synthetic_splits  # noqa: PLC0415
    from data_pipeline.templating import prompt_completion_messages  # noqa: PLC0415
    from data_pipeline.tokenizer import train_demo_tokenizer  # noqa: PLC0415
    path = str(tmp_path_factory.mktemp("llama_tiny"))
    rows = synthetic_splits(300, 0, {"train": 1.0})["train"]
    tok = train_demo_tokenizer([prompt_completion_messages(r["prompt"], r["completion"]) for r in rows],
                               vocab_size=300, min_frequency=4)
    tok.save_pretrained(path)
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2048, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    data = os.path.join(path, "..", "rows.jsonl")
    with open(data, "w") as f:
        for r in rows[:200]:
            f.write(json.dumps({"prompt": r["prompt"], "completion": r["completion"]}) + "\n")
    return path, os.path.abspath(data)


@pytest.mark.slow
def test_eval_of_an_hf_model_with_no_workdir(llama_dir, tmp_path):
    path, data = llama_dir
    out = str(tmp_path / "report")
    r = run("trainer.eval", f"--hf_path={path}", f"--data={data}", "--limit=8", f"--out={out}",
            "--baselines=zero_shot,few_shot:2", "--max_new_tokens=4", "--batch_size=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| llama_tiny" in r.stdout and "2-shot minus" in r.stdout.replace(", ", " ")
    report = json.load(open(os.path.join(out, "report.json")))
    assert [x["prompting"] for x in report["rows"]] == ["zero-shot", "2-shot"]
    assert report["num_examples"] == 8 and math.isfinite(report["rows"][0]["loss"]["loss"])
    assert report["rows"][1]["prompts"]["mean_exemplars"] > 0
    assert len(open(os.path.join(out, "predictions.jsonl")).readlines()) == 8
    import matplotlib.image  # noqa: PLC0415
    assert matplotlib.image.imread(os.path.join(out, "per_task.png")).shape[0] > 100
    assert not os.path.exists(os.path.join(out, "training.png"))  # no run, no curves


@pytest.mark.slow
def test_eval_bad_inputs_are_one_line_each(llama_dir, tmp_path, workdir):
    import shutil  # noqa: PLC0415
    path, data = llama_dir
    no_tok = str(tmp_path / "no_tokenizer")
    shutil.copytree(path, no_tok, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    r = run("trainer.eval", f"--hf_path={no_tok}", f"--data={data}")
    assert_clean_error(r, "has no tokenizer")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n')
    r = run("trainer.eval", f"--hf_path={path}", f"--data={bad}")
    assert_clean_error(r, "bad.jsonl:2")
    r = run("trainer.eval", f"--hf_path={path}")
    assert_clean_error(r, "--data")
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "a", "completion": "b"}\n')
    out = f"--out={tmp_path / 'out'}"  # (the default, ./eval/..., is the repository when run from it)
    r = run("trainer.eval", f"--hf_path={path}", f"--data={one}", "--split=validation", "--baselines=zero_shot", out)
    r2 = run("trainer.eval", f"--hf_path={path}", f"--data={one}", "--split=test", "--baselines=zero_shot", out)
    assert any(x.returncode == 2 and "is empty" in x.stderr and "Traceback" not in x.stderr for x in (r, r2)), \
        r.stderr[-2000:] + r2.stderr[-2000:]


def test_an_answer_pattern_that_never_matches_is_a_counted_warning(workdir, tmp_path):
    cfg = tmp_path / "pattern.py"
    cfg.write_text("from configs import tiny\n\ndef get_config():\n    c = tiny.get_config()\n"
                   "    c.eval.answer_pattern = r'####\\s*(\\d+)'\n    return c\n")
    out = str(tmp_path / "out")
    r = run("trainer.eval", "--workdir", workdir, "--checkpoint", "latest", f"--data={cfg}", f"--out={out}",
            "--baselines=zero_shot")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "matches no answer in 16 of 16 references" in r.stdout
    report = json.load(open(os.path.join(out, "report.json")))
    assert "16 of 16" in report["pattern_warning"]
    assert "exact match*" in open(os.path.join(out, "report.md")).read()


def test_eval_and_export_pick_the_same_best_step(tmp_path):
    """``--checkpoint best`` ranks by the run's ``checkpoint.best_metric`` in trainer.eval and
    trainer.export alike (export used to rank by validation loss whatever the run's config said).
    Here best is the *highest* validation loss, so the two rankings cannot agree by accident."""
    from trainer.evaluation.compare import Request, evaluate  # noqa: PLC0415
    from trainer.export import export  # noqa: PLC0415
    wd = str(tmp_path / "run")
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", wd, "--config.train.num_steps=3",
            "--config.train.checkpoint_every=1", "--config.train.eval_every=1",
            "--config.train.keep_checkpoints=3", "--config.checkpoint.best_mode=max")
    assert r.returncode == 0, r.stderr[-3000:]
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        loss = {x["step"]: x["val/loss"] for x in map(json.loads, f) if "val/loss" in x}
    want = max(loss, key=loss.get)
    assert want != min(loss, key=loss.get)
    assert export(wd, str(tmp_path / "export"), "best")["step"] == want
    report = evaluate(Request(workdir=wd, checkpoint="best", limit=4, baselines="zero_shot",
                              out=str(tmp_path / "eval"), progress=False))
    assert report["step"] == want
