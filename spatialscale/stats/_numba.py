"""Compiled loops for the per-gene passes over ``(B, n, p)`` batches with few isoforms.

NumPy reduces over a last axis of 2-4 isoforms slowly (strided, one
temporary per step); on large sections these passes cost more than the
kernel products themselves. Each function here is one or two sequential
passes per gene. Sums over spots are accumulated in blocks of
:data:`BLOCK` (a partial sum per block, then the blocks), so their rounding
error grows like NumPy's pairwise sums rather than with ``n``.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["centred_ratios", "batch_gram", "compiled_available", "BLOCK"]

#: spots per partial sum
BLOCK = 4096


@functools.cache
def compiled_available() -> bool:
    """Whether numba is importable (else callers use their NumPy expressions)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


@functools.cache
def _compiled():
    from numba import njit

    @njit(cache=True, nogil=True)
    def ratios(c, y, covered, block):  # pragma: no cover - compiled
        nb, n, p = c.shape
        part = np.zeros(p)
        tot = np.zeros(p)
        for b in range(nb):
            tot[:] = 0.0
            part[:] = 0.0
            m = 0
            for i in range(n):
                t = 0.0
                for j in range(p):
                    t += c[b, i, j]
                if t > 0.0:
                    covered[b, i] = True
                    m += 1
                    for j in range(p):
                        r = c[b, i, j] / t
                        y[b, i, j] = r
                        part[j] += r
                else:
                    covered[b, i] = False
                    for j in range(p):
                        y[b, i, j] = 0.0
                if (i + 1) % block == 0:
                    for j in range(p):
                        tot[j] += part[j]
                        part[j] = 0.0
            if m == 0:
                continue
            for j in range(p):
                tot[j] = (tot[j] + part[j]) / m
            for i in range(n):
                if covered[b, i]:
                    for j in range(p):
                        y[b, i, j] -= tot[j]

    @njit(cache=True, nogil=True)
    def gram(y, out, block):  # pragma: no cover - compiled
        nb, n, d = y.shape
        part = np.zeros((d, d))
        for b in range(nb):
            part[:, :] = 0.0
            for i in range(n):
                for k in range(d):
                    v = y[b, i, k]
                    if v != 0.0:
                        for e in range(k, d):
                            part[k, e] += v * y[b, i, e]
                if (i + 1) % block == 0 or i == n - 1:
                    for k in range(d):
                        for e in range(k, d):
                            out[b, k, e] += part[k, e]
                            part[k, e] = 0.0
            for k in range(d):
                for e in range(k):
                    out[b, k, e] = out[b, e, k]

    return ratios, gram


def centred_ratios(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Isoform ratios centred over the covered spots (zero elsewhere), and the coverage.

    Parameters
    ----------
    counts
        ``(B, n, p)`` non-negative counts.

    Returns
    -------
    y : numpy.ndarray
        ``(B, n, p)`` float64.
    covered : numpy.ndarray
        ``(B, n)`` boolean, spots with a positive gene total.
    """
    c = np.ascontiguousarray(counts, dtype=np.float64)
    y = np.empty_like(c)
    covered = np.empty(c.shape[:2], dtype=np.bool_)
    _compiled()[0](c, y, covered, BLOCK)
    return y, covered


def batch_gram(y: np.ndarray) -> np.ndarray:
    """``Y_g' Y_g`` of every gene of a batch, ``(B, n, d) -> (B, d, d)``."""
    y = np.ascontiguousarray(y, dtype=np.float64)
    out = np.zeros((y.shape[0], y.shape[2], y.shape[2]))
    _compiled()[1](y, out, BLOCK)
    return out
