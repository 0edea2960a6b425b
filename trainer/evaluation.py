r"""Evaluation of a run: the fine-tuned model against zero-/few-shot prompting of the base
(the CLI is ``trainer.eval``).

Needs only the workdir (its ``config.json`` and ``tokenizer/`` say what data, template and model were
used). Writes ``workdir/eval/<split>_step<N>.{md,json}`` and prints the Markdown table.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import defaultdict
from typing import Any

import jax
import numpy as np

from data_pipeline import pipeline, templating
from trainer import experiment, metrics as metrics_lib, sharding as sharding_lib
from trainer.checkpoint import Checkpointer
from trainer.cli import UserError
from trainer.generate import cut_at_stop, generate_all, make_generate_fn
from trainer.scoring import bootstrap_interval, exact_match, paired_difference  # noqa: F401 (re-exported)
from trainer.step import make_eval_step



def target_of(row: dict[str, Any]) -> str:
    """The reference answer: the conversation's last assistant message."""
    return row["messages"][-1]["content"]


def prompt_of(row: dict[str, Any]) -> list[templating.Message]:
    return row["messages"][:-1]


def few_shot_messages(row: dict[str, Any], exemplars: list[dict[str, Any]]
                      ) -> list[templating.Message]:
    """Solved exemplars (rows from train), then the question, as one conversation."""
    prompt = prompt_of(row)
    system = [m for m in prompt[:1] if m["role"] == "system"]
    msgs: list[templating.Message] = list(system)
    for ex in exemplars:
        msgs += [m for m in ex["messages"] if m["role"] != "system"]
    return msgs + prompt[len(system):]


def fit_prompt(encode, row: dict[str, Any], exemplars: list[dict[str, Any]], budget: int,
               bos_id: int | None) -> tuple[np.ndarray, int, bool]:
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


def score(rows: list[dict[str, Any]], predictions: list[str], pattern: str = "") -> dict[str, Any]:
    """Exact match overall and per task, each with its 95% bootstrap interval; ``hits`` per row."""
    hits = [exact_match(p, target_of(r), pattern) for r, p in zip(rows, predictions)]
    by_task: dict[str, list[bool]] = defaultdict(list)
    for r, h in zip(rows, hits):
        by_task[r.get("task", "all")].append(h)
    return {"exact_match": float(np.mean(hits)) if hits else 0.0, "n": len(hits),
            "interval": bootstrap_interval(hits),
            "per_task": {t: float(np.mean(v)) for t, v in sorted(by_task.items())},
            "per_task_interval": {t: bootstrap_interval(v) for t, v in sorted(by_task.items())},
            "hits": [int(h) for h in hits]}


def _cell(text: str, limit: int = 160) -> str:
    """Text fit for one Markdown table cell."""
    text = text if len(text) <= limit else "..." + text[-limit:]
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


def markdown_report(result: dict[str, Any]) -> str:
    tasks = sorted({t for r in result["rows"] for t in r["per_task"]})
    lines = [f"## Evaluation: `{result['split']}` split, {result['num_examples']} rows",
             "", f"Run `{result['workdir']}`, checkpoint step {result['step']} "
             f"({result['checkpoint']}). Exact match of greedy generation, with 95% bootstrap "
             "intervals over the evaluated rows.", "",
             "| model | prompting | exact match | 95% interval | " + " | ".join(tasks) + " |",
             "|---|---|---:|---:|" + "---:|" * len(tasks)]
    for r in result["rows"]:
        lo, hi = r["interval"]
        lines.append(f"| {r['model']} | {r['prompting']} | **{100 * r['exact_match']:.1f}%** | "
                     f"{100 * lo:.1f}–{100 * hi:.1f} | "
                     + " | ".join(f"{100 * r['per_task'].get(t, 0):.1f}%" for t in tasks) + " |")
    if d := result.get("gain"):
        lines += ["", f"Fine-tuned minus the best base row ({d['versus']}): **{100 * d['difference']:+.1f} "
                  f"points**, 95% paired-bootstrap interval {100 * d['low']:+.1f} to {100 * d['high']:+.1f} "
                  f"(share of resamples with no gain: {d['p_not_better']:.4f})."]
    loss = result["finetuned_loss"]
    lines += ["", f"Fine-tuned completion loss on `{result['split']}`: {loss['loss']:.4f} "
              f"(token accuracy {100 * loss['token_accuracy']:.1f}% over {int(loss['tokens'])} "
              "supervised tokens)."]
    for setting, st in result.get("prompts", {}).items():
        if st["questions_cut"] or setting != "0-shot":
            lines.append(f"{setting} prompts: {st['mean_exemplars']:.2f} exemplars on average within "
                         f"eval.max_prompt_length; {st['questions_cut']} questions cut from the left.")
    lines += ["", "Sample fine-tuned predictions:", "",
              "| prompt | target | prediction | ok |", "|---|---|---|---|"]
    for s in result["samples"]:
        lines.append(f"| {_cell(s['prompt'])} | {_cell(s['target'])} | {_cell(s['prediction'])} | "
                     f"{'yes' if s['ok'] else 'no'} |")
    return "\n".join(lines) + "\n"


