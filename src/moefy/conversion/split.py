"""Grouping the d_ff neurons of one FFN layer into E equal experts ("MoEfication", Zhang et al. 2022).

A split is an int64 `labels` array of length d_ff with values 0..E-1, each value used exactly
d_ff/E times (coact_split is only near-equal; balance.py makes it exact). Three ways to get one:
random_split (the baseline), balanced_kmeans on the rows of W_in (parameter clustering) and
coact_split, a METIS partition of the neurons' co-activation graph.
"""

from __future__ import annotations

import functools

import faiss
import numpy as np
import pymetis
import scipy.sparse as sp
import torch
from threadpoolctl import ThreadpoolController

from moefy.conversion.assignment import balanced_assignment
from moefy.errors import MoefyError

# METIS needs integer edge weights; phi in (0, 1] becomes 1..1000.
_METIS_WEIGHT_SCALE = 1000
# Rows of the co-activation matrix turned into phi at once, so memory stays O(block * d_ff).
_PHI_BLOCK_ROWS = 2048


def _to_numpy(x, dtype=np.float64) -> np.ndarray:
    """Accept torch tensors (any dtype or device, bfloat16 included) and array-likes alike."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=dtype)


def _check_labels(labels, n: int, num_experts: int | None = None) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise MoefyError(f"labels has shape {labels.shape}, expected ({n},): one expert id per neuron")
    if not np.issubdtype(labels.dtype, np.integer):
        raise MoefyError(f"labels has dtype {labels.dtype}; expert ids must be integers")
    labels = labels.astype(np.int64)
    upper = num_experts if num_experts is not None else np.iinfo(np.int64).max
    if n and (labels.min() < 0 or labels.max() >= upper):
        raise MoefyError(
            f"labels range over {labels.min()}..{labels.max()}, expected 0..{upper - 1}; "
            "pass the number of experts the split was made with"
        )
    return labels


def check_num_experts(d_ff: int, num_experts: int) -> int:
    """Return the expert size d_ff // num_experts; experts must be equal, so E has to divide d_ff."""
    if d_ff < 1:
        raise MoefyError(f"d_ff={d_ff}: a layer needs at least one FFN neuron to split")
    if 1 <= num_experts <= d_ff and d_ff % num_experts == 0:
        return d_ff // num_experts
    divisors = [e for e in range(1, d_ff + 1) if d_ff % e == 0]
    nearest = sorted(sorted(divisors, key=lambda e: (abs(e - num_experts), e))[:8])
    raise MoefyError(
        f"num_experts={num_experts} cannot split d_ff={d_ff} into equal experts: it must be a divisor "
        f"of d_ff between 1 and {d_ff}; valid choices near it: {', '.join(map(str, nearest))}"
    )


def random_split(d_ff: int, num_experts: int, seed: int = 0) -> np.ndarray:
    """The baseline every other split has to beat."""
    size = check_num_experts(d_ff, num_experts)
    labels = np.empty(d_ff, dtype=np.int64)
    labels[np.random.default_rng(seed).permutation(d_ff)] = np.arange(d_ff) // size
    return labels


def _normalized_rows(weight) -> np.ndarray:
    """Cluster on direction only: a neuron's scale says how strongly, not when, it fires."""
    x = _to_numpy(weight, np.float32)
    if x.ndim != 2:
        raise MoefyError(f"weight has shape {x.shape}; expected [d_ff, d_model] (one row per neuron, W_in)")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(np.float32).tiny)


def _group_means(x: np.ndarray, labels: np.ndarray, num_experts: int) -> np.ndarray:
    """Mean row per label (float64); a label with no rows gets a zero row."""
    n = x.shape[0]
    onehot = sp.csr_matrix((np.ones(n, dtype=x.dtype), (labels, np.arange(n))), shape=(num_experts, n))
    counts = np.bincount(labels, minlength=num_experts).astype(np.float64)
    return np.asarray(onehot @ x, dtype=np.float64) / np.maximum(counts, 1.0)[:, None]


def _objective(x: np.ndarray, labels: np.ndarray, num_experts: int) -> float:
    centroids = _group_means(x, labels, num_experts)
    return float(((x.astype(np.float64) - centroids[labels]) ** 2).sum())


