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
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import json
import os
import random
import socket
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from typing import Any

from ml_collections import ConfigDict

from data_pipeline.errors import BadRows, DataError
from data_pipeline.formats import RowProblem, expand, mapped_paths, prompt_completion_messages, to_messages
from data_pipeline.splits import hash_split
from data_pipeline.synthetic import synthetic_splits

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation", "dev": "validation",
                 "val": "validation", "test": "test"}
SOURCE_TYPES = ("files", "disk", "hub", "synthetic")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
Row = dict[str, Any]


def source(**overrides: Any) -> ConfigDict:
    """A source spec with every key present (so ``--config.data.sources.NAME.KEY=...`` can set any)."""
    spec = ConfigDict(dict(
        type="files",        # files | disk | hub | synthetic
        path="",             # files: a file or glob; disk: the save_to_disk directory; hub: the name
        splits=ConfigDict(dict(train="", validation="", test="")),  # files: the dataset's own splits
        hub_config="",       # hub: the dataset config name
        file_format="auto",  # auto (from the extension) | jsonl | json | csv | parquet
        format="prompt_completion",  # prompt_completion | alpaca | messages
        fields=ConfigDict(dict(prompt="prompt", completion="completion", instruction="instruction",
                               input="input", output="output", messages="messages", role="role",
                               content="content")),
        system="",           # a system prompt added to every conversation that has none
        strip_suffix="",     # e.g. "<|endoftext|>" that some exports append to every completion
        strip=True,          # strip surrounding whitespace from every message
        weight=0.0,          # mixture weight (train only); 0 everywhere = as many rows as each has
        max_rows=0,          # read at most this many rows per split (0 = all)
        task_from="",        # per-task eval label: "" = the source name | "file" = file stem | a field
    ))
    for k, v in overrides.items():
        if isinstance(v, dict):
            spec[k].update(v)
        else:
            spec[k] = v
    return spec


@dataclasses.dataclass
class SourceReport:
    """What reading one source did: nothing disappears without a count here."""

    name: str
    files: list[str] = dataclasses.field(default_factory=list)
    rows: Counter = dataclasses.field(default_factory=Counter)  # split -> rows kept
    bad: BadRows | None = None
    duplicates_removed: Counter = dataclasses.field(default_factory=Counter)  # split -> rows
    mixture_rows: int = 0  # train examples after mixture re-sampling (0: no re-sampling)


# ---------------------------------------------------------------------------------------------
# Reading records
# ---------------------------------------------------------------------------------------------

def _expand(pattern: str, what: str) -> list[str]:
    paths = sorted(glob_lib.glob(os.path.expanduser(pattern))) if pattern else []
    if not paths:
        raise DataError(f"{what}: no file matches {pattern!r}")
    return paths


def _jsonl(path: str, bad: BadRows, max_row_bytes: int) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if len(raw) > max_row_bytes:
                bad(where, f"line is {len(raw) / 1e6:.1f} MB, over data.max_row_bytes="
                    f"{max_row_bytes:,}", "line over data.max_row_bytes")
                continue
            try:
                # utf-8-sig on the first line: a byte-order mark (Windows editors write one) is not
                # part of the first record.
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                bad(where, f"not valid UTF-8 (byte {e.start} of the line)", "not UTF-8")
                continue
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                yield where, json.loads(text)
            except json.JSONDecodeError as e:
                bad(where, f"malformed JSON ({e.msg}, column {e.colno})", "malformed JSON")


def _json(path: str, bad: BadRows, max_row_bytes: int) -> Iterator[tuple[str, Any]]:
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a leading byte-order mark is not JSON
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line: JSON Lines with a .json name
            yield from _jsonl(path, bad, max_row_bytes)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})") from None
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1 and len(data) == 1:  # {"data": [records]}
            data = lists[0]
        elif lists and len(lists) == len(data) and len({len(v) for v in lists}) == 1:  # columns
            data = [dict(zip(data, vals)) for vals in zip(*data.values())]
        else:
            raise DataError(f"{path}: expected a list of records, {{'key': [records]}} or columns")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        yield f"{path}: record {i}", rec


def _csv(path: str, bad: BadRows, max_row_bytes: int) -> Iterator[tuple[str, Any]]:
    """CSV with the standard ``csv`` module: a header row, every field a string (a numeric column
    stays text), quoted fields may span lines, and each record is named by its physical lines.

    A record whose field count differs from the header's -- what an unterminated quote produces when
    it swallows the following lines -- is a bad row at its lines, never a silent merge; a quote left
    open at the end of the file is an error at the line it opened.
    """
    import csv  # noqa: PLC0415
    csv.field_size_limit(max(max_row_bytes, 1 << 20))
    try:
        f = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise DataError(f"{path}: {e}") from None
    with f:
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if header is None:
                return
            if len(set(header)) != len(header) or not all(h.strip() for h in header):
                raise DataError(f"{path}:1: the header needs distinct, non-empty column names, got "
                                f"{header}")
            start = reader.line_num + 1
            while True:
                try:
                    fields = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    raise DataError(f"{path}:{start}: malformed CSV ({e}); a quote opened here is "
                                    "not closed") from None
                end = reader.line_num
                where = f"{path}:{start}" if end == start else f"{path}:{start}-{end}"
                start = end + 1
                if not fields:
                    continue  # a blank line
                if len(fields) != len(header):
                    bad(where, f"{len(fields)} fields, the header has {len(header)} (an unclosed quote "
                        "merges lines; a field with a comma needs quotes)", "wrong number of fields")
                    continue
                yield where, dict(zip(header, fields))
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{start}: not valid UTF-8 ({e.reason})") from None


