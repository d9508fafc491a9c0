"""Moran's I and Geary's C spatial-autocorrelation tests, vectorised over the genes of a batch.

A batch is a ``(B, n, p)`` array of isoform counts (``B`` genes of ``p``
isoforms over ``n`` spots).  Each gene becomes ``d`` centred response
columns ``Y`` (isoform ratios, isoform counts or the gene count), and with
spatial weights ``W`` (``n x n``, zero diagonal, ``S0 = sum_ij w_ij``) the
multivariate statistics are

- Moran: ``I = (n / S0) tr(Y'WY) / tr(Y'Y)``;
- Geary: ``C = (n - 1) sum_ij w_ij |y_i - y_j|^2 / (2 S0 tr(Y'Y))``,

which for one column are the textbook univariate statistics.  P-values are
one-sided for positive autocorrelation, from the normal approximation with
the exact null mean and variance of a Gaussian variable (Cliff & Ord's
"normality" moments), the variance scaled by ``tr((Y'Y)^2) / tr(Y'Y)^2``
for ``d > 1`` columns (see ``docs/statistics.md``).

Only sparse products with ``W`` are formed; nothing here is ``n x n`` dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from scipy import stats

from spatialscale.stats.responses import count_response, gene_count_response, ratio_response

__all__ = ["AUTOCORR_METHODS", "RESPONSES", "WEIGHTINGS", "SpatialWeights", "spatial_weights", "grid_offsets",
           "grid_adjacency", "autocorr_responses", "autocorr_sums", "autocorr_statistic", "null_moments",
           "column_scale", "autocorr_pvalue", "autocorr_batch"]

AUTOCORR_METHODS = ("moran", "geary")
#: which per-gene responses are tested: isoform ratios (mean-filled), isoform counts, gene counts
RESPONSES = ("isoform-ratios", "isoform-counts", "gene-counts")
#: ``row``: each spot's weights scaled to sum to one; ``binary``: one per edge of the spot graph
WEIGHTINGS = ("row", "binary")


@dataclass(frozen=True)
class SpatialWeights:
    """Spatial weights of a section and the sums the null moments need.

    Attributes
    ----------
    matrix
        ``(n, n)`` CSR weights ``W``, zero diagonal (not necessarily symmetric).
    degree
        ``(n,)`` ``(w_i. + w_.i) / 2``: the degrees of the symmetric part of ``W``.
    s0
        ``sum_ij w_ij``.
    s1
        ``sum_ij (w_ij + w_ji)^2 / 2``.
    s2
        ``sum_i (w_i. + w_.i)^2``.
    """

    matrix: scipy.sparse.csr_matrix
    degree: np.ndarray
    s0: float
    s1: float
    s2: float

    @property
    def n(self) -> int:
        return int(self.matrix.shape[0])


def spatial_weights(adjacency: scipy.sparse.spmatrix | np.ndarray, weighting: str = "row") -> SpatialWeights:
    """The weights ``W`` of a spot graph and their sums ``S0``, ``S1``, ``S2``.

    Parameters
    ----------
    adjacency
        ``(n, n)`` non-negative spot graph (a store's
        ``obsp/spatialscale_adjacency``); its diagonal is dropped (a store
        marks isolated spots with a self loop: they get no neighbours).
    weighting
        ``row``: the graph's weights divided by their row sums (rows of
        isolated spots stay zero), as squidpy's default
        ``transformation=True``; ``binary``: every edge weighs one.

    Returns
    -------
    SpatialWeights
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"Unknown weighting {weighting!r}; choose from {WEIGHTINGS}.")
    w = scipy.sparse.csr_matrix(adjacency, dtype=np.float64, copy=True)
    if w.shape[0] != w.shape[1]:
        raise ValueError(f"the spot graph must be square, got shape {w.shape}.")
    w.setdiag(0.0)
    w.eliminate_zeros()
    if weighting == "binary":
        w.data[:] = 1.0
    else:
        rows = np.asarray(w.sum(axis=1)).ravel()
        w = scipy.sparse.diags(1.0 / np.where(rows > 0, rows, 1.0)) @ w
    w = scipy.sparse.csr_matrix(w)
    w.sort_indices()
    out_deg, in_deg = np.asarray(w.sum(axis=1)).ravel(), np.asarray(w.sum(axis=0)).ravel()
    both = w + w.T
    s1 = float(both.multiply(both).sum()) / 2.0
    return SpatialWeights(matrix=w, degree=(out_deg + in_deg) / 2.0, s0=float(w.sum()), s1=s1,
                          s2=float(np.sum((out_deg + in_deg) ** 2)))


