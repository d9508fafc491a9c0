"""Per-gene response matrices for the HSIC tests, vectorised over a batch.

A batch is a ``(B, n, p)`` array of isoform counts: ``B`` genes that all have
``p`` isoforms, over ``n`` spots.  Every function here returns column-centred
responses ``(B, n, d)`` ready for ``tr(Y' K_eff Y)``.
"""

from __future__ import annotations

import numpy as np

from spatialscale.stats._numba import centred_ratios, compiled_available

__all__ = ["TRANSFORMS", "ratio_response", "count_response", "gene_count_response",
           "response_width", "helmert_basis"]

TRANSFORMS = ("none", "clr", "ilr", "alr", "radial")
#: weight of the raw counts in the pseudocount mix used before log-ratios
_MIX = 0.99


def response_width(method: str, n_isoforms: int, transformation: str = "none") -> int:
    """Number of response columns a gene with ``n_isoforms`` contributes."""
    if method == "hsic-gc":
        return 1
    if method == "hsic-ir" and transformation in ("ilr", "alr"):
        return max(1, n_isoforms - 1)
    return n_isoforms


def helmert_basis(p: int) -> np.ndarray:
    """Orthonormal ``(p, p-1)`` basis of the plane orthogonal to the ones vector.

    Column ``j`` contrasts the first ``j+1`` parts with part ``j+1``; any such
    basis gives the same HSIC statistic and null, because ilr coordinates
    are a rotation of clr coordinates.
    """
    v = np.zeros((p, p - 1))
    for j in range(p - 1):
        v[: j + 1, j] = 1.0 / (j + 1)
        v[j + 1, j] = -1.0
        v[:, j] /= np.linalg.norm(v[:, j])
    return v


def _centre_rows_where(y: np.ndarray, covered: np.ndarray) -> np.ndarray:
    """Centre each column over the covered spots; uncovered spots become 0.

    This equals filling uncovered spots with the covered-spot mean and then
    centring over all spots.
    """
    mask = covered[..., None]
    n_cov = np.maximum(covered.sum(axis=1), 1)[:, None, None]
    y = np.where(mask, y, 0.0)  # a new array: centred in place below
    y -= y.sum(axis=1, keepdims=True) / n_cov
    y *= mask
    return y


def ratio_response(counts: np.ndarray, transformation: str = "none",
                   centre: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Centred isoform-ratio responses (``hsic-ir``).

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    transformation
        ``none`` (ratios), ``radial`` (ratios scaled to unit length),
        ``clr`` / ``ilr`` / ``alr`` (log-ratios after mixing 1% of each
        isoform's mean count over all spots into every spot; ``alr`` takes
        the first isoform as reference).
    centre
        Centre over covered spots (default); with ``False`` uncovered spots
        take the covered-spot mean instead.

    Returns
    -------
    y : numpy.ndarray
        ``(B, n, d)`` responses, centred over covered spots, zero at spots
        with no counts for the gene.
    covered : numpy.ndarray
        ``(B, n)`` boolean, spots with a positive gene total.
    """
    if transformation not in TRANSFORMS:
        raise ValueError(f"Unknown ratio transformation {transformation!r}; choose from {TRANSFORMS}.")
    if transformation == "none" and centre and compiled_available():
        return centred_ratios(counts)
    c = np.asarray(counts, dtype=np.float64)
    total = c.sum(axis=2)
    covered = total > 0
    safe_total = np.where(covered, total, 1.0)[..., None]
    if transformation in ("none", "radial"):
        y = c / safe_total
        if transformation == "radial":
            norm = np.linalg.norm(y, axis=2, keepdims=True)
            y = y / np.where(norm > 0, norm, 1.0)
    else:
        mixed = _MIX * c + (1.0 - _MIX) * c.mean(axis=1, keepdims=True)
        msum = mixed.sum(axis=2, keepdims=True)
        comp = mixed / np.where(msum > 0, msum, 1.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            logc = np.log(comp)
        if transformation == "alr":
            y = logc[..., 1:] - logc[..., :1]
        else:
            y = logc - logc.mean(axis=2, keepdims=True)
            if transformation == "ilr":
                y = y @ helmert_basis(c.shape[2])
        y = np.where(covered[..., None], y, 0.0)
    if not centre:
        w = covered[..., None]
        mean = np.where(w, y, 0.0).sum(1, keepdims=True) / np.maximum(w.sum(1, keepdims=True), 1)
        return np.where(w, y, mean), covered
    return _centre_rows_where(y, covered), covered


def count_response(counts: np.ndarray) -> np.ndarray:
    """Centred raw isoform counts (``hsic-ic``), ``(B, n, p)``."""
    c = np.asarray(counts, dtype=np.float64)
    return c - c.mean(axis=1, keepdims=True)


def gene_count_response(counts: np.ndarray) -> np.ndarray:
    """Centred gene totals (``hsic-gc``), ``(B, n, 1)``."""
    t = np.asarray(counts, dtype=np.float64).sum(axis=2, keepdims=True)
    return t - t.mean(axis=1, keepdims=True)
