"""The balanced assignment must be the exact optimum, however it is reached."""

import itertools

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from moefy.conversion.assignment import balanced_assignment
from moefy.errors import MoefyError


def optimum(cost: np.ndarray, size: int) -> float:
    rows, slots = linear_sum_assignment(np.repeat(cost, size, axis=1))
    return float(cost[rows, slots // size].sum())


def total(cost: np.ndarray, labels: np.ndarray) -> float:
    return float(cost[np.arange(len(labels)), labels].sum())


@pytest.mark.parametrize(("num_clusters", "size"), [(2, 5), (6, 32), (16, 8), (48, 4), (7, 1)])
def test_matches_linear_sum_assignment(num_clusters, size):
    rng = np.random.default_rng(num_clusters)
    for trial in range(5):
        points = rng.standard_normal((num_clusters * size, 8))
        centres = rng.standard_normal((num_clusters, 8)) * (trial + 1)  # from mild to very unbalanced nearest sets
        cost = ((points[:, None, :] - centres[None]) ** 2).sum(-1)
        labels = balanced_assignment(cost, size)
        assert (np.bincount(labels, minlength=num_clusters) == size).all()
        assert total(cost, labels) == pytest.approx(optimum(cost, size), rel=1e-12, abs=1e-9)


def test_exact_even_when_the_price_ascent_is_skipped():
    """The shortest-path phase alone must reach the optimum (the ascent only saves moves)."""
    rng = np.random.default_rng(1)
    cost = rng.random((120, 6)) ** 3
    labels = balanced_assignment(cost, 20, ascent_steps=0)
    assert total(cost, labels) == pytest.approx(optimum(cost, 20), abs=1e-12)


def test_ties_and_integer_costs():
    rng = np.random.default_rng(2)
    for cost in (np.zeros((12, 4)), rng.integers(0, 3, (60, 5)).astype(float), np.tile([0.0, 1.0, 2.0], (30, 1))):
        size = len(cost) // cost.shape[1]
        labels = balanced_assignment(cost, size)
        assert (np.bincount(labels, minlength=cost.shape[1]) == size).all()
        assert total(cost, labels) == pytest.approx(optimum(cost, size), abs=1e-12)


def test_balanced_assignment_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    n, num_experts, size = 9, 3, 3
    every_split = np.array(sorted(set(itertools.permutations(np.repeat(np.arange(num_experts), size)))))
    for _ in range(5):
        cost = rng.random((n, num_experts))
        labels = balanced_assignment(cost, size)
        assert labels.dtype == np.int64
        assert (np.bincount(labels, minlength=num_experts) == size).all()
        best = cost[np.arange(n), every_split].sum(axis=1).min()
        assert cost[np.arange(n), labels].sum() == pytest.approx(best, abs=1e-12)


def test_balanced_assignment_differs_from_greedy_nearest_when_that_is_unbalanced():
    # Every row prefers cluster 0; only two of them can have it: the two with the largest gain.
    cost = np.array([[0.0, 1.0], [0.0, 5.0], [0.0, 3.0], [0.0, 2.0]])
    assert balanced_assignment(cost, 2).tolist() == [1, 0, 0, 1]


def test_rejects_a_shape_that_cannot_balance():
    with pytest.raises(MoefyError, match="need n = E \\* size"):
        balanced_assignment(np.zeros((10, 3)), 3)
