"""Done-means checks on the real data in ../shared/data (skipped when absent): GSM8K and the T0 mix
train through the pipeline with a tiny model, eval reports per task, and the pre-flight report runs.
Plus the pre-flight CLI on the demo and on bad input (needs no shared data)."""

import json
import os

import pytest

from tests.cli_test import ROOT, assert_clean_error, run

SHARED = os.path.join(ROOT, "..", "shared", "data")
needs_shared = pytest.mark.skipif(not os.path.isdir(SHARED), reason="../shared/data absent")
TINY = ["--config.model.hidden_size=32", "--config.model.intermediate_size=64",
        "--config.model.num_hidden_layers=2", "--config.model.head_dim=8",
        "--config.tokenizer.vocab_size=1024", "--config.train.num_steps=3",
        "--config.train.batch_size=8", "--config.train.eval_every=3",
        "--config.train.checkpoint_every=3", "--config.train.progress_bar=False",
        "--config.train.log_every=1",
        "--config.eval.max_examples=8", "--config.eval.max_new_tokens=8", "--config.eval.batch_size=8",
        "--config.train.eval_batch_size=16"]


@needs_shared
@pytest.mark.parametrize("name,extra", [
    ("gsm8k", ["--config.data.sources.gsm8k.max_rows=300"]),
    ("t0_mix", ["--config.data.mixture_rows=300", "--config.eval.max_examples=24"]),
])
@pytest.mark.slow
def test_real_data_trains_and_evaluates(tmp_path, name, extra):
    wd = str(tmp_path / name)
    args = ["--config", f"configs/{name}.py", "--workdir", wd, "--config.data.cache=False", *TINY, *extra]
    r = run("trainer.train", *args)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    metrics = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    assert [m["step"] for m in metrics if "train/loss" in m] == [1, 2, 3]
    assert any("val/loss" in m for m in metrics)
    r = run("trainer.eval", "--workdir", wd)
    assert r.returncode == 0, r.stderr[-4000:]
    report = json.load(open(os.path.join(wd, "eval", "test_step3", "report.json")))
    tasks = set(report["rows"][-1]["per_task"])
    if name == "t0_mix":  # per-task scores, one per task file that has test rows
        assert len(tasks) >= 5 and "xsum_DOC_write_summary_of_above" in tasks
    else:
        assert tasks == {"gsm8k"}


@needs_shared
@pytest.mark.parametrize("name", ["gsm8k", "t0_mix"])
def test_inspect_on_real_data(tmp_path, name):
    out = str(tmp_path / "r.json")
    r = run("data_pipeline.inspect", "--config", f"configs/{name}.py", "--config.data.cache=False",
            "--preview", "1", "--json", out)
    assert r.returncode == 0, r.stderr[-4000:]
    for section in ("## Sources", "## Tokenised splits", "## Packing (train)", "[[", "tokens p50"):
        assert section in r.stdout
    result = json.load(open(out))
    assert result["packing"]["packed_efficiency"] >= 0.97
    if name == "t0_mix":  # the trec file (every completion empty) is left out by the config
        assert not any(s["name"].startswith("trec") for s in result["sources"])
        assert len(result["sources"]) >= 5


def test_inspect_demo_and_bad_input_cli(tmp_path):
    r = run("data_pipeline.inspect", "--config", "configs/tiny.py", "--preview", "2")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "| synthetic | 1 |" in r.stdout and r.stdout.count("]]\n```") == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{"question": "q2"}\n')
    args = ["--config", "configs/gsm8k.py", f"--config.data.sources.gsm8k.splits.train={bad}",
            "--config.data.sources.gsm8k.splits.test=", "--config.data.cache=False"]
    r = run("data_pipeline.inspect", *args)
    assert_clean_error(r, f"{bad}:2: missing field 'answer'", "on_bad_row=skip")
    r = run("trainer.train", *args, "--workdir", str(tmp_path / "w"))
    assert_clean_error(r, f"{bad}:2: missing field 'answer'")
    r = run("data_pipeline.inspect", "--config", "configs/tiny.py", "--config.data.sources.synthetic.nope=1")
    assert_clean_error(r, "nope")


def test_inspect_exits_non_zero_when_a_needed_split_is_empty():
    # All rows to train: validation (which training needs) and test (eval.split) are empty.
    r = run("data_pipeline.inspect", "--config", "configs/tiny.py", "--preview", "0",
            "--config.data.split_fractions.train=1.0", "--config.data.split_fractions.validation=0.0",
            "--config.data.split_fractions.test=0.0")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Empty split(s) the run needs: validation, test" in r.stdout
    assert "error: split(s) validation, test have no usable rows" in r.stderr and "Traceback" not in r.stderr


@needs_shared
def test_a_real_task_file_with_no_usable_row_is_an_error_even_when_skipping():
    from configs import t0_mix  # noqa: PLC0415
    from data_pipeline import sources  # noqa: PLC0415
    from data_pipeline.errors import DataError  # noqa: PLC0415
    path = os.path.join(t0_mix.T0, "trec_what_category_best_describe.jsonl")
    spec = sources.source(path=path, strip_suffix="<|endoftext|>")
    with pytest.raises(DataError, match=r"data.sources.trec: no usable rows .*'empty completion': 200"):
        sources.read_source("trec", spec, "skip", 1_000_000)