def grid_offsets(spacing: tuple[float, float] = (1.0, 1.0), neighbor_degree: int = 1) -> np.ndarray:
    """Neighbour offsets ``(dy, dx)`` of a raster bin: the raster kernel's rule, on an unbounded grid.

    A bin's neighbours are the bins at squared distance
    ``dy^2 a^2 + dx^2 b^2`` (``spacing = (a, b)``) up to the
    ``neighbor_degree``-th smallest nonzero distance (``1``: the 4 rook
    neighbours of a square grid).  The ``k`` distances ``(j min(a, b))^2``,
    ``j = 1..k``, bound that cutoff, so every neighbour lies within ``k``
    bins on each axis.

    Returns
    -------
    numpy.ndarray
        ``(m, 2)`` integer offsets, symmetric (``-o`` is there with ``o``).
    """
    k = int(neighbor_degree)
    if k < 1:
        raise ValueError(f"neighbor_degree must be >= 1, got {neighbor_degree!r}.")
    a, b = float(spacing[0]), float(spacing[1])
    dy, dx = np.meshgrid(np.arange(-k, k + 1), np.arange(-k, k + 1), indexing="ij")
    d2 = (dy * a) ** 2 + (dx * b) ** 2
    cutoff = np.unique(d2)[k]  # index 0 is the bin itself
    keep = (d2 > 0) & (d2 <= cutoff)
    return np.stack([dy[keep], dx[keep]], axis=1).astype(np.int64)


def grid_adjacency(positions: np.ndarray, shape: tuple[int, int], offsets: np.ndarray) -> scipy.sparse.csr_matrix:
    """Binary graph of a raster's observed bins: two bins are neighbours when one is at an offset from the other.

    No wrap-around at the grid's edges (unlike the periodic raster kernel),
    and absent bins are simply not in the graph.

    Parameters
    ----------
    positions
        ``(m,)`` distinct flat grid positions ``row * nx + col`` of the observed bins, in their order.
    shape
        ``(ny, nx)`` of the grid.
    offsets
        ``(k, 2)`` symmetric neighbour offsets (:func:`grid_offsets`).

    Returns
    -------
    scipy.sparse.csr_matrix
        ``(m, m)`` symmetric 0/1 adjacency, rows in ``positions``' order.
    """
    pos = np.asarray(positions, dtype=np.int64)
    ny, nx = int(shape[0]), int(shape[1])
    m = pos.size
    row, col = np.divmod(pos, nx)
    order = np.argsort(pos, kind="stable")
    ranked = pos[order]
    src, dst = [], []
    for dy, dx in np.asarray(offsets, dtype=np.int64).reshape(-1, 2):
        r, c = row + dy, col + dx
        inside = (r >= 0) & (r < ny) & (c >= 0) & (c < nx)
        target = r * nx + c
        at = np.minimum(np.searchsorted(ranked, target), max(m - 1, 0))
        hit = inside & (ranked[at] == target) if m else inside
        src.append(np.flatnonzero(hit))
        dst.append(order[at[hit]])
    i = np.concatenate(src) if src else np.zeros(0, np.int64)
    j = np.concatenate(dst) if dst else np.zeros(0, np.int64)
    adj = scipy.sparse.csr_matrix((np.ones(i.size), (i, j)), shape=(m, m))
    adj.sum_duplicates()
    adj.data[:] = 1.0
    return adj


