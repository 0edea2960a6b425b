"""The Evaluator: generation-based and teacher-forced evaluation of any parameters on a fixed set of rows.

Built once per model graph and data (prompts tokenised per prompting setting, generation compiled per
prompt bucket, scorers ready), then called for each set of parameters: by ``trainer.eval`` for every
compared model (base zero-/few-shot, fine-tuned), and by the training loop every ``eval.every_steps``
on a fixed, seeded sample of the validation split -- the same code, so the numbers agree.

    evaluator = Evaluator.create(config, tok, spec, rows, train_rows, examples=...)
    result = evaluator.run(params, shots=0)          # predictions, per-example scores, intervals
    result.metrics()                                 # {"exact_match": ..., "rougeL": ..., "loss": ...}
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from data_pipeline import pipeline, templating
from trainer import console
from trainer import sharding as sharding_lib
from trainer.evaluation import scoring
from trainer.evaluation.generate import (
    CompiledGenerate,
    cut_at_stop,
    generate_all,
    make_generate_fn,
    row_streams,
)
from trainer.settings import spec as spec_lib
from trainer.training import experiment, modeling

Row = dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Rows, prompts and exemplars
# ---------------------------------------------------------------------------------------------

def target_of(row: Row) -> str:
    """The reference answer: the conversation's last assistant message."""
    return row["messages"][-1]["content"]


def prompt_of(row: Row) -> list[templating.Message]:
    return row["messages"][:-1]


def task_of(row: Row) -> str:
    return str(row.get("task") or row.get("source") or "all")


def few_shot_messages(row: Row, exemplars: Sequence[Row]) -> list[templating.Message]:
    """Solved exemplars (rows from train), then the question, as one conversation."""
    prompt = prompt_of(row)
    system = [m for m in prompt[:1] if m["role"] == "system"]
    msgs: list[templating.Message] = list(system)
    for ex in exemplars:
        msgs += [m for m in ex["messages"] if m["role"] != "system"]
    return msgs + prompt[len(system):]


def fit_prompt(encode, row: Row, exemplars: Sequence[Row], budget: int, bos_id: int | None
               ) -> tuple[np.ndarray, int, bool]:
    """The longest prompt within ``budget`` tokens: fewer exemplars first, then the question cut
    from the left (keeping BOS), as the training length policy does.

    Returns: (ids, exemplars used, whether the question itself was cut).
    """
    for k in range(len(exemplars), -1, -1):
        ids = encode(few_shot_messages(row, exemplars[:k]))
        if len(ids) <= budget:
            return ids, k, False
    keep = int(bos_id is not None and ids[0] == bos_id)
    return np.concatenate([ids[:keep], ids[len(ids) - (budget - keep):]]), 0, True


def sample_rows(rows: Sequence[Row], limit: int, seed: int) -> list[Row]:
    """At most ``limit`` rows (0: all), a seeded sample in the split's order, so every task/source is
    represented and the same rows come back every time."""
    if not 0 < limit < len(rows):
        return list(rows)
    keep = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in keep]


def prompting_name(shots: int) -> str:
    return "zero-shot" if shots == 0 else f"{shots}-shot"


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    """One model under one prompting setting on the Evaluator's rows."""

    prompting: str
    predictions: list[str]
    scores: dict[str, np.ndarray]   # metric -> [n] per-example scores
    summary: dict[str, Any]         # scoring.summarize: means, intervals, per task
    generation: dict[str, float]    # tokens, seconds, tokens_per_s, rows_per_s, compile_seconds, row_streams
    prompts: dict[str, float]       # mean exemplars used, questions cut
    loss: dict[str, float] | None   # teacher-forced: loss, perplexity, token_accuracy, tokens
    pattern_misses: int = 0         # predictions the answer pattern does not match

    def metrics(self) -> dict[str, float]:
        """Flat numbers for logs: every score's mean, generation speed, and the loss if computed."""
        out = {m: v["mean"] for m, v in self.summary["metrics"].items()}
        out["gen_tokens_per_s"] = self.generation["tokens_per_s"]
        # > 0: this call compiled programs and ran them for the first time, which on XLA:CPU sets up
        # each library fusion (YNNPACK) as it first runs -- time that falls into gen_tokens_per_s.
        out["gen_compile_seconds"] = self.generation["compile_seconds"]
        if self.loss and "loss" in self.loss:
            out.update(loss=self.loss["loss"], perplexity=self.loss["perplexity"],
                       token_accuracy=self.loss["token_accuracy"])
        return out


