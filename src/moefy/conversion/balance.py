"""Making a near-equal split exact (every expert d_ff/E neurons), and scoring how much it keeps together.

METIS (split.coact_split) only promises part sizes near d_ff/E. MoEfication moved surplus neurons
to under-full experts at random (balance_random); balance_least_loss instead always makes the move
that gives up the least affinity to the neuron's current expert, which keeps more intra-expert
co-activation.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from moefy.conversion.split import _check_labels, _to_numpy, check_num_experts
from moefy.errors import MoefyError


def _square(matrix, n: int):
    """Dense float64 ndarray or CSR float64, checked to be [n, n]."""
    if sp.issparse(matrix):
        matrix = sp.csr_matrix(matrix, dtype=np.float64)
        matrix.sum_duplicates()  # the incremental updates index rows, so each entry must appear once
    else:
        matrix = _to_numpy(matrix)
    if matrix.shape != (n, n):
        raise MoefyError(f"matrix has shape {matrix.shape}, expected ({n}, {n}) to match {n} labels")
    return matrix


def expert_sizes(labels, num_experts: int) -> np.ndarray:
    labels = _check_labels(labels, len(labels), num_experts)
    return np.bincount(labels, minlength=num_experts)


def is_balanced(labels, num_experts: int) -> bool:
    sizes = expert_sizes(labels, num_experts)
    return bool(len(labels) % num_experts == 0 and (sizes == len(labels) // num_experts).all())


def balance_random(labels, num_experts: int, seed: int = 0) -> np.ndarray:
    """MoEfication's baseline: random surplus neurons of over-full experts fill the under-full ones."""
    labels = _check_labels(labels, len(labels), num_experts).copy()
    size = check_num_experts(len(labels), num_experts)
    sizes = np.bincount(labels, minlength=num_experts)
    rng = np.random.default_rng(seed)
    surplus = [rng.choice(np.flatnonzero(labels == e), sizes[e] - size, replace=False) for e in np.flatnonzero(sizes > size)]
    if not surplus:
        return labels
    movers = rng.permutation(np.concatenate(surplus))
    under = np.flatnonzero(sizes < size)
    labels[movers] = np.repeat(under, size - sizes[under])
    return labels


def balance_least_loss(labels, affinity, num_experts: int) -> np.ndarray:
    """Greedy exact balancing that keeps the most affinity inside experts.

    Repeatedly applies the single move (neuron i of an over-full expert a -> under-full expert b)
    with the least loss A[i, a] - A[i, b], where A[i, e] is i's total affinity to the other members
    of e. Each move fixes one unit of surplus, so there are exactly (total surplus) moves.
    `affinity` must be symmetric: the association weights METIS partitioned (split.association_graph).
    """
    labels = _check_labels(labels, len(labels), num_experts).copy()
    n = len(labels)
    size = check_num_experts(n, num_experts)
    sizes = np.bincount(labels, minlength=num_experts)
    if (sizes == size).all():
        return labels
    affinity = _square(affinity, n)
    # A neuron's affinity to itself says nothing about where it belongs.
    if sp.issparse(affinity):
        affinity = (affinity - sp.diags(affinity.diagonal())).tocsr()
        affinity.eliminate_zeros()
    else:
        affinity = affinity.copy()
        np.fill_diagonal(affinity, 0.0)
    onehot = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, num_experts))
    A = affinity @ onehot  # [n, E]: each neuron's affinity to each expert's members
    A = A.toarray() if sp.issparse(A) else np.asarray(A)
    for _ in range(int(np.maximum(sizes - size, 0).sum())):
        candidates = np.flatnonzero(sizes[labels] > size)
        under = np.flatnonzero(sizes < size)
        own = A[candidates, labels[candidates]]
        loss = own[:, None] - A[np.ix_(candidates, under)]
        best = np.argmin(loss)
        i, b = candidates[best // len(under)], under[best % len(under)]
        a = labels[i]
        # Symmetric affinity: row i is column i, i.e. what every neuron gains/loses from i moving.
        if sp.issparse(affinity):
            lo, hi = affinity.indptr[i], affinity.indptr[i + 1]
            neighbours, weights = affinity.indices[lo:hi], affinity.data[lo:hi]
            A[neighbours, a] -= weights
            A[neighbours, b] += weights
        else:
            A[:, a] -= affinity[i]
            A[:, b] += affinity[i]
        labels[i] = b
        sizes[a] -= 1
        sizes[b] += 1
    return labels


def weight_kept(matrix, labels) -> float:
    """Share of a symmetric matrix's off-diagonal weight that lies inside experts (a split's quality)."""
    labels = _check_labels(labels, len(labels))
    n = len(labels)
    matrix = _square(matrix, n)
    if sp.issparse(matrix):
        coo = matrix.tocoo()
        off = coo.row != coo.col
        total = coo.data[off].sum()
        inside = coo.data[off & (labels[coo.row] == labels[coo.col])].sum()
    else:
        num_experts = int(labels.max()) + 1 if n else 0
        onehot = np.zeros((n, num_experts))
        onehot[np.arange(n), labels] = 1.0
        trace = np.trace(matrix)
        total = matrix.sum() - trace
        inside = (matrix @ onehot)[np.arange(n), labels].sum() - trace
    return float(inside / total) if total != 0 else 0.0
