r"""Pre-flight report: run it before every training run.

    python -m data_pipeline.inspect --config configs/gsm8k.py [--config.data.max_length=1024]
        [--preview 3] [--tokenizer runs/x/tokenizer] [--json report.json]

Prints, for exactly the data the trainer would build from this config: rows per split and per source,
bad rows skipped, duplicates removed, token length p50/p95/max, rows truncated or dropped and why,
packing efficiency, and a preview of templated examples with the supervised tokens marked
``[[like this]]``. Imports no model code and needs no accelerator.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from absl import app, flags, logging

from data_pipeline.cli import UserError, config_flag, parse_flags
from data_pipeline.errors import DataError

FLAGS = flags.FLAGS


def mark_supervised(tok, ex) -> str:
    """Decodes an example with each supervised span wrapped in ``[[...]]``."""
    out, start = [], 0
    ids, mask = ex.ids.tolist(), ex.loss_mask.tolist()
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tok.decode(ids[start:i], skip_special_tokens=False)
            out.append(f"[[{text}]]" if mask[start] else text)
            start = i
    return "".join(out)


def report(config: Any, tokenizer_dir: str = "", preview: int = 3) -> tuple[str, dict[str, Any]]:
    """Builds the data exactly as ``trainer.train`` would; returns (Markdown, JSON-able dict)."""
    # Imported here, not at the top: ``--help`` should not wait for datasets/transformers/grain.
    from data_pipeline import packing, pipeline, sources  # noqa: PLC0415
    from data_pipeline import tokenizer as tokenizer_lib
    dcfg = config.data
    rows, source_reports = sources.build_splits(dcfg)
    if tokenizer_dir:
        tok = tokenizer_lib.load_tokenizer(tokenizer_dir)
    else:
        tok = tokenizer_lib.build_tokenizer(config.tokenizer, (r["messages"] for r in rows["train"]),
                                            config.model.get("hf_path", "") or config.model.get("gguf_path", ""))
    data = pipeline.tokenize(dcfg, tok, rows, source_reports, config.seed)
    splits = list(rows)

    lines = ["# Data pre-flight report", "",
             f"template `{dcfg.template}`, max_length {dcfg.max_length}, length_policy "
             f"`{dcfg.length_policy}`, packing `{dcfg.packing}`, tokenizer {len(tok)} tokens", "",
             "## Sources", "",
             "| source | files | " + " | ".join(splits) + " | bad rows skipped | duplicates removed "
             "| train rows after mixing |", "|---|---:|" + "---:|" * len(splits) + "---|---|---:|"]
    sources_json = []
    for rep in source_reports:
        bad = ", ".join(f"{n} {why}" for why, n in rep.bad.counts.items()) or "0"
        dup = ", ".join(f"{n} {s}" for s, n in rep.duplicates_removed.items() if n) or "0"
        lines.append(f"| {rep.name} | {len(rep.files)} | "
                     + " | ".join(str(rep.rows[s]) for s in splits)
                     + f" | {bad} | {dup} | {rep.mixture_rows or '-'} |")
        sources_json.append({"name": rep.name, "files": rep.files, "rows": dict(rep.rows),
                             "bad_rows": dict(rep.bad.counts), "bad_row_examples": rep.bad.examples,
                             "duplicates_removed": dict(rep.duplicates_removed),
                             "mixture_rows": rep.mixture_rows})
    skipped = [ex for rep in source_reports for ex in rep.bad.examples]
    if skipped:
        lines += ["", "First skipped rows:", ""] + [f"- {ex}" for ex in skipped]

    lines += ["", "## Tokenised splits", "",
              "| split | rows | kept | dropped (why) | truncated (how) | tokens p50 / p95 / max "
              "| supervised tokens |", "|---|---:|---:|---|---|---|---:|"]
    for split in splits:
        r = data.reports[split]
        s = r.length_stats()
        dropped = ", ".join(f"{n} {w}" for w, n in sorted(r.dropped.items())) or "0"
        trunc = ", ".join(f"{n} {w}" for w, n in sorted(r.truncated.items())) or "0"
        lines.append(f"| {split} | {r.rows} | {r.kept} | {dropped} | {trunc} | "
                     f"{s['p50']} / {s['p95']} / {s['max']} | {r.supervised_tokens:,} |")

    train = data.examples["train"]
    lengths = [len(ex.ids) - 1 for ex in train]
    pack_json: dict[str, Any] = {}
    if train:
        padded = packing.efficiency(lengths, [[i] for i in range(len(train))], dcfg.max_length)
        method = dcfg.packing if dcfg.packing != "none" else "best_fit"
        bins = packing.pack(lengths, dcfg.max_length, method, dcfg.max_segments_per_row)
        packed = packing.efficiency(lengths, bins, dcfg.max_length)
        pack_json = {"padded_efficiency": padded, "packed_efficiency": packed, "method": method,
                     "packed_rows": len(bins), "padded_rows": len(train)}
        lines += ["", "## Packing (train)", "",
                  f"- padded (one example per row): {100 * padded:.1f}% of row tokens are real "
                  f"({len(train)} rows)",
                  f"- packed ({method}): {100 * packed:.1f}% ({len(bins)} rows, "
                  f"{len(train) / len(bins):.1f} examples per row)"
                  + ("" if dcfg.packing != "none" else "; set data.packing=best_fit to use it")]
    lines += ["", f"## Preview: {min(preview, len(train))} train examples "
              "(supervised tokens in [[...]])"]
    for ex in train[:preview]:
        lines += ["", f"source `{ex.meta['source']}`, task `{ex.meta['task']}`, {len(ex.ids)} tokens, "
                  f"{int(ex.loss_mask.sum())} supervised:", "", "```", mark_supervised(tok, ex), "```"]
    # train and validation are what training needs (validation ranks the checkpoints); eval.split is
    # what trainer.eval reads.
    needed = list(dict.fromkeys(["train", "validation", config.eval.split]))
    empty = [s for s in needed if not data.examples.get(s)]
    if empty:
        lines += ["", f"**Empty split(s) the run needs: {', '.join(empty)}.**"]
    result = {"sources": sources_json, "splits": {s: data.reports[s].to_json() for s in splits},
              "packing": pack_json, "empty_needed_splits": empty}
    return "\n".join(lines) + "\n", result


def _define_flags() -> None:
    """Defined when the entry point runs, not on import (see ``data_pipeline.cli``)."""
    from ml_collections import config_flags  # noqa: PLC0415
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)
    flags.DEFINE_integer("preview", 3, "Templated train examples to show.")
    flags.DEFINE_string("tokenizer", "", "A tokenizer directory (e.g. RUN/tokenizer) instead of building "
                        "the one config.tokenizer describes.")
    flags.DEFINE_string("json", "", "Also write the report as JSON to this path.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS["verbosity"].present:  # datasets and others log at INFO; the report is printed
        logging.set_verbosity(logging.WARNING)
    try:
        md, result = report(config_flag(), FLAGS.tokenizer, FLAGS.preview)
    except (UserError, DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    print(md, flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(result, f, indent=2)
    if result["empty_needed_splits"]:
        print(f"error: split(s) {', '.join(result['empty_needed_splits'])} have no usable rows; training "
              "needs train and validation, trainer.eval needs eval.split (see the tables above)",
              file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
