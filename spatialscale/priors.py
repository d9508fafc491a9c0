"""Spatial priors of Smoother (Su et al. 2023) as kernel precisions: weights, precisions, admissible ``rho``.

A prior turns symmetric non-negative spatial weights ``W`` (``D = diag(W 1)``) and an
autocorrelation ``rho`` into the precision ``Q`` of a Gaussian spatial process; the kernel is
``K = Q^-1`` (standardised to unit diagonal where asked, :mod:`spatialscale.kernel`); the graphs and weights
they start from are :mod:`spatialscale.graph`'s.

=========  ===========================================  =====================================
prior      precision ``Q``                              ``rho`` with ``Q`` positive definite
=========  ===========================================  =====================================
splisosm   ``I - rho N``, ``N = D^-1/2 W D^-1/2``       ``0 <= rho < 1``
car        ``I - rho W``                                ``0 <= rho < 1 / lambda_max(W)``
icar       ``D - rho W``                                ``0 <= rho < 1``
sar        ``(I - rho V)' (I - rho V)``                 ``0 <= rho < 1 / lambda_max(V)``
isar       sar with ``V = D^-1 W`` (row-scaled)         ``0 <= rho < 1``
sma        ``[(I + rho V)(I + rho V)']^-1`` (dense)     ``0 <= rho < 1 / |lambda_min(V)|``
=========  ===========================================  =====================================

``V`` is ``W``, or ``D^-1 W`` with ``row_scale`` (Smoother's ``row_scale=True`` weights; car and
icar need symmetric weights, so they refuse it).  ``D^-1 W`` is similar to ``N``: its eigenvalues
are ``N``'s, in ``[-1, 1]`` with ``lambda_max = 1``.  The formulas are Smoother 1.1.0's
(``smoother.weights``); the weights follow its ``coordinate_to_weights_knn_sparse`` and
``coordinate_to_weights_dist_sparse``.  See ``docs/priors.md``.

Everything here is plain numpy / scipy: no Dask, no store.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.sparse
import scipy.sparse.linalg

from spatialscale.graph import car_precision, finish_adjacency, knn_adjacency, square_weights

__all__ = [
    "PRIORS",
    "WEIGHTS",
    "DEFAULT_BANDWIDTH",
    "knn_weights",
    "distance_weights",
    "row_scale_weights",
    "prior_precision",
    "sma_covariance",
    "sma_precision",
    "rho_range",
    "check_rho",
    "extreme_eigenvalue",
]

#: Priors: ``splisosm`` (the default kernel: degree-normalised CAR) and Smoother's five.
PRIORS = ("splisosm", "car", "icar", "sar", "isar", "sma")

#: Ways of building the weights from coordinates.
WEIGHTS = ("knn", "distance")

#: Smoother's default Gaussian band width (in the units of the scaled coordinates).
DEFAULT_BANDWIDTH = 0.1

#: ``distance_weights`` refuses a radius that links more than this many neighbours per spot on average.
MAX_MEAN_NEIGHBOURS = 1000

#: Graphs up to this many spots get their extreme eigenvalue from a dense decomposition.
DENSE_EIGEN_MAX = 500

#: Priors whose admissible ``rho`` does not depend on the graph: ``0 <= rho < 1``.
UNIT_RANGE_PRIORS = ("splisosm", "icar", "isar")

#: Priors that need symmetric weights (so refuse ``row_scale``).
SYMMETRIC_PRIORS = ("splisosm", "car", "icar")


def knn_weights(coords: np.ndarray, k_neighbors: int = 4) -> scipy.sparse.csr_matrix:
    """Binary mutual k-nearest-neighbour weights (SPLISOSM's graph; Smoother's ``symmetric=True`` kNN).

    Spots ``i`` and ``j`` are joined (weight 1) when each is among the other's ``k_neighbors``
    nearest; a spot left without an edge gets a self loop of weight 1.  This is
    :func:`spatialscale.graph.knn_adjacency`: neighbours are searched on coordinates rounded to
    float32, so exact distance ties (lattices) are broken as in SPLISOSM; Smoother searches the
    unrounded coordinates, which gives the same graph wherever no two candidate distances tie.

    Parameters
    ----------
    coords
        ``(n, d)`` finite spot coordinates.
    k_neighbors
        Neighbours per spot, self excluded.

    Returns
    -------
    scipy.sparse.csr_matrix
        Symmetric binary ``(n, n)`` weights.
    """
    return knn_adjacency(coords, k_neighbors)


def distance_weights(coords: np.ndarray, radius: float, bandwidth: float = DEFAULT_BANDWIDTH, *,
                     scale_coords: bool = True) -> scipy.sparse.csr_matrix:
    """Gaussian distance-band weights, as Smoother's ``coordinate_to_weights_dist_sparse`` defines them.

    With ``scale_coords`` the coordinates are shifted to a zero minimum per axis and divided by
    one common scale ``s``, the largest extent over the axes (``max_a (max x_a - min x_a)``), so
    shapes are kept and the section fits in ``[0, 1]^d``; without it ``s = 1``.  Spots ``i != j``
    at Euclidean distance ``d_ij <= radius`` (inclusive; ``radius`` in the units of the *given*
    coordinates) are joined with weight ``exp(-(d_ij / s)^2 / (2 bandwidth^2))``: ``bandwidth`` is
    in the units of the *scaled* coordinates (a fraction of the largest extent).  A spot left
    without an edge gets a self loop of weight 1.  Smoother's option of row-normalising the
    weights is ``row_scale`` of :func:`prior_precision` here, so the weights stay symmetric.

    Parameters
    ----------
    coords
        ``(n, d)`` finite spot coordinates.
    radius
        Distance cutoff, ``> 0``, in coordinate units.
    bandwidth
        Width of the Gaussian, ``> 0`` (Smoother's ``band_width``; default 0.1).
    scale_coords
        Scale the coordinates into ``[0, 1]`` before weighting (Smoother's default).

    Returns
    -------
    scipy.sparse.csr_matrix
        Symmetric non-negative ``(n, n)`` weights.

    Raises
    ------
    ValueError
        On a non-positive radius or bandwidth, a radius that joins no pair of spots, or one that
        joins more than :data:`MAX_MEAN_NEIGHBOURS` neighbours per spot on average.
    """
    from scipy.spatial import cKDTree
    from sklearn.neighbors import NearestNeighbors

    radius, bandwidth = float(radius), float(bandwidth)
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a finite number > 0, got {radius!r}.")
    if not (math.isfinite(bandwidth) and bandwidth > 0):
        raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}.")
    x = np.asarray(coords, dtype=np.float64)
    if x.ndim != 2 or not np.all(np.isfinite(x)):
        raise ValueError("coordinates must be a finite (n, d) array.")
    n = x.shape[0]
    scale = 1.0
    if scale_coords:
        x = x - x.min(axis=0, keepdims=True)
        scale = float(np.abs(x).max()) if x.size else 1.0
        scale = scale if scale > 0 else 1.0
        x = x / scale
    r = radius / scale
    pairs = float(cKDTree(x).count_neighbors(cKDTree(x), r)) - n  # ordered pairs i != j (and coincident spots)
    if pairs <= 0:
        nearest = cKDTree(x).query(x, k=2)[0][:, 1].min() * scale if n > 1 else float("nan")
        raise ValueError(f"radius={radius:g} joins no pair of spots (the closest two are {nearest:.4g} apart, in "
                         "coordinate units); use a larger radius.")
    if pairs / n > MAX_MEAN_NEIGHBOURS:
        raise ValueError(f"radius={radius:g} joins {pairs / n:.0f} neighbours per spot on average (more than "
                         f"{MAX_MEAN_NEIGHBOURS}); is it in coordinate units? Use a smaller radius.")
    g = NearestNeighbors(radius=r, metric="euclidean").fit(x).radius_neighbors_graph(x, mode="distance").tocoo()
    off = g.row != g.col
    rows, cols, dist = g.row[off], g.col[off], g.data[off]
    w = scipy.sparse.csr_matrix((np.exp(-(dist**2) / (2.0 * bandwidth**2)), (rows, cols)), shape=(n, n))
    w = w.maximum(w.T).tocsr()  # symmetric by construction; guards a pair found from one end only
    return finish_adjacency(w)


def row_scale_weights(w: scipy.sparse.spmatrix) -> scipy.sparse.csr_matrix:
    """``D^-1 W``: every row scaled to sum to one (Smoother's ``row_scale=True``; not symmetric)."""
    w = scipy.sparse.csr_matrix(w, dtype=np.float64)
    deg = np.asarray(w.sum(axis=1)).ravel()
    if np.any(deg <= 0):
        raise ValueError("every spot needs a positive weight sum to row-scale the weights.")
    return (scipy.sparse.diags(1.0 / deg) @ w).tocsr()


def _checked_weights(w: scipy.sparse.spmatrix | np.ndarray) -> scipy.sparse.csr_matrix:
    """``w`` as float64 CSR, after checking it is square, finite, non-negative and symmetric."""
    w = square_weights(w)
    diff = abs(w - w.T)
    if diff.nnz and diff.max() > 1e-12 * max(abs(w).max(), 1.0):
        raise ValueError("weights must be symmetric (pass the graph before any row scaling; use row_scale=True to "
                         "row-scale it for sar or sma).")
    return w


def _normalised(w: scipy.sparse.csr_matrix) -> scipy.sparse.csr_matrix:
    """``D^-1/2 W D^-1/2`` (symmetric, similar to ``D^-1 W``)."""
    deg = np.asarray(w.sum(axis=1)).ravel()
    if np.any(deg <= 0):
        raise ValueError("every spot needs a positive weight sum (give isolated spots a self loop).")
    d = scipy.sparse.diags(1.0 / np.sqrt(deg))
    return (d @ w @ d).tocsr()


def extreme_eigenvalue(a: scipy.sparse.spmatrix, which: str = "max") -> float:
    """A safe bound on the largest (``which="max"``) or smallest (``"min"``) eigenvalue of symmetric ``a``.

    Up to :data:`DENSE_EIGEN_MAX` rows a dense decomposition (``+-`` a rounding margin).  Above it,
    Lanczos (``scipy.sparse.linalg.eigsh``, relative tolerance ``1e-6``, a fixed start vector, so
    deterministic: the ones vector for ``max``, which overlaps the positive Perron vector of a
    non-negative ``a``) with the residual ``|a v - mu v|`` added (``max``) or subtracted (``min``):
    an eigenvalue lies within the residual of the Ritz value ``mu``, so the bound is on the safe side
    of the extreme eigenvalue Lanczos converged to, by about ``1e-6`` relative.  Where Lanczos does
    not converge, the Gershgorin bound ``+-max_i sum_j |a_ij|`` (always safe) is returned.  Either
    way the result is clipped to the Gershgorin bound.

    Parameters
    ----------
    a
        Sparse symmetric matrix.
    which
        ``"max"`` or ``"min"``.

    Returns
    -------
    float
        An upper bound on ``lambda_max`` or a lower bound on ``lambda_min``.
    """
    if which not in ("max", "min"):
        raise ValueError(f"which must be 'max' or 'min', got {which!r}.")
    a = scipy.sparse.csr_matrix(a, dtype=np.float64)
    n = a.shape[0]
    radius = _gershgorin(a)
    sign = 1.0 if which == "max" else -1.0
    if n <= DENSE_EIGEN_MAX:
        ev = scipy.linalg.eigvalsh(a.toarray())
        value = ev[-1] if which == "max" else ev[0]
        return float(np.clip(value + sign * 1e-12 * max(radius, 1.0), -radius, radius))
    v0 = np.ones(n) if which == "max" else np.random.default_rng(0).standard_normal(n)
    try:
        mu, vec = scipy.sparse.linalg.eigsh(sign * a, k=1, which="LA", v0=v0, ncv=min(n, 64), tol=1e-6,
                                            maxiter=max(1000, n))
    except scipy.sparse.linalg.ArpackNoConvergence:
        return sign * radius
    v = vec[:, 0] / np.linalg.norm(vec[:, 0])
    resid = float(np.linalg.norm(sign * (a @ v) - mu[0] * v))
    return float(np.clip(sign * (mu[0] + resid), -radius, radius))


def rho_range(w: scipy.sparse.spmatrix | np.ndarray, prior: str, *, row_scale: bool = False) -> tuple[float, float]:
    """The admissible ``rho`` of a prior on weights ``w``: ``low <= rho < high``.

    ``low`` is 0 (negative autocorrelation is not offered).  ``high`` is 1 for splisosm, icar and
    isar (and sar with ``row_scale``), whatever the graph: there the precision is
    ``D^1/2 (I - rho N) D^1/2`` or ``(I - rho D^-1 W)'(I - rho D^-1 W)`` with ``N``'s eigenvalues in
    ``[-1, 1]``, singular at ``rho = 1``.  For car and sar it is ``1 / lambda_max(W)``, where ``I - rho W``
    becomes singular (car: indefinite beyond); for sma ``1 / |lambda_min(V)|``, where ``I + rho V``
    does (``inf`` when ``V`` has no negative eigenvalue).  Extreme eigenvalues come from
    :func:`extreme_eigenvalue`, a bound on the safe side, so ``high`` is exact to rounding up to
    500 spots and conservative by about ``1e-6`` relative beyond (Lanczos: seconds at 10^5 spots,
    up to a minute on large lattices with clustered top eigenvalues; :func:`check_rho` avoids it
    where it can).

    Parameters
    ----------
    w
        Symmetric non-negative weights (before any row scaling).
    prior
        One of :data:`PRIORS`.
    row_scale
        Use ``D^-1 W`` (sar, isar, sma; refused by splisosm, car and icar).

    Returns
    -------
    low, high
        The admissible range ``[low, high)``.
    """
    _check_prior(prior, row_scale)
    if prior in UNIT_RANGE_PRIORS or (prior == "sar" and row_scale):
        return 0.0, 1.0
    w = _checked_weights(w)
    if prior in ("car", "sar"):
        lam = extreme_eigenvalue(w, "max")
        return 0.0, (1.0 / lam if lam > 0 else math.inf)
    lam_min = extreme_eigenvalue(_normalised(w) if row_scale else w, "min")  # sma
    return 0.0, (1.0 / -lam_min if lam_min < 0 else math.inf)


def check_rho(w: scipy.sparse.spmatrix | np.ndarray, prior: str, rho: float, *, row_scale: bool = False) -> None:
    """Raise ``ValueError`` unless ``rho`` is in :func:`rho_range` (the message names the range and the fix).

    Cheap bounds decide first: ``rho * max_i sum_j |V_ij| < 1`` (Gershgorin) is admissible without
    any eigenvalue; for car and sar above 500 spots, ``rho * L >= 1`` with ``L <= lambda_max`` a
    Rayleigh quotient of ``W^j 1`` (30 power steps) is refused, the message naming the bracket
    ``[1 / max row sum, 1 / L]`` of the bound.  Only a ``rho`` between those needs
    :func:`rho_range`'s Lanczos.

    Parameters
    ----------
    w
        Symmetric non-negative weights (before any row scaling).
    prior
        One of :data:`PRIORS`.
    rho
        Spatial autocorrelation.
    row_scale
        Use ``D^-1 W`` (sar, isar, sma).
    """
    rho = float(rho)
    _check_prior(prior, row_scale)
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}.")
    if prior in UNIT_RANGE_PRIORS or (prior == "sar" and row_scale):
        if rho >= 1.0:
            what = "sar with row_scale" if prior == "sar" else repr(prior)
            raise ValueError(f"prior={what} needs 0 <= rho < 1 (at rho = 1 its precision is singular: constants "
                             f"have zero precision), got rho={rho:g}; use a smaller rho, e.g. 0.99.")
        return
    w = _checked_weights(w)
    a = _normalised(w) if (prior == "sma" and row_scale) else w
    if rho * _gershgorin(a) < 1.0:  # |lambda| <= max row sum: admissible without an eigenvalue computation
        return
    bound = None
    if prior in ("car", "sar") and a.shape[0] > DENSE_EIGEN_MAX:
        low_lam = _perron_lower_bound(a)
        if rho * low_lam >= 1.0:  # certainly inadmissible: name the bracket without running Lanczos
            lo, hi = 1.0 / _gershgorin(a), 1.0 / low_lam
            bound = f"= {hi:.4g}" if f"{lo:.4g}" == f"{hi:.4g}" else f"lies in [{lo:.4g}, {hi:.4g}]"
    if bound is None:
        high = rho_range(w, prior, row_scale=row_scale)[1]
        if rho < high:
            return
        bound = f"= {high:.6g}"
    if prior == "car":
        raise ValueError(f"prior='car' on this graph needs rho < 1/lambda_max(W) {bound} (I - rho W is not positive "
                         f"definite beyond), got rho={rho:g}; use prior='icar' or the default 'splisosm' "
                         "(degree-normalised, any 0 <= rho < 1), or a smaller rho.")
    if prior == "sar":
        raise ValueError(f"prior='sar' on this graph needs rho < 1/lambda_max(W) {bound} (I - rho W is singular "
                         f"there), got rho={rho:g}; use prior='isar' (or row_scale=True; any 0 <= rho < 1), or a "
                         "smaller rho.")
    v = "D^-1 W" if row_scale else "W"
    raise ValueError(f"prior='sma' on these weights needs rho < 1/|lambda_min({v})| {bound} (I + rho {v} is singular "
                     f"there), got rho={rho:g}; use a smaller rho{'' if row_scale else ' or row_scale=True'}.")


def _gershgorin(a: scipy.sparse.csr_matrix) -> float:
    """``max_i sum_j |a_ij|``: a bound on every ``|lambda|`` of ``a``."""
    return float(np.asarray(abs(a).sum(axis=1)).max()) if a.shape[0] else 0.0


def _perron_lower_bound(w: scipy.sparse.csr_matrix, steps: int = 30) -> float:
    """A lower bound on ``lambda_max`` of non-negative symmetric ``w``: Rayleigh quotients of ``w^j 1``."""
    x = np.ones(w.shape[0])
    best = 0.0
    for _ in range(steps):
        y = w @ x
        best = max(best, float(x @ y) / float(x @ x))
        norm = np.linalg.norm(y)
        if norm == 0:
            break
        x = y / norm
    return best


def _check_prior(prior: str, row_scale: bool) -> None:
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}.")
    if row_scale and prior in SYMMETRIC_PRIORS:
        raise ValueError(f"prior={prior!r} needs symmetric weights, and row-scaled weights are not; use prior='sar', "
                         "'isar' or 'sma' with row_scale, or row_scale=False.")


def prior_precision(w: scipy.sparse.spmatrix | np.ndarray, prior: str, rho: float, *, row_scale: bool = False,
                    check: bool = True) -> scipy.sparse.csr_matrix:
    """The precision ``Q`` of a prior on symmetric weights ``w`` (formulas in the module docstring).

    splisosm, car, icar, sar and isar give a sparse ``Q`` (sar and isar: the pattern of ``W + W'W``).
    sma's precision is the inverse of the sparse covariance :func:`sma_covariance`, a dense matrix
    (returned as CSR, ``n^2`` entries; ``O(n^3)`` time): use it on small sections only.

    Parameters
    ----------
    w
        Symmetric non-negative ``(n, n)`` weights (before any row scaling), e.g. from
        :func:`knn_weights` or :func:`distance_weights`.
    prior
        One of :data:`PRIORS`.
    rho
        Spatial autocorrelation, in :func:`rho_range`.
    row_scale
        Row-scale the weights first (``D^-1 W``; sar, isar, sma).
    check
        Check ``rho`` (:func:`check_rho`; a ``ValueError`` outside the admissible range).

    Returns
    -------
    scipy.sparse.csr_matrix
        The ``(n, n)`` symmetric positive-definite precision.
    """
    _check_prior(prior, row_scale)
    w = _checked_weights(w)
    if check:
        check_rho(w, prior, rho, row_scale=row_scale)
    rho = float(rho)
    n = w.shape[0]
    eye = scipy.sparse.identity(n, format="csr")
    if prior == "splisosm":
        return car_precision(w, rho)
    if prior == "car":
        return (eye - rho * w).tocsr()
    if prior == "icar":
        return (scipy.sparse.diags(np.asarray(w.sum(axis=1)).ravel()) - rho * w).tocsr()
    if prior == "sma":
        return scipy.sparse.csr_matrix(sma_precision(w, rho, row_scale=row_scale))
    v = row_scale_weights(w) if (row_scale or prior == "isar") else w
    a = (eye - rho * v).tocsr()
    q = (a.T @ a).tocsr()
    q = (0.5 * (q + q.T)).tocsr()  # exactly symmetric
    q.sort_indices()
    return q


def sma_covariance(w: scipy.sparse.spmatrix | np.ndarray, rho: float, *, row_scale: bool = False,
                   ) -> scipy.sparse.csr_matrix:
    """The sma covariance ``(I + rho V)(I + rho V)'`` (``V = W`` or ``D^-1 W``): sparse, unlike its inverse."""
    w = _checked_weights(w)
    v = row_scale_weights(w) if row_scale else w
    b = (scipy.sparse.identity(w.shape[0], format="csr") + float(rho) * v).tocsr()
    k = (b @ b.T).tocsr()
    return (0.5 * (k + k.T)).tocsr()


def sma_precision(w: scipy.sparse.spmatrix | np.ndarray, rho: float, *, row_scale: bool = False,
                  standardize: bool = False) -> np.ndarray:
    """Dense precision of the sma prior, optionally of its unit-diagonal (standardised) covariance.

    The covariance ``K = (I + rho V)(I + rho V)'`` is sparse, so the standardisation ``S K S``,
    ``S = diag(K)^-1/2``, is exact and cheap; the precision is its Cholesky inverse (``n^2`` memory,
    ``n^3 / 3`` time).  ``rho`` is not checked here (see :func:`check_rho`); a singular covariance
    raises ``numpy.linalg.LinAlgError``.

    Parameters
    ----------
    w
        Symmetric non-negative weights (before any row scaling).
    rho
        Spatial autocorrelation.
    row_scale
        ``V = D^-1 W`` instead of ``W``.
    standardize
        Return the precision of ``S K S`` instead of ``K``'s.

    Returns
    -------
    numpy.ndarray
        Dense symmetric ``(n, n)`` precision.
    """
    k = sma_covariance(w, rho, row_scale=row_scale)
    if standardize:
        s = scipy.sparse.diags(1.0 / np.sqrt(k.diagonal()))
        k = (s @ k @ s).tocsr()
    dense = k.toarray()
    q = scipy.linalg.cho_solve(scipy.linalg.cho_factor(dense, lower=True), np.eye(dense.shape[0]))
    return 0.5 * (q + q.T)
