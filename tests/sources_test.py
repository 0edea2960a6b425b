"""Reading, field mapping, splits, de-duplication, mixtures and bad input (file:line errors)."""

import json
import os
import time

import datasets
import pytest
from ml_collections import ConfigDict

from configs import tiny
from data_pipeline import sources
from data_pipeline.errors import DataError
from data_pipeline.sources import build_splits, read_source, source

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def rows_pc(n, start=0):
    return [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(start, start + n)]


def write_jsonl(path, recs):
    with open(path, "w") as f:
        for r in recs:
            f.write(json.dumps(r) + "\n")
    return str(path)


def data_cfg(**srcs):
    c = tiny.get_config().data
    c.sources = ConfigDict(srcs)
    return c


def texts(rows):
    return [(r["messages"][-2]["content"], r["messages"][-1]["content"]) for r in rows]


def read(spec, on_bad_row="error"):
    out, report = read_source("s", spec, on_bad_row, 1_000_000)
    return out, report


# ---- formats ----------------------------------------------------------------------------------

def test_all_file_formats_read_the_same_rows(tmp_path):
    recs = rows_pc(5)
    paths = {"jsonl": write_jsonl(tmp_path / "a.jsonl", recs)}
    paths["json"] = str(tmp_path / "a.json")
    with open(paths["json"], "w") as f:
        json.dump(recs, f, indent=1)
    ds = datasets.Dataset.from_list(recs)
    paths["csv"], paths["parquet"] = str(tmp_path / "a.csv"), str(tmp_path / "a.parquet")
    ds.to_csv(paths["csv"], index=False)
    ds.to_parquet(paths["parquet"])
    paths["disk"] = str(tmp_path / "disk")
    ds.save_to_disk(paths["disk"])
    expected = [(r["prompt"], r["completion"]) for r in recs]
    for kind, path in paths.items():
        spec = source(type="disk" if kind == "disk" else "files", path=path)
        out, _ = read(spec)
        assert texts(out[""]) == expected, kind
    with open(tmp_path / "cols.json", "w") as f:  # JSON as columns, and {"data": [records]}
        json.dump({"prompt": [r["prompt"] for r in recs], "completion": [r["completion"] for r in recs]}, f)
    with open(tmp_path / "wrapped.json", "w") as f:
        json.dump({"data": recs}, f)
    for name in ("cols.json", "wrapped.json"):
        assert texts(read(source(path=str(tmp_path / name)))[0][""]) == expected


def test_glob_reads_every_file_and_task_from_file(tmp_path):
    write_jsonl(tmp_path / "t_one.jsonl", rows_pc(3))
    write_jsonl(tmp_path / "t_two.jsonl", rows_pc(2, 10))
    out, rep = read(source(path=str(tmp_path / "t_*.jsonl"), task_from="file"))
    assert len(rep.files) == 2 and len(out[""]) == 5
    assert [r["task"] for r in out[""]] == ["t_one"] * 3 + ["t_two"] * 2
    assert out[""][3]["loc"].endswith("t_two.jsonl:1")


def test_field_mapping_alpaca_messages_and_suffix(tmp_path):
    p = write_jsonl(tmp_path / "g.jsonl", [{"question": "q?", "answer": "a<|endoftext|>"}])
    out, _ = read(source(path=p, fields={"prompt": "question", "completion": "answer"},
                         strip_suffix="<|endoftext|>"))
    assert texts(out[""]) == [("q?", "a")]
    p = write_jsonl(tmp_path / "al.jsonl", [{"instruction": "Sum", "input": "1 2", "output": "3"},
                                             {"instruction": "Hi", "output": "Hello"}])
    out, _ = read(source(path=p, format="alpaca"))
    assert out[""][0]["messages"][0] == {"role": "user", "content": "Sum\n\n1 2", "instruction": "Sum",
                                         "input": "1 2"}
    assert out[""][1]["messages"][0]["input"] == ""
    conv = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"},
            {"from": "human", "value": "again"}]  # a trailing unanswered turn is dropped
    p = write_jsonl(tmp_path / "m.jsonl", [{"conversations": conv}])
    out, _ = read(source(path=p, format="messages", system="Be brief.",
                         fields={"messages": "conversations", "role": "from", "content": "value"}))
    assert out[""][0]["messages"] == [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "yo"}]


def test_hub_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="offline"):
        read(source(type="hub", path="openai/gsm8k"))


