import faiss
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from moefy.conversion.balance import balance_least_loss, balance_random, expert_sizes, is_balanced
from moefy.conversion.split import (
    association_graph,
    balanced_kmeans,
    check_num_experts,
    coact_split,
    kmeans_objective,
    random_split,
)
from moefy.errors import MoefyError


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal up to renaming the experts."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def pairs_recovered(truth: np.ndarray, labels: np.ndarray) -> float:
    """Share of same-group neuron pairs that ended up in the same expert."""
    same_truth = truth[:, None] == truth[None, :]
    same_labels = labels[:, None] == labels[None, :]
    off = ~np.eye(len(truth), dtype=bool)
    return (same_truth & same_labels & off).sum() / (same_truth & off).sum()


def planted_firing(n: int, groups: int, tokens: int, seed: int):
    """Binary activations [tokens, n] where each group of neurons tends to fire together."""
    rng = np.random.default_rng(seed)
    truth = rng.permutation(n) // (n // groups)
    group_on = rng.random((tokens, groups)) < 0.15
    fires = (group_on[:, truth] & (rng.random((tokens, n)) < 0.7)) | (rng.random((tokens, n)) < 0.05)
    fires[:, :3] |= rng.random((tokens, 3)) < 0.9  # a few neurons fire on almost every token
    return truth, fires


def coactivation(fires: np.ndarray) -> np.ndarray:
    f = fires.astype(np.float32)
    return f.T @ f


# --- check_num_experts -------------------------------------------------------------------------


def test_check_num_experts_returns_expert_size():
    assert check_num_experts(1536, 48) == 32
    assert check_num_experts(12, 1) == 12
    assert check_num_experts(12, 12) == 1


@pytest.mark.parametrize("num_experts", [5, 0, -3, 13])
def test_check_num_experts_rejects_non_divisors(num_experts):
    with pytest.raises(MoefyError) as err:
        check_num_experts(12, num_experts)
    message = str(err.value)
    assert "d_ff=12" in message and f"num_experts={num_experts}" in message
    assert "divisor" in message
    assert "4, 6" in message  # lists valid choices


# --- random_split ------------------------------------------------------------------------------


def test_random_split_is_equal_sized_seeded_and_seed_dependent():
    labels = random_split(96, 8, seed=3)
    assert labels.dtype == np.int64 and labels.shape == (96,)
    assert (np.bincount(labels, minlength=8) == 12).all()
    assert np.array_equal(labels, random_split(96, 8, seed=3))
    assert not np.array_equal(labels, random_split(96, 8, seed=4))


def test_random_split_checks_num_experts():
    with pytest.raises(MoefyError):
        random_split(96, 7)


# --- kmeans_objective --------------------------------------------------------------------------


