"""Scores of generated answers, and how sure we can be of them.

Per-example scores -- exact match (with configurable normalisation and an optional extraction regex),
ROUGE-1/2/L F1 (``rouge-score``, Google's reference implementation) and chrF (``sacrebleu``) -- and
the 95% intervals every rate in a report carries.

A rate on a few hundred rows moves by several points from sampling alone, so every mean comes with a
95% percentile-bootstrap interval over the evaluated rows, and a difference between two models with a
*paired* bootstrap (the same resampled rows for both), which is tighter than comparing two independent
intervals because both models answer the same questions.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from trainer.imports import import_without
from trainer.settings import options
from trainer.settings.spec import Normalization

CONFIDENCE = 0.95
NUM_RESAMPLES = 2000
METRICS = options.METRICS  # every per-example score, in order
HEADLINE_PAIRED = ("exact_match", "rougeL", "chrf")  # the model differences a report tests


def extract(text: str, pattern: str) -> str | None:
    """The answer ``pattern`` (a regex with one group, e.g. GSM8K's ``####\\s*(\\S+)``) extracts from
    ``text``, thousands separators removed; None when it does not match."""
    m = re.search(pattern, text)
    return None if m is None else m.group(1).replace(",", "")


def exact_match(prediction: str, target: str, pattern: str = "",
                normalize: Normalization = Normalization()) -> bool:
    """``normalize(prediction) == normalize(target)``. With ``pattern`` only the extracted answers are
    compared; a prediction it does not match is a miss (so is a target it does not match)."""
    if pattern:
        t, p = extract(target, pattern), extract(prediction, pattern)
        if t is None or p is None:
            return False
        prediction, target = p, t
    return normalize(prediction) == normalize(target)


class Scorer:
    """Per-example scores of predictions against references: ``score(preds, refs) -> {metric: [n]}``.

    Built once (the ROUGE scorer and the chrF metric objects are reused). chrF is sacrebleu's sentence
    chrF (character 6-grams, beta 2) on a 0-1 scale; ROUGE is F1 without stemming, as ``rouge-score``
    computes it on whitespace/alphanumeric tokens (so non-Latin scripts score 0: chrF covers them).
    """

    def __init__(self, pattern: str = "", normalize: Normalization = Normalization()):
        # slow imports, only when scoring; without scipy.stats (nltk's, unused): trainer.imports
        rouge_scorer = import_without("rouge_score.rouge_scorer", "scipy.stats")
        from sacrebleu.metrics import CHRF  # noqa: PLC0415
        self.pattern, self.normalize = pattern, normalize
        self._rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
        self._chrf = CHRF()

    def score(self, predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
        out = {m: np.zeros(len(predictions), np.float64) for m in METRICS}
        for i, (p, r) in enumerate(zip(predictions, references, strict=True)):
            out["exact_match"][i] = exact_match(p, r, self.pattern, self.normalize)
            rouge = self._rouge.score(r, p)  # (target, prediction)
            for m in ("rouge1", "rouge2", "rougeL"):
                out[m][i] = rouge[m].fmeasure
            out["chrf"][i] = self._chrf.sentence_score(p, [r]).score / 100.0
        return out

    def pattern_misses(self, texts: Sequence[str]) -> int:
        """How many of ``texts`` the extraction pattern does not match (0 without a pattern)."""
        return sum(extract(t, self.pattern) is None for t in texts) if self.pattern else 0


def _resample_means(scores: np.ndarray, seed: int) -> np.ndarray:
    """[..., NUM_RESAMPLES] means of ``scores`` ([n] or [models, n]) over rows drawn with replacement."""
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


def summarize(per_example: Mapping[str, np.ndarray], groups: Sequence[str], seed: int = 0
              ) -> dict[str, Any]:
    """Each metric's mean and 95% interval, overall and per group (task/source).

    Returns ``{"n", "metrics": {m: {"mean", "low", "high"}}, "per_task": {task: {"n", m: {...}}}}``.
    """
    def stats(idx: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"n": int(idx.size)}
        for m, v in per_example.items():
            lo, hi = bootstrap_interval(v[idx], seed)
            out[m] = {"mean": float(v[idx].mean()) if idx.size else float("nan"), "low": lo, "high": hi}
        return out

    groups = np.asarray(groups)
    whole = stats(np.arange(len(groups)))
    return {"n": whole.pop("n"), "metrics": whole,
            "per_task": {str(t): stats(np.flatnonzero(groups == t)) for t in sorted(set(groups.tolist()))}}
