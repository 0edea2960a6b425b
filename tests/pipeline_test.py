"""Tokenising splits: the length policy, drop counts, the cache and parallel tokenisation."""

import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from configs import tiny
from data_pipeline import pipeline
from data_pipeline.templating import encode_messages
from tests.cli_test import ROOT
from tests.templating_test import TEMPLATE_WITH_BOS, word_tokenizer


def cfg(**kw):
    c = tiny.get_config().data
    c.template = "tokenizer"
    c.update(kw)
    return c


def row(*turns):
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": r, "content": t} for r, t in zip(roles, turns)], "source": "s",
            "task": "t", "loc": "f.jsonl:1"}


# A chat template that refuses a system role, as Gemma's does.
REFUSES_SYSTEM = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def with_system(r):
    """``r`` with a system message first (which ``REFUSES_SYSTEM`` refuses)."""
    return {**r, "messages": [{"role": "system", "content": "sort"}] + r["messages"]}


@pytest.fixture
def tok():
    return word_tokenizer(TEMPLATE_WITH_BOS)


def test_fitting_rows_are_untouched_and_long_ones_dropped_and_counted(tok):
    rows = [row("reverse abc", "cba"), row("reverse abc abc abc abc", "cba")]
    exs, rep = pipeline.tokenize_split(cfg(max_length=7, length_policy="drop"), tok, rows)
    #  <s> <|user|> reverse abc <|end|> <|assistant|> cba <|end|>
    assert [e.ids.tolist() for e in exs] == [[1, 3, 5, 6, 2, 4, 7, 2]]
    assert rep.rows == 2 and rep.kept == 1 and rep.dropped == {"longer than data.max_length=7": 1}


def test_truncate_cuts_the_prompt_from_the_left_and_keeps_bos_and_completion(tok):
    rows = [row("reverse abc abc abc abc", "cba")]  # 11 tokens, the model would see 10
    exs, rep = pipeline.tokenize_split(cfg(max_length=6, length_policy="truncate"), tok, rows)
    assert exs[0].ids.tolist() == [1, 6, 6, 2, 4, 7, 2]
    assert exs[0].loss_mask.tolist() == [0, 0, 0, 0, 0, 1, 1]
    assert rep.truncated == {"prompt cut from the left": 1}


def test_truncate_drops_oldest_turns_first(tok):
    rows = [row("sort bca", "abc", "reverse abc", "cba")]  # 15 tokens
    exs, rep = pipeline.tokenize_split(cfg(max_length=9, length_policy="truncate"), tok, rows)
    assert exs[0].ids.tolist() == [1, 3, 5, 6, 2, 4, 7, 2]  # only the last exchange is left
    assert exs[0].loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert rep.truncated == {"oldest turns dropped": 1}


def test_rows_that_cannot_be_fixed_are_dropped_with_a_reason(tok):
    rows = [row("reverse", "abc cba abc cba abc cba")]  # the completion alone is too long
    exs, rep = pipeline.tokenize_split(cfg(max_length=5, length_policy="truncate"), tok, rows)
    assert exs == [] and rep.dropped == {"completion alone longer than data.max_length=5": 1}


def test_cache_hits_on_same_inputs_and_misses_on_changed_settings(tok, tmp_path):
    rows = [row("reverse abc", "cba"), row("sort bca", "abc")]
    c = cfg(max_length=8, cache=True, cache_dir=str(tmp_path))
    a, rep_a = pipeline.tokenize_split(c, tok, rows)
    b, rep_b = pipeline.tokenize_split(c, tok, rows)
    assert not rep_a.cached and rep_b.cached
    assert [e.ids.tolist() for e in a] == [e.ids.tolist() for e in b]
    assert [e.loss_mask.tolist() for e in a] == [e.loss_mask.tolist() for e in b]
    _, rep_c = pipeline.tokenize_split(cfg(max_length=9, cache=True, cache_dir=str(tmp_path)), tok, rows)
    _, rep_d = pipeline.tokenize_split(c, tok, rows[:1])
    assert not rep_c.cached and not rep_d.cached


