"""Spot graphs and spatial weights: the mutual kNN graph, user adjacencies, the CAR precision.

The lowest layer of the kernel code: :mod:`spatialscale.priors` (Smoother's priors on these
weights) and :mod:`spatialscale.kernel` (the standardised kernel, power sums, eigenpairs) both
build on it, and :mod:`spatialscale.kernel` re-exports every name here.

Plain numpy / scipy (scikit-learn for the neighbour search): no Dask, no store.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

__all__ = ["knn_adjacency", "square_weights", "symmetrise_adjacency", "finish_adjacency", "car_precision"]


def knn_adjacency(coords: np.ndarray, k_neighbors: int = 4) -> scipy.sparse.csr_matrix:
    """Mutual kNN graph of the spots.

    Each spot's ``k_neighbors`` nearest other spots are found with
    scikit-learn's default neighbour search (so ties, as on hexagonal
    lattices, are broken the same way as in SPLISOSM); an edge is kept only
    when both ends list each other.  A spot left without edges gets a self
    loop of weight one.

    Parameters
    ----------
    coords
        ``(n, d)`` spot coordinates, finite and distinct.
    k_neighbors
        Neighbours per spot, self excluded.

    Returns
    -------
    scipy.sparse.csr_matrix
        Binary symmetric ``(n, n)`` adjacency.
    """
    from sklearn.neighbors import NearestNeighbors

    # Neighbours are searched on float32-rounded coordinates: on lattices many
    # neighbours tie, and the rounding decides which win, exactly as in SPLISOSM.
    coords = np.asarray(coords, dtype=np.float32).astype(np.float64)
    n = coords.shape[0]
    n_nb = min(int(k_neighbors) + 1, n)
    nn = NearestNeighbors(n_neighbors=n_nb, algorithm="auto", metric="euclidean")
    directed = nn.fit(coords).kneighbors_graph(coords, mode="connectivity")
    both = (directed + directed.T).tocsr()
    both.data = (both.data > 1).astype(np.float64)
    return finish_adjacency(both)


def square_weights(w: scipy.sparse.spmatrix | np.ndarray, what: str = "weights") -> scipy.sparse.csr_matrix:
    """``w`` as float64 CSR, after checking it is square with finite, non-negative entries (``what`` names it)."""
    a = scipy.sparse.csr_matrix(w, dtype=np.float64)
    if a.shape[0] != a.shape[1]:
        raise ValueError(f"{what} must be square, got shape {a.shape}.")
    if a.nnz and (not np.all(np.isfinite(a.data)) or a.data.min() < 0):
        raise ValueError(f"{what} must be finite and non-negative.")
    return a


def symmetrise_adjacency(adj: scipy.sparse.spmatrix | np.ndarray) -> scipy.sparse.csr_matrix:
    """Symmetrise a user adjacency as ``(A + A') / 2``, keeping its weights."""
    a = square_weights(adj, "adjacency")
    if (a != a.T).nnz:
        a = ((a + a.T) * 0.5).tocsr()
    return finish_adjacency(a)


def finish_adjacency(w: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """Zero the diagonal, give isolated spots a self loop, drop zeros."""
    w = w.tolil()
    w.setdiag(0.0)
    w = w.tocsr()
    isolated = np.asarray(w.sum(axis=1)).ravel() == 0
    if isolated.any():
        w = w + scipy.sparse.diags(isolated.astype(np.float64), format="csr")
    w.eliminate_zeros()
    w.sort_indices()
    return w.tocsr()


def car_precision(adj: scipy.sparse.spmatrix, rho: float) -> scipy.sparse.csr_matrix:
    """CAR precision ``I - rho D^-1/2 W D^-1/2`` of a symmetric graph."""
    deg = np.asarray(adj.sum(axis=1)).ravel().clip(1e-12)
    d = scipy.sparse.diags(1.0 / np.sqrt(deg))
    n = adj.shape[0]
    return (scipy.sparse.identity(n, format="csr") - rho * (d @ adj @ d)).tocsr()
