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
    rows = make_synthetic_rows(300, seed=0) + make_synthetic_rows(300, seed=0, words="english")
    assert {r["task"] for r in rows} == {"reverse", "sort", "double", "count", "upper", "first", "add"}
    for r in rows:
        w, c = r["input"], r["completion"]
        if r["task"] == "add":
            a, b = map(int, w.split("+"))
            assert c == str(a + b) and str(a) in r["prompt"] and str(b) in r["prompt"]
        else:
            expected = {"reverse": w[::-1], "sort": "".join(sorted(w)), "double": w + w,
                        "count": str(len(w)), "upper": w.upper(), "first": w[0]}[r["task"]]
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


def test_english_words_and_zero_weights():
    """The pretrained-base variant: dictionary words, a task left out by weight 0, and still no input
    of one split in another."""
    from data_pipeline.synthetic import ENGLISH_WORDS  # noqa: PLC0415
    splits = synthetic_splits(1000, 0, FRACTIONS, salt="s", words="english", max_first_addend=40,
                              task_weights=dict(reverse=0, sort=0, double=1, count=1, upper=1, first=1, add=1))
    rows = [r for rs in splits.values() for r in rs]
    assert {r["task"] for r in rows} == {"double", "count", "upper", "first", "add"}
    assert all(r["input"] in ENGLISH_WORDS for r in rows if r["task"] != "add")
    inputs = {name: {r["input"] for r in rs} for name, rs in splits.items()}
    assert not inputs["test"] & inputs["train"] and not inputs["validation"] & inputs["train"]


def test_hash_split_fractions():
    counts = {"train": 0, "validation": 0, "test": 0}
    for i in range(20000):
        counts[hash_split(str(i), FRACTIONS, "x")] += 1
    assert abs(counts["test"] / 20000 - 0.1) < 0.01 and abs(counts["train"] / 20000 - 0.8) < 0.01