def test_parallel_tokenisation_equals_serial(tok):
    rows = [row("reverse abc", "cba"), row("sort bca", "abc")] * 300
    serial, _ = pipeline.tokenize_split(cfg(max_length=8), tok, rows)
    parallel, _ = pipeline.tokenize_split(cfg(max_length=8, num_proc=2), tok, rows)
    assert len(serial) == len(parallel) == 600
    assert all(np.array_equal(a.ids, b.ids) and np.array_equal(a.loss_mask, b.loss_mask)
               for a, b in zip(serial, parallel))


def test_a_small_split_encoded_in_process_equals_datasets_map(tok, monkeypatch):
    """Below ``IN_PROCESS_ROWS`` a split is encoded without ``datasets``: the same examples, statuses and
    counts as its map gives, for rows that fit, are truncated (turns, prompt), dropped or refused."""
    tok.chat_template = REFUSES_SYSTEM
    rows = [row("reverse abc", "cba"), row("sort bca", "abc", "reverse abc", "cba"),
            with_system(row("sort abc", "abc")), row("reverse abc abc abc abc abc abc", "cba"),
            row("reverse", " ".join(["abc cba"] * 5)),
            row("reverse abc")] * 300  # 1,800 rows: several 256-row batches
    c = cfg(max_length=9, length_policy="truncate", on_bad_row="skip")
    here, rep_here = pipeline.tokenize_split(c, tok, rows)
    monkeypatch.setattr(pipeline, "IN_PROCESS_ROWS", 0)
    mapped, rep_mapped = pipeline.tokenize_split(c, tok, rows)
    assert len(here) == len(mapped) == 900
    assert all(a.ids.dtype == b.ids.dtype and a.loss_mask.dtype == b.loss_mask.dtype for a, b in zip(here, mapped))
    assert all(np.array_equal(a.ids, b.ids) and np.array_equal(a.loss_mask, b.loss_mask)
               for a, b in zip(here, mapped))
    assert rep_here == rep_mapped
    assert rep_here.dropped == {"template error": 300, "completion alone longer than data.max_length=9": 300,
                                "no supervised token": 300}
    assert rep_here.truncated == {"oldest turns dropped": 300, "prompt cut from the left": 300}


