r"""Standalone evaluation (the CLI is ``trainer.eval``): a fine-tuned run against zero-/few-shot prompting
of its base model, or any HF/GGUF model on any data the pipeline reads.

What is compared:
  * ``workdir``: the run's base model (its HF/GGUF weights, or the untrained init) under each baseline
    prompting, then the fine-tuned checkpoint zero-shot. Config, tokenizer and data come from the run.
  * ``hf_path`` / ``gguf`` (no run at all): that model under each baseline prompting; its own tokenizer
    and chat template; ``data`` says what to evaluate on.

Every row goes through one ``Evaluator`` (``trainer.evaluation.evaluator``); the files are written by
``trainer.evaluation.reports`` into ``workdir/eval/<split>_step<N>/`` (or ``out``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from data_pipeline import sources
from data_pipeline import tokenizer as tokenizer_lib
from data_pipeline.errors import DataError
from trainer import console
from trainer.errors import UserError
from trainer.evaluation import reports
from trainer.evaluation.evaluator import (  # noqa: F401
    Evaluator,
    Result,
    few_shot_messages,
    fit_prompt,
    log_pattern_warning,
    prompt_of,
    sample_rows,
    target_of,
)
from trainer.evaluation.scoring import HEADLINE_PAIRED, exact_match, paired_difference  # noqa: F401
from trainer.io import paths
from trainer.models import lora as lora_lib
from trainer.settings import options
from trainer.settings.spec import RunSpec, default_config, load_config_file
from trainer.training import experiment, modeling, rundir
from trainer.training.runs import open_run


@dataclasses.dataclass
class Request:
    """What ``trainer.eval`` was asked (its flags)."""

    workdir: str = ""
    checkpoint: str = "best"
    hf_path: str = ""
    gguf: str = ""
    data: str = ""          # a configs/*.py file (its data and eval sections) or a data file
    split: str = ""         # "" = eval.split
    limit: int = -1         # -1 = eval.max_examples; 0 = all
    baselines: str = ""     # "" = eval.baselines
    out: str = ""
    max_new_tokens: int = 0  # 0 = eval.max_new_tokens
    batch_size: int = 0      # 0 = eval.batch_size
    progress: bool = True


# ---------------------------------------------------------------------------------------------
# Config: from the run, or the defaults plus a model and data
# ---------------------------------------------------------------------------------------------

def guess_format(path: str) -> str:
    """The row format of a data file from its first record's keys."""
    keys: set[str] = set()
    try:
        if path.endswith(".jsonl"):
            with open(path, encoding="utf-8-sig") as f:
                for line in f:
                    if line.strip():
                        keys = set(json.loads(line))
                        break
        elif path.endswith(".json"):
            with open(path, encoding="utf-8-sig") as f:
                obj = json.load(f)
            rec = obj[0] if isinstance(obj, list) and obj else (
                next(iter(obj.values()))[0] if isinstance(obj, dict) and obj
                and isinstance(next(iter(obj.values())), list) else obj)
            keys = set(rec) if isinstance(rec, dict) else set()
        elif path.endswith(".csv"):
            import csv  # noqa: PLC0415
            with open(path, encoding="utf-8-sig", newline="") as f:
                keys = set(next(csv.reader(f), []))
        else:
            return "prompt_completion"
    except (OSError, ValueError, StopIteration, IndexError) as e:
        raise UserError(f"--data {path}: cannot read its first record: {e}") from e
    if "messages" in keys:
        return "messages"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    raise UserError(f"--data {path}: cannot tell the row format from the fields {sorted(keys)}; "
                    "expected messages, instruction/output (alpaca) or prompt/completion")


