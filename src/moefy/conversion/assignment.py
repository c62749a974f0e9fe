"""Exact balanced assignment: n points to E clusters of exactly `size` points, at least total cost.

This is the step balanced k-means repeats every round, so its speed decides how fast layers are
split. It is a transportation problem with few sinks (E clusters), solved on the E-node cluster
graph instead of the n x n matrix that linear_sum_assignment or a min-cost-flow network would need:

1. Prices: with a price p_e per cluster, sending every point to argmin_e (cost - p) is optimal for
   the cluster sizes it produces (no cycle of moves between clusters can lower the cost). A few
   rounds of dual ascent (raise the price of short clusters, lower it for overfull ones) make those
   sizes nearly equal.
2. Successive shortest paths: the remaining surplus is moved one point at a time along the
   cheapest chain of moves from an overfull to a short cluster (Dijkstra on E nodes with the prices
   as potentials), which keeps the assignment optimal. When no cluster is overfull, it is the
   optimum of the balanced problem.
"""

from __future__ import annotations

import numpy as np
from scipy.sparse.csgraph import csgraph_from_dense, dijkstra

from moefy.errors import MoefyError


def _check(cost: np.ndarray, size: int) -> np.ndarray:
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or size < 1 or cost.shape[0] != cost.shape[1] * size:
        raise MoefyError(f"cost has shape {cost.shape} but size={size}: need n = E * size rows for E clusters of {size}")
    return cost


def _ascend_prices(cost: np.ndarray, size: int, prices: np.ndarray, steps: int) -> np.ndarray:
    """Dual (super)gradient ascent on the cluster prices; returns the prices with the least surplus."""
    num_clusters = cost.shape[1]
    nearest_two = np.partition(cost, 1, axis=1)[:, :2] if num_clusters > 1 else cost
    gap = float(np.median(nearest_two[:, -1] - nearest_two[:, 0])) or 1.0
    best_prices, best_surplus = prices, np.inf
    for step in range(steps):
        counts = np.bincount((cost - prices).argmin(1), minlength=num_clusters)
        surplus = np.maximum(counts - size, 0).sum()
        if surplus < best_surplus:
            best_prices, best_surplus = prices, surplus
        if surplus == 0:
            break
        prices = prices - (gap / size) * (counts - size) / (1.0 + step / 10.0)
    return best_prices


def _cheapest_moves(cost: np.ndarray, labels: np.ndarray, clusters, moves: np.ndarray, movers: np.ndarray) -> None:
    """For each cluster a in `clusters`: moves[a, b] = least extra cost of moving one of a's points to b."""
    for a in clusters:
        members = np.flatnonzero(labels == a)
        if members.size == 0:
            moves[a], movers[a] = np.inf, -1
            continue
        extra = cost[members] - cost[members, a][:, None]
        best = extra.argmin(0)
        moves[a] = extra[best, np.arange(extra.shape[1])]
        movers[a] = members[best]
        moves[a, a] = np.inf


def balanced_assignment(cost, size: int, ascent_steps: int = 50) -> np.ndarray:
    """Labels 0..E-1, each exactly `size` times, minimising sum_i cost[i, label_i] (cost is [n, E]).

    `ascent_steps` only trades price-ascent work for shortest-path moves; the result is optimal either way.
    """
    cost = _check(cost, size)
    num_clusters = cost.shape[1]
    prices = _ascend_prices(cost, size, np.zeros(num_clusters), ascent_steps)
    labels = (cost - prices).argmin(1)
    counts = np.bincount(labels, minlength=num_clusters)
    if (counts == size).all():
        return labels.astype(np.int64)
    moves = np.empty((num_clusters, num_clusters))
    movers = np.empty((num_clusters, num_clusters), dtype=np.int64)
    _cheapest_moves(cost, labels, range(num_clusters), moves, movers)
    while (counts > size).any():
        # reduced costs are >= 0 by the invariant; clip float noise so Dijkstra accepts them
        reduced = np.maximum(moves + prices[:, None] - prices[None, :], 0.0)
        graph = csgraph_from_dense(reduced, null_value=np.inf)
        sources = np.flatnonzero(counts > size)
        dist, pred, _ = dijkstra(graph, indices=sources, min_only=True, return_predecessors=True)
        short = np.flatnonzero(counts < size)
        target = short[dist[short].argmin()]
        prices += np.minimum(dist, dist[target])  # keeps every reduced cost >= 0 after the moves
        path = [target]
        while pred[path[-1]] >= 0:
            path.append(pred[path[-1]])
        path.reverse()
        for a, b in zip(path[:-1], path[1:]):
            labels[movers[a, b]] = b
        counts[path[0]] -= 1
        counts[path[-1]] += 1
        _cheapest_moves(cost, labels, path, moves, movers)
    return labels.astype(np.int64)
