"""The built-in synthetic dataset: determinism, task coverage, and no train/test leakage."""

from data_pipeline.splits import hash_split
from data_pipeline.synthetic import TASKS, make_synthetic_rows, synthetic_splits

FRACTIONS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def test_deterministic_and_unique():
    a = make_synthetic_rows(500, seed=3)
    assert a == make_synthetic_rows(500, seed=3)
    assert a != make_synthetic_rows(500, seed=4)
    assert len({(r["task"], r["input"]) for r in a}) == 500
    assert {r["task"] for r in a} == set(TASKS)


def test_answers_are_exact():
    for r in make_synthetic_rows(300, seed=0):
        w, c = r["input"], r["completion"]
        if r["task"] == "add":
            a, b = map(int, w.split("+"))
            assert c == str(a + b) and str(a) in r["prompt"] and str(b) in r["prompt"]
        else:
            expected = {"reverse": w[::-1], "sort": "".join(sorted(w)), "double": w + w,
                        "count": str(len(w))}[r["task"]]
            assert c == expected and f'"{w}"' in r["prompt"]


def test_no_test_row_or_input_in_train():
    splits = synthetic_splits(5000, 0, FRACTIONS, salt="flax-ift")
    train_inputs = {r["input"] for r in splits["train"]}
    train_pairs = {(r["input"], r["completion"]) for r in splits["train"]}
    train_prompts = {r["prompt"] for r in splits["train"]}
    for split in ("validation", "test"):
        assert splits[split], split
        for r in splits[split]:
            assert r["input"] not in train_inputs
            assert (r["input"], r["completion"]) not in train_pairs
            assert r["prompt"] not in train_prompts


def test_hash_split_is_stable_when_the_dataset_grows():
    small = synthetic_splits(1000, 0, FRACTIONS, salt="s")
    big = synthetic_splits(3000, 0, FRACTIONS, salt="s")  # the first 1000 rows are the same rows
    where = {r["prompt"]: name for name, rows in big.items() for r in rows}
    for name, rows in small.items():
        assert all(where[r["prompt"]] == name for r in rows)


def test_hash_split_fractions():
    counts = {"train": 0, "validation": 0, "test": 0}
    for i in range(20000):
        counts[hash_split(str(i), FRACTIONS, "x")] += 1
    assert abs(counts["test"] / 20000 - 0.1) < 0.01 and abs(counts["train"] / 20000 - 0.8) < 0.01