def apply_data(config: ml_collections.ConfigDict, data: str) -> str:
    """Points ``config`` at ``data``; returns a short name for it. A ``.py`` config contributes its
    ``data`` and ``eval`` sections; a data file becomes the only source, split by content hash with
    ``data.split_fractions`` as in training (so few-shot exemplars come from its train part)."""
    if not os.path.exists(data):
        raise UserError(f"--data {data!r} does not exist")
    name = os.path.splitext(os.path.basename(data))[0]
    if data.endswith(".py"):
        other = load_config_file(data, "--data")
        config.data = other.data
        config.eval = other.eval
        return name
    config.data.sources = ml_collections.ConfigDict(
        {name: sources.source(type="files", path=data, format=guess_format(data))})
    return name


def model_only_config(req: Request) -> ml_collections.ConfigDict:
    """The spec's defaults with the model, its tokenizer and the data of ``req`` (editable: the
    request's other settings go in before it is resolved)."""
    if not req.data:
        raise UserError("--hf_path/--gguf evaluate a model on --data (a configs/*.py file or a data file)")
    config = default_config()
    config.model.hf_path, config.model.gguf_path = req.hf_path, req.gguf
    config.data.max_length = 512  # a data file's rows; a --data config sets its own
    apply_data(config, req.data)
    config.tokenizer.kind, config.tokenizer.path = "hf", ""
    return config


def load_model_tokenizer(path: str):
    """The HF directory's or GGUF file's own tokenizer, or one clear line."""
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in (
            "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{path} has no tokenizer (no tokenizer.json, tokenizer_config.json, "
                        "tokenizer.model or vocab.json); copy the base model's tokenizer files there")
    try:
        return tokenizer_lib.load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the tokenizer of {path}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

def evaluate(req: Request) -> dict[str, Any]:
    """Compares the models ``req`` names on its data; writes and returns the report (see
    ``trainer.eval``). Steps: check the request, open the run (or the model), pick and tokenise the
    rows, name the compared models, run each through one Evaluator, report."""
    t0 = time.perf_counter()
    model_path = _check_request(req)
    setup = _Setup.create(req, model_path)
    rows, eval_rows, examples = _rows(setup)
    spec, step, compared = _compared_models(req, setup, model_path)
    try:
        evaluator = Evaluator.create(setup.config, setup.tok, spec, eval_rows, rows.get("train", []),
                                     examples=examples, progress=req.progress)
    except ValueError as e:
        raise UserError(str(e)) from e
    warning = log_pattern_warning(evaluator)
    results = [_run_one(evaluator, name, params, shots, with_loss, t0)
               for name, params, shots, with_loss in compared]
    report, out = _report(req, setup, model_path, step, rows, eval_rows, compared, results, evaluator,
                          warning)
    report["seconds"] = time.perf_counter() - t0
    if jax.process_index() == 0:
        _write(req, out, report, evaluator, results)
    report["out"] = out
    return report


def _check_request(req: Request) -> str:
    """The model path of a run-less request ('' with --workdir); one line for a contradictory one."""
    if req.workdir and (req.hf_path or req.gguf):
        raise UserError("--workdir evaluates a run (its base and its checkpoint); --hf_path/--gguf "
                        "evaluate a model without one: give one of them")
    if not (req.workdir or req.hf_path or req.gguf):
        raise UserError("give --workdir (a trainer.train run), --hf_path (an HF model directory) or "
                        "--gguf (a GGUF file)")
    if req.hf_path and req.gguf:
        raise UserError("give --hf_path or --gguf, not both")
    model_path = req.hf_path or req.gguf
    if model_path and not os.path.exists(model_path):
        raise UserError(f"{'--hf_path' if req.hf_path else '--gguf'} {model_path!r} does not exist")
    return model_path


