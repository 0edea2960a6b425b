"""Exact match and the bootstrap intervals in eval reports, against hand-computed cases."""

import math

import numpy as np

from trainer.scoring import bootstrap_interval, exact_match, paired_difference


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
