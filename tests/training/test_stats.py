"""training/stats.py against references: scipy's exact binomial test, the normal approximation of a mean,
and a brute-force loop over every resample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from training.stats import bootstrap_ci, compare, interval, mcnemar_exact, paired_bootstrap


@pytest.mark.parametrize(
    "only_a, only_b, both, neither", [(9, 3, 40, 48), (0, 7, 5, 5), (30, 30, 1, 1), (0, 0, 4, 2)]
)
def test_mcnemar_equals_the_exact_binomial_test_on_the_discordant_questions(only_a, only_b, both, neither):
    a = [1] * only_a + [0] * only_b + [1] * both + [0] * neither
    b = [0] * only_a + [1] * only_b + [1] * both + [0] * neither
    p = mcnemar_exact(a, b)
    if only_a + only_b == 0:
        assert p == 1.0
    else:
        assert p == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-12)
    assert mcnemar_exact(b, a) == p  # symmetric


def test_mcnemar_on_a_thousand_questions_matches_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2, 1000), rng.integers(0, 2, 1000)
    only_a, only_b = int(np.sum(a > b)), int(np.sum(b > a))
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(only_a, only_a + only_b).pvalue, rel=1e-9)


def test_bootstrap_interval_agrees_with_the_normal_approximation():
    rng = np.random.default_rng(0)
    em = (rng.random(1000) < 0.4).astype(float)
    low, high = bootstrap_ci(em, resamples=4000, seed=1)
    half = 1.96 * em.std() / np.sqrt(em.size)  # about 0.030
    assert low == pytest.approx(em.mean() - half, abs=0.005)
    assert high == pytest.approx(em.mean() + half, abs=0.005)
    assert bootstrap_ci(em, resamples=4000, seed=1) == (low, high)  # seeded
    assert interval(em)["mean"] == pytest.approx(em.mean())


def test_bootstrap_equals_a_brute_force_loop_over_the_same_draws():
    values = np.array([0.0, 1.0, 0.5, 1.0, 0.25])
    rng = np.random.default_rng(7)
    draws = rng.integers(0, values.size, size=(50, values.size))
    means = sorted(sum(values[i] for i in row) / values.size for row in draws)
    low, high = bootstrap_ci(values, resamples=50, seed=7)
    assert low == pytest.approx(np.quantile(means, 0.025)) and high == pytest.approx(
        np.quantile(means, 0.975)
    )


def test_paired_bootstrap_difference_interval_and_p():
    rng = np.random.default_rng(2)
    a = (rng.random(1000) < 0.5).astype(float)
    same = paired_bootstrap(a, a)
    assert same["difference"] == 0 and same["p"] == 1.0
    b = a.copy()
    b[np.flatnonzero(a)[:80]] = 0  # b loses 80 questions: a is better by 0.08
    better = paired_bootstrap(a, b, resamples=4000)
    assert better["difference"] == pytest.approx(0.08)
    d = a - b
    half = 1.96 * d.std() / np.sqrt(d.size)
    assert better["ci95"][0] == pytest.approx(0.08 - half, abs=0.006)
    assert better["p"] < 0.001 and mcnemar_exact(a, b) < 1e-20
    row = compare(a, b)
    assert row["p"] == mcnemar_exact(a, b) and row["em_difference"] == pytest.approx(0.08)


def test_bad_input_names_the_problem():
    with pytest.raises(ValueError, match="not the same questions"):
        mcnemar_exact([1, 0], [1])
    with pytest.raises(ValueError, match="0 or 1"):
        mcnemar_exact([0.5, 1], [1, 1])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="not the same questions"):
        paired_bootstrap([1.0], [1.0, 0.0])
