"""Covariate-adjusted HSIC spatial-variability tests: residualised responses and the projected kernel's power sums.

With a covariate design ``Z`` (an intercept always included) and
``M = I - [1 Z]([1 Z]'[1 Z])^-1 [1 Z]' = H - U U'`` (``U``: an orthonormal
basis of the centred covariates, ``U' 1 = 0``), the adjusted statistic is
``tr(Y' M K_c M Y)`` with ``K_c`` the centred kernel.  Its null mixture
takes the eigenvalues of ``M K_c M`` instead of ``K_c``'s; only their
power sums ``tr((M K_c M)^r)``, ``r = 1..4``, are needed.  Since
``K_c = H K_c H``, ``M K_c M = P K_c P`` with ``P = I - U U'`` and
``tr((P K_c P)^r) = tr((K_c P)^r) = tr((K_c - L)^r)`` with the rank-``u``
``L = (K_c U) U'``.  Expanding the power into words of ``K_c`` and ``-L``
gives ``tr(K_c^r)`` (the stored power sums) plus traces of products of the
``u x u`` matrices ``G_a = U' K_c^a U``, ``a = 1..4``, which need
``K_c U`` and ``K_c^2 U`` only (``2u`` kernel products).  Nothing here
forms an ``n x n`` matrix.
"""

from __future__ import annotations

import itertools

import numpy as np

from spatialscale.stats.hsic import KernelOperator

__all__ = ["covariate_basis", "projected_gram", "adjusted_power_sums", "residualise", "projected_kernel_sums"]

#: singular values of the centred, column-scaled design below this fraction of the largest are dropped
RANK_TOL = 1e-10


def covariate_basis(z: np.ndarray, tol: float = RANK_TOL) -> np.ndarray:
    """An orthonormal basis ``U`` (``n x u``) of the column space of the centred covariates.

    Columns are centred and scaled to unit length first; directions whose
    singular value is below ``tol`` of the largest are dropped, so a
    categorical's full set of level indicators (which sum to the intercept)
    gives ``k - 1`` directions.

    Parameters
    ----------
    z
        ``(n, F)`` covariate design (no intercept column needed).

    Returns
    -------
    numpy.ndarray
        ``(n, u)`` with ``U' U = I`` and ``U' 1 = 0``; ``u = 0`` when the
        centred design is zero.
    """
    z = np.asarray(z, dtype=np.float64)
    z = z.reshape(z.shape[0], -1)
    zc = z - z.mean(axis=0)
    norms = np.linalg.norm(zc, axis=0)
    zc = zc[:, norms > 0] / norms[norms > 0]
    if zc.shape[1] == 0:
        return np.zeros((z.shape[0], 0))
    u, s, _ = np.linalg.svd(zc, full_matrices=False)
    keep = s > tol * s.max()
    basis = u[:, keep]
    return basis - basis.mean(axis=0)  # exactly orthogonal to 1 up to rounding


def residualise(y: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``M Y`` for every gene of a batch: column-centred ``Y`` minus its projection on ``U``.

    Parameters
    ----------
    y
        ``(B, n, d)`` column-centred responses.
    basis
        ``(n, u)`` orthonormal basis of the centred covariates.
    """
    if basis.shape[1] == 0:
        return y
    return y - basis @ (basis.T @ y)  # batched matmuls: (u, n) @ (B, n, d), then (n, u) @ (B, u, d)


def projected_gram(op: KernelOperator, basis: np.ndarray) -> np.ndarray:
    """``G_a = U' K_c^a U`` for ``a = 1..4``, ``(4, u, u)``, from ``2u`` kernel products."""
    def apply(x: np.ndarray) -> np.ndarray:
        out = np.asarray(op.apply_centred(np.ascontiguousarray(x)), dtype=np.float64)
        return out - out.mean(axis=0)  # K_c x exactly (some operators return it up to a per-column constant)

    b1 = apply(basis)
    b2 = apply(b1)
    g = np.stack([basis.T @ b1, b1.T @ b1, b1.T @ b2, b2.T @ b2])
    return 0.5 * (g + g.transpose(0, 2, 1))


def adjusted_power_sums(kernel_sums: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """``tr((M K_c M)^r)``, ``r = 1..4``, from ``tr(K_c^r)`` and ``G_a = U' K_c^a U``.

    Every word of length ``r`` in ``K_c`` and ``-L`` (``L = K_c U U'``) with
    ``m >= 1`` factors ``L`` is, cyclically, ``(-1)^m tr(G_{a_1+1} ... G_{a_m+1})``
    with ``a_i`` the number of ``K_c`` factors between consecutive ``L`` s.

    Parameters
    ----------
    kernel_sums
        ``(4,)`` power sums of the centred kernel.
    gram
        ``(4, u, u)`` from :func:`projected_gram`.
    """
    k = np.asarray(kernel_sums, dtype=np.float64)
    g = np.asarray(gram, dtype=np.float64)
    out = k.copy()
    if g.shape[1] == 0:
        return out
    for r in range(1, 5):
        total = 0.0
        for word in itertools.product((0, 1), repeat=r):  # 1: a factor L
            pos = [i for i, w in enumerate(word) if w]
            if not pos:
                continue
            gaps = [(pos[(i + 1) % len(pos)] - pos[i] - 1) % r if len(pos) > 1 else r - 1 for i in range(len(pos))]
            prod = np.eye(g.shape[1])
            for a in gaps:
                prod = prod @ g[a]  # G_{a+1} is g[a]
            total += (-1.0) ** len(pos) * np.trace(prod)
        out[r - 1] = k[r - 1] + total
    return out


def projected_kernel_sums(op: KernelOperator, kernel_sums: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``tr((M K_c M)^r)``, ``r = 1..4``, of a section's kernel operator (:func:`projected_gram`, then
    :func:`adjusted_power_sums`)."""
    return adjusted_power_sums(kernel_sums, projected_gram(op, basis))
