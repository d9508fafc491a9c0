"""Null distributions of the HSIC statistic: Liu, Welch and permutations.

All functions are vectorised over genes.  ``c`` holds, per gene, the sums
``c_r = sum_ij (lambda_i mu_j / (n-1))^r`` for ``r = 1..4`` (see
:func:`spatialscale.stats.hsic.mixture_cumulants`).
"""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["NULLS", "liu_pvalue", "welch_pvalue", "permutation_pvalue"]

NULLS = ("liu", "welch", "perm")
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
