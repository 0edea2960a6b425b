"""The Evaluator: exemplars from train only, the teacher-forced loss equal to the train step's, the
in-training generation eval at the right steps, and best-by-metric checkpoint selection."""

import json
import math
import os
import re

import jax
import numpy as np
import pytest

from data_pipeline import loader
from data_pipeline.synthetic import synthetic_splits
from data_pipeline.templating import prompt_completion_messages
from data_pipeline.tokenizer import train_demo_tokenizer
from tests import helpers
from tests.cli_test import run
from tests.helpers import resolved
from trainer.evaluation.evaluator import Evaluator, sample_rows
from trainer.io.checkpoint import Checkpointer
from trainer.settings.options import parse_baselines
from trainer.training import experiment
from trainer.training.step import TrainState, make_train_step


def rows_and_tok():
    raw = synthetic_splits(300, 0, {"train": 0.8, "test": 0.2})
    conv = {s: [{"messages": prompt_completion_messages(r["prompt"], r["completion"]), "task": r["task"],
                 "source": "synthetic", "loc": f"row {i}"} for i, r in enumerate(rs)] for s, rs in raw.items()}
    tok = train_demo_tokenizer([r["messages"] for r in conv["train"]], vocab_size=300, min_frequency=4)
    return conv, tok


@pytest.fixture(scope="module")
def setup():
    conv, tok = rows_and_tok()
    config = helpers.tiny_config()
    mesh, spec, tx, schedule, state_sh, batch_sh = helpers.setup(config, len(tok))
    return config, conv, tok, spec, tx, schedule, state_sh, batch_sh


def test_baselines_parse():
    assert parse_baselines("zero_shot,few_shot:3", 1) == [0, 3]
    assert parse_baselines("few_shot", 2) == [2]
    with pytest.raises(ValueError, match="few_shot"):
        parse_baselines("five_shot", 1)


def test_sample_is_seeded_and_keeps_order():
    rows = list(range(100))
    a = sample_rows(rows, 10, seed=3)
    assert a == sample_rows(rows, 10, seed=3) and a == sorted(a) and len(a) == 10
    assert sample_rows(rows, 0, 3) == rows and sample_rows(rows, 500, 3) == rows


def test_exemplars_come_from_train_and_never_from_the_evaluated_rows(setup):
    config, conv, tok, spec, *_ = setup
    evaluated = conv["test"][:12]
    # The pool handed over also holds the evaluated rows (as if a user passed the wrong split):
    # they must still never be shown as exemplars.
    pool = conv["train"] + evaluated
    ev = Evaluator.create(resolved(config), tok, spec, evaluated, pool)
    train_ids = {id(r) for r in conv["train"]}
    for exemplars in ev.exemplars(3):
        assert len(exemplars) == 3
        assert all(id(e) in train_ids for e in exemplars)
    # Same task first: every exemplar of a row solves the row's task.
    for row, exemplars in zip(evaluated, ev.exemplars(3)):
        assert {e["task"] for e in exemplars} == {row["task"]}


def test_teacher_forced_loss_equals_the_train_steps_loss_on_the_same_batch(setup):
    config, conv, tok, spec, tx, schedule, state_sh, batch_sh = setup
    rows = conv["test"][:10]
    examples = experiment.tokenize(resolved(config), tok, {"test": rows}).examples["test"]
    params = spec.init_params(0)
    ev = Evaluator.create(resolved(config), tok, spec, rows, conv["train"], examples=examples)
    got = ev.loss(params)
    # The same rows as one batch through the train step: its reported loss is the same number.
    (batch,) = list(loader.eval_batches(examples, seq_len=config.data.max_length, pad_id=tok.pad_token_id,
                                        batch_size=16))
    state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params))
    _, m = jax.jit(make_train_step(spec.graphdef, tx, schedule))(state, helpers.to_global(batch, batch_sh))
    assert got["tokens"] == float(m["tokens"]) > 0
    np.testing.assert_allclose(got["loss"], float(m["loss"]), rtol=1e-6)
    np.testing.assert_allclose(got["token_accuracy"], float(m["token_accuracy"]), rtol=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["loss"]))