# ---------------------------------------------------------------------------------------------
# The Evaluator
# ---------------------------------------------------------------------------------------------

class Evaluator:
    """Evaluates parameters of one model graph on fixed rows; see the module docstring.

    Few-shot exemplars come from ``train_rows`` only (same task first), never from the rows being
    evaluated: a row that is also among ``rows`` is never an exemplar.
    """

    def __init__(self, *, rows: Sequence[Row], train_rows: Sequence[Row], tok, template, graphdef,
                 mesh, eval_cfg: spec_lib.Eval, seed: int, max_length: int, loss_fn=None, progress: bool = False,
                 name: str = "eval", param_shardings=None):
        if not rows:
            raise ValueError("no rows to evaluate")
        self.rows, self.tok, self.template, self.seed = list(rows), tok, template, seed
        self.ecfg, self.name, self.progress = eval_cfg, name, progress
        self.references = [target_of(r) for r in self.rows]
        self.tasks = [task_of(r) for r in self.rows]
        self.scorer = scoring.Scorer(eval_cfg.answer_pattern,
                                     eval_cfg.normalize)
        self.reference_pattern_misses = self.scorer.pattern_misses(self.references)
        evaluated = {id(r) for r in self.rows}
        self._pool: dict[str, list[Row]] = defaultdict(list)
        for r in train_rows:
            if id(r) not in evaluated:
                self._pool[task_of(r)].append(r)
        self.budget = eval_cfg.prompt_budget(max_length)
        self._generate = CompiledGenerate(make_generate_fn(
            graphdef, max_new_tokens=eval_cfg.max_new_tokens, eos_ids=template.stop_ids,
            pad_id=tok.pad_token_id, mesh=mesh, param_shardings=param_shardings,
            gather=eval_cfg.gather_weights))
        self._streams = row_streams(eval_cfg.batch_size)  # greedy
        self._loss_fn = loss_fn
        self._prompts: dict[int, tuple[list[np.ndarray], dict[str, float], list[list[Row]]]] = {}

    @classmethod
    def create(cls, config: spec_lib.RunSpec, tok, spec: modeling.ModelSpec, rows: Sequence[Row],
               train_rows: Sequence[Row], *, examples=None, progress: bool = False,
               name: str = "eval") -> Evaluator:
        """From the run's config: ``examples`` (the rows tokenised by the pipeline) enable the
        teacher-forced loss, computed by the same eval step the training loop uses."""
        loss_fn = None
        if examples:
            batch_sh = sharding_lib.batch_sharding(spec.mesh, modeling.rules(config))
            loss_fn = experiment.split_loss_fn(config, spec, examples, tok.pad_token_id, batch_sh)
        return cls(rows=rows, train_rows=train_rows, tok=tok,
                   template=pipeline.template_for(config.data, tok), graphdef=spec.graphdef,
                   mesh=spec.mesh, eval_cfg=config.eval, seed=config.seed,
                   max_length=config.data.max_length, loss_fn=loss_fn, progress=progress, name=name,
                   param_shardings=spec.param_shardings)

    # ---- prompts ------------------------------------------------------------------------------
    def exemplars(self, shots: int) -> list[list[Row]]:
        """The exemplars drawn for each row with ``shots`` exemplars (seeded; before budgeting)."""
        return self._prompts_for(shots)[2]

    def prompts(self, shots: int) -> list[np.ndarray]:
        return self._prompts_for(shots)[0]

    def _prompts_for(self, shots: int):
        """Prompts of at most ``eval.max_prompt_length`` tokens (0: room for k exemplars and the
        question, each as long as a training row: ``data.max_length * (few_shot_k + 1)``)."""
        if shots not in self._prompts:
            rng = random.Random(self.seed)
            everything = [x for xs in self._pool.values() for x in xs]
            if shots and not everything:
                raise ValueError(f"{shots}-shot prompting needs exemplars from the train split, which "
                                 "is empty here")
            out, drawn, used, cut = [], [], 0, 0
            for r in self.rows:
                candidates = self._pool.get(task_of(r)) or everything
                ex = rng.sample(candidates, min(shots, len(candidates)))
                ids, k, was_cut = fit_prompt(self._encode, r, ex, self.budget, self.template.bos_id)
                out.append(ids)
                drawn.append(ex)
                used += k
                cut += was_cut
            stats = {"mean_exemplars": used / len(self.rows), "questions_cut": cut}
            self._prompts[shots] = (out, stats, drawn)
        return self._prompts[shots]

    def _encode(self, msgs):
        return templating.encode_messages(self.tok, msgs, template=self.template)[0]

    # ---- running --------------------------------------------------------------------------------
    def generate(self, params, shots: int = 0, desc: str = "") -> tuple[list[str], dict[str, float]]:
        """Greedy completions for every row (cut at EOS and at ``eval.stop`` strings), and speed."""
        prompts = self.prompts(shots)
        bar = None
        if self.progress and jax.process_index() == 0:
            from tqdm.auto import tqdm  # noqa: PLC0415
            bar = tqdm(total=len(prompts), unit="row", desc=desc or prompting_name(shots),
                       dynamic_ncols=True, leave=False)
        t0, compile0 = time.perf_counter(), self._generate.compile_seconds
        ids = generate_all(self._generate, params, prompts, batch_size=self.ecfg.batch_size,
                           pad_id=self.tok.pad_token_id, eos_ids=self.template.stop_ids, seed=self.seed,
                           streams=self._streams, on_batch=bar.update if bar is not None else None)
        compile_s = self._generate.compile_seconds - compile0
        seconds = time.perf_counter() - t0 - compile_s
        if bar is not None:
            bar.close()
        stop = self.ecfg.stop  # e.g. "\n\n" for a base model that rambles on
        texts = [cut_at_stop(self.tok.decode(x, skip_special_tokens=True), stop) for x in ids]
        # Generated tokens include each row's EOS (computed like any other token).
        tokens = sum(min(len(x) + 1, self.ecfg.max_new_tokens) for x in ids)
        return texts, {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                       "rows_per_s": len(ids) / seconds, "compile_seconds": compile_s,
                       "row_streams": self._streams}

    def loss(self, params) -> dict[str, float] | None:
        """Teacher-forced loss, perplexity and token accuracy on the rows' completion tokens
        (token-weighted over the whole set); None when built without examples."""
        if self._loss_fn is None:
            return None
        out = dict(self._loss_fn(params))
        if "loss" in out:
            out["perplexity"] = math.exp(min(out["loss"], 700.0))
        return out

    def run(self, params, shots: int = 0, *, with_loss: bool = True, desc: str = "") -> Result:
        predictions, speed = self.generate(params, shots, desc)
        scores = self.scorer.score(predictions, self.references)
        return Result(prompting=prompting_name(shots), predictions=predictions, scores=scores,
                      summary=scoring.summarize(scores, self.tasks, self.seed), generation=speed,
                      prompts=self._prompts_for(shots)[1],
                      loss=self.loss(params) if with_loss else None,
                      pattern_misses=self.scorer.pattern_misses(predictions))

    def __call__(self, params) -> dict[str, float]:
        """The in-training form: zero-shot generation metrics of ``params`` (no loss: the loop
        computes the validation loss on the whole split)."""
        result = self.run(params, 0, with_loss=False)
        out = result.metrics()
        if self.scorer.pattern:
            out["pattern_misses"] = float(result.pattern_misses)
        return out


def log_pattern_warning(evaluator: Evaluator) -> str | None:
    """A warning line when ``eval.answer_pattern`` does not match some references (those rows can
    never count as exact matches); None when it matches them all."""
    n = evaluator.reference_pattern_misses
    if not n:
        return None
    msg = (f"warning: eval.answer_pattern {evaluator.scorer.pattern!r} matches no answer in {n} of "
           f"{len(evaluator.references)} references; exact match counts those rows as misses "
           "(reported as exact_match*)")
    console.log(msg)
    return msg
