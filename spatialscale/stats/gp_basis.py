"""Spatial-GP kernel bases: the RBF kernel on z-scored coordinates, exactly (eigendecomposition) or by Nystrom.

The spectral form ``K ~ U diag(s) U'`` that :mod:`spatialscale.stats.gp` fits
and residualises with.  Pure torch / numpy; nothing here knows Dask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.linalg
import torch

__all__ = ["EXACT_HARD_MAX_N", "SpectralBasis", "as_2d_float", "chunk_rows", "exact_basis", "inducing_points",
           "nystrom_basis", "rbf_kernel", "resolve_device", "standardize_covariates", "zscore_coordinates"]

EXACT_HARD_MAX_N = 40_000
"""Largest section the exact backend decomposes (dense ``n x n``)."""
CHUNK_ELEMENTS = 1 << 24
"""Elements of one block of kernel rows formed at a time."""

@dataclass(frozen=True)
class SpectralBasis:
    """Orthonormal eigen-basis of the (approximate) unit-amplitude RBF kernel.

    Attributes
    ----------
    vectors
        ``(n, r)`` orthonormal columns ``U``.
    values
        ``(r,)`` eigenvalues ``s >= 0`` (unit amplitude); the kernel is ``U diag(s) U'``
        and is zero on the orthogonal complement of ``U``.
    kind
        ``"exact"`` or ``"lowrank"``.
    n_inducing
        Number of inducing points (0 for the exact basis).
    """

    vectors: torch.Tensor
    values: torch.Tensor
    kind: str
    n_inducing: int = 0

    @property
    def n(self) -> int:
        """Number of spots."""
        return int(self.vectors.shape[0])

    @property
    def rank(self) -> int:
        """Number of basis vectors."""
        return int(self.vectors.shape[1])


# --------------------------------------------------------------------------- inputs


def as_2d_float(a: Any, name: str) -> np.ndarray:
    """Convert to a finite 2-D float64 array or raise ``ValueError``."""
    arr = np.asarray(a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {arr.shape})")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{name} has {bad.sum()} non-finite value(s) (NaN/inf) in {rows.size} row(s), "
                         f"first at row {rows[0]}; drop or impute those spots first")
    return arr


def zscore_coordinates(coords: Any) -> np.ndarray:
    """Centre each coordinate axis and divide by its sample standard deviation.

    Parameters
    ----------
    coords
        ``(n, d)`` spot coordinates.

    Returns
    -------
    numpy.ndarray
        ``(n, d)`` float64; an axis with standard deviation below ``1e-8`` is divided by
        ``1e-8`` (as the reference does), i.e. it becomes 0.
    """
    x = as_2d_float(coords, "coords")
    if x.shape[0] < 2:
        raise ValueError("need at least 2 spots")
    sd = np.maximum(x.std(axis=0, ddof=1), 1e-8)
    return (x - x.mean(axis=0)) / sd


def standardize_covariates(y: Any, *, min_std: float = 0.0) -> np.ndarray:
    """Centre each covariate and divide by its sample (``ddof=1``) standard deviation.

    Parameters
    ----------
    y
        ``(n,)`` or ``(n, F)`` covariates.
    min_std
        A column whose standard deviation is ``<= min_std`` is an error.

    Returns
    -------
    numpy.ndarray
        ``(n, F)`` float64.

    Raises
    ------
    ValueError
        On non-finite values or a constant column.
    """
    z = as_2d_float(y, "y")
    if z.shape[0] < 2:
        raise ValueError("need at least 2 spots")
    sd = z.std(axis=0, ddof=1)
    const = np.flatnonzero(sd <= min_std)
    if const.size:
        raise ValueError(f"covariate column(s) {const.tolist()} have zero variance")
    return (z - z.mean(axis=0)) / sd


# --------------------------------------------------------------------------- kernels


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CPU."""
    return torch.device("cpu") if device is None else torch.device(device)


def rbf_kernel(x1: torch.Tensor, x2: torch.Tensor, length_scale: float = 1.0) -> torch.Tensor:
    """Unit-amplitude RBF kernel ``exp(-|x1_i - x2_j|^2 / (2 l^2))``.

    Parameters
    ----------
    x1, x2
        ``(n1, d)`` and ``(n2, d)`` coordinates (same dtype and device).
    length_scale
        ``l``.

    Returns
    -------
    torch.Tensor
        ``(n1, n2)``.
    """
    a = x1 / length_scale
    b = x2 / length_scale
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    return torch.exp(-0.5 * sq.clamp_min_(0.0))


