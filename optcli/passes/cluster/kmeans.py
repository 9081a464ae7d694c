"""1-D k-means for weight sharing: optimal on a quantile histogram (dynamic programming), then Lloyd on the raw values.

k-means in one dimension is exactly solvable: sorted, the clusters are contiguous runs, and the best split into k runs
is a dynamic programme over prefix sums (Wang & Song 2011, Ckmeans.1d.dp). Over every weight of a big layer the
O(k n^2) table is too large, so the programme runs over at most `bins` quantile bins (exact for those points), and
Lloyd's iterations on the raw weights then refine the centroids; each Lloyd step can only lower the squared error.
"""

from __future__ import annotations

import numpy as np

BINS = 512


def kmeans_1d(values: np.ndarray, k: int, bins: int = BINS, iterations: int = 30) -> np.ndarray:
    """Sorted centroids (at most k; fewer when the values hold fewer distinct numbers)."""
    x = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if x.size == 0:
        return np.zeros(0)
    unique, counts = np.unique(x, return_counts=True)
    if len(unique) <= k:
        return unique
    if len(unique) <= bins:
        points, weights, squares = unique, counts.astype(np.float64), counts * unique**2
    else:
        cuts = np.unique(np.searchsorted(x, np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1])))
        groups = [g for g in np.split(x, cuts) if len(g)]
        points = np.array([g.mean() for g in groups])
        weights = np.array([len(g) for g in groups], dtype=np.float64)
        squares = np.array([(g * g).sum() for g in groups])
    centroids = _optimal(points, weights, squares, k)
    return _lloyd(x, centroids, iterations)


def _optimal(points: np.ndarray, weights: np.ndarray, squares: np.ndarray, k: int) -> np.ndarray:
    m = len(points)
    cw = np.concatenate([[0.0], np.cumsum(weights)])
    cs = np.concatenate([[0.0], np.cumsum(weights * points)])
    cq = np.concatenate([[0.0], np.cumsum(squares)])
    i = np.arange(m + 1)[:, None]
    j = np.arange(m + 1)[None, :]
    n = cw[j] - cw[i]
    s = cs[j] - cs[i]
    # cost[i, j]: squared error of points i..j-1 as one cluster; infinite where the run is empty.
    cost = np.where(i < j, (cq[j] - cq[i]) - s * s / np.where(n > 0, n, 1.0), np.inf)
    best = np.full(m + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((k + 1, m + 1), dtype=np.int64)
    for c in range(1, k + 1):
        total = best[:, None] + cost
        choice[c] = np.argmin(total, axis=0)
        best = total[choice[c], np.arange(m + 1)]
    bounds, end = [], m
    for c in range(k, 0, -1):
        start = int(choice[c, end])
        bounds.append((start, end))
        end = start
    return np.array([(cs[e] - cs[b]) / (cw[e] - cw[b]) for b, e in reversed(bounds)])


def _lloyd(x: np.ndarray, centroids: np.ndarray, iterations: int) -> np.ndarray:
    k = len(centroids)
    for _ in range(iterations):
        index = assign(x, centroids)
        sums = np.bincount(index, weights=x, minlength=k)
        counts = np.bincount(index, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.array_equal(new, centroids):
            break
        centroids = new
    return np.sort(centroids)


def assign(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted centroids for every value."""
    if len(centroids) == 1:
        return np.zeros(np.shape(values), dtype=np.int64)
    return np.searchsorted((centroids[1:] + centroids[:-1]) / 2, values)


def squared_error(values: np.ndarray, centroids: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64).ravel()
    return float(((v - centroids[assign(v, centroids)]) ** 2).sum())


def cluster_values(values: np.ndarray, k: int, sparse: float) -> tuple[np.ndarray, np.ndarray, bool]:
    """k shared values for a flat weight array: (centroids, index per value, zero pinned). A layer at least `sparse`
    zero (pruned before) keeps its zeros as a centroid fixed at 0, so clustering never undoes the pruning."""
    keep_zero = float((values == 0).mean()) >= sparse
    rest = values[values != 0] if keep_zero else values
    centroids = kmeans_1d(rest, k - 1 if keep_zero else k)
    index = assign(rest, centroids)
    if keep_zero:
        full = np.zeros(values.shape, dtype=np.int64)
        full[values != 0] = index + 1
        centroids, index = np.concatenate([[0.0], centroids]), full
    return centroids, index, keep_zero
