"""Scores of generated answers, and how sure we can be of them: exact match, bootstrap intervals.

A rate on a few hundred rows moves by several points from sampling alone, so every rate in a report
comes with a 95% percentile-bootstrap interval over the evaluated rows, and the fine-tuned-minus-base
difference with a *paired* bootstrap (the same resampled rows for both models), which is tighter than
comparing two independent intervals because both models answer the same questions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
NUM_RESAMPLES = 2000


def exact_match(prediction: str, target: str, pattern: str = "") -> bool:
    """Whitespace-insensitive at the ends only: 'ABC ' == 'ABC', 'A BC' != 'ABC'.

    With ``pattern`` (``eval.answer_pattern``, a regex with one group, e.g. GSM8K's
    ``####\\s*(\\S+)``) only the answers it extracts are compared; no match in the prediction is a miss.
    """
    if pattern:
        t, p = re.search(pattern, target), re.search(pattern, prediction)
        if t is None or p is None:
            return False
        prediction, target = p.group(1).replace(",", ""), t.group(1).replace(",", "")
    return prediction.strip() == target.strip()


def _resample_means(scores: np.ndarray, seed: int) -> np.ndarray:
    """[NUM_RESAMPLES] means of ``scores`` ([n] or [models, n]) over rows drawn with replacement."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, scores.shape[-1], (NUM_RESAMPLES, scores.shape[-1]))
    return scores[..., idx].mean(-1)


def bootstrap_interval(scores: Sequence[float], seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of per-row ``scores`` (0/1 hits or any score)."""
    x = np.asarray(scores, np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    means = _resample_means(x, seed)
    a = (1 - CONFIDENCE) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def paired_difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> dict[str, float]:
    """Mean of ``a - b`` over the same rows, its 95% paired-bootstrap interval, and the share of
    resamples in which ``a`` did not beat ``b`` (a one-sided bootstrap p-value)."""
    x = np.stack([np.asarray(a, np.float64), np.asarray(b, np.float64)])
    if x.shape[1] == 0:
        return {"difference": float("nan"), "low": float("nan"), "high": float("nan"), "p_not_better": float("nan")}
    means = _resample_means(x, seed)
    diff = means[0] - means[1]
    lo, hi = np.quantile(diff, [(1 - CONFIDENCE) / 2, 1 - (1 - CONFIDENCE) / 2])
    return {"difference": float(x[0].mean() - x[1].mean()), "low": float(lo), "high": float(hi),
            "p_not_better": float(np.mean(diff <= 0))}
