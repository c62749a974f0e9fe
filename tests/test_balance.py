import numpy as np
import pytest
import scipy.sparse as sp
import torch

from moefy.conversion.balance import balance_least_loss, balance_random, expert_sizes, is_balanced, weight_kept
from moefy.errors import MoefyError


def random_affinity(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.random((n, n))
    return a + a.T


def unbalanced_labels(n: int, num_experts: int, seed: int) -> np.ndarray:
    labels = np.random.default_rng(seed).integers(0, num_experts, n)
    assert not is_balanced(labels, num_experts)
    return labels


def planted_case():
    """4 groups of 8 with strong inside affinity; 4 members of group 1 sit in expert 0 (12 vs 4)."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(4), 8)
    affinity = 0.1 * rng.random((32, 32)) + (truth[:, None] == truth[None, :])
    affinity = (affinity + affinity.T) / 2
    labels = truth.copy()
    labels[8:12] = 0
    return truth, affinity, labels


def greedy_reference(labels, affinity, num_experts):
    """balance_least_loss without the incremental bookkeeping: recompute everything each move."""
    labels = labels.copy()
    affinity = affinity.copy()
    np.fill_diagonal(affinity, 0)
    size = len(labels) // num_experts
    while not is_balanced(labels, num_experts):
        sizes = np.bincount(labels, minlength=num_experts)
        best = None
        for i in np.flatnonzero(sizes[labels] > size):
            for b in np.flatnonzero(sizes < size):
                loss = affinity[i, labels == labels[i]].sum() - affinity[i, labels == b].sum()
                if best is None or loss < best[0] - 1e-12:
                    best = (loss, i, b)
        labels[best[1]] = best[2]
    return labels


# --- sizes -------------------------------------------------------------------------------------


def test_expert_sizes_and_is_balanced():
    assert expert_sizes(np.array([0, 2, 2, 0]), 3).tolist() == [2, 0, 2]
    assert is_balanced(np.array([1, 0, 0, 1]), 2)
    assert not is_balanced(np.array([1, 1, 0, 1]), 2)
    with pytest.raises(MoefyError, match="0..1"):
        expert_sizes(np.array([0, 2]), 2)


# --- balance_least_loss ------------------------------------------------------------------------


def test_balance_least_loss_balances_with_only_surplus_moves():
    n, num_experts = 60, 6
    affinity = random_affinity(n, 0)
    for seed in range(3):
        labels = unbalanced_labels(n, num_experts, seed)
        balanced = balance_least_loss(labels, affinity, num_experts)
        assert balanced.dtype == np.int64
        assert is_balanced(balanced, num_experts)
        sizes = np.bincount(labels, minlength=num_experts)
        moved = balanced != labels
        assert moved.sum() == np.maximum(sizes - n // num_experts, 0).sum()
        assert (sizes[labels[moved]] > n // num_experts).all()  # only out of over-full experts
        assert (sizes[balanced[moved]] < n // num_experts).all()  # only into under-full ones


def test_balance_least_loss_matches_brute_force_greedy():
    n, num_experts = 24, 4
    for seed in range(3):
        affinity = random_affinity(n, seed) ** 4  # heavy-tailed, so each move changes later choices
        # Far from balanced, so that many moves build on earlier ones.
        labels = np.random.default_rng(seed).choice(num_experts, n, p=[0.6, 0.25, 0.1, 0.05])
        expected = greedy_reference(labels, affinity, num_experts)
        assert np.array_equal(balance_least_loss(labels, affinity, num_experts), expected)
        affinity[affinity < 1.0] = 0  # sparse inputs take a different update path
        expected = greedy_reference(labels, affinity, num_experts)
        assert np.array_equal(balance_least_loss(labels, sp.csr_matrix(affinity), num_experts), expected)


def test_balance_least_loss_leaves_balanced_labels_alone():
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(4), 5))
    result = balance_least_loss(labels, random_affinity(20, 0), 4)
    assert np.array_equal(result, labels) and result is not labels


def test_balance_least_loss_dense_sparse_and_torch_agree():
    n, num_experts = 48, 4
    affinity = random_affinity(n, 1)
    affinity[affinity < 1.4] = 0  # make it genuinely sparse
    labels = unbalanced_labels(n, num_experts, 2)
    dense = balance_least_loss(labels, affinity, num_experts)
    assert np.array_equal(dense, balance_least_loss(labels, sp.csr_matrix(affinity), num_experts))
    assert np.array_equal(dense, balance_least_loss(labels, sp.coo_matrix(affinity), num_experts))
    assert np.array_equal(dense, balance_least_loss(labels, torch.tensor(affinity), num_experts))


def test_balance_least_loss_keeps_planted_structure_better_than_random():
    truth, affinity, labels = planted_case()
    balanced = balance_least_loss(labels, affinity, 4)
    assert np.array_equal(balanced, truth)
    for seed in range(5):
        assert weight_kept(affinity, balanced) > weight_kept(affinity, balance_random(labels, 4, seed=seed))
    assert np.array_equal(balance_least_loss(labels, sp.csr_matrix(affinity), 4), truth)


def test_balance_least_loss_keeps_at_least_as_much_as_random():
    n, num_experts = 64, 8
    for seed in range(4):
        affinity = random_affinity(n, seed)
        labels = unbalanced_labels(n, num_experts, seed)
        kept = weight_kept(affinity, balance_least_loss(labels, affinity, num_experts))
        assert kept >= weight_kept(affinity, balance_random(labels, num_experts, seed=seed))


def test_balance_least_loss_rejects_bad_input():
    with pytest.raises(MoefyError, match="\\(10, 10\\)"):
        balance_least_loss(np.zeros(10, dtype=np.int64), np.zeros((8, 8)), 2)
    with pytest.raises(MoefyError, match="num_experts=3"):
        balance_least_loss(np.zeros(10, dtype=np.int64), np.zeros((10, 10)), 3)
    with pytest.raises(MoefyError, match="labels range"):
        balance_least_loss(np.full(10, 5), np.zeros((10, 10)), 2)


# --- balance_random ----------------------------------------------------------------------------


def test_balance_random_moves_only_surplus_and_is_seeded():
    n, num_experts = 60, 6
    labels = unbalanced_labels(n, num_experts, 0)
    balanced = balance_random(labels, num_experts, seed=1)
    assert balanced.dtype == np.int64 and is_balanced(balanced, num_experts)
    sizes = np.bincount(labels, minlength=num_experts)
    moved = balanced != labels
    assert moved.sum() == np.maximum(sizes - n // num_experts, 0).sum()
    assert (sizes[labels[moved]] > n // num_experts).all()
    assert np.array_equal(balanced, balance_random(labels, num_experts, seed=1))
    assert not np.array_equal(balanced, balance_random(labels, num_experts, seed=2))
    already = np.repeat(np.arange(num_experts), n // num_experts)
    assert np.array_equal(balance_random(already, num_experts), already)


# --- weight_kept -------------------------------------------------------------------------------


def test_weight_kept_hand_computed():
    matrix = np.array([[9, 1, 2, 0], [1, 9, 0, 3], [2, 0, 9, 4], [0, 3, 4, 9]], dtype=np.float32)
    labels = np.array([0, 0, 1, 1])
    # off-diagonal total 2 * (1 + 2 + 3 + 4) = 20; inside: (0,1) and (2,3) -> 2 * (1 + 4) = 10
    assert weight_kept(matrix, labels) == pytest.approx(0.5)
    assert weight_kept(sp.csr_matrix(matrix), labels) == pytest.approx(0.5)
    assert weight_kept(torch.tensor(matrix), labels) == pytest.approx(0.5)
    assert weight_kept(matrix, np.array([0, 1, 0, 1])) == pytest.approx(0.5)  # (0,2) and (1,3): 2 * 5
    assert weight_kept(matrix, np.array([0, 1, 1, 0])) == pytest.approx(0.0)  # (0,3) and (1,2) are 0
    assert weight_kept(matrix, np.zeros(4, dtype=np.int64)) == pytest.approx(1.0)


def test_weight_kept_without_off_diagonal_weight_is_zero():
    assert weight_kept(np.eye(4), np.array([0, 0, 1, 1])) == 0.0
    assert weight_kept(sp.csr_matrix((4, 4)), np.array([0, 0, 1, 1])) == 0.0


def test_weight_kept_random_labels_is_about_one_over_e():
    n, num_experts = 600, 6
    labels = np.random.default_rng(0).permutation(np.repeat(np.arange(num_experts), n // num_experts))
    assert weight_kept(random_affinity(n, 0), labels) == pytest.approx(1 / num_experts, abs=0.01)


def test_weight_kept_of_a_layer_sized_count_matrix():
    """The matrix of a MiniLM layer (its speed is measured by benchmarks/split_speed.py)."""
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 1000, (1536, 1536)).astype(np.float32)
    counts = counts + counts.T
    labels = rng.permutation(np.repeat(np.arange(48), 32))
    # uniform counts, random experts of 32: 31 of a neuron's 1535 partners share its expert
    assert weight_kept(counts, labels) == pytest.approx(31 / 1535, rel=0.03)
