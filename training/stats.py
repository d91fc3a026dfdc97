"""Uncertainty of per-question scores: percentile bootstrap intervals and paired tests between two rows.

Every function takes one value per question (EM 0/1, F1 in [0, 1], recall hit 0/1), resamples questions
(not tokens or batches) with a seeded generator, and is pure numpy. For two rows scored on the same
questions the reported p-value is the exact McNemar test on EM: EM is a 0/1 outcome per question, the
test uses only the questions on which the rows disagree, and it is exact (no resampling noise, no
large-sample approximation). The paired bootstrap of the mean difference gives the difference's interval
and a p-value for non-binary scores such as F1.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import comb

import numpy as np

RESAMPLES = 2000
LEVEL = 0.95


def _scores(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name}: expected a non-empty list of per-question scores, got shape {array.shape}")
    return array


def _resampled_means(values: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """The mean of `resamples` bootstrap samples of the questions: (resamples,)."""
    rows = np.random.default_rng(seed).integers(0, values.size, size=(resamples, values.size))  # (R, n)
    return values[rows].mean(axis=1)  # (R,)


def bootstrap_ci(
    values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-question scores."""
    means = _resampled_means(_scores(values, "bootstrap_ci"), resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> dict[str, float | list[float]]:
    """Mean of a − b over the same questions, its percentile interval, and the two-sided bootstrap
    p-value (twice the smaller share of resampled differences on either side of zero, at most 1)."""
    first, second = _scores(a, "paired_bootstrap a"), _scores(b, "paired_bootstrap b")
    if first.size != second.size:
        raise ValueError(
            f"paired_bootstrap: {first.size} scores against {second.size}: not the same questions"
        )
    differences = first - second  # (n,)
    means = _resampled_means(differences, resamples, seed)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    p = min(1.0, 2 * min(np.mean(means <= 0), np.mean(means >= 0)))
    return {"difference": float(differences.mean()), "ci95": [float(low), float(high)], "p": float(p)}


def mcnemar_exact(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided exact McNemar p-value for two 0/1 outcomes on the same questions: the questions only
    one row gets right follow Binomial(discordant, 1/2) when the rows are equally good."""
    first, second = _scores(a, "mcnemar a"), _scores(b, "mcnemar b")
    if first.size != second.size:
        raise ValueError(
            f"mcnemar_exact: {first.size} outcomes against {second.size}: not the same questions"
        )
    if not np.all(np.isin(first, (0, 1)) & np.isin(second, (0, 1))):
        raise ValueError("mcnemar_exact: outcomes must be 0 or 1 (exact match per question)")
    only_a = int(np.sum((first == 1) & (second == 0)))
    only_b = int(np.sum((first == 0) & (second == 1)))
    n, k = only_a + only_b, min(only_a, only_b)
    if n == 0:
        return 1.0
    tail = sum(comb(n, i) for i in range(k + 1))  # exact integers: P(X <= k) = tail / 2^n
    return min(1.0, 2 * tail / 2**n)


def interval(values: Sequence[float], seed: int = 0) -> dict[str, float | list[float]]:
    """A cell of the table: the mean and its 95% bootstrap interval."""
    low, high = bootstrap_ci(values, seed=seed)
    return {"mean": float(np.mean(_scores(values, "interval"))), "ci95": [low, high]}


def compare(a_em: Sequence[float], b_em: Sequence[float], seed: int = 0) -> dict[str, float | list[float]]:
    """Row a against row b on EM: the McNemar p-value (reported) and the paired bootstrap's difference,
    interval and p-value (shown beside it)."""
    paired = paired_bootstrap(a_em, b_em, seed=seed)
    return {
        "p": mcnemar_exact(a_em, b_em),
        "em_difference": paired["difference"],
        "em_difference_ci95": paired["ci95"],
        "p_bootstrap": paired["p"],
    }
