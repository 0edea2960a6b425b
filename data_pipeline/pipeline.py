"""Rows -> tokenised examples, with the length policy, a cache, and a report of everything dropped.

    rows, source_reports = sources.build_splits(data_cfg)  # read, map, split
    tok = tokenizer.build_tokenizer(tok_cfg, ...)     # or the run's saved tokenizer
    data = tokenize(data_cfg, tok, rows)              # this module

Tokenisation is batched (one fast-tokenizer call per 256 rows) and cached on disk under a key made of
the rows' content, the tokenizer, the template and the length settings: a second run with the same
inputs loads it. A split of ``IN_PROCESS_ROWS`` rows or more, or one split over worker processes
(``data.num_proc``), runs through ``datasets.Dataset.map``; a smaller one is encoded in this process, by
the same function, into the same files (below).

No large split's tokens are held in RAM: its rows go to disk as Arrow in 10k-row pieces, the map
writes Arrow files, and those become three flat arrays (``ids.npy`` int32, ``loss_mask.npy`` int8,
``offsets.npy``) that are memory-mapped; every example is a view into them. A million-row mix of
~1,000-token conversations is ~5.5 GB of tokens, read from the page cache as batches need them.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from data_pipeline import sources
from data_pipeline.errors import DataError
from data_pipeline.loader import Example
from data_pipeline.templating import (
    Template,
    TemplateError,
    encode_messages,
    plan,
    tokenize_plans,
)
from data_pipeline.user_cache import user_cache_dir

CACHE_VERSION = "2"  # bump when tokenisation or the cache's files change meaning
LENGTH_POLICIES = ("drop", "truncate")


@dataclasses.dataclass
class TokenizeReport:
    """What happened to the rows of one split: nothing is dropped without being counted here."""

    rows: int = 0
    kept: int = 0
    dropped: Counter = dataclasses.field(default_factory=Counter)
    truncated: Counter = dataclasses.field(default_factory=Counter)
    supervised_tokens: int = 0
    lengths: list[int] = dataclasses.field(default_factory=list)  # model tokens per kept example
    cached: bool = False

    @property
    def max_len(self) -> int:
        return max(self.lengths, default=0)

    def length_stats(self) -> dict[str, int]:
        if not self.lengths:
            return {"p50": 0, "p95": 0, "max": 0}
        p50, p95 = np.percentile(self.lengths, [50, 95])
        return {"p50": int(p50), "p95": int(p95), "max": int(max(self.lengths))}

    def summary(self) -> str:
        drops = ", ".join(f"{n} {why}" for why, n in sorted(self.dropped.items())) or "none"
        trunc = sum(self.truncated.values())
        s = self.length_stats()
        return (f"{self.kept}/{self.rows} rows kept (dropped: {drops}; truncated: {trunc}); "
                f"tokens p50 {s['p50']} p95 {s['p95']} max {s['max']}")

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "kept": self.kept, "dropped": dict(self.dropped),
                "truncated": dict(self.truncated), "supervised_tokens": self.supervised_tokens,
                **{f"length_{k}": v for k, v in self.length_stats().items()}}


@dataclasses.dataclass
class Data:
    rows: dict[str, list[dict[str, Any]]]
    examples: dict[str, list[Example]]
    reports: dict[str, TokenizeReport]
    source_reports: list[sources.SourceReport] = dataclasses.field(default_factory=list)


def template_for(data_cfg: Any, tok: PreTrainedTokenizerBase) -> Template:
    return Template.create(tok, data_cfg.template, data_cfg.end_of_turn, data_cfg.loss_on,
                           data_cfg.allow_special_tokens_in_text)


# ---------------------------------------------------------------------------------------------
# Length policy
# ---------------------------------------------------------------------------------------------

def fit_length(tok: PreTrainedTokenizerBase, t: Template, messages: list[dict[str, str]],
               ids: np.ndarray, mask: np.ndarray, max_length: int, policy: str
               ) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Applies the length policy to one encoded conversation.

    The model sees ``len(ids) - 1`` tokens (inputs and targets are shifted), so a row fits when
    ``len(ids) <= max_length + 1``. ``truncate`` first drops the oldest user/assistant exchanges
    (keeping a system message), then cuts the prompt from the left (keeping BOS); the supervised
    completion is never cut.

    Returns:
      ``(ids, mask, "")`` if it fit; ``(ids, mask, why)`` if truncated; ``(None, None, why)`` if dropped.
    """
    if len(ids) <= max_length + 1:
        return ids, mask, ""
    if policy == "drop":
        return None, None, f"longer than data.max_length={max_length}"
    why = ""
    start = 1 if messages[0]["role"] == "system" else 0
    while len(ids) > max_length + 1:
        users = [j for j in range(start, len(messages)) if messages[j]["role"] == "user"]
        if len(users) < 2:
            break
        messages = messages[:start] + messages[users[1]:]
        ids, mask = encode_messages(tok, messages, template=t)
        why = "oldest turns dropped"
    if len(ids) > max_length + 1:
        first = int(np.argmax(mask > 0))
        bos = int(t.bos_id is not None and ids[0] == t.bos_id)
        keep = max_length + 1 - (len(ids) - first) - bos
        if keep < 1:
            return None, None, f"completion alone longer than data.max_length={max_length}"
        ids = np.concatenate([ids[:bos], ids[first - keep:]])
        mask = np.concatenate([mask[:bos], mask[first - keep:]])
        why = "prompt cut from the left"
    return ids, mask, why


