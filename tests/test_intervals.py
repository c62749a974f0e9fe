"""What a test set of n texts can resolve (moefy.report.intervals): Wilson intervals, the 99% line,
method intervals over seeds and ranks that only separate separated intervals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from moefy.report.intervals import keeps_line, method_interval, relative_interval, separated_ranks, wilson


def test_wilson_matches_the_textbook_values_and_stays_in_the_unit_interval():
    low, high = wilson([5, 0, 10], [10, 10, 10])
    assert low[0] == pytest.approx(0.2366, abs=1e-4) and high[0] == pytest.approx(0.7634, abs=1e-4)
    assert low[1] == 0 and high[1] == pytest.approx(0.2775, abs=1e-4), "no successes: an interval above 0, not a point"
    assert low[2] == pytest.approx(0.7225, abs=1e-4) and high[2] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson([0], [0])[0]), "no texts, no interval"


def test_a_relative_accuracy_gets_a_paired_interval_from_the_texts_whose_predictions_differ():
    table = pd.DataFrame(
        {
            "test_accuracy": [0.88, 0.88, 0.9],
            "dense_test_accuracy": [0.9, 0.9, 0.9],
            "dense_agreement": [0.9, 0.97, 1.0],
            "test_count": [500, 5000, 500],
        }
    )
    low, high = relative_interval(table, "accuracy")
    # 50 texts differ; the MoE is right on 20 of them, the dense model on 30 (b - c = -10)
    pi_low, pi_high = wilson(20, 50)
    assert (low[0], high[0]) == pytest.approx((1 + 50 * (2 * pi_low - 1) / 500 / 0.9, 1 + 50 * (2 * pi_high - 1) / 500 / 0.9))
    assert low[0] < 0.99 < high[0] < 1.03, "two points below dense on 500 texts: the test set cannot tell"
    assert high[1] < 0.99 and low[1] > 0.95, "the same drop on 5,000 texts with fewer differing predictions: resolved"
    assert low[2] == high[2] == 1.0, "no prediction differs: exactly the dense accuracy on these texts"
    perplexity = pd.DataFrame({"test_perplexity": [20.0], "dense_test_perplexity": [19.0], "test_count": [1000]})
    assert relative_interval(perplexity, "perplexity")[0].isna().all(), "perplexity has no interval from its totals"
    older = table.drop(columns="test_count")
    assert relative_interval(older, "accuracy")[1].isna().all(), "records without test_count"


def test_the_99_percent_line_is_kept_missed_or_unresolved():
    low, high = pd.Series([0.995, 0.95, 0.98, np.nan]), pd.Series([1.01, 0.985, 1.0, np.nan])
    assert list(keeps_line(low, high, 0.99, True)) == ["yes", "no", "unresolved", ""]
    # perplexity: lower is better, the line at 1 / 0.99
    assert list(keeps_line(pd.Series([1.0, 1.02]), pd.Series([1.005, 1.03]), 1 / 0.99, False)) == ["yes", "no"]


def test_a_methods_interval_is_its_seeds_union_or_their_range():
    values = pd.Series([0.97, 0.99])
    assert method_interval(values, pd.Series([0.95, 0.96]), pd.Series([0.99, 1.01])) == (0.95, 1.01)
    nan = pd.Series([np.nan, np.nan])
    assert method_interval(values, nan, nan) == (0.97, 0.99), "no test-set interval: the seeds' range"
    assert all(math.isnan(v) for v in method_interval(pd.Series([0.97]), nan[:1], nan[:1])), "one seed, no interval"


def test_only_separated_intervals_get_different_ranks():
    low = pd.Series([0.90, 0.85, 0.80, 0.70, np.nan], index=list("ABCDE"))
    high = pd.Series([1.00, 0.95, 0.88, 0.75, np.nan], index=list("ABCDE"))
    ranks = separated_ranks(low, high, higher_is_better=True)
    # B overlaps A and C; C lies below A; D below all three; E has no interval
    assert ranks[:4].tolist() == [1, 1, 2, 4] and math.isnan(ranks["E"])
    lower = separated_ranks(pd.Series([1.0, 1.1]), pd.Series([1.05, 1.2]), higher_is_better=False)
    assert lower.tolist() == [1, 2], "perplexity: the lower interval ranks first"
