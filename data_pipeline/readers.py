"""Reading a source's records with their locations: JSONL and JSON parsed here line by line (an error,
or a counted skip, names the file and line), CSV with the csv module, Parquet, ``save_to_disk``
directories and Hub datasets through ``datasets``."""

from __future__ import annotations

import glob as glob_lib
import json
import os
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

from data_pipeline.errors import BadRows, DataError
from data_pipeline.source_spec import (
    FILE_FORMATS,
    SOURCE_TYPES,
    SPLIT_ALIASES,
    SPLITS,
    SourceReport,
)


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


def source_records(name: str, spec: Any, bad: BadRows, max_row_bytes: int, report: SourceReport
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
                out[split] += [(w, r, path) for w, r in with_progress(
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


def with_progress(items, desc: str):
    """A rows/s progress bar that appears only if the stage is still running after 3 seconds."""
    from tqdm.auto import tqdm  # noqa: PLC0415
    return tqdm(items, desc=desc, unit="row", delay=3, leave=False, dynamic_ncols=True)
