"""Where rows come from: ``build_splits(data_cfg) -> (splits, report)``.

``data.sources`` names one or more sources (a mixture). Each is read, mapped to conversations
(``formats.to_messages``), assigned to train/validation/test and remembered by name, so evaluation can
report per source/task. A row is ``{"messages", "source", "task", "loc"}``; ``loc`` is ``file:line``.

Source types:
  * ``files``: JSONL, JSON (a list of records, ``{"key": [records]}``, or columns), CSV or Parquet; one
    file or a glob. JSONL and JSON are parsed here, line by line, because the error (or skip) must name
    the file and line, and ``datasets``' JSON builder (pyarrow) neither reports lines nor can skip one
    bad line; CSV and Parquet are read with ``datasets``.
  * ``disk``: a directory written by ``datasets.save_to_disk`` (a Dataset, or a DatasetDict of splits).
  * ``hub``: a Hugging Face Hub dataset name (needs the network; offline it fails at once, clearly).
  * ``synthetic``: the built-in demo tasks (``data.synthetic``).

Splits: a source's own splits are used when it has them (``splits.train/validation/test`` file
patterns, or a DatasetDict's split names); a split it lacks is carved out of its train split by a hash
of the row's content. Without own splits every row goes where the hash of its content sends it, so it
keeps its split when the dataset grows or is reordered. Exact duplicates that land in two splits are
removed from validation/test (train > validation > test) and counted.

This module puts a source together (read, map, split, count); the pieces have their own modules:
``source_spec`` (the keys of a source and the report), ``readers`` (records with their file:line),
``splits`` (content-hash assignment and cross-split duplicates), ``mixtures`` (source weights).
"""

from __future__ import annotations

import os
from typing import Any

from data_pipeline.errors import BadRows, DataError
from data_pipeline.formats import (
    RowProblem,
    expand,
    mapped_paths,
    prompt_completion_messages,
    to_messages,
)
from data_pipeline.mixtures import mix, mixture_weights  # noqa: F401 (sources.mix & co.)
from data_pipeline.readers import source_records, with_progress
from data_pipeline.source_spec import (  # noqa: F401
    FILE_FORMATS,
    SOURCE_TYPES,
    SPLIT_ALIASES,
    SPLITS,
    Row,
    SourceReport,
    plain_spec,
    source,
)
from data_pipeline.splits import (  # noqa: F401
    assign_splits,
    content_key,
    remove_cross_split_duplicates,
)
from data_pipeline.synthetic import synthetic_splits


def _task(spec: Any, name: str, rec: dict[str, Any], path: str) -> str:
    if not spec.task_from:
        return name
    if spec.task_from == "file":
        return os.path.basename(path).split(".")[0]
    return str(rec.get(spec.task_from, name))


def read_source(name: str, spec: Any, on_bad_row: str, max_row_bytes: int
                ) -> tuple[dict[str, list[Row]], SourceReport]:
    """Reads one source into ``{split or "": [row]}`` (see module docstring)."""
    report = SourceReport(name, bad=BadRows(on_bad_row))
    spec = plain_spec(spec)  # ConfigDict attribute access costs ~2 us; rows read it ~10 times each
    try:
        paths = mapped_paths(spec)
    except ValueError as e:
        raise DataError(f"data.sources.{name}.fields: {e}") from None
    out: dict[str, list[Row]] = {}
    for split, recs in source_records(name, spec, report.bad, max_row_bytes, report).items():
        rows = out.setdefault(split, [])
        for where, rec, path in with_progress(recs, f"mapping {name}"):
            if spec.max_rows and len(rows) >= spec.max_rows:
                break
            if not isinstance(rec, dict):
                report.bad(where, f"expected an object, got {type(rec).__name__}", "not an object")
                continue
            try:
                flat_recs = expand(rec, paths)
            except RowProblem as e:
                report.bad(where, str(e), e.reason)
                continue
            for suffix, flat in flat_recs:
                try:
                    msgs = to_messages(flat, spec)
                except RowProblem as e:
                    report.bad(where + suffix, str(e), e.reason)
                    continue
                rows.append({"messages": msgs, "source": name, "task": _task(spec, name, flat, path),
                             "loc": where + suffix})
    if not any(out.values()):  # in every mode: a source that gives nothing is a mistake, not data
        skipped = (f"; skipped {report.bad.total} bad rows: {dict(report.bad.counts)}, e.g. "
                   f"{report.bad.examples[0]}" if report.bad.total else "")
        raise DataError(f"data.sources.{name}: no usable rows in {', '.join(report.files) or spec.path}"
                        f"{skipped}")
    return out, report


# ---------------------------------------------------------------------------------------------
# Splits, de-duplication, mixture
# ---------------------------------------------------------------------------------------------

def _synthetic(data_cfg: Any) -> dict[str, list[Row]]:
    s = data_cfg.synthetic
    raw = synthetic_splits(
        s.num_rows, s.seed, dict(data_cfg.split_fractions), salt=data_cfg.split_salt,
        min_len=s.min_word_len, max_len=s.max_word_len, alphabet=s.alphabet,
        max_first_addend=s.max_first_addend, max_second_addend=s.max_second_addend,
        words=s.words, task_weights=dict(s.task_weights))
    return {split: [{"messages": prompt_completion_messages(r["prompt"], r["completion"]),
                     "source": "synthetic", "task": r["task"], "loc": f"synthetic row {r['input']}"}
                    for r in rs] for split, rs in raw.items()}


def build_splits(data_cfg: Any) -> tuple[dict[str, list[Row]], list[SourceReport]]:
    """Reads every source in ``data_cfg.sources`` and returns ``({split: [row]}, reports)``.

    Splits depend on each row's content hash and ``data.split_salt`` only, never on ``seed``: a run
    with another seed (model init, data order) must keep every test row out of train."""
    sources = dict(data_cfg.sources)
    if not sources:
        raise DataError("data.sources is empty: name at least one source")
    fractions = dict(data_cfg.split_fractions)
    per_source: dict[str, dict[str, list[Row]]] = {}
    reports = []
    for name, spec in sources.items():
        if spec.type == "synthetic":
            per_source[name] = _synthetic(data_cfg)
            report = SourceReport(name, files=["(built-in synthetic tasks)"], bad=BadRows())
        else:
            rows, report = read_source(name, spec, data_cfg.on_bad_row, data_cfg.max_row_bytes)
            per_source[name] = assign_splits(rows, fractions, data_cfg.split_salt)
        reports.append(report)

    splits = {s: [r for name in sources for r in per_source[name].get(s, [])] for s in SPLITS}
    by_name = {r.name: r for r in reports}
    for s, rows in remove_cross_split_duplicates(splits).items():
        for r in rows:
            by_name[r["source"]].duplicates_removed[s] += 1
    for s in SPLITS:
        for r in splits[s]:
            by_name[r["source"]].rows[s] += 1

    mixture_weights(data_cfg)  # checked here; applied after tokenisation (pipeline.tokenize), so
    return splits, reports     # the weights hold for the examples that survive the length policy