# ---------------------------------------------------------------------------------------------
# Tokenising a split (batched, parallel, cached)
# ---------------------------------------------------------------------------------------------

def _encode_batch(batch: dict[str, list], tok, t: Template, max_length: int, policy: str,
                  on_bad_row: str = "error") -> dict[str, list]:
    """``datasets.Dataset.map``'s function: the rows' messages arrive as JSON text."""
    return _encode_rows([json.loads(s) for s in batch["messages"]], batch["loc"], tok, t, max_length, policy,
                        on_bad_row)


def _encode_rows(convs: list[list[dict[str, Any]]], locs: list[str], tok, t: Template, max_length: int,
                 policy: str, on_bad_row: str = "error") -> dict[str, list]:
    """One batch of conversations -> ``{"ids", "loss_mask", "status"}``, a list entry per row."""
    plans, failed = [], {}
    for i, (msgs, loc) in enumerate(zip(convs, locs)):
        try:
            plans.append(plan(tok, t, msgs))
        except TemplateError as e:  # a row the template cannot render: a bad row like any other
            if on_bad_row == "error":
                raise DataError(f"{loc}: {e} (set data.on_bad_row=skip to skip and count such rows)"
                                ) from None
            failed[i] = "template error"
            plans.append([])
    out: dict[str, list] = {"ids": [], "loss_mask": [], "status": []}
    for i, (msgs, (ids, mask)) in enumerate(zip(convs, tokenize_plans(tok, t, plans))):
        if i in failed:
            out["ids"].append(_EMPTY)
            out["loss_mask"].append(_EMPTY)
            out["status"].append("dropped: " + failed[i])
            continue
        ids, mask, why = fit_length(tok, t, msgs, ids, mask, max_length, policy)
        if ids is not None and mask[1:].sum() == 0:
            ids, mask, why = None, None, "no supervised token"
        status = ("dropped: " if ids is None else "truncated: " if why else "") + why
        out["ids"].append(_EMPTY if ids is None else ids)
        out["loss_mask"].append(_EMPTY if mask is None else mask)
        out["status"].append(status)
    return out


_EMPTY = np.zeros(0, np.int32)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    h = hashlib.sha256(tok.backend_tokenizer.to_str().encode())
    h.update(json.dumps([str(tok.special_tokens_map), tok.chat_template or ""]).encode())
    return h.hexdigest()


def cache_key(rows: list[dict[str, Any]], tok, t: Template, data_cfg: Any) -> str:
    h = hashlib.sha256()
    settings = [CACHE_VERSION, tokenizer_fingerprint(tok), t.chat_template or "", t.end_of_turn,
                t.loss_on, t.allow_special_tokens_in_text, data_cfg.max_length,
                data_cfg.length_policy]
    h.update(json.dumps(settings).encode())
    for r in rows:
        h.update(json.dumps([r["messages"], r["source"], r["task"]], ensure_ascii=False).encode())
    return h.hexdigest()[:24]