def kmeans_objective(weight, labels) -> float:
    """Sum of squared distances from each normalised row to its expert's mean: lower = tighter experts."""
    x = _normalized_rows(weight)
    labels = _check_labels(labels, x.shape[0])
    return _objective(x, labels, int(labels.max()) + 1 if labels.size else 0)


@functools.cache
def _threadpools() -> ThreadpoolController:
    """Inspecting the loaded BLAS/OpenMP libraries takes milliseconds: do it once."""
    return ThreadpoolController()


def _faiss_centroids(x: np.ndarray, num_experts: int, seed: int, iterations: int, gpu: int | None = None) -> np.ndarray:
    """Plain (unbalanced) k-means centroids: single-threaded on CPU so they are bitwise reproducible,
    or on GPU `gpu` (one device per torchrun rank) where faiss-gpu is installed."""
    n, d = x.shape
    params = faiss.ClusteringParameters()
    params.niter, params.seed = iterations, seed
    # d_ff is small: train on every row, and no "provide at least 39*k points" warning.
    params.min_points_per_centroid, params.max_points_per_centroid = 1, max(n, 1)
    clustering = faiss.Clustering(d, num_experts, params)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if gpu is not None:
        if not hasattr(faiss, "StandardGpuResources"):
            raise MoefyError(
                "the split runs on CUDA but faiss has no GPU support; pip install faiss-gpu, or set compute.device: cpu"
            )
        config = faiss.GpuIndexFlatConfig()
        config.device = gpu
        clustering.train(x, faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), d, config))
    else:
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            clustering.train(x, faiss.IndexFlatL2(d))
        finally:
            faiss.omp_set_num_threads(threads)
    return faiss.vector_to_array(clustering.centroids).reshape(num_experts, d).astype(np.float64)


def balanced_kmeans(
    weight, num_experts: int, seed: int = 0, kmeans_iterations: int = 20, rounds: int = 30, gpu: int | None = None
) -> np.ndarray:
    """Equal-size k-means on the normalised rows of W_in: neurons with similar input weights fire together.

    faiss k-means gives the start; then each round assigns exactly d_ff/E rows per expert at least
    total distance (moefy.conversion.assignment) and moves the centroids; the best round is kept. `gpu` runs
    the faiss part on that CUDA device.
    """
    x = _normalized_rows(weight)
    size = check_num_experts(x.shape[0], num_experts)
    if rounds < 1 or kmeans_iterations < 1:
        raise MoefyError(f"balanced_kmeans needs rounds >= 1 and kmeans_iterations >= 1, got {rounds} and {kmeans_iterations}")
    with _threadpools().limit(limits=1):  # one BLAS thread: the same bits on every torchrun rank layout
        centroids = _faiss_centroids(x, num_experts, seed, kmeans_iterations, gpu)
        squared_norms = np.einsum("ij,ij->i", x, x).astype(np.float64)
        labels, best_labels, best_objective = None, None, np.inf
        for _ in range(rounds):
            # |x|^2 is the same for every cluster of a row, so it is left out of the assignment cost
            cost = (centroids**2).sum(1)[None, :] - 2.0 * (x @ centroids.T.astype(np.float32)).astype(np.float64)
            new_labels = balanced_assignment(cost, size)
            if labels is not None and np.array_equal(new_labels, labels):
                break
            labels = new_labels
            centroids = _group_means(x, labels, num_experts)
            # sum_i |x_i - mu_l(i)|^2 = sum_i |x_i|^2 - sum_e n_e |mu_e|^2 for means mu
            objective = float(squared_norms.sum() - size * (centroids**2).sum())
            if objective < best_objective:
                best_labels, best_objective = labels, objective
    return best_labels


def _phi(block: np.ndarray, fire_rows: np.ndarray, fire: np.ndarray, tokens: int) -> np.ndarray:
    """Phi correlation of binary firing from counts; 0 where a neuron never or always fires."""
    spread = np.sqrt(fire * (tokens - fire))
    numerator = tokens * block - fire_rows[:, None] * fire[None, :]
    denominator = np.sqrt(fire_rows * (tokens - fire_rows))[:, None] * spread[None, :]
    phi = np.zeros_like(numerator)
    np.divide(numerator, denominator, out=phi, where=denominator > 0)
    return phi


