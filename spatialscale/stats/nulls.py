"""Null distributions of the HSIC statistic: Liu, Welch, permutations, Liu with exact permutation moments.

All functions are vectorised over genes.  ``c`` holds, per gene, the sums
``c_r = sum_ij (lambda_i mu_j / (n-1))^r`` for ``r = 1..4`` (see
:func:`spatialscale.stats.hsic.mixture_cumulants`).

The chi-square mixture is the large-sample null.  In finite samples the
permutation distribution of ``Q = tr(K_eff Y Y')`` has a variance that
also depends on the fourth moments of the data: for discrete, bounded
responses (isoform ratios at low depth) it is smaller than the mixture's,
and the mixture's p-values are conservative (under-dispersed).
:func:`permutation_moments` gives the exact permutation mean and variance
of ``Q`` (the moments of a quadratic assignment statistic: Kazi-Aoual et
al. 1995, as used for the RV coefficient); ``null="liu-perm"`` standardises
``Q`` with them and keeps Liu's shape (skewness, kurtosis) of the mixture.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["NULLS", "liu_pvalue", "permutation_moments", "permutation_pvalue", "rescale_to_mixture",
           "welch_pvalue"]

NULLS = ("liu", "welch", "perm", "liu-perm")
#: tiny regulariser of the moment ratios (keeps SPLISOSM's numbers)
_EPS = 1e-10


def liu_pvalue(t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Liu's shifted non-central chi-square approximation of ``P[Q > t]``.

    Parameters
    ----------
    t
        ``(G,)`` observed statistics ``Q``.
    c
        ``(G, 4)`` mixture sums ``c_1..c_4``.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` p-values; 1 where the null has no variance.
    """
    t = np.asarray(t, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    c1, c2, c3, c4 = c.T
    ok = np.isfinite(c2) & (c2 > _EPS) & np.isfinite(t)
    c2s = np.where(ok, c2, 1.0)
    s1 = c3 / (c2s**1.5 + _EPS)
    s2 = c4 / (c2s**2 + _EPS)
    disc = s1**2 - s2
    skewed = disc > 0
    root = s1 - np.sqrt(np.where(skewed, disc, 0.0))
    degenerate = skewed & (np.abs(root) < _EPS)
    a = 1.0 / np.where(skewed & ~degenerate, root, 1.0)
    nc = np.where(skewed & ~degenerate, s1 * a**3 - a**2, 0.0)
    df = np.where(
        skewed & ~degenerate,
        a**2 - 2.0 * nc,
        np.where(degenerate, 1.0 / (s2 + _EPS), 1.0 / (s1**2 + _EPS)),
    )
    df = np.maximum(df, _EPS)
    nc = np.maximum(nc, 0.0)
    t_std = (t - c1) / (np.sqrt(2.0 * c2s) + _EPS)
    x = t_std * np.sqrt(2.0 * (df + 2.0 * nc)) + df + nc
    p = stats.ncx2.sf(np.where(ok, x, 0.0), df, np.maximum(nc, 1e-9))
    return np.where(ok, np.clip(p, 0.0, 1.0), 1.0)


def welch_pvalue(t: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Welch-Satterthwaite scaled chi-square ``g chi2(h)`` approximation.

    ``g = c_2 / c_1`` and ``h = c_1^2 / c_2`` match the null mean ``c_1``
    and variance ``2 c_2``.
    """
    t = np.asarray(t, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    mean, var = c[:, 0], 2.0 * c[:, 1]
    ok = (var > _EPS) & (mean > _EPS) & np.isfinite(t)
    g = np.where(ok, var / (2.0 * np.where(ok, mean, 1.0)), 1.0)
    h = np.where(ok, 2.0 * mean**2 / np.where(ok, var, 1.0), 1.0)
    p = stats.chi2.sf(np.where(ok, t / g, 0.0), h)
    fallback = np.where(t > mean + _EPS, 0.0, 1.0)
    return np.where(ok, p, fallback)


def permutation_pvalue(t: np.ndarray, t_null: np.ndarray) -> np.ndarray:
    """``(1 + #{t_null >= t}) / (B + 1)`` per gene.

    Parameters
    ----------
    t
        ``(G,)`` observed statistics.
    t_null
        ``(G, B)`` statistics of ``B`` permutations.
    """
    t = np.asarray(t, dtype=np.float64)
    t_null = np.asarray(t_null, dtype=np.float64)
    exceed = np.sum(t_null >= t[:, None] * (1.0 - 1e-12), axis=1)
    return (1.0 + exceed) / (t_null.shape[1] + 1.0)


def permutation_moments(kernel_sums: np.ndarray, kernel_diag_sq: float | np.ndarray, feature_sums: np.ndarray,
                        response_diag_sq: np.ndarray, n: int | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact mean and variance of ``Q = tr(A P B P')`` over uniformly random spot permutations ``P``.

    ``A = K_eff`` and ``B = Y Y'`` are doubly centred ``n x n`` matrices.  With
    ``T_1 = tr A``, ``T_2 = tr A^2``, ``S = sum_i A_ii^2`` (and ``t_1, t_2, s``
    of ``B``):

    ``E Q = T_1 t_1 / (n - 1)``,

    ``Var Q = 2 ((n-1) T_2 - T_1^2)((n-1) t_2 - t_1^2) / ((n-1)^2 (n+1)(n-2))
    + (n(n+1) S - (n-1)(T_1^2 + 2 T_2))(n(n+1) s - (n-1)(t_1^2 + 2 t_2))
    / ((n+1) n (n-1)(n-2)(n-3))``.

    The second term (the data's fourth moments) is what the chi-square
    mixture leaves out.

    Parameters
    ----------
    kernel_sums
        ``(4,)`` or ``(G, 4)`` power sums ``tr(K_eff^r)`` (the first two are used).
    kernel_diag_sq
        ``sum_i (K_eff)_ii^2``.
    feature_sums
        ``(G, 4)`` power sums of the eigenvalues of ``Y' Y`` (``f_1 = tr B``,
        ``f_2 = tr B^2``).
    response_diag_sq
        ``(G,)`` ``sum_i ||y_i||^4`` (``sum_i B_ii^2``).
    n
        Spots.

    Returns
    -------
    mean, var
        ``(G,)`` each.
    """
    k = np.asarray(kernel_sums, dtype=np.float64)
    f = np.asarray(feature_sums, dtype=np.float64)
    n = np.asarray(n, dtype=np.float64)
    t1, t2 = k[..., 0], k[..., 1]
    u1, u2 = f[..., 0], f[..., 1]
    ss, s = np.asarray(kernel_diag_sq, dtype=np.float64), np.asarray(response_diag_sq, dtype=np.float64)
    mean = t1 * u1 / (n - 1.0)
    gaussian = 2.0 * ((n - 1.0) * t2 - t1**2) * ((n - 1.0) * u2 - u1**2) / ((n - 1.0) ** 2 * (n + 1.0) * (n - 2.0))
    kernel_excess = n * (n + 1.0) * ss - (n - 1.0) * (t1**2 + 2.0 * t2)
    data_excess = n * (n + 1.0) * s - (n - 1.0) * (u1**2 + 2.0 * u2)
    var = gaussian + kernel_excess * data_excess / ((n + 1.0) * n * (n - 1.0) * (n - 2.0) * (n - 3.0))
    return mean, var


def rescale_to_mixture(t: np.ndarray, c: np.ndarray, mean: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``t`` moved onto the mixture's scale: its exact standardisation ``(t - mean) / sd`` mapped to the mixture.

    ``c_1 + (t - mean) sqrt(2 c_2 / var)``; where ``var`` is not positive the
    statistic is returned unchanged.
    """
    t = np.asarray(t, dtype=np.float64)
    c = np.asarray(c, dtype=np.float64)
    ok = np.isfinite(var) & (var > _EPS) & (c[:, 1] > _EPS)
    scale = np.sqrt(np.where(ok, 2.0 * c[:, 1] / np.where(ok, var, 1.0), 1.0))
    return np.where(ok, c[:, 0] + (t - mean) * scale, t)