def test_a_small_split_does_not_import_datasets():
    """``datasets`` (pandas, pyarrow.dataset) took 2.7 s of a tiny run's start: a small split, the usual
    run's, is tokenised without importing it."""
    code = ("import sys; from tests.pipeline_test import cfg, row, word_tokenizer, TEMPLATE_WITH_BOS; "
            "from data_pipeline import pipeline; "
            "exs, _ = pipeline.tokenize_split(cfg(max_length=8), word_tokenizer(TEMPLATE_WITH_BOS), "
            "[row('reverse abc', 'cba')] * 1000); "
            "assert len(exs) == 1000; print(sorted(m for m in ('datasets', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]", out.stdout


def test_a_row_the_template_refuses_is_a_bad_row(tok):
    """A chat template that raises for some conversations (Gemma's refuses a system role): an error
    naming the row, or with on_bad_row=skip a counted drop -- never the whole run stopped."""
    tok.chat_template = REFUSES_SYSTEM
    good = row("reverse abc", "cba")
    bad = with_system({**row("sort abc", "abc"), "loc": "f.jsonl:7"})
    with pytest.raises(pipeline.DataError, match="f.jsonl:7: .*System role not supported"):
        pipeline.tokenize_split(cfg(max_length=16), tok, [good, bad])
    exs, rep = pipeline.tokenize_split(cfg(max_length=16, on_bad_row="skip"), tok, [good, bad])
    assert len(exs) == 1 and rep.dropped == {"template error": 1}
    with pytest.raises(pipeline.DataError, match="every one of the 1 rows of the train split"):
        pipeline.tokenize(cfg(max_length=16, on_bad_row="skip"), tok, {"train": [bad]})


def test_data_benchmark_smoke(tmp_path, capsys):
    """The throughput benchmark runs every stage (a smoke run: speed is printed, never asserted)."""
    from configs import demo  # noqa: PLC0415
    from data_pipeline.benchmark import run  # noqa: PLC0415
    result = run(demo.get_config(), rows=3000, max_length=64)
    assert result["rows"] == 3000 and result["batches"] > 0
    assert set(result["rows_per_s"]) == {"read", "tokenizer", "template+tokenise", "pack+batches"}
    assert "rows/s" in capsys.readouterr().out
    assert not os.path.exists(result["file"])  # the generated data is removed afterwards
    long = run(demo.get_config(), conversations=60, max_length=2048)  # ~200-2,000-token chat rows
    assert long["rows"] == 60 and long["train_tokens"] > 60 * 150
    assert "peak memory" in capsys.readouterr().out
    if os.path.exists("/proc/self/status"):
        assert long["peak_anon_gb"] > 0


def test_a_split_is_three_flat_memory_mapped_arrays_equal_to_encoding_each_row_alone(tok, tmp_path):
    """A million-row split must not sit in RAM: its tokens are views into memory-mapped files (int32
    ids, int8 mask), and nothing else of the tokenisation (the Arrow copies) stays on disk."""
    rows = [row("reverse abc", "cba"), row("reverse abc abc abc abc", "cba"), row("sort bca", "abc")]
    c = cfg(max_length=7, length_policy="drop", cache=True, cache_dir=str(tmp_path))
    exs, rep = pipeline.tokenize_split(c, tok, rows)
    (entry,) = os.listdir(tmp_path)
    assert sorted(os.listdir(tmp_path / entry)) == ["ids.npy", "loss_mask.npy", "offsets.npy", "statuses.json"]
    assert all(isinstance(e.ids, np.memmap) and isinstance(e.loss_mask, np.memmap) for e in exs)
    assert {e.ids.dtype for e in exs} == {np.dtype(np.int32)}
    assert {e.loss_mask.dtype for e in exs} == {np.dtype(np.int8)}
    t = pipeline.template_for(c, tok)
    for r, e in zip([rows[0], rows[2]], exs, strict=True):
        ids, mask = encode_messages(tok, r["messages"], template=t)
        assert e.ids.tolist() == ids.tolist() and e.loss_mask.tolist() == mask.tolist()
    assert rep.dropped == {"longer than data.max_length=7": 1}
    assert rep.supervised_tokens == sum(int(e.loss_mask[1:].sum()) for e in exs) == 4
    assert rep.lengths == [len(e.ids) - 1 for e in exs]


def test_without_the_cache_the_mapped_files_leave_nothing_behind(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    exs, _ = pipeline.tokenize_split(cfg(max_length=8, cache=False), tok, [row("reverse abc", "cba")])
    assert os.listdir(tmp_path) == []
    assert exs[0].ids.tolist() == [1, 3, 5, 6, 2, 4, 7, 2]  # still readable: the mapping keeps the file


def test_automatic_workers_are_forked_only_from_a_small_process_without_jax(monkeypatch):
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415
    monkeypatch.delitem(sys.modules, "jax._src.xla_bridge", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setattr(pipeline, "anon_gb", lambda: 0.5)
    assert pipeline._auto_num_proc(200_000) == 5 and pipeline._auto_num_proc(10_000) == 1
    monkeypatch.setattr(pipeline, "anon_gb", lambda: 13.0)  # a million long rows held: in-process
    assert pipeline._auto_num_proc(1_000_000) == 1
    monkeypatch.setattr(pipeline, "anon_gb", lambda: 0.5)
    monkeypatch.setitem(sys.modules, "jax._src.xla_bridge", types.SimpleNamespace(_backends={"cpu": 0}))
    assert pipeline._auto_num_proc(1_000_000) == 1
    assert 0 < pipeline.anon_gb() < 64  # this test process, read from /proc (Linux)
