"""What the training loop evaluates, and when: ``scheduled_evals`` builds the loop's evaluators once
from the run spec, as big_vision's ``train.py`` does, and ``trainer.train`` hands them to
``trainer.training.loop.train``. They are built here, not in the loop, so that the training package
never imports evaluation: the loop only calls a ``ScheduledEval``'s ``evaluate`` on its schedule.
"""

from __future__ import annotations

from typing import Any

from jax.sharding import NamedSharding

from data_pipeline import pipeline
from trainer.evaluation.evaluator import Evaluator, log_pattern_warning, sample_rows
from trainer.io.checkpoint import VAL_METRIC
from trainer.settings.spec import RunSpec
from trainer.training import experiment, modeling
from trainer.training.loop import ScheduledEval


def scheduled_evals(config: RunSpec, spec: modeling.ModelSpec, tok, rows: dict[str, list[dict[str, Any]]],
                    data: pipeline.Data, batch_sh: NamedSharding) -> list[ScheduledEval]:
    """The validation loss on the whole split (every ``train.eval_every`` steps and at every
    checkpoint), then the generation metrics -- exact match, ROUGE, chrF: the ``trainer.eval`` code --
    on a fixed seeded sample of it (every ``eval.every_steps``, and at every checkpoint when
    ``checkpoint.best_metric`` is one of them)."""
    ecfg = config.eval
    loss = experiment.split_loss_fn(config, spec, data.examples["validation"], tok.pad_token_id, batch_sh)
    evals = [ScheduledEval(
        "loss", loss, config.train.eval_every, at_checkpoints=True,
        describe=lambda step, v: (f"step {step}: val loss {v.get('loss', float('nan')):.4f}, "
                                  f"token accuracy {v.get('token_accuracy', float('nan')):.4f}"))]
    best_metric = config.checkpoint.best_metric
    gen_every = ecfg.every_steps
    if gen_every or best_metric != VAL_METRIC:
        sample = sample_rows(rows["validation"], ecfg.in_training_examples, config.seed)
        generation = Evaluator.create(config, tok, spec, sample, rows["train"], name="val")
        log_pattern_warning(generation)
        evals.append(ScheduledEval(
            "generation", generation, gen_every, at_checkpoints=best_metric != VAL_METRIC,
            describe=lambda step, g: f"step {step}: " + ", ".join(
                f"{k} {100 * g[k]:.1f}%" for k in ("exact_match", "rougeL", "chrf")) +
                f" on {len(generation.rows)} validation rows ({g['gen_tokens_per_s']:.0f} generated tokens/s"
                + (", the first run of newly compiled programs" if g["gen_compile_seconds"] else "") + ")"))
    return evals