def _tabular(path: str, fmt: str) -> Iterator[tuple[str, Any]]:
    import datasets  # noqa: PLC0415 (slow import, only when needed)
    try:
        ds = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as e:  # noqa: BLE001 -- pyarrow/datasets raise many types; name the file
        raise DataError(f"{path}: cannot read as {fmt}: {type(e).__name__}: {e}") from None
    for i, rec in enumerate(ds):
        yield f"{path}: row {i}", rec


def _read_file(path: str, file_format: str, bad: BadRows, max_row_bytes: int
               ) -> Iterator[tuple[str, Any]]:
    fmt = file_format
    if fmt == "auto":
        fmt = FILE_FORMATS.get(os.path.splitext(path)[1].lower(), "")
        if not fmt:
            raise DataError(f"{path}: cannot tell the format from the extension; set "
                            f"file_format to one of {sorted(set(FILE_FORMATS.values()))}")
    if os.path.getsize(path) == 0:
        bad(path, "file is empty", "empty file")
        return
    reader = {"jsonl": lambda: _jsonl(path, bad, max_row_bytes),
              "json": lambda: _json(path, bad, max_row_bytes),
              "csv": lambda: _csv(path, bad, max_row_bytes), "parquet": lambda: _tabular(path, "parquet")}
    if fmt not in reader:
        raise DataError(f"{path}: unknown file_format {fmt!r}")
    n = 0
    for n, item in enumerate(reader[fmt](), 1):  # noqa: B007
        yield item
    if n == 0:
        bad(path, "file has no rows", "empty file")


def _check_hub_reachable(name: str, dataset: str, timeout: float = 5.0) -> None:
    """Fails in seconds when the Hub cannot be reached (``datasets`` retries for ~25 s first)."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError as e:
        raise DataError(f"data.sources.{name}: cannot reach {endpoint.hostname} to load Hub dataset "
                        f"{dataset!r} ({e}); offline? download it once and use type=disk, or point "
                        "type=files at local files") from None


def _hf_splits(name: str, spec: Any) -> dict[str, Any]:
    """A ``datasets`` Dataset/DatasetDict from disk or the Hub, as ``{split: Dataset}``."""
    import datasets  # noqa: PLC0415
    if spec.type == "disk":
        if not os.path.isdir(spec.path):
            raise DataError(f"data.sources.{name}.path: {spec.path!r} is not a directory")
        try:
            ds = datasets.load_from_disk(spec.path)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"{spec.path}: not a datasets.save_to_disk directory ({e})") from None
    else:
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get(
                "HF_DATASETS_OFFLINE", "0") not in ("0", ""):
            raise DataError(f"data.sources.{name}: Hub dataset {spec.path!r} cannot be loaded offline "
                            "(HF_HUB_OFFLINE is set); download it once with datasets and use "
                            "type=disk, or point type=files at local files")
        _check_hub_reachable(name, spec.path)
        try:
            ds = datasets.load_dataset(spec.path, spec.hub_config or None)
        except Exception as e:  # noqa: BLE001
            raise DataError(f"data.sources.{name}: cannot load Hub dataset {spec.path!r}: "
                            f"{type(e).__name__}: {str(e)[:300]} (offline? use local files)") from None
    if isinstance(ds, datasets.Dataset):
        return {"": ds}
    return dict(ds)


def _records(name: str, spec: Any, bad: BadRows, max_row_bytes: int, report: SourceReport
             ) -> dict[str, list[tuple[str, Any, str]]]:
    """``{split or "": [(where, record, file)]}``; "" holds rows that have no split of their own."""
    out: dict[str, list[tuple[str, Any, str]]] = {}
    if spec.type == "files":
        own = {s: p for s, p in dict(spec.splits).items() if p}
        if unknown := set(own) - set(SPLITS):
            raise DataError(f"data.sources.{name}.splits: unknown split(s) {sorted(unknown)}")
        patterns = own or {"": spec.path}
        for split, pattern in patterns.items():
            out[split] = []
            for path in _expand(pattern, f"data.sources.{name}"):
                report.files.append(path)
                out[split] += [(w, r, path) for w, r in _progress(
                    _read_file(path, spec.file_format, bad, max_row_bytes), f"reading {os.path.basename(path)}")]
    elif spec.type in ("disk", "hub"):
        for split, ds in _hf_splits(name, spec).items():
            key = SPLIT_ALIASES.get(split, split) if split else ""
            if key and key not in SPLITS:
                continue  # e.g. an "unsupervised" split
            report.files.append(f"{spec.path}[{split or 'all'}]")
            out[key] = [(f"{spec.path}[{split or 'all'}] row {i}", r, spec.path)
                        for i, r in enumerate(ds)]
    else:
        raise DataError(f"data.sources.{name}.type must be one of {SOURCE_TYPES}, got {spec.type!r}")
    return out


def _progress(items, desc: str):
    """A rows/s progress bar that appears only if the stage is still running after 3 seconds."""
    from tqdm.auto import tqdm  # noqa: PLC0415
    return tqdm(items, desc=desc, unit="row", delay=3, leave=False, dynamic_ncols=True)


class _Attrs(dict):
    """A plain dict read as attributes: the per-row view of a source's ConfigDict."""

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _plain(spec: Any) -> _Attrs:
    d = spec.to_dict() if hasattr(spec, "to_dict") else dict(spec)
    return _Attrs({k: _Attrs(v) if isinstance(v, dict) else v for k, v in d.items()})


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
    spec = _plain(spec)  # ConfigDict attribute access costs ~2 us; rows read it ~10 times each
    try:
        paths = mapped_paths(spec)
    except ValueError as e:
        raise DataError(f"data.sources.{name}.fields: {e}") from None
    out: dict[str, list[Row]] = {}
    for split, recs in _records(name, spec, report.bad, max_row_bytes, report).items():
        rows = out.setdefault(split, [])
        for where, rec, path in _progress(recs, f"mapping {name}"):
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

