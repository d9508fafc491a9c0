"""HSIC spatial-variability statistic and its null moments, per gene batch."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from spatialscale.kernel import EIG_FLOOR
from spatialscale.stats._numba import batch_gram, compiled_available

__all__ = ["KernelOperator", "quadratic_statistic", "quadratic_statistic_simplex", "feature_power_sums",
           "mixture_cumulants"]


class KernelOperator(Protocol):
    """What the statistics need from a spatial kernel."""

    n: int

    def quadratic_columns(self, yc: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        """``diag(Y' K_eff Y)`` for column-centred ``Y`` of shape ``(n, m)``."""

    def apply_centred(self, yc: np.ndarray) -> np.ndarray:  # pragma: no cover - protocol
        """``K_eff Y`` up to a per-column constant, for column-centred ``Y``."""


def _stack_columns(y: np.ndarray) -> np.ndarray:
    """``(B, n, d)`` -> ``(n, B*d)`` with gene-major columns."""
    b, n, d = y.shape
    return np.ascontiguousarray(y.transpose(1, 0, 2).reshape(n, b * d))


def quadratic_statistic(op: KernelOperator, y: np.ndarray) -> np.ndarray:
    """``Q_g = tr(Y_g' K_eff Y_g)`` for every gene of a batch.

    Parameters
    ----------
    op
        Kernel operator of the section.
    y
        ``(B, n, d)`` column-centred responses.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` unnormalised statistics.
    """
    b, _, d = y.shape
    q_cols = op.quadratic_columns(_stack_columns(y))
    return q_cols.reshape(b, d).sum(axis=1)


def quadratic_statistic_simplex(op: KernelOperator, y: np.ndarray) -> np.ndarray:
    """``Q_g`` for responses whose columns sum to zero in every spot.

    Isoform ratios (and clr coordinates) are linearly dependent: the last
    column is minus the sum of the others, so with ``A = Y_q' K_eff Y_q`` over
    the first ``q = p - 1`` columns, ``Q = tr(A) + sum(A)``.  One solve per
    isoform is saved.

    Parameters
    ----------
    op
        Kernel operator (needs ``apply_centred``, or ``gene_quadratics``).
    y
        ``(B, n, p)`` column-centred responses with ``y.sum(axis=2) == 0``.
    """
    b, n, p = y.shape
    yq = y[:, :, : p - 1]
    if hasattr(op, "gene_quadratics"):  # operators that form Y' K Y without K Y (FFT: Parseval)
        a = op.gene_quadratics(yq)
    else:
        stacked = _stack_columns(yq)
        u = op.apply_centred(stacked).reshape(n, b, p - 1)
        a = np.einsum("nbi,nbj->bij", stacked.reshape(n, b, p - 1), u)
    return np.trace(a, axis1=1, axis2=2) + a.sum(axis=(1, 2))


def feature_power_sums(y: np.ndarray, floor: float = EIG_FLOOR) -> np.ndarray:
    """Power sums ``f_r = sum mu^r`` of the eigenvalues of ``Y_g' Y_g``.

    Parameters
    ----------
    y
        ``(B, n, d)`` column-centred responses.
    floor
        Eigenvalues at or below this count as zero.

    Returns
    -------
    numpy.ndarray
        ``(B, 4)`` power sums for ``r = 1..4``.
    """
    gram = batch_gram(y) if compiled_available() else np.einsum("bnd,bne->bde", y, y)
    return gram_power_sums(gram, floor)


def gram_power_sums(gram: np.ndarray, floor: float = EIG_FLOOR) -> np.ndarray:
    """:func:`feature_power_sums` from the Gram matrices ``Y_g' Y_g``, ``(B, d, d) -> (B, 4)``."""
    mu = np.linalg.eigvalsh(gram)
    mu = np.where(np.isfinite(mu) & (mu > floor), mu, 0.0)
    return np.stack([np.sum(mu**r, axis=1) for r in range(1, 5)], axis=1)


def mixture_cumulants(kernel_sums: np.ndarray, feature_sums: np.ndarray, n: int | np.ndarray) -> np.ndarray:
    """Cumulant-like sums ``c_r = k_r f_r / (n-1)^r`` of the null mixture of ``Q``.

    ``Q`` is, under the null, ``sum_ij lambda_i mu_j chi2_1 / (n-1)`` with
    ``lambda`` the kernel and ``mu`` the feature eigenvalues.
    """
    r = np.arange(1, 5)
    denom = np.maximum(np.asarray(n, dtype=np.float64) - 1.0, 1.0)
    denom = np.power(denom[..., None] if np.ndim(denom) else denom, r)
    return np.asarray(kernel_sums) * np.asarray(feature_sums) / denom
