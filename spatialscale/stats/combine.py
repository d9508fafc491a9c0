"""Combining per-section evidence into one p-value per gene (cohorts of tissue sections).

All functions take p-values (or statistics) with the sections on the last
axis and ignore NaN entries (a gene absent or filtered out in a section):
each gene is combined over the sections where it was tested.  A gene tested
in no section gets NaN.

- :func:`cauchy_combine`: the Cauchy combination (ACAT),
  ``T = sum_s w_s tan((1/2 - p_s) pi)`` with weights summing to one and
  ``p = 1/2 - arctan(T) / pi``; valid under arbitrary dependence between
  sections (the tail of ``T`` stays standard Cauchy).  Computed as
  ``tan((1/2 - p) pi) = 1 / tan(p pi)`` and ``p = arctan(1 / T) / pi`` for
  ``T > 0``, so p-values near 0 and near 1 keep their precision.
- :func:`fisher_combine`: ``-2 sum log p_s ~ chi2(2 k)`` (independent sections).
- :func:`stouffer_combine`: ``Z = sum w_s z_s / sqrt(sum w_s^2)`` with
  ``z_s = Phi^-1(1 - p_s)`` (independent sections); weights typically
  ``sqrt`` of the sections' spot counts.
- :func:`pooled_liu`: the pooled HSIC test.  Under the null each section's
  statistic is a weighted sum of independent chi-square(1) variables with
  mixture sums ``c_r = sum lambda^r`` (:mod:`spatialscale.stats.nulls`);
  for independent sections the statistics add and so do the ``c_r`` (the
  cumulants are ``2^(r-1) (r-1)! c_r``), so the summed statistic gets Liu's
  p-value with exact first four moments.
- :func:`partial_conjunction`: replicability, "the gene has the effect in at
  least ``r`` of the ``k`` sections that tested it" (Benjamini & Heller
  2008): the ``k - r + 1`` largest p-values combined.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

from spatialscale.stats.nulls import liu_pvalue

__all__ = ["COMBINATIONS", "cauchy_combine", "combine_pvalues", "fisher_combine", "n_tested",
           "partial_conjunction", "pooled_liu", "stouffer_combine"]

#: combination methods of p-values across sections
COMBINATIONS = ("cauchy", "fisher", "stouffer")
#: p-values are kept inside [_TINY, 1 - _TINY] where a transform would be infinite
_TINY = 1e-300


def n_tested(p: np.ndarray) -> np.ndarray:
    """Number of sections (last axis) where each gene has a p-value."""
    return np.isfinite(np.asarray(p, dtype=np.float64)).sum(axis=-1)


def _weights(p: np.ndarray, weights: np.ndarray | None) -> np.ndarray:
    """Weights broadcast to ``p``, zero where ``p`` is missing."""
    w = np.ones_like(p) if weights is None else np.broadcast_to(np.asarray(weights, dtype=np.float64), p.shape)
    if np.any(w[np.isfinite(p)] < 0):
        raise ValueError("weights must be non-negative.")
    return np.where(np.isfinite(p), w, 0.0)


def cauchy_combine(p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Cauchy (ACAT) combination over the last axis; weights are normalised per gene."""
    p = np.asarray(p, dtype=np.float64)
    w = _weights(p, weights)
    total = w.sum(axis=-1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total > 0)
    pc = np.clip(np.where(np.isfinite(p), p, 0.5), _TINY, 1.0 - 1e-16)
    # tan((1/2 - p) pi) = cot(p pi): exact for small p, where 1 / (p pi) dominates
    t = np.sum(w / np.tan(pc * np.pi), axis=-1)
    out = np.where(t > 0, np.arctan(1.0 / np.where(t > 0, t, 1.0)) / np.pi, 0.5 - np.arctan(t) / np.pi)
    return np.where(total[..., 0] > 0, out, np.nan)


def fisher_combine(p: np.ndarray) -> np.ndarray:
    """Fisher's method over the last axis: ``-2 sum log p ~ chi2(2 k)``."""
    p = np.asarray(p, dtype=np.float64)
    ok = np.isfinite(p)
    k = ok.sum(axis=-1)
    x = -2.0 * np.sum(np.where(ok, np.log(np.clip(np.where(ok, p, 1.0), _TINY, 1.0)), 0.0), axis=-1)
    return np.where(k > 0, stats.chi2.sf(x, 2 * np.maximum(k, 1)), np.nan)