def evaluate(workdir: str, split: str = "", checkpoint: str = "best", max_examples: int = -1
             ) -> dict[str, Any]:
    t0 = time.perf_counter()
    config = experiment.load_config(workdir)
    ecfg = config.eval
    split = split or ecfg.split
    max_examples = ecfg.max_examples if max_examples < 0 else max_examples

    # ---- data and tokenizer, exactly as the run saw them ----------------------------------
    tok = experiment.build_or_load_tokenizer(config, workdir, train_rows=None)
    rows, _ = experiment.read_rows(config)
    template = pipeline.template_for(config.data, tok)
    if split not in rows:
        raise UserError(f"no split {split!r} in this run's data; available: {', '.join(rows)}")
    eval_rows = rows[split]
    if 0 < max_examples < len(eval_rows):  # a seeded sample, so every task/source is represented
        keep = sorted(random.Random(config.seed).sample(range(len(eval_rows)), max_examples))
        eval_rows = [eval_rows[i] for i in keep]
    if not eval_rows:
        raise UserError(f"split {split!r} is empty")
    data = experiment.tokenize(config, tok, {split: eval_rows})

    # ---- model: fine-tuned checkpoint and the base it started from ------------------------
    mesh = experiment.make_mesh(config)
    spec = experiment.model_spec(config, len(tok), mesh)
    ckpt = Checkpointer(workdir, read_only=True)
    step = ckpt.resolve(checkpoint)
    abstract = experiment.abstract_with_shardings(spec.init_params_fn(0), spec.param_shardings)
    finetuned = ckpt.restore_params(step, abstract)
    ckpt.close()
    base = spec.init_params(config.seed)  # what the run started from: the HF weights or the init
    base_name = (f"base ({os.path.basename(os.path.normpath(spec.hf_path))})" if spec.hf_path
                 else "base (untrained init)")

    # ---- loss on the split --------------------------------------------------------------
    batch_sh = sharding_lib.batch_sharding(mesh, experiment.rules(config))
    eval_step = sharding_lib.with_mesh(mesh, jax.jit(make_eval_step(
        spec.graphdef, config.train.get("loss_chunk_tokens", 1024))))
    loss = experiment.split_loss(eval_step, finetuned, data.examples[split], config,
                                 tok.pad_token_id, batch_sh)

    # ---- greedy generation: base zero-/few-shot vs fine-tuned ------------------------------
    eos_ids = template.stop_ids
    generate = make_generate_fn(spec.graphdef, max_new_tokens=ecfg.max_new_tokens, eos_ids=eos_ids,
                                pad_id=tok.pad_token_id, mesh=mesh)
    pool: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows.get("train", []):
        pool[r.get("task", "")].append(r)

    prompt_stats: dict[str, Any] = {}
    pattern = ecfg.get("answer_pattern", "")
    budget = ecfg.get("max_prompt_length", 0) or config.data.max_length * (ecfg.few_shot_k + 1)

    def prompts_for(k: int) -> list[np.ndarray]:
        """Prompts of at most ``eval.max_prompt_length`` tokens (0: room for k exemplars and the
        question, each as long as a training row: ``data.max_length * (few_shot_k + 1)``)."""
        rng = random.Random(config.seed)
        encode = lambda msgs: templating.encode_messages(tok, msgs, template=template)[0]  # noqa: E731
        out, shots, cut = [], 0, 0
        for r in eval_rows:
            candidates = pool.get(r.get("task", ""), []) or [x for xs in pool.values() for x in xs]
            exemplars = rng.sample(candidates, min(k, len(candidates)))
            ids, used, was_cut = fit_prompt(encode, r, exemplars, budget, template.bos_id)
            out.append(ids)
            shots += used
            cut += was_cut
        prompt_stats[f"{k}-shot"] = {"mean_exemplars": shots / len(eval_rows), "questions_cut": cut}
        return out

    def run(params, prompts) -> list[str]:
        ids = generate_all(generate, params, prompts, batch_size=ecfg.batch_size,
                           pad_id=tok.pad_token_id, eos_ids=eos_ids)
        stop = tuple(ecfg.get("stop", ()))  # e.g. "\n\n" for a base model that rambles on
        return [cut_at_stop(tok.decode(x, skip_special_tokens=True), stop) for x in ids]

    zero = prompts_for(0)
    settings = [(base_name, "zero-shot", base, zero),
                (base_name, f"{ecfg.few_shot_k}-shot", base, prompts_for(ecfg.few_shot_k)),
                (f"fine-tuned (step {step})", "zero-shot", finetuned, zero)]
    result_rows, predictions = [], None
    for model_name, prompting, params, prompts in settings:
        predictions = run(params, prompts)
        result_rows.append({"model": model_name, "prompting": prompting,
                            **score(eval_rows, predictions, pattern)})
        metrics_lib.log(f"{model_name}, {prompting}: {100 * result_rows[-1]['exact_match']:.1f}% "
                        f"exact match ({time.perf_counter() - t0:.0f}s)")

    best_base = max(result_rows[:-1], key=lambda r: r["exact_match"])
    gain = {"versus": best_base["prompting"],
            **paired_difference(result_rows[-1]["hits"], best_base["hits"], seed=config.seed)}
    samples = []
    wrong_first = sorted(range(len(eval_rows)), key=lambda i: exact_match(
        predictions[i], target_of(eval_rows[i]), pattern))[:4] + list(range(4))
    for i in dict.fromkeys(wrong_first):
        samples.append({"prompt": prompt_of(eval_rows[i])[-1]["content"],
                        "target": target_of(eval_rows[i]), "prediction": predictions[i],
                        "ok": exact_match(predictions[i], target_of(eval_rows[i]), pattern)})
    result = {"workdir": workdir, "split": split, "checkpoint": checkpoint, "step": step,
              "num_examples": len(eval_rows), "rows": result_rows, "gain": gain, "finetuned_loss": loss,
              "samples": samples[:8], "prompts": prompt_stats, "seconds": time.perf_counter() - t0}

    md = markdown_report(result)
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, "eval")
        os.makedirs(out_dir, exist_ok=True)
        stem = os.path.join(out_dir, f"{split}_step{step}")
        with open(stem + ".json", "w") as f:
            json.dump(result, f, indent=2)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(md + f"\n(eval took {result['seconds']:.0f}s; report: {stem}.md / .json)", flush=True)
    return result