def association_graph(coactivation, tokens: int, neighbors: int) -> sp.csr_matrix:
    """Sparse neuron graph weighted by phi, the chance-corrected correlation of firing.

    Raw co-activation counts are dominated by neurons that fire on most tokens (they co-fire with
    everyone), which makes METIS return empty and huge parts; phi subtracts the co-firing expected
    by chance. Each neuron keeps its `neighbors` strongest positive edges (union of both directions,
    weight = max), so the graph stays sparse enough for METIS.
    """
    counts = coactivation
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu()
    shape = tuple(counts.shape)
    if len(shape) != 2 or shape[0] != shape[1]:
        raise MoefyError(f"coactivation has shape {shape}; expected a square [d_ff, d_ff] count matrix")
    if tokens < 1:
        raise MoefyError(f"tokens={tokens}: the co-activation counts must come from at least one token")
    if neighbors < 1:
        raise MoefyError(f"neighbors={neighbors}: keep at least one edge per neuron (64 is a good default)")
    n = shape[0]
    fire = _to_numpy(counts.diagonal())
    if fire.min(initial=0.0) < 0 or fire.max(initial=0.0) > tokens:
        raise MoefyError(
            f"coactivation diagonal (firing counts) spans {fire.min()}..{fire.max()} but tokens={tokens}; "
            "pass the number of tokens the counts were accumulated over"
        )
    k = min(neighbors, n - 1)
    if k == 0:
        return sp.csr_matrix((n, n), dtype=np.float64)
    rows, cols, weights = [], [], []
    for start in range(0, n, _PHI_BLOCK_ROWS):
        stop = min(start + _PHI_BLOCK_ROWS, n)
        phi = _phi(_to_numpy(counts[start:stop]), fire[start:stop], fire, tokens)
        phi[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argpartition(-phi, k - 1, axis=1)[:, :k]
        top_phi = np.take_along_axis(phi, top, axis=1)
        keep = top_phi > 0
        rows.append(np.broadcast_to(np.arange(start, stop)[:, None], top.shape)[keep])
        cols.append(top[keep])
        weights.append(top_phi[keep])
    rows, cols, weights = np.concatenate(rows), np.concatenate(cols), np.concatenate(weights)
    directed = sp.csr_matrix((weights, (rows, cols)), shape=(n, n), dtype=np.float64)
    graph = directed.maximum(directed.T).tocsr()
    graph.eliminate_zeros()
    graph.sort_indices()
    return graph


def coact_split(coactivation, tokens: int, num_experts: int, neighbors: int = 64, ufactor: int = 1, seed: int = 0) -> np.ndarray:
    """METIS min-cut partition of the association graph: neurons that fire together share an expert.

    Part sizes are only near d_ff/E (METIS's `ufactor` tolerance); balance.balance_least_loss makes
    them exact. Isolated neurons (no positive phi edge) are placed by METIS wherever there is room.
    """
    n = coactivation.shape[0]
    check_num_experts(n, num_experts)
    if num_experts == 1:
        return np.zeros(n, dtype=np.int64)
    graph = association_graph(coactivation, tokens, neighbors)
    # METIS's own seed barely moves its result on these graphs (seeds 0 and 1 are even the same
    # srand state), so the seed also shuffles the vertex order, which METIS does depend on.
    order = np.random.default_rng(seed).permutation(n)
    graph = graph[order][:, order].tocsr()
    graph.sort_indices()
    eweights = np.maximum(np.rint(graph.data * _METIS_WEIGHT_SCALE), 1).astype(np.int64)
    adjacency = pymetis.CSRAdjacency(graph.indptr.astype(np.int64), graph.indices.astype(np.int64))
    _, parts = pymetis.part_graph(
        num_experts,
        adjacency=adjacency,
        eweights=eweights,
        options=pymetis.Options(ufactor=ufactor, seed=seed),
    )
    labels = np.empty(n, dtype=np.int64)
    labels[order] = np.asarray(parts, dtype=np.int64)
    return labels