def test_teacher_forced_loss_over_packed_rows_equals_one_example_a_row(setup):
    """The eval packs its examples as training does (``data.packing``): the same tokens, the same loss
    and accuracy as one padded example a row, in fewer rows."""
    config, conv, tok, spec, *_ = setup
    rows = conv["test"][:40]
    params = spec.init_params(0)
    got, batches = {}, {}
    for method in ("none", "best_fit"):
        c = config.copy_and_resolve_references()
        c.data.packing, c.data.max_length = method, 72  # the demo's rows: ~25-token examples, ~2.8 a row
        examples = experiment.tokenize(resolved(c), tok, {"test": rows}).examples["test"]
        got[method] = Evaluator.create(resolved(c), tok, spec, rows, conv["train"], examples=examples).loss(params)
        batches[method] = len(list(loader.eval_batches(examples, seq_len=c.data.max_length, pad_id=0,
                                                       batch_size=c.train.eval_batch_size, packing=method)))
    assert got["best_fit"]["tokens"] == got["none"]["tokens"] > 0
    np.testing.assert_allclose(got["best_fit"]["loss"], got["none"]["loss"], rtol=1e-6)
    np.testing.assert_allclose(got["best_fit"]["token_accuracy"], got["none"]["token_accuracy"], rtol=1e-6)
    assert batches["best_fit"] < batches["none"]


def test_generation_metrics_score_the_predictions(setup):
    config, conv, tok, spec, *_ = setup
    rows = conv["test"][:8]
    ev = Evaluator.create(resolved(config), tok, spec, rows, conv["train"])
    result = ev.run(spec.init_params(0), 0, with_loss=False)
    assert len(result.predictions) == 8 and result.loss is None
    np.testing.assert_array_equal(result.scores["exact_match"],
                                  [p.strip() == r["messages"][-1]["content"] for p, r in zip(result.predictions, rows)])
    m = ev(spec.init_params(0))
    assert set(m) >= {"exact_match", "rouge1", "rouge2", "rougeL", "chrf", "gen_tokens_per_s"}
    # The first call compiled (and so first ran) the programs; the second reused them.
    assert result.generation["compile_seconds"] > 0 and m["gen_compile_seconds"] == 0


def test_in_training_eval_at_its_steps_and_best_checkpoint_by_that_metric(tmp_path):
    wd = str(tmp_path / "run")
    r = run("trainer.train", "--config", "configs/tiny.py", "--workdir", wd, "--config.train.num_steps=4",
            "--config.train.checkpoint_every=2", "--config.train.eval_every=4", "--config.eval.every_steps=3",
            "--config.eval.in_training_examples=8", "--config.checkpoint.best_metric=val/chrf",
            "--config.train.keep_checkpoints=1")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = [json.loads(x) for x in open(os.path.join(wd, "metrics.jsonl"))]
    # every_steps=3 -> step 3; best_metric is a generation metric -> also every checkpoint (2, 4)
    assert [x["step"] for x in rows if "val/chrf" in x] == [2, 3, 4]
    # Only the first eval ran newly compiled programs, and its log line says so.
    assert [x["val/gen_compile_seconds"] > 0 for x in rows if "val/chrf" in x] == [True, False, False]
    assert len(re.findall(r"generated tokens/s, the first run of newly compiled programs\)", r.stdout + r.stderr)) == 1
    assert [x["step"] for x in rows if "val/loss" in x] == [2, 4]
    chrf = {x["step"]: x["val/chrf"] for x in rows if "val/chrf" in x and x["step"] in (2, 4)}
    ck = Checkpointer(wd, read_only=True, best_metric="val/chrf")
    want = max(chrf, key=lambda s: (chrf[s], -s))
    assert ck.best_step() == want and want in ck.all_steps()
    ck.close()


def test_best_step_by_metric_mode_and_non_finite_values(tmp_path):
    """max for rates, min for losses; a NaN metric never ranks best; old workdirs' val_loss reads."""
    state = {"w": np.zeros(2, np.float32)}

    class S:
        params, opt_state = state, state

    def saved(metrics_by_step, **kw):
        path = tmp_path / f"w{len(os.listdir(tmp_path))}"
        ck = Checkpointer(str(path), keep=10, **kw)
        for step, m in metrics_by_step.items():
            ck.save(step, S, {}, metrics=m)
        ck.wait()
        best = ck.best_step()
        ck.close()
        return best

    em = {1: {"val/exact_match": 0.2}, 2: {"val/exact_match": 0.5}, 3: {"val/exact_match": float("nan")},
          4: {"val/exact_match": 0.3}}
    assert saved(em, best_metric="val/exact_match") == 2
    assert saved(em, best_metric="val/exact_match", best_mode="min") == 1
    assert saved({1: {"val/loss": 2.0}, 2: {"val/loss": float("nan")}, 3: {"val/loss": 1.5}}) == 3
    assert saved({1: {"val_loss": 2.0}, 2: {"val_loss": 1.0}}) == 2  # written before best_metric