def exact_basis(x: np.ndarray, *, length_scale: float = 1.0, device: str | torch.device | None = None) -> SpectralBasis:
    """Full eigen-decomposition of the dense ``n x n`` RBF kernel.

    Parameters
    ----------
    x
        ``(n, d)`` z-scored coordinates.
    length_scale
        RBF length scale.
    device
        ``None``/``"cpu"`` uses LAPACK's divide-and-conquer ``syevd`` through SciPy;
        any other torch device uses ``torch.linalg.eigh`` there.

    Returns
    -------
    SpectralBasis
        ``n`` eigenpairs; eigenvalues clipped at 0.
    """
    n = x.shape[0]
    if n > EXACT_HARD_MAX_N:
        raise ValueError(f"exact GP backend refuses n={n} > {EXACT_HARD_MAX_N} spots (dense n x n); use 'lowrank'")
    dev = resolve_device(device)
    xt = torch.as_tensor(x, dtype=torch.float64, device=dev)
    k = rbf_kernel(xt, xt, length_scale)
    k = 0.5 * (k + k.T)
    if dev.type == "cpu":
        s, u = scipy.linalg.eigh(k.numpy(), driver="evd", overwrite_a=True, check_finite=False)
        s_t, u_t = torch.from_numpy(s), torch.from_numpy(u)
    else:
        s_t, u_t = torch.linalg.eigh(k)
    del k
    return SpectralBasis(vectors=u_t, values=s_t.clamp_min(0.0), kind="exact")


def inducing_points(x: np.ndarray, *, spacing: float = 0.25, max_points: int = 2000) -> np.ndarray:
    """Deterministic inducing points: centroids of the occupied cells of a square grid.

    Parameters
    ----------
    x
        ``(n, d)`` coordinates (z-scored).
    spacing
        Initial grid cell width, in the coordinates' units.
    max_points
        Upper bound on the number of points; the cell width grows by the needed factor
        until at most this many cells are occupied.

    Returns
    -------
    numpy.ndarray
        ``(m, d)`` inducing points, ``m <= max_points``, in lexicographic cell order.
    """
    if spacing <= 0 or max_points < 1:
        raise ValueError("spacing must be > 0 and max_points >= 1")
    lo = x.min(axis=0)
    h = float(spacing)
    while True:
        cells = np.floor((x - lo) / h).astype(np.int64)
        _, inverse, counts = np.unique(cells, axis=0, return_inverse=True, return_counts=True)
        m = counts.size
        if m <= max_points:
            break
        h *= max(1.02, (m / max_points) ** (1.0 / x.shape[1]))
    inverse = inverse.reshape(-1)
    centroids = np.stack([np.bincount(inverse, weights=x[:, j], minlength=m) for j in range(x.shape[1])], axis=1)
    return centroids / counts[:, None]


def chunk_rows(n_cols: int) -> int:
    """Rows per chunk so that one chunk holds about 16M elements."""
    return max(1, CHUNK_ELEMENTS // max(n_cols, 1))


def nystrom_basis(
    x: np.ndarray,
    *,
    length_scale: float = 1.0,
    spacing: float = 0.25,
    max_inducing: int = 2000,
    rtol: float = 1e-12,
    device: str | torch.device | None = None,
) -> SpectralBasis:
    """Eigen-basis of the Nystrom approximation ``R_nm R_mm^+ R_mn``, in ``O(n m)`` memory.

    The feature matrix ``F = R_nm V diag(w^-1/2)`` (``R_mm = V diag(w) V'``, eigenvalues
    below ``rtol * max(w)`` dropped) satisfies ``F F' = R_nm R_mm^+ R_mn``; a thin QR
    ``F = Q T`` and the SVD ``T = P diag(sigma) W'`` give the orthonormal basis ``Q P``
    with eigenvalues ``sigma^2``.

    Parameters
    ----------
    x
        ``(n, d)`` z-scored coordinates.
    length_scale
        RBF length scale.
    spacing
        Grid cell width for :func:`inducing_points`, as a multiple of ``length_scale``.
    max_inducing
        Upper bound on the number of inducing points.
    rtol
        Relative eigenvalue floor of ``R_mm``.
    device
        Torch device (``None`` = CPU).

    Returns
    -------
    SpectralBasis
        ``r <= m`` eigenpairs.
    """
    dev = resolve_device(device)
    z = inducing_points(x, spacing=spacing * length_scale, max_points=max_inducing)
    zt = torch.as_tensor(z, dtype=torch.float64, device=dev)
    kmm = rbf_kernel(zt, zt, length_scale)
    w, v = torch.linalg.eigh(0.5 * (kmm + kmm.T))
    keep = w > rtol * w.max()
    proj = v[:, keep] / torch.sqrt(w[keep])
    n = x.shape[0]
    feats = torch.empty((n, proj.shape[1]), dtype=torch.float64, device=dev)
    step = chunk_rows(zt.shape[0])
    for start in range(0, n, step):
        xc = torch.as_tensor(x[start:start + step], dtype=torch.float64, device=dev)
        feats[start:start + step] = rbf_kernel(xc, zt, length_scale) @ proj
    q, t = torch.linalg.qr(feats, mode="reduced")
    del feats
    p, sigma, _ = torch.linalg.svd(t, full_matrices=False)
    vectors = q @ p
    return SpectralBasis(vectors=vectors, values=sigma**2, kind="lowrank", n_inducing=int(z.shape[0]))