def _cache_dir(data_cfg: Any) -> str:
    return os.path.expanduser(data_cfg.cache_dir) if data_cfg.cache_dir else user_cache_dir("tokenized")


def tokenize_split(data_cfg: Any, tok: PreTrainedTokenizerBase, rows: list[dict[str, Any]]
                   ) -> tuple[list[Example], TokenizeReport]:
    """Encodes one split's rows (see module docstring); drops and counts what cannot be used."""
    if data_cfg.length_policy not in LENGTH_POLICIES:
        raise DataError(f"data.length_policy must be one of {LENGTH_POLICIES}, got "
                        f"{data_cfg.length_policy!r}")
    t = template_for(data_cfg, tok)
    report = TokenizeReport(rows=len(rows))
    if not rows:
        return [], report
    key = cache_key(rows, tok, t, data_cfg)
    path = os.path.join(_cache_dir(data_cfg), key) if data_cfg.cache else ""
    if path and os.path.exists(os.path.join(path, "offsets.npy")):
        report.cached = True
        ids_all, mask_all, offsets, statuses = _load_flat(path)
    elif path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        _encode_to_disk(data_cfg, tok, t, rows, key, tmp)
        if os.path.exists(path):  # another process got there first
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, path)  # a crash never leaves a half-written cache
        ids_all, mask_all, offsets, statuses = _load_flat(path)
    else:  # no cache: the same files in a temporary directory, removed once mapped (POSIX keeps them)
        tmp = tempfile.mkdtemp(prefix="flax_ift_tokens_")
        try:
            _encode_to_disk(data_cfg, tok, t, rows, key, tmp)
            ids_all, mask_all, offsets, statuses = _load_flat(tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    examples = []
    for i, r in enumerate(rows):
        status = statuses.get(i, "")
        if status.startswith("dropped: "):
            report.dropped[status[len("dropped: "):]] += 1
            continue
        if status:
            report.truncated[status[len("truncated: "):]] += 1
        a, b = int(offsets[i]), int(offsets[i + 1])
        examples.append(Example(ids_all[a:b], mask_all[a:b], {"source": r["source"], "task": r["task"]}))
        report.lengths.append(b - a - 1)
    report.kept = len(examples)
    # Supervised tokens: every mask value but each example's first (targets are ids[1:]); a dropped
    # row has no tokens, so the whole array is the kept examples'.
    firsts = offsets[:-1][np.diff(offsets) > 0]
    report.supervised_tokens = int(mask_all.sum(dtype=np.int64) - mask_all[firsts].sum(dtype=np.int64))
    return examples, report


def _features():
    import datasets  # noqa: PLC0415 (slow import)
    return datasets.Features({"ids": datasets.List(datasets.Value("int32")),
                              "loss_mask": datasets.List(datasets.Value("int8")),
                              "status": datasets.Value("string")})


# A split of fewer rows, tokenised in one process, is encoded without ``datasets``: its import (pandas,
# pyarrow.dataset; 2.7 s under ``python -X importtime``) cost more than tokenising a few thousand rows,
# and its map's Arrow files and fingerprints buy nothing at that size. A 4-step tiny run with warm
# compiled programs started 0.5-1.5 s sooner without it (README, "Tests"). Such a split takes seconds,
# so it shows no progress bar either way.
IN_PROCESS_ROWS = 20_000
_MAP_BATCH = 256  # rows per tokenizer call, on either path (the fast tokenizer encodes a batch in one call)


def _encode_to_disk(data_cfg: Any, tok, t: Template, rows: list[dict[str, Any]], key: str, out: str
                    ) -> None:
    """Tokenises ``rows`` into ``out``/{ids,loss_mask,offsets}.npy + statuses.json (see module doc)."""
    os.makedirs(out, exist_ok=True)
    num_proc = data_cfg.num_proc or _auto_num_proc(len(rows))
    kwargs = dict(tok=tok, t=t, max_length=data_cfg.max_length, policy=data_cfg.length_policy,
                  on_bad_row=data_cfg.on_bad_row)
    if num_proc == 1 and len(rows) < IN_PROCESS_ROWS:
        _encode_in_process(rows, kwargs, out)
    else:
        _encode_with_datasets(rows, kwargs, num_proc, key, out)


def _encode_in_process(rows: list[dict[str, Any]], kwargs: dict[str, Any], out: str) -> None:
    """The rows encoded by ``_encode_rows`` in the map's batches and written by ``_save_flat``, as the
    map's are. Each batch is kept as one int32 and one int8 array (5 bytes a token, as on disk) until
    the write."""
    lengths, statuses = [], []
    pieces: dict[str, list[np.ndarray]] = {"ids": [], "loss_mask": []}
    for a in range(0, len(rows), _MAP_BATCH):
        piece = rows[a:a + _MAP_BATCH]
        encoded = _encode_rows([r["messages"] for r in piece], [r["loc"] for r in piece], **kwargs)
        lengths.extend(len(x) for x in encoded["ids"])
        statuses.extend(encoded["status"])
        for name, dtype in (("ids", np.int32), ("loss_mask", np.int8)):
            pieces[name].append(np.concatenate(encoded[name]).astype(dtype, copy=False))
    _save_flat(out, np.array(lengths, np.int64), {name: lambda name=name: pieces[name] for name in pieces},
               statuses)


def _encode_with_datasets(rows: list[dict[str, Any]], kwargs: dict[str, Any], num_proc: int, key: str,
                          out: str) -> None:
    """``datasets.Dataset.map`` over the rows written to disk as Arrow, in ``num_proc`` forked workers
    (1: this process), with a progress bar from ``IN_PROCESS_ROWS`` rows on."""
    import datasets  # noqa: PLC0415 (slow import)
    from datasets.arrow_writer import ArrowWriter  # noqa: PLC0415
    source = os.path.join(out, "rows.arrow")
    with ArrowWriter(path=source, features=datasets.Features(
            {"messages": datasets.Value("string"), "loc": datasets.Value("string")})) as writer:
        for a in range(0, len(rows), 10_000):
            piece = rows[a:a + 10_000]
            writer.write_batch({"messages": [json.dumps(r["messages"], ensure_ascii=False) for r in piece],
                                "loc": [r["loc"] for r in piece]})
        writer.finalize()
    table = datasets.Dataset.from_file(source)
    # A progress bar (rows/s) for the splits that take more than a few seconds.
    (datasets.enable_progress_bars if len(rows) >= IN_PROCESS_ROWS else datasets.disable_progress_bars)()
    # Forked workers (data.num_proc > 1) inherit every row as Python objects (~12 GB for a million
    # long conversations); frozen, a worker's cyclic GC never walks them (nor copies their pages).
    gc.freeze()
    try:
        encoded = table.map(_encode_batch, batched=True, batch_size=_MAP_BATCH, desc="templating + tokenising",
                            num_proc=num_proc if num_proc > 1 else None, features=_features(),
                            remove_columns=["messages", "loc"], new_fingerprint=key,
                            cache_file_name=os.path.join(out, "encoded.arrow"), fn_kwargs=kwargs)
    finally:
        gc.unfreeze()
    _write_flat(encoded.data.table, out)
    del table, encoded
    for name in os.listdir(out):
        if name.endswith(".arrow"):
            os.remove(os.path.join(out, name))


def _write_flat(table, out: str) -> None:
    """The map's Arrow ``ids``/``loss_mask`` list columns -> flat .npy files, one Arrow chunk at a time."""
    ids = table.column("ids")
    lengths = np.concatenate([np.diff(c.offsets.to_numpy()) for c in ids.chunks] or [np.zeros(0, np.int64)])
    # (flatten honours slices)
    chunks = {name: lambda name=name: (c.flatten().to_numpy(zero_copy_only=False)
                                       for c in table.column(name).chunks) for name in ("ids", "loss_mask")}
    _save_flat(out, lengths, chunks, table.column("status").to_pylist())


def _save_flat(out: str, lengths: np.ndarray, pieces: dict[str, Callable[[], Iterable[np.ndarray]]],
               statuses: list[str]) -> None:
    """Writes ``offsets.npy`` (from the rows' ``lengths``), ``ids.npy`` (int32) and ``loss_mask.npy``
    (int8), each filled from ``pieces[name]()`` (the rows' values in order, in pieces of any size), and
    ``statuses.json`` (the rows with a status)."""
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    np.save(os.path.join(out, "offsets.npy"), offsets)
    for name, dtype in (("ids", np.int32), ("loss_mask", np.int8)):
        flat = np.lib.format.open_memmap(os.path.join(out, f"{name}.npy"), "w+", dtype, (int(offsets[-1]),))
        at = 0
        for values in pieces[name]():
            flat[at:at + len(values)] = values
            at += len(values)
        assert at == len(flat), (name, at, len(flat))
        flat.flush()
        del flat
    with open(os.path.join(out, "statuses.json"), "w") as f:
        json.dump({i: s for i, s in enumerate(statuses) if s}, f)


def _load_flat(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, str]]:
    with open(os.path.join(path, "statuses.json")) as f:
        statuses = {int(i): s for i, s in json.load(f).items()}
    return (np.load(os.path.join(path, "ids.npy"), mmap_mode="r"),
            np.load(os.path.join(path, "loss_mask.npy"), mmap_mode="r"),
            np.load(os.path.join(path, "offsets.npy")), statuses)