@dataclasses.dataclass
class _Setup:
    """The request resolved against the run's (or the defaults') config."""

    config: RunSpec
    tok: Any
    run: Any            # trainer.training.runs.Run, or None without --workdir
    data_name: str
    split: str
    limit: int
    shots: list[int]    # exemplars per base-model row

    @classmethod
    def create(cls, req: Request, model_path: str) -> _Setup:
        if req.workdir:
            editable = rundir.load_config(req.workdir).to_config()
            data_name = f"`{apply_data(editable, req.data)}`" if req.data else "the run's data"
        else:
            editable = model_only_config(req)
            data_name = f"`{os.path.basename(req.data)}`"
            tok = load_model_tokenizer(model_path)
            editable.data.template = "tokenizer" if tok.chat_template else "plain"
            console.log(f"{os.path.basename(model_path)}: its own tokenizer, template "
                        f"{editable.data.template!r}")
        if req.max_new_tokens:
            editable.eval.max_new_tokens = req.max_new_tokens
        if req.batch_size:
            editable.eval.batch_size = req.batch_size
        try:
            config = RunSpec.from_config(editable)  # the request applied: resolved once
            ecfg = config.eval
            shots = options.parse_baselines(req.baselines or ecfg.baselines, ecfg.few_shot_k)
        except ValueError as e:  # (SpecError too: a --data config with keys this version lacks)
            raise UserError(str(e)) from e
        run = open_run(req.workdir, config) if req.workdir else None
        tok = run.tok if run else tok
        return cls(config, tok, run, data_name, req.split or ecfg.split,
                   ecfg.max_examples if req.limit < 0 else req.limit, shots)


def _rows(setup: _Setup):
    """All rows by split, the evaluated sample and its tokenised examples (for the loss)."""
    split, shots, data_name = setup.split, setup.shots, setup.data_name
    rows, _ = experiment.read_rows(setup.config)
    if split not in rows:
        raise UserError(f"no split {split!r} in this data; available: {', '.join(rows)}")
    if not rows[split]:
        raise UserError(f"split {split!r} of {data_name} is empty (its sources and split fractions "
                        "leave it no rows; python -m data_pipeline.inspect shows why)")
    if split == "train" and any(shots):
        raise UserError("few-shot exemplars come from the train split, so the train split cannot be "
                        "evaluated few-shot; use --baselines zero_shot")
    if any(shots) and not rows.get("train"):
        raise UserError(f"few-shot baselines need train rows for exemplars and {data_name} has none; "
                        "use --baselines zero_shot")
    eval_rows = sample_rows(rows[split], setup.limit, setup.config.seed)
    try:
        examples = experiment.tokenize(setup.config, setup.tok, {split: eval_rows}).examples[split]
    except DataError as e:
        raise UserError(str(e)) from e
    return rows, eval_rows, examples


def _compared_models(req: Request, setup: _Setup, model_path: str):
    """``(spec, step, [(name, params, shots, with_loss)])``: the base under each prompting, then the
    fine-tuned checkpoint of a run. The teacher-forced loss does not depend on the prompting, so it
    is computed once per set of parameters."""
    config, step = setup.config, None
    if setup.run is not None:
        spec = setup.run.spec
        step, finetuned = setup.run.restore(req.checkpoint)
        setup.run.close()
    else:
        spec = modeling.model_spec(config, len(setup.tok), modeling.make_mesh(config))
    base = spec.init_params(config.seed)  # the run's start: the HF/GGUF weights or the init
    if spec.lora.enabled:
        # One copy of the base serves both rows: the base row is it with zeroed adapters (exactly
        # the base: the LoRA branch adds 0), the fine-tuned row the same arrays plus the trained ones.
        adapters, frozen = spec.split(base)
        base = lora_lib.combine(frozen, jax.tree.map(jnp.zeros_like, adapters))
        if req.workdir:
            finetuned = lora_lib.combine(frozen, finetuned)
    base_name = (f"base ({os.path.basename(os.path.normpath(spec.hf_path))})" if spec.hf_path
                 else "base (untrained init)")
    if spec.lora.base_quant:
        base_name = f"{base_name[:-1]}, {spec.lora.base_quant})"
    name = base_name if req.workdir else os.path.basename(os.path.normpath(model_path))
    compared = [(name, base, k, i == 0) for i, k in enumerate(setup.shots)]
    if req.workdir:
        compared.append((f"fine-tuned (step {step})", finetuned, 0, True))
    return spec, step, compared


