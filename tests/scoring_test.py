"""Exact match and the bootstrap intervals in eval reports, against hand-computed cases."""

import math

import numpy as np

from trainer.evaluation.scoring import bootstrap_interval, exact_match, paired_difference


def test_exact_match_trims_the_ends_only():
    assert exact_match(" ABC\n", "ABC") and not exact_match("A BC", "ABC") and not exact_match("abc", "ABC")


def test_bootstrap_interval_is_seeded_and_agrees_with_the_normal_approximation():
    hits = [1] * 120 + [0] * 80  # p = 0.6, n = 200: normal approximation 0.6 +- 1.96 * 0.0346
    lo, hi = bootstrap_interval(hits, seed=0)
    assert (lo, hi) == bootstrap_interval(hits, seed=0)
    half = 1.96 * math.sqrt(0.6 * 0.4 / 200)
    assert abs(lo - (0.6 - half)) < 0.015 and abs(hi - (0.6 + half)) < 0.015
    assert bootstrap_interval([1, 1, 1]) == (1.0, 1.0)
    assert all(math.isnan(x) for x in bootstrap_interval([]))


def test_paired_difference():
    a = np.array([1, 1, 1, 0] * 50)
    same = paired_difference(a, a)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0, "p_not_better": 1.0}
    b = np.array([1, 0, 0, 0] * 50)  # a is right wherever b is, and on 100 more rows
    d = paired_difference(a, b)
    assert d["difference"] == 0.5 and d["p_not_better"] == 0.0
    # Pairing: a's hits are a superset of b's, so every resample shows a gain of 0.5 +- sampling of
    # the 100 differing rows -- tighter than two independent intervals would suggest.
    assert 0.42 < d["low"] < 0.5 < d["high"] < 0.58


# ---- normalisation, extraction, ROUGE, chrF: hand-computed literal cases ----------------------

from trainer.evaluation.scoring import Normalization, Scorer, extract, summarize  # noqa: E402


def test_normalisation_options():
    assert exact_match("Paris.", "paris", normalize=Normalization(lowercase=True, punctuation=True))
    assert not exact_match("Paris.", "paris", normalize=Normalization(lowercase=True))
    assert exact_match("New   York\n", "new york", normalize=Normalization(lowercase=True, whitespace=True))
    assert not exact_match(" a", "a", normalize=Normalization(strip=False))
    import pytest  # noqa: PLC0415

    from trainer.settings.spec import RunSpec, SpecError  # noqa: PLC0415
    with pytest.raises(SpecError, match="eval.normalize: unknown key 'lower'"):
        RunSpec.from_dict({"eval": {"normalize": {"lower": True}}})


def test_extraction_pattern():
    assert extract("so 3+4 = 7\n#### 1,234", r"####\s*([-0-9.,]+)") == "1234"
    assert extract("no answer here", r"####\s*(\S+)") is None


def test_rouge_and_chrf_on_known_pairs():
    s = Scorer()
    out = s.score(["the cat sat", "the cat sat on the mat", "dog", ""],
                  ["the cat sat on the mat", "the cat sat on the mat", "cat", "cat"])
    # pair 0: unigrams P = 3/3, R = 3/6 -> F = 2/3; bigrams P = 2/2, R = 2/5 -> F = 4/7; LCS 3 -> 2/3
    np.testing.assert_allclose(out["rouge1"], [2 / 3, 1, 0, 0])
    np.testing.assert_allclose(out["rouge2"], [4 / 7, 1, 0, 0])
    np.testing.assert_allclose(out["rougeL"], [2 / 3, 1, 0, 0])
    assert out["chrf"][1] == 1.0 and out["chrf"][2] == 0.0 and out["chrf"][3] == 0.0
    assert 0 < out["chrf"][0] < 1
    np.testing.assert_array_equal(out["exact_match"], [0, 1, 0, 0])


def test_summarize_per_task_with_intervals():
    per = {"exact_match": np.array([1, 1, 0, 0, 1.0])}
    s = summarize(per, ["a", "a", "b", "b", "b"], seed=0)
    assert s["n"] == 5 and s["metrics"]["exact_match"]["mean"] == 0.6
    assert s["per_task"]["a"]["exact_match"] == {"mean": 1.0, "low": 1.0, "high": 1.0}
    assert s["per_task"]["b"]["n"] == 3 and abs(s["per_task"]["b"]["exact_match"]["mean"] - 1 / 3) < 1e-12
    lo, hi = s["metrics"]["exact_match"]["low"], s["metrics"]["exact_match"]["high"]
    assert (lo, hi) == bootstrap_interval(per["exact_match"], seed=0) and lo < 0.6 < hi
