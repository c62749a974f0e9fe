"""How much of a difference in relative accuracy the test set can resolve: an interval per record,
per method, whether a crossing of the 99% line is supported, and ranks that only separate what the
intervals separate.

A test set of n texts measures an accuracy in steps of 1/n (499 texts: 0.2 points per text), and
its sampling error is several of those steps, so two methods a point apart, or a point just above
the 99% line, may be the same method measured twice.

Each record's relative accuracy gets a paired 95% interval: the MoE and the dense model read the
same n texts, so their accuracies differ only on the D = n (1 - dense_agreement) texts where their
predictions differ. Of those the MoE is right on b and the dense model on c, b - c = n (accuracy -
dense accuracy); with two classes exactly one of them is right on each, so b + c = D and b is
known (with more classes b + c <= D, and taking D makes the interval wider: conservative). Given
D, b is binomial (D, pi) (McNemar's conditioning), so the Wilson interval of pi gives the
difference's, D (2 pi - 1) / n, and dividing by the dense accuracy the relative accuracy's. A
conversion that changes no prediction (D = 0: budget 1, the dense model itself) has exactly the
dense accuracy on these texts: its interval is the point. The spread of D itself is left out.
Perplexity is a mean over correlated tokens and the records keep only its totals, so a perplexity
record gets no interval; with several seeds the seeds' range stands in.

A method's interval at a point (budget or tau) is the union of its seeds' intervals (with no
per-record interval: the seeds' range, when there are at least two), so it holds both the test
set's noise and the seeds' spread. Methods at the same point are ranked by separation: a method's
rank is 1 + the number of methods whose interval lies wholly on the better side of its own.
Methods whose intervals overlap (and that no third method separates differently) share a rank;
a method without an interval gets no rank.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

Z = 1.959964  # two-sided 95%


def wilson(successes, n, z: float = Z) -> tuple[np.ndarray, np.ndarray]:
    """The Wilson score interval (low, high) of a proportion successes / n; NaN where n is not positive."""
    successes, n = np.asarray(successes, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = successes / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    valid = n > 0
    return np.where(valid, centre - half, np.nan), np.where(valid, centre + half, np.nan)


def relative_interval(table: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series]:
    """Each record's paired interval (low, high) of relative_<metric> from its test_count texts and
    dense_agreement (see the module's docstring); NaN for perplexity and for records without test_count."""
    if metric != "accuracy" or "test_count" not in table:
        nan = pd.Series(np.nan, index=table.index)
        return nan, nan.copy()
    n = table["test_count"].astype(float)
    dense = table["dense_test_accuracy"].astype(float)
    differing = (n * (1 - table["dense_agreement"].astype(float))).round()  # D
    gained = ((differing + (n * (table["test_accuracy"] - dense)).round()) / 2).clip(lower=0).clip(upper=differing)  # b
    low, high = wilson(gained, differing)
    same = differing.to_numpy() == 0
    low, high = np.where(same, 0.5, low), np.where(same, 0.5, high)  # no differing text: a difference of exactly 0
    difference_low, difference_high = differing * (2 * low - 1) / n, differing * (2 * high - 1) / n
    return 1 + difference_low / dense, 1 + difference_high / dense


def keeps_line(low: pd.Series, high: pd.Series, line: float, higher_is_better: bool) -> pd.Series:
    """Per interval, against the 99% line: "yes" when the whole interval keeps it, "no" when none of
    it does, "unresolved" when it holds the line (the test set cannot tell), "" without an interval."""
    keeps, misses = (low >= line, high < line) if higher_is_better else (high <= line, low > line)
    out = pd.Series("unresolved", index=low.index)
    out[keeps] = "yes"
    out[misses] = "no"
    out[low.isna() | high.isna()] = ""
    return out


def method_interval(values: pd.Series, lows: pd.Series, highs: pd.Series) -> tuple[float, float]:
    """One method's interval at one point from its seeds' values and intervals: the union of the
    seeds' intervals, or without them the seeds' range (NaN for a single seed)."""
    if lows.notna().all() and highs.notna().all() and len(lows):
        return float(lows.min()), float(highs.max())
    if values.notna().sum() >= 2:
        return float(values.min()), float(values.max())
    return float("nan"), float("nan")


def separated_ranks(low: pd.Series, high: pd.Series, higher_is_better: bool) -> pd.Series:
    """Rank 1 + the number of others whose interval lies wholly better than each one's (NaN without
    an interval): only separated intervals order two methods, overlapping ones share a rank."""
    ranks = pd.Series(np.nan, index=low.index)
    known = low.notna() & high.notna()
    for i in low.index[known]:
        others = known & (low.index != i)
        better = (low[others] > high[i]) if higher_is_better else (high[others] < low[i])
        ranks[i] = 1 + int(better.sum())
    return ranks