def content_key(messages: list[dict[str, str]]) -> str:
    """What makes two rows "the same": their roles and texts (not the file they came from)."""
    return json.dumps([[m["role"], m["content"]] for m in messages], ensure_ascii=False)


def assign_splits(rows: dict[str, list[Row]], fractions: dict[str, float], salt: str
                  ) -> dict[str, list[Row]]:
    """Own splits kept; rows without one (and splits a dataset lacks) assigned by content hash."""
    out: dict[str, list[Row]] = {s: [] for s in SPLITS}
    own = {s: r for s, r in rows.items() if s}
    if own:
        missing = {s: fractions.get(s, 0.0) for s in SPLITS if s not in own and s != "train"}
        carve = {**missing, "train": max(0.0, 1.0 - sum(missing.values()))}
        for s, rs in own.items():
            if s != "train":
                out[s] += rs
        for r in own.get("train", []):
            out[hash_split(content_key(r["messages"]), carve, salt)].append(r)
    for r in rows.get("", []):
        out[hash_split(content_key(r["messages"]), fractions, salt)].append(r)
    return out


def remove_cross_split_duplicates(splits: dict[str, list[Row]]) -> dict[str, list[Row]]:
    """Drops validation/test rows whose content is already in an earlier split (train > validation >
    test); returns the removed rows per split (for the per-source counts)."""
    seen: set[str] = set()
    removed: dict[str, list[Row]] = {}
    for s in SPLITS:
        keys = [content_key(r["messages"]) for r in splits[s]]
        dup = [s != "train" and k in seen for k in keys]
        removed[s] = [r for r, d in zip(splits[s], dup) if d]
        splits[s] = [r for r, d in zip(splits[s], dup) if not d]
        seen.update(keys)
    return removed


def mix(train_by_source: dict[str, list[Any]], weights: dict[str, float], total: int, seed: int
        ) -> dict[str, list[Any]]:
    """Re-samples each source's train rows (or examples) to ``total * weight / sum(weights)``.

    An up-weighted source repeats its rows (every row once per pass, a seeded order); a down-weighted
    one contributes a seeded subset. The mixture is fixed for the run (it is packed once).
    """
    wsum = sum(w for name, w in weights.items() if train_by_source[name])  # empty sources get none
    out = {}
    for name, rows in train_by_source.items():
        want = round(total * weights[name] / wsum)
        if not rows or want == 0:
            out[name] = []
            continue
        rng = random.Random(f"{seed}:{name}")
        picked: list[Any] = []
        while len(picked) < want:
            order = list(rows)
            rng.shuffle(order)
            picked += order[: want - len(picked)]
        out[name] = picked
    return out


def _synthetic(data_cfg: Any) -> dict[str, list[Row]]:
    s = data_cfg.synthetic
    raw = synthetic_splits(
        s.num_rows, s.seed, dict(data_cfg.split_fractions), salt=data_cfg.split_salt,
        min_len=s.min_word_len, max_len=s.max_word_len, alphabet=s.alphabet,
        max_first_addend=s.max_first_addend, max_second_addend=s.max_second_addend,
        words=s.get("words", "random"), task_weights=dict(s.task_weights))
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


def mixture_weights(data_cfg: Any) -> dict[str, float] | None:
    """``{source: weight}`` when the sources form a weighted mixture, else None."""
    weights = {name: float(spec.weight) for name, spec in dict(data_cfg.sources).items()}
    if not any(w > 0 for w in weights.values()):
        return None
    if any(w <= 0 for w in weights.values()):
        raise DataError(f"data.sources: either every source has a weight > 0 or none does, got {weights}")
    return weights