def test_kmeans_objective_hand_computed():
    weight = np.array([[3.0, 0.0], [0.0, 2.0], [5.0, 0.0], [0.5, 0.0]])
    # expert 0: unit rows (1,0),(0,1), centroid (.5,.5) -> 2 * 0.5; expert 1: identical rows -> 0
    assert kmeans_objective(weight, np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert kmeans_objective(torch.tensor(weight), [1, 1, 0, 0]) == pytest.approx(1.0)
    assert kmeans_objective(weight, np.array([0, 1, 0, 0])) == pytest.approx(0.0)


# --- balanced_kmeans ---------------------------------------------------------------------------


def test_balanced_kmeans_recovers_equal_well_separated_clusters():
    rng = np.random.default_rng(1)
    centers = rng.standard_normal((8, 32))
    truth = rng.permutation(np.repeat(np.arange(8), 16))
    weight = centers[truth] + 0.05 * rng.standard_normal((128, 32))
    labels = balanced_kmeans(torch.tensor(weight, dtype=torch.float32), 8, seed=0)
    assert same_partition(labels, truth)


def test_balanced_kmeans_is_equal_sized_deterministic_and_seed_dependent():
    weight = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    labels = balanced_kmeans(weight, 16, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (256,)
    assert (np.bincount(labels, minlength=16) == 16).all()
    assert np.array_equal(labels, balanced_kmeans(weight, 16, seed=0))
    assert np.array_equal(labels, balanced_kmeans(weight.numpy(), 16, seed=0))
    assert not same_partition(labels, balanced_kmeans(weight, 16, seed=1))


def test_balanced_kmeans_beats_random_and_faiss_start():
    # Low-rank plus noise, roughly like trained weights: some directions are shared by many rows.
    rng = np.random.default_rng(2)
    n, d, num_experts = 384, 48, 12
    weight = (rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    for seed in range(3):
        labels = balanced_kmeans(weight, num_experts, seed=seed)
        objective = kmeans_objective(weight, labels)
        assert objective < kmeans_objective(weight, random_split(n, num_experts, seed=seed))

        # The faiss-only start: plain k-means labels, made equal-sized at random.
        x = weight / np.linalg.norm(weight, axis=1, keepdims=True)
        kmeans = faiss.Kmeans(d, num_experts, niter=20, seed=seed, min_points_per_centroid=1)
        kmeans.train(x)
        start = kmeans.index.search(x, 1)[1][:, 0].astype(np.int64)
        assert objective <= kmeans_objective(weight, balance_random(start, num_experts, seed=seed)) + 1e-9
        # More balanced rounds never make it worse than a single balanced assignment.
        one_round = balanced_kmeans(weight, num_experts, seed=seed, rounds=1)
        assert objective <= kmeans_objective(weight, one_round) + 1e-9


def test_balanced_kmeans_handles_one_row_per_expert_and_one_expert():
    weight = np.eye(6, 4, dtype=np.float32) + 0.1
    assert sorted(balanced_kmeans(weight, 6).tolist()) == list(range(6))
    assert balanced_kmeans(weight, 1).tolist() == [0] * 6


def test_balanced_kmeans_rejects_bad_input():
    with pytest.raises(MoefyError, match="d_ff=10"):
        balanced_kmeans(np.ones((10, 4)), 4)
    with pytest.raises(MoefyError, match="d_ff, d_model"):
        balanced_kmeans(np.ones(10), 2)
    with pytest.raises(MoefyError, match="rounds"):
        balanced_kmeans(np.ones((10, 4)), 2, rounds=0)


# --- association_graph -------------------------------------------------------------------------


def test_association_graph_phi_by_hand():
    tokens = 10
    fires = np.zeros((tokens, 5), dtype=bool)
    fires[:5, 0] = True  # 0 fires on tokens 0-4
    fires[:4, 1] = True  # 1 fires on tokens 0-3: strongly with 0
    fires[5:, 3] = True  # 3 fires exactly when 0 does not: phi = -1, no edge
    fires[:, 4] = True  # 4 always fires: phi undefined, no edge; 2 never fires: no edge
    graph = association_graph(coactivation(fires), tokens, neighbors=4)
    expected = (tokens * 4 - 5 * 4) / np.sqrt(5 * 5 * 4 * 6)
    dense = graph.toarray()
    assert isinstance(graph, sp.csr_matrix)
    assert dense[0, 1] == pytest.approx(expected) and dense[1, 0] == pytest.approx(expected)
    assert np.count_nonzero(dense) == 2


def test_association_graph_shape_properties():
    _, fires = planted_firing(120, 6, 600, seed=0)
    fires[:, 7] = False  # a neuron that never fires
    counts = coactivation(fires)
    neighbors = 5
    graph = association_graph(torch.tensor(counts), 600, neighbors)
    assert graph.shape == (120, 120)
    assert abs(graph - graph.T).max() == 0
    assert graph.data.min() > 0
    assert graph.diagonal().max() == 0
    # Union of each neuron's top `neighbors`: at most 2 * neighbors edges per neuron on average
    # (a hub that many neurons pick can have more), and each neuron keeps its own top list.
    degree = np.diff(graph.indptr)
    assert graph.nnz <= 2 * neighbors * 120
    assert (degree[degree > 0] >= neighbors).all()
    assert graph[7].nnz == 0 and graph[:, 7].nnz == 0
    # Every edge is among the strongest `neighbors` of at least one of its endpoints.
    full = association_graph(counts, 600, 119).toarray()
    kth = -np.sort(-full, axis=1)[:, neighbors - 1]
    rows, cols = graph.nonzero()
    assert ((full[rows, cols] >= kth[rows]) | (full[rows, cols] >= kth[cols])).all()
    assert np.allclose(graph.toarray()[rows, cols], full[rows, cols])


def test_association_graph_rejects_inconsistent_counts():
    with pytest.raises(MoefyError, match="tokens"):
        association_graph(np.eye(3) * 20, tokens=10, neighbors=2)
    with pytest.raises(MoefyError, match="square"):
        association_graph(np.zeros((3, 4)), tokens=10, neighbors=2)


# --- coact_split -------------------------------------------------------------------------------


def test_coact_split_recovers_planted_groups():
    n, num_experts, tokens = 256, 8, 2000
    truth, fires = planted_firing(n, num_experts, tokens, seed=1)
    fires[:, 10] = False  # isolated in the graph: still needs a label
    counts = coactivation(fires)
    labels = coact_split(counts, tokens, num_experts, neighbors=16, seed=0)
    assert labels.dtype == np.int64 and labels.shape == (n,)
    assert labels.min() >= 0 and labels.max() < num_experts
    assert np.array_equal(labels, coact_split(torch.tensor(counts), tokens, num_experts, neighbors=16, seed=0))

    balanced = balance_least_loss(labels, association_graph(counts, tokens, 16), num_experts)
    assert is_balanced(balanced, num_experts)
    # Chance is about 1/8 of the pairs.
    assert pairs_recovered(truth, balanced) > 0.9
    assert pairs_recovered(truth, random_split(n, num_experts)) < 0.25


def test_coact_split_sizes_are_near_equal():
    _, fires = planted_firing(192, 6, 800, seed=2)
    labels = coact_split(coactivation(fires), 800, 6, neighbors=12, ufactor=30)
    sizes = expert_sizes(labels, 6)
    assert sizes.sum() == 192 and sizes.max() <= 32 * 1.03 + 1


def test_coact_split_with_no_edges_and_one_expert():
    counts = np.zeros((8, 8), dtype=np.float32)  # nothing ever fired
    labels = coact_split(counts, 100, 4)
    assert labels.shape == (8,) and labels.min() >= 0 and labels.max() < 4
    assert coact_split(counts, 100, 1).tolist() == [0] * 8


def test_coact_split_depends_on_the_seed():
    """Weakly structured graphs have many near-equal cuts: the seed must pick among them."""
    rng = np.random.default_rng(3)
    fires = rng.random((1500, 96)) < 0.3
    counts = coactivation(fires)
    first = coact_split(counts, 1500, 6, neighbors=12, seed=0)
    assert np.array_equal(first, coact_split(counts, 1500, 6, neighbors=12, seed=0))
    assert pairs_recovered(first, coact_split(counts, 1500, 6, neighbors=12, seed=1)) < 0.9
