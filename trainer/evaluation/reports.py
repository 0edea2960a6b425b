"""Evaluation reports: ``report.json`` (every number), ``report.md`` (the side-by-side table with deltas
and intervals, per task, best and worst examples), ``predictions.jsonl`` (every row, every model's
prediction and per-example scores), and PNG plots (matplotlib): the run's loss and in-training eval
metrics by step, and the per-task bars of the compared models.

The report dict is built by ``trainer.evaluation.compare``; here it is only written and drawn.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from trainer.evaluation.evaluator import Evaluator, Result, prompt_of
from trainer.evaluation.scoring import METRICS

HEADLINE = ("exact_match", "rouge1", "rouge2", "rougeL", "chrf")
LABELS = {"exact_match": "exact match", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougeL": "ROUGE-L",
          "chrf": "chrF"}


def row_label(row: dict[str, Any]) -> str:
    return f"{row['model']}, {row['prompting']}"


def _pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.1f}"


def _interval(m: dict[str, float]) -> str:
    return f"{_pct(m['mean'])} ({_pct(m['low'])}–{_pct(m['high'])})"


def _delta(d: dict[str, float]) -> str:
    return f"{100 * d['difference']:+.1f} ({100 * d['low']:+.1f} to {100 * d['high']:+.1f})"


def _cell(text: str, limit: int = 160) -> str:
    """Text fit for one Markdown table cell."""
    text = text if len(text) <= limit else "..." + text[-limit:]
    return text.replace("|", "\\|").replace("\n", "<br>") or " "


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------

def main_table(report: dict[str, Any]) -> list[str]:
    """The side-by-side table: every metric with its 95% interval, and each row's paired difference
    in exact match against the first row."""
    marked = "*" if report.get("pattern_warning") else ""
    head = ["model", "prompting"] + [LABELS[m] + (marked if m == "exact_match" else "") for m in HEADLINE]
    head += ["Δ exact match vs row 1 (paired 95%)", "loss", "gen tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    for i, r in enumerate(report["rows"]):
        delta = _delta(r["delta_vs_first"]["exact_match"]) if i else "—"
        loss = f"{r['loss']['loss']:.4f}" if r.get("loss") and "loss" in r["loss"] else "—"
        lines.append(f"| {r['model']} | {r['prompting']} | "
                     + " | ".join(_interval(r["metrics"][m]) for m in HEADLINE)
                     + f" | {delta} | {loss} | {r['generation']['tokens_per_s']:.0f} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    rows = report["rows"]
    lines = [f"# Evaluation: {report['title']}", "",
             f"Split `{report['split']}` of {report['data']}, {report['num_examples']} rows"
             + (f" (a seeded sample of {report['split_rows']})" if report["split_rows"] != report["num_examples"]
                else "") + f". Greedy decoding, at most {report['max_new_tokens']} new tokens. "
             "Scores in percent with 95% bootstrap intervals over the rows; differences are paired "
             "bootstraps (both models on the same resampled rows).", ""]
    lines += main_table(report)
    if g := report.get("gain"):
        lines += ["", f"**{g['a']} minus {g['b']}**: exact match {_delta(g['exact_match'])} points "
                  f"(share of resamples with no gain: {g['exact_match']['p_not_better']:.4f}); ROUGE-L "
                  f"{_delta(g['rougeL'])}; chrF {_delta(g['chrf'])}."]
    if w := report.get("pattern_warning"):
        lines += ["", f"\\* {w}"]
    tasks = sorted({t for r in rows for t in r["per_task"]})
    if len(tasks) > 1:
        lines += ["", "## Exact match per task", "",
                  "| model | prompting | " + " | ".join(f"{t} (n={rows[0]['per_task'][t]['n']})" for t in tasks) + " |",
                  "|---|---|" + "---:|" * len(tasks)]
        for r in rows:
            lines.append(f"| {r['model']} | {r['prompting']} | "
                         + " | ".join(_pct(r["per_task"][t]["exact_match"]["mean"]) for t in tasks) + " |")
    prompts = [(r["prompting"], r["prompts"]) for r in rows if r["prompting"] != "zero-shot"
               or r["prompts"]["questions_cut"]]
    if prompts:
        lines.append("")
        for setting, st in dict(prompts).items():
            lines.append(f"- {setting} prompts: {st['mean_exemplars']:.2f} exemplars on average within "
                         f"the prompt budget; {st['questions_cut']} questions cut from the left.")
    for title, key in (("Best examples", "best"), ("Worst examples", "worst")):
        if report["examples"].get(key):
            lines += ["", f"## {title} ({row_label(rows[-1])} against {row_label(rows[report['examples']['versus']])})",
                      "", "| task | prompt | reference | prediction | compared prediction |", "|---|---|---|---|---|"]
            for e in report["examples"][key]:
                lines.append(f"| {e['task']} | {_cell(e['prompt'])} | {_cell(e['reference'])} | "
                             f"{_cell(e['prediction'])} | {_cell(e['compared'])} |")
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in report["plots"]]
    lines += ["", f"Files: `report.json` (every number), `predictions.jsonl` (every row). "
              f"Evaluation took {report['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Building blocks of the report dict
# ---------------------------------------------------------------------------------------------

def result_row(model: str, result: Result) -> dict[str, Any]:
    """One compared (model, prompting) row of report.json: no per-example arrays (those go to
    predictions.jsonl)."""
    return {"model": model, "prompting": result.prompting, "metrics": result.summary["metrics"],
            "per_task": result.summary["per_task"], "generation": result.generation,
            "prompts": result.prompts, "loss": result.loss, "pattern_misses": result.pattern_misses}


def examples(evaluator: Evaluator, results: Sequence[Result], versus: int, k: int = 4
             ) -> dict[str, Any]:
    """The last row's best examples (right where the compared row was wrong first, then by ROUGE-L)
    and worst (wrong where the compared row was right first)."""
    last, other = results[-1], results[versus]
    em, rl, oem = last.scores["exact_match"], last.scores["rougeL"], other.scores["exact_match"]
    best = sorted(range(len(em)), key=lambda i: (-em[i], oem[i], -rl[i]))[:k]
    worst = sorted(range(len(em)), key=lambda i: (em[i], -oem[i], rl[i]))[:k]

    def show(i: int) -> dict[str, Any]:
        return {"index": i, "task": evaluator.tasks[i],
                "prompt": prompt_of(evaluator.rows[i])[-1]["content"],
                "reference": evaluator.references[i], "prediction": last.predictions[i],
                "compared": other.predictions[i]}
    return {"versus": versus, "best": [show(i) for i in best], "worst": [show(i) for i in worst]}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def write_predictions(path: str, evaluator: Evaluator, labels: Sequence[str],
                      results: Sequence[Result]) -> None:
    with open(path, "w") as f:
        for i, row in enumerate(evaluator.rows):
            rec = {"index": i, "task": evaluator.tasks[i], "loc": row.get("loc", ""),
                   "prompt": prompt_of(row), "reference": evaluator.references[i],
                   "predictions": {lab: r.predictions[i] for lab, r in zip(labels, results)},
                   "scores": {lab: {m: float(r.scores[m][i]) for m in METRICS}
                              for lab, r in zip(labels, results)}}
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _pyplot():
    import matplotlib  # noqa: PLC0415 (only when drawing)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    return plt


def plot_per_task(path: str, report: dict[str, Any]) -> None:
    """Grouped bars: exact match per task (and overall) for each compared row, with 95% intervals."""
    plt = _pyplot()
    rows = report["rows"]
    tasks = sorted({t for r in rows for t in r["per_task"]}) + ["all"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(tasks) * max(1, len(rows)) / 2), 4))
    width = 0.8 / len(rows)
    for j, r in enumerate(rows):
        stats = [r["per_task"][t]["exact_match"] if t != "all" else r["metrics"]["exact_match"]
                 for t in tasks]
        means = np.array([100 * s["mean"] for s in stats])
        err = np.array([[100 * (s["mean"] - s["low"]) for s in stats],
                        [100 * (s["high"] - s["mean"]) for s in stats]])
        ax.bar(np.arange(len(tasks)) + (j - (len(rows) - 1) / 2) * width, means, width,
               yerr=np.nan_to_num(err), capsize=2, label=row_label(r))
    ax.set_xticks(np.arange(len(tasks)), tasks, rotation=30, ha="right")
    ax.set_ylabel("exact match (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{report['title']}: exact match per task (95% intervals)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """``metrics.jsonl`` rows; a later row for the same step replaces an earlier one (a resumed run
    logs the steps after its last checkpoint again)."""
    by_step: dict[tuple[int, tuple[str, ...]], dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            by_step[(rec["step"], tuple(sorted(rec)))] = rec
    return sorted(by_step.values(), key=lambda r: r["step"])


def plot_training(path: str, metrics_path: str) -> bool:
    """Train and validation loss by step (left) and the in-training generation metrics (right) from a
    run's ``metrics.jsonl``; False when there is nothing to draw."""
    recs = read_metrics(metrics_path)
    series: dict[str, list[tuple[int, float]]] = {}
    for rec in recs:
        for k, v in rec.items():
            if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, []).append((rec["step"], v))
    losses = [k for k in ("train/loss", "val/loss") if k in series]
    gen = [f"val/{m}" for m in HEADLINE if f"val/{m}" in series]
    if not losses:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2 if gen else 1, figsize=(11 if gen else 6, 4), squeeze=False)
    for k in losses:
        s = np.array(series[k])
        axes[0, 0].plot(s[:, 0], s[:, 1], marker="o" if k == "val/loss" else None, ms=3, label=k)
    axes[0, 0].set(xlabel="step", ylabel="loss (completion tokens)", yscale="log", title="loss")
    axes[0, 0].legend()
    if gen:
        for k in gen:
            s = np.array(series[k])
            axes[0, 1].plot(s[:, 0], 100 * s[:, 1], marker="o", ms=3, label=k)
        axes[0, 1].set(xlabel="step", ylabel="%", title="in-training generation eval (validation sample)")
        axes[0, 1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write(out_dir: str, report: dict[str, Any], evaluator: Evaluator, results: Sequence[Result],
          metrics_path: str = "") -> str:
    """Writes every file of the report into ``out_dir`` (a local directory, or ``gs://``: written
    locally, then uploaded); returns the Markdown."""
    from trainer.io import paths  # noqa: PLC0415
    if paths.is_remote(out_dir) or paths.is_remote(metrics_path):
        local = paths.fresh_local_dir(out_dir)
        local_metrics = ""
        if metrics_path and paths.exists(metrics_path):
            local_metrics = os.path.join(paths.fresh_local_dir(metrics_path), "metrics.jsonl")
            with open(local_metrics, "w") as f:
                f.write(paths.read_text(metrics_path))
        md = write(local, report, evaluator, results, local_metrics)
        if paths.is_remote(out_dir):
            paths.upload_dir(local, out_dir)
        return md
    os.makedirs(out_dir, exist_ok=True)
    labels = [row_label(r) for r in report["rows"]]
    write_predictions(os.path.join(out_dir, "predictions.jsonl"), evaluator, labels, results)
    report["plots"] = []
    plot_per_task(os.path.join(out_dir, "per_task.png"), report)
    report["plots"].append("per_task.png")
    if metrics_path and os.path.exists(metrics_path) and plot_training(
            os.path.join(out_dir, "training.png"), metrics_path):
        report["plots"].append("training.png")
    md = markdown(report)
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(md)
    return md