def autocorr_responses(counts: np.ndarray, response: str = "isoform-ratios") -> np.ndarray:
    """Column-centred responses ``(B, n, d)`` of a batch.

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    response
        ``isoform-ratios`` (``d = p``; spots where the gene has no counts take
        the covered spots' mean ratio, as ``hsic-ir``), ``isoform-counts``
        (``d = p``) or ``gene-counts`` (``d = 1``).
    """
    if response == "isoform-ratios":
        return ratio_response(counts)[0]
    if response == "isoform-counts":
        return count_response(counts)
    if response == "gene-counts":
        return gene_count_response(counts)
    raise ValueError(f"Unknown response {response!r}; choose from {RESPONSES}.")


def autocorr_sums(weights: SpatialWeights, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-gene quadratic forms of centred responses: ``tr(Y'WY)``, ``sum_i deg_i |y_i|^2`` and ``tr(Y'Y)``.

    One sparse product ``W Y_g`` per gene (``d`` columns at a time), so each
    gene's sums are computed alike whatever the batch's other genes.

    Parameters
    ----------
    weights
        The section's weights.
    y
        ``(B, n, d)`` column-centred responses.

    Returns
    -------
    cross, spread, total : numpy.ndarray
        ``(B,)`` each.
    """
    y = np.asarray(y, dtype=np.float64)
    b, n, _ = y.shape
    if n != weights.n:
        raise ValueError(f"responses have {n} spots, the weights {weights.n}.")
    d = y.shape[2]
    cols = np.ascontiguousarray(y.transpose(1, 0, 2).reshape(n, b * d))  # every gene's columns side by side
    # one sparse product for the batch; each column's sums run along its own contiguous row, so they do not
    # depend on which other genes share the batch
    rows = np.ascontiguousarray(cols.T)  # (B d, n)
    lagged = np.ascontiguousarray((weights.matrix @ cols).T)
    sq = rows * rows
    cross = np.sum(rows * lagged, axis=1).reshape(b, d).sum(axis=1)
    spread = np.sum(sq * weights.degree[None, :], axis=1).reshape(b, d).sum(axis=1)
    total = np.sum(sq, axis=1).reshape(b, d).sum(axis=1)
    return cross, spread, total


def autocorr_statistic(method: str, weights: SpatialWeights, cross: np.ndarray, spread: np.ndarray,
                       total: np.ndarray) -> np.ndarray:
    """Moran's I or Geary's C from :func:`autocorr_sums` (NaN where ``total`` is 0).

    ``sum_ij w_ij |y_i - y_j|^2 = 2 (sum_i deg_i |y_i|^2 - tr(Y'WY))``, so
    Geary's numerator needs no second product.
    """
    n = weights.n
    safe = np.where(total > 0, total, 1.0)
    if method == "moran":
        stat = (n / weights.s0) * cross / safe
    elif method == "geary":
        stat = (n - 1) * (spread - cross) / (weights.s0 * safe)
    else:
        raise ValueError(f"Unknown method {method!r}; choose from {AUTOCORR_METHODS}.")
    return np.where(total > 0, stat, np.nan)


def null_moments(method: str, weights: SpatialWeights) -> tuple[float, float]:
    """Null mean and variance of the univariate statistic for an i.i.d. Gaussian variable.

    Moran: ``E = -1 / (n - 1)``, ``Var = (n^2 S1 - n S2 + 3 S0^2) / ((n^2 - 1) S0^2) - E^2``;
    Geary: ``E = 1``, ``Var = ((2 S1 + S2)(n - 1) - 4 S0^2) / (2 (n + 1) S0^2)``.
    Both are exact (the statistic is a ratio of quadratic forms in a
    Gaussian vector, independent of its denominator).
    """
    n, s0, s1, s2 = float(weights.n), weights.s0, weights.s1, weights.s2
    if method == "moran":
        mean = -1.0 / (n - 1.0)
        return mean, (n * n * s1 - n * s2 + 3.0 * s0 * s0) / ((n * n - 1.0) * s0 * s0) - mean * mean
    if method == "geary":
        return 1.0, ((2.0 * s1 + s2) * (n - 1.0) - 4.0 * s0 * s0) / (2.0 * (n + 1.0) * s0 * s0)
    raise ValueError(f"Unknown method {method!r}; choose from {AUTOCORR_METHODS}.")


def column_scale(y: np.ndarray) -> np.ndarray:
    """``sum(mu^2) / (sum mu)^2`` per gene, ``mu`` the eigenvalues of ``Y'Y`` (1 for one column; NaN if ``Y = 0``).

    Equal to ``||Y'Y||_F^2 / tr(Y'Y)^2``, so no eigen-decomposition is needed.
    """
    y = np.asarray(y, dtype=np.float64)
    gram = np.matmul(y.transpose(0, 2, 1), y)
    b = gram.shape[0]
    tr = np.trace(gram, axis1=1, axis2=2)
    fro = (gram * gram).reshape(b, -1).sum(axis=1)
    return np.where(tr > 0, fro / np.where(tr > 0, tr, 1.0) ** 2, np.nan)


def autocorr_pvalue(method: str, statistic: np.ndarray, mean: float, var: float,
                    scale: np.ndarray | float = 1.0) -> np.ndarray:
    """One-sided normal p-value for positive autocorrelation (I above its mean, C below 1).

    ``scale`` multiplies the univariate null variance (:func:`column_scale`).
    """
    sd = np.sqrt(var * np.asarray(scale, dtype=np.float64))
    with np.errstate(invalid="ignore", divide="ignore"):
        z = (statistic - mean) / sd if method == "moran" else (mean - statistic) / sd
    return stats.norm.sf(z)


def autocorr_batch(counts: np.ndarray, weights: SpatialWeights, *, method: str = "moran",
                   response: str = "isoform-ratios") -> dict[str, np.ndarray]:
    """Moran's I or Geary's C test of every gene of a batch.

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    weights
        The section's weights (:func:`spatial_weights`).
    method
        ``moran`` or ``geary``.
    response
        One of :data:`RESPONSES`.

    Returns
    -------
    dict
        ``(B,)`` arrays: ``statistic`` (I or C; NaN for a gene constant in
        space), ``pvalue`` (1 where the statistic is NaN), ``effect`` (``I``,
        or ``1 - C``) and ``n_spots_used`` (every spot: uncovered spots take
        the mean ratio).
    """
    if method not in AUTOCORR_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose from {AUTOCORR_METHODS}.")
    y = autocorr_responses(np.asarray(counts, dtype=np.float64), response)
    b, n, _ = y.shape
    varies = _varies(y)
    if not varies.all():
        y = np.where(varies[:, None, None], y, 0.0)
    cross, spread, total = autocorr_sums(weights, y)
    stat = autocorr_statistic(method, weights, cross, spread, total)
    mean, var = null_moments(method, weights)
    p = autocorr_pvalue(method, stat, mean, var, column_scale(y))
    ok = varies & np.isfinite(stat)
    stat = np.where(ok, stat, np.nan)
    return {"statistic": stat, "pvalue": np.where(ok, p, 1.0),
            "effect": stat if method == "moran" else 1.0 - stat,
            "n_spots_used": np.full(b, n, dtype=np.int64)}


def _varies(y: np.ndarray) -> np.ndarray:
    """``(B,)``: the gene's responses are finite and not constant in space.

    Centring a constant column leaves rounding noise of the order of the
    values' precision, not a spatial pattern: a column varies when its range
    exceeds ``1e-12`` of its largest magnitude (at least ``1e-12``).
    """
    if y.shape[1] == 0 or y.shape[2] == 0:
        return np.zeros(y.shape[0], dtype=bool)
    hi, lo = y.max(axis=1), y.min(axis=1)  # (B, d); NaN propagates through max / min, infinities show in them
    finite = np.isfinite(hi).all(axis=1) & np.isfinite(lo).all(axis=1)
    with np.errstate(invalid="ignore"):
        spread = hi - lo > 1e-12 * np.maximum(np.maximum(np.abs(hi), np.abs(lo)), 1.0)
    return finite & spread.any(axis=1)