def test_hub_unreachable_fails_in_seconds_not_after_retries(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    t0 = time.perf_counter()
    with pytest.raises(DataError, match="cannot reach 127.0.0.1"):
        read(source(type="hub", path="openai/gsm8k"))
    assert time.perf_counter() - t0 < 10


# ---- bad input ----------------------------------------------------------------------------------

BAD_CASES = {  # name -> (file bytes, expected line, message fragment, skip reason)
    "malformed_json": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", \n', 2, "malformed JSON",
                       "malformed JSON"),
    "missing_field": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a"}\n', 2,
                      "missing field 'completion'", "missing field 'completion'"),
    "non_string": (b'{"prompt": "a", "completion": "b"}\n{"prompt": 7, "completion": "b"}\n', 2,
                   "field 'prompt' is int, not a string", "non-string field 'prompt'"),
    "empty_completion": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "a", "completion": "  "}\n',
                         2, "field 'completion' is empty", "empty field 'completion'"),
    "not_utf8": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "\xff\xfe", "completion": "b"}\n', 2,
                 "not valid UTF-8", "not UTF-8"),
    "huge_line": (b'{"prompt": "a", "completion": "b"}\n{"prompt": "' + b"x" * 10_000_000
                  + b'", "completion": "b"}\n', 2, "10.0 MB", "line over data.max_row_bytes"),
    "not_object": (b'{"prompt": "a", "completion": "b"}\n[1, 2]\n', 2, "expected an object",
                   "not an object"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_rows_error_names_file_and_line_or_are_skipped_and_counted(tmp_path, case):
    content, line, fragment, reason = BAD_CASES[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(content)
    spec = source(path=str(path))
    with pytest.raises(DataError) as e:
        read(spec)
    assert f"{path}:{line}: " in str(e.value) and fragment in str(e.value)
    assert "on_bad_row=skip" in str(e.value)
    out, rep = read(spec, on_bad_row="skip")
    assert len(out[""]) == 1 and rep.bad.counts == {reason: 1} and rep.bad.total == 1


def test_empty_file_and_missing_file(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=f"{empty}: file is empty"):
        read(source(path=str(empty)))
    with pytest.raises(DataError, match=r"no usable rows .*'empty file': 1"):  # skip mode too
        read(source(path=str(empty)), on_bad_row="skip")
    with pytest.raises(DataError, match="no file matches"):
        read(source(path=str(tmp_path / "nope*.jsonl")))


def test_bad_csv_names_the_file(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_bytes(b"prompt,completion\na,b\nc,d,e,f\n")
    with pytest.raises(DataError, match=f"{p}:3: 4 fields, the header has 2"):
        read(source(path=str(p)))


# ---- splits -------------------------------------------------------------------------------------

def test_hash_split_is_stable_when_the_dataset_grows_and_is_reordered(tmp_path):
    small = write_jsonl(tmp_path / "small.jsonl", rows_pc(300))
    big_rows = rows_pc(600)[::-1]
    big = write_jsonl(tmp_path / "big.jsonl", big_rows)
    split_of = {}
    for path in (small, big):
        splits, _ = build_splits(data_cfg(s=source(path=path)))
        for name, rs in splits.items():
            for r in rs:
                key = r["messages"][0]["content"]
                assert split_of.setdefault(key, name) == name  # same row, same split, both times
    sizes = {n: sum(v == n for v in split_of.values()) for n in FRACTIONS}
    assert 400 < sizes["train"] < 560 and sizes["validation"] > 30 and sizes["test"] > 30


def test_own_splits_are_used_and_missing_validation_is_carved_from_train(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", rows_pc(200))
    te = write_jsonl(tmp_path / "test.jsonl", rows_pc(30, 1000))
    splits, reps = build_splits(data_cfg(s=source(splits={"train": tr, "test": te})))
    assert texts(splits["test"]) == [(r["prompt"], r["completion"]) for r in rows_pc(30, 1000)]
    assert len(splits["train"]) + len(splits["validation"]) == 200 and 5 < len(splits["validation"]) < 40
    assert reps[0].rows == {"train": len(splits["train"]), "validation": len(splits["validation"]),
                            "test": 30}


def test_cross_split_duplicates_are_removed_from_eval_splits_and_counted(tmp_path):
    tr = write_jsonl(tmp_path / "train.jsonl", rows_pc(50))
    te = write_jsonl(tmp_path / "test.jsonl", rows_pc(5, 48) + rows_pc(3, 500))  # 2 in train too
    splits, reps = build_splits(data_cfg(s=source(splits={"train": tr, "test": te})))
    train = set(texts(splits["train"]))
    assert len(splits["test"]) == 6 and not train & set(texts(splits["test"]))
    assert reps[0].duplicates_removed["test"] == 2


def _tok():
    from data_pipeline.tokenizer import train_demo_tokenizer  # noqa: PLC0415
    convs = [[{"role": "user", "content": f"question {i} " + "word " * 30},
              {"role": "assistant", "content": f"answer {i}"}] for i in range(50)]
    return train_demo_tokenizer(convs, vocab_size=300, min_frequency=2)


def test_mixture_weights_and_source_names(tmp_path):
    from data_pipeline import pipeline  # noqa: PLC0415
    a = write_jsonl(tmp_path / "a.jsonl", rows_pc(400))
    b = write_jsonl(tmp_path / "b.jsonl", rows_pc(40, 1000))
    cfg = data_cfg(a=source(path=a, weight=1.0), b=source(path=b, weight=1.0))
    cfg.max_length = 64
    splits, reps = build_splits(cfg)
    train = pipeline.tokenize(cfg, _tok(), splits, reps).examples["train"]
    n_a = sum(ex.meta["source"] == "a" for ex in train)
    n_b = sum(ex.meta["source"] == "b" for ex in train)
    assert abs(n_a - n_b) <= 1 and n_a + n_b == sum(rep.rows["train"] for rep in reps)
    assert (reps[0].mixture_rows, reps[1].mixture_rows) == (n_a, n_b)
    assert {r["source"] for r in splits["test"]} == {"a", "b"}
    with pytest.raises(DataError, match="weight"):
        build_splits(data_cfg(a=source(path=a, weight=1.0), b=source(path=b)))


def test_mixture_weights_hold_after_length_filtering(tmp_path):
    """Source b's rows are half too long for max_length: with weights 1:1 the mixture still has as
    many b examples as a examples (weights applied to rows before the length drop gave b ~half)."""
    from data_pipeline import pipeline  # noqa: PLC0415
    a = write_jsonl(tmp_path / "a.jsonl", rows_pc(300))
    long_b = [{"prompt": f"question {i} " + ("word " * 40 if i % 2 else ""), "completion": f"answer {i}"}
              for i in range(1000, 1300)]
    b = write_jsonl(tmp_path / "b.jsonl", long_b)
    cfg = data_cfg(a=source(path=a, weight=1.0), b=source(path=b, weight=1.0))
    cfg.max_length, cfg.length_policy, cfg.mixture_rows = 24, "drop", 400
    splits, reps = build_splits(cfg)
    data = pipeline.tokenize(cfg, _tok(), splits, reps)
    assert data.reports["train"].dropped["longer than data.max_length=24"] > 80  # b lost ~half its rows
    n = {s: sum(ex.meta["source"] == s for ex in data.examples["train"]) for s in "ab"}
    assert n == {"a": 200, "b": 200}


# ---- bad input that used to slip through (issue: real files) ------------------------------------

def test_bom_is_accepted_in_jsonl_json_and_csv(tmp_path):
    bom = "\ufeff"
    (tmp_path / "a.jsonl").write_text(bom + "\n".join(json.dumps(r) for r in rows_pc(3)) + "\n", encoding="utf-8")
    (tmp_path / "a.json").write_text(bom + json.dumps(rows_pc(3)), encoding="utf-8")
    (tmp_path / "a.csv").write_text(bom + "prompt,completion\nquestion 0,answer 0\nquestion 1,answer 1\n"
                                    "question 2,answer 2\n", encoding="utf-8")
    for name in ("a.jsonl", "a.json", "a.csv"):
        out, rep = read(source(path=str(tmp_path / name)))
        assert len(out[""]) == 3 and rep.bad.total == 0, name
        assert out[""][0]["messages"][0]["content"] == "question 0", name


def test_csv_every_field_is_text_and_a_merge_is_an_error_at_its_lines(tmp_path):
    p = tmp_path / "nums.csv"
    p.write_text('prompt,completion\n"What is 2 + 2?",4\n"multi\nline prompt",5\nlast,6\n')
    out, _ = read(source(path=str(p)))
    assert [r["messages"][1]["content"] for r in out[""]] == ["4", "5", "6"]  # a numeric column is text
    assert [r["loc"].rsplit(":", 1)[1] for r in out[""]] == ["2", "3-4", "5"]  # physical lines
    merged = tmp_path / "merged.csv"  # an unclosed quote on line 2 swallows line 3 up to a later quote
    merged.write_text('prompt,completion\n"unclosed,1\nnext,2"\nok,3\n')
    with pytest.raises(DataError, match=r"merged.csv:2-3: 1 fields, the header has 2"):
        read(source(path=str(merged)))
    out, rep = read(source(path=str(merged)), on_bad_row="skip")
    assert [r["messages"][0]["content"] for r in out[""]] == ["ok"] and rep.bad.total == 1
    eof = tmp_path / "eof.csv"
    eof.write_text('prompt,completion\nok,1\n"never closed,2\nmore,3\n')
    with pytest.raises(DataError, match=r"eof.csv:3: malformed CSV"):
        read(source(path=str(eof)))


@pytest.mark.parametrize("text,what", [("\ud800", "lone surrogate"), ("a\ue000b", "private-use"),
                                       ("\ue001", "private-use")])
def test_unusable_characters_are_bad_rows(tmp_path, text, what):
    p = tmp_path / "x.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps({"prompt": "fine", "completion": "ok"}) + "\n")
        f.write(json.dumps({"prompt": f"bad {text}", "completion": "ok"}) + "\n")
    with pytest.raises(DataError, match=rf"x.jsonl:2: .*{what}"):
        read(source(path=str(p)))
    out, rep = read(source(path=str(p)), on_bad_row="skip")
    assert len(out[""]) == 1 and rep.bad.total == 1


def test_a_source_with_no_usable_row_is_an_error_in_every_mode(tmp_path):
    p = tmp_path / "allbad.jsonl"
    write_jsonl(p, [{"question": "x", "answer": "y"}] * 3)  # wrong field names on every row
    for mode in ("error", "skip"):
        with pytest.raises(DataError, match=r"no usable rows|missing field"):
            read(source(path=str(p)), on_bad_row=mode)
    with pytest.raises(DataError, match=r"data.sources.s: no usable rows .*skipped 3 bad rows"):
        read(source(path=str(p)), on_bad_row="skip")


def test_nested_records_with_dotted_paths_and_one_list_expansion(tmp_path):
    """The self-instruct human-eval form: one instruction, several instances -> one row each."""
    recs = [{"id": "t1", "meta": {"task": "greet"}, "instruction": "Say hello to the name.",
             "instances": [{"input": "Ann", "output": "Hello, Ann!"}, {"input": "Bo", "output": "Hello, Bo!"}]},
            {"id": "t2", "meta": {"task": "shout"}, "instruction": "Upper-case it.",
             "instances": [{"input": "hey", "output": "HEY"}]}]
    p = write_jsonl(tmp_path / "nested.jsonl", recs)
    spec = source(path=p, format="alpaca", task_from="meta.task",
                  fields={"instruction": "instruction", "input": "instances[*].input",
                          "output": "instances[*].output"})
    out, _ = read(spec)
    rows = out[""]
    assert [(r["messages"][0]["input"], r["messages"][1]["content"], r["task"]) for r in rows] == [
        ("Ann", "Hello, Ann!", "greet"), ("Bo", "Hello, Bo!", "greet"), ("hey", "HEY", "shout")]
    assert rows[1]["loc"].endswith("nested.jsonl:1 [instances[1]]")
    pc = source(path=p, fields={"prompt": "instances[0].input", "completion": "meta.task"})
    out, _ = read(pc)
    assert [texts_ for texts_ in texts(out[""])] == [("Ann", "greet"), ("hey", "shout")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "instances": "not a list"}] + recs)
    with pytest.raises(DataError, match=r"bad.jsonl:1: field 'instances' is not a non-empty list"):
        read(source(path=bad, format="alpaca", fields={"input": "instances[*].input",
                                                       "output": "instances[*].output"}))
    with pytest.raises(DataError, match="one list expansion"):
        read(source(path=p, format="alpaca", fields={"input": "instances[*].input", "output": "other[*].x"}))


def test_shared_data_gsm8k_reads_cleanly():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k")
    if not os.path.isdir(path):
        pytest.skip("../shared/data absent")
    from configs import gsm8k
    splits, reps = build_splits(gsm8k.get_config().data)
    assert len(splits["test"]) == 1319 and len(splits["train"]) + len(splits["validation"]) == 7473
    assert reps[0].bad.total == 0
    assert sources.SPLITS == ("train", "validation", "test")