def _run_one(evaluator: Evaluator, name: str, params, shots: int, with_loss: bool, t0: float) -> Result:
    try:
        result = evaluator.run(params, shots, with_loss=with_loss, desc=f"{name}, {shots}-shot")
    except ValueError as e:
        raise UserError(str(e)) from e
    m = result.metrics()
    console.log(f"{name}, {result.prompting}: exact match {100 * m['exact_match']:.1f}%, "
                f"ROUGE-L {100 * m['rougeL']:.1f}, chrF {100 * m['chrf']:.1f} "
                f"({result.generation['tokens_per_s']:.0f} generated tokens/s, "
                f"{time.perf_counter() - t0:.0f}s)")
    return result


def _report(req, setup, model_path, step, rows, eval_rows, compared, results, evaluator, warning):
    """The report dict and its directory: a row per compared model with its paired difference to the first, and the
    last row (fine-tuned, or the most-shot) against the best other row."""
    seed, ecfg = setup.config.seed, setup.config.eval
    report_rows = [reports.result_row(name, r) for (name, *_), r in zip(compared, results)]
    for row, r in zip(report_rows, results):
        row["delta_vs_first"] = {m: paired_difference(r.scores[m], results[0].scores[m], seed=seed)
                                 for m in HEADLINE_PAIRED}
    gain, versus = None, 0
    if len(results) > 1:
        versus = max(range(len(results) - 1),
                     key=lambda i: results[i].summary["metrics"]["exact_match"]["mean"])
        gain = {"a": reports.row_label(report_rows[-1]), "b": reports.row_label(report_rows[versus]),
                **{m: paired_difference(results[-1].scores[m], results[versus].scores[m], seed=seed)
                   for m in HEADLINE_PAIRED}}
    title = (f"{os.path.basename(os.path.normpath(req.workdir))} (step {step})" if req.workdir
             else os.path.basename(os.path.normpath(model_path)))
    split = setup.split
    out = req.out or (paths.join(req.workdir, "eval", f"{split}_step{step}") if req.workdir else
                      os.path.join("eval", f"{title}_{os.path.splitext(os.path.basename(req.data))[0]}_{split}"))
    return {"title": title, "workdir": req.workdir, "model_path": model_path,
            "checkpoint": req.checkpoint if req.workdir else None, "step": step, "data": setup.data_name,
            "split": split, "split_rows": len(rows[split]), "num_examples": len(eval_rows),
            "max_new_tokens": ecfg.max_new_tokens, "answer_pattern": ecfg.answer_pattern,
            "normalize": dataclasses.asdict(ecfg.normalize), "rows": report_rows, "gain": gain,
            "pattern_warning": warning, "examples": reports.examples(evaluator, results, versus)}, out


def _write(req: Request, out: str, report: dict[str, Any], evaluator: Evaluator, results: list[Result]
           ) -> None:
    """report.md, report.json, predictions.jsonl and the plots in ``out``; the table on the terminal."""
    gain = report["gain"]
    md = reports.write(out, report, evaluator, results,
                       paths.join(req.workdir, "metrics.jsonl") if req.workdir else "")
    table = "\n".join(reports.main_table(report))
    gain_line = (f"\n{gain['a']} minus {gain['b']}: exact match "
                 f"{100 * gain['exact_match']['difference']:+.1f} points (paired 95% "
                 f"{100 * gain['exact_match']['low']:+.1f} to {100 * gain['exact_match']['high']:+.1f})"
                 if gain else "")
    print(f"\n{table}{gain_line}\n\n(eval took {report['seconds']:.0f}s; report: "
          f"{os.path.join(out, 'report.md')}, predictions.jsonl, report.json, plots)", flush=True)
    report["markdown"] = md