def _auto_num_proc(rows: int) -> int:
    """Forked workers, one per 50k rows up to the CPU count, while this process is small; else 1.

    Short rows are bound by Python (templating, the length policy), which workers split: the README's
    200k short rows ran 11,780 rows/s in 2 workers. Long rows are bound by the Rust tokenizer, which
    already encodes each batch on every core in the process, and workers forked from a large process
    are slow: with a million long conversations held (13 GB), 8,000 of them ran 312 rows/s in 2
    workers against 510 in the process. Never once a JAX backend runs in this process (``datasets``
    forks, and forking JAX's threads can deadlock), so inside ``trainer.train`` it is 1 unless
    ``data.num_proc`` says otherwise."""
    bridge = sys.modules.get("jax._src.xla_bridge")  # (grain imports jax; a backend means threads)
    if bridge is not None and getattr(bridge, "_backends", True):  # unknown layout: do not fork
        return 1
    if anon_gb() > 2.0:
        return 1
    return min(os.cpu_count() or 1, 1 + rows // 50_000)


def anon_gb(pid: int | str = "self") -> float:
    """A process's anonymous memory (what a forked worker inherits); 0 where /proc is missing."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:")) / 2**20
    except (OSError, StopIteration):
        return 0.0


def tokenize(data_cfg: Any, tok: PreTrainedTokenizerBase, rows: dict[str, list[dict[str, Any]]],
             source_reports: list[sources.SourceReport] | None = None, seed: int = 0) -> Data:
    """Tokenises every split; a weighted mixture (``data.sources.*.weight``) is then drawn from the
    train *examples*, after the length policy, so each source's share of the training examples is its
    weight's share even when one source loses more rows to ``data.max_length`` than another."""
    examples, reports = {}, {}
    for split, split_rows in rows.items():
        examples[split], reports[split] = tokenize_split(data_cfg, tok, split_rows)
        rep = reports[split]
        if rep.rows and not rep.kept:  # in every mode: nothing usable left is a mistake, not data
            raise DataError(f"data: every one of the {rep.rows} rows of the {split} split was dropped "
                            f"({', '.join(f'{n} {why}' for why, n in sorted(rep.dropped.items()))}); "
                            "python -m data_pipeline.inspect shows examples")
    weights = sources.mixture_weights(data_cfg)
    if weights and examples.get("train"):
        by_source: dict[str, list[Example]] = {name: [] for name in weights}
        for ex in examples["train"]:
            by_source[ex.meta["source"]].append(ex)
        total = data_cfg.mixture_rows or sum(len(v) for v in by_source.values())
        mixed = sources.mix(by_source, weights, total, seed)
        examples["train"] = [ex for name in weights for ex in mixed[name]]
        for rep in source_reports or []:
            rep.mixture_rows = len(mixed.get(rep.name, []))
    return Data(rows, examples, reports, source_reports or [])