def stouffer_combine(p: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted Stouffer combination over the last axis: ``Z = sum w z / sqrt(sum w^2)``, ``z = Phi^-1(1 - p)``."""
    p = np.asarray(p, dtype=np.float64)
    w = _weights(p, weights)
    z = stats.norm.isf(np.clip(np.where(np.isfinite(p), p, 0.5), _TINY, 1.0 - 1e-16))
    norm = np.sqrt(np.sum(w**2, axis=-1))
    zc = np.sum(w * z, axis=-1) / np.where(norm > 0, norm, 1.0)
    return np.where(norm > 0, stats.norm.sf(zc), np.nan)


def pooled_liu(statistic: np.ndarray, cumulants: np.ndarray) -> np.ndarray:
    """Pooled HSIC p-values: summed statistics against the summed null mixture (Liu's approximation).

    Parameters
    ----------
    statistic
        ``(G, S)`` per-section statistics on the scale of their mixture sums
        (NaN where a gene was not tested).
    cumulants
        ``(G, S, 4)`` mixture sums ``c_1..c_4`` of each section's null.

    Returns
    -------
    numpy.ndarray
        ``(G,)`` p-values (NaN for genes tested nowhere).
    """
    t = np.asarray(statistic, dtype=np.float64)
    c = np.asarray(cumulants, dtype=np.float64)
    ok = np.isfinite(t) & np.isfinite(c).all(axis=-1)
    t_sum = np.where(ok, t, 0.0).sum(axis=-1)
    c_sum = np.where(ok[..., None], c, 0.0).sum(axis=-2)
    return np.where(ok.any(axis=-1), liu_pvalue(t_sum, c_sum), np.nan)


def combine_pvalues(p: np.ndarray, method: str = "cauchy", weights: np.ndarray | None = None) -> np.ndarray:
    """Combine p-values over the last axis by ``method`` (one of :data:`COMBINATIONS`)."""
    if method == "cauchy":
        return cauchy_combine(p, weights)
    if method == "fisher":
        if weights is not None:
            raise ValueError("Fisher's method takes no weights.")
        return fisher_combine(p)
    if method == "stouffer":
        return stouffer_combine(p, weights)
    raise ValueError(f"unknown combination {method!r}; choose one of {', '.join(COMBINATIONS)}.")


def partial_conjunction(p: np.ndarray, r: int, method: str = "cauchy", weights: np.ndarray | None = None) -> np.ndarray:
    """Partial-conjunction p-values: the gene has the effect in at least ``r`` of the sections that tested it.

    The null is "at most ``r - 1`` of the gene's ``k`` sections have the
    effect".  Under it at least ``k - r + 1`` of the ``k`` p-values are
    null, and the ``k - r + 1`` largest p-values are each at least as large
    as a distinct null one (the ``j``-th largest of all is at least the
    ``j``-th largest of the null ones), so combining them by a method that
    is valid for null p-values and increasing in each gives a valid p-value
    (Benjamini & Heller 2008).  ``r = 1`` is the ordinary combination of all
    ``k``; ``r = k`` their maximum for Cauchy (the largest p-value alone).
    The Cauchy combination keeps its validity under dependence between
    sections; Fisher and Stouffer assume independent sections.

    Parameters
    ----------
    p
        ``(..., S)`` p-values, sections on the last axis, NaN where a section
        did not test the gene.
    r
        The number of sections (``>= 1``).
    method
        One of :data:`COMBINATIONS`.
    weights
        ``(S,)`` section weights (Stouffer, Cauchy), following each kept
        p-value to its section.

    Returns
    -------
    numpy.ndarray
        ``(...)``; NaN where a gene was tested in fewer than ``r`` sections.
    """
    if isinstance(r, bool) or not isinstance(r, int | np.integer) or r < 1:
        raise ValueError(f"r must be a whole number >= 1, got {r!r}.")
    p = np.asarray(p, dtype=np.float64)
    ok = np.isfinite(p)
    k = ok.sum(axis=-1)
    order = np.argsort(np.where(ok, p, np.inf), axis=-1, kind="stable")  # ascending, untested last
    ranked = np.take_along_axis(p, order, axis=-1)
    rank = np.arange(p.shape[-1])
    keep = (rank >= r - 1) & np.isfinite(ranked)  # the k - r + 1 largest of each gene's finite p-values
    kept = np.where(keep, ranked, np.nan)
    w = None
    if weights is not None:
        w = np.take_along_axis(np.broadcast_to(np.asarray(weights, dtype=np.float64), p.shape), order, axis=-1)
    out = combine_pvalues(kept, method, w)
    return np.where(k >= r, out, np.nan)
