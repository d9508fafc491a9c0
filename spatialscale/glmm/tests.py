"""Score and Wald tests of differential usage from a fitted multinomial model."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["score_test", "wald_test", "covariate_information"]

#: added to the information matrix's diagonal (keeps SPLISOSM's numbers)
_JITTER = 1e-5


def covariate_information(counts: np.ndarray, probs: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per covariate ``I_f = sum_i z_if^2 N_i (diag p_i - p_i p_i') + 1e-5 I``.

    Returns ``(B, F, q, q)`` for ``counts`` ``(B, n, p)``, fitted ``probs``
    ``(B, n, p)`` and covariates ``z`` ``(n, F)``.
    """
    pq = probs[..., :-1]
    q = pq.shape[-1]
    w = np.einsum("bnq,qr->bnqr", pq, np.eye(q)) - np.einsum("bnq,bnr->bnqr", pq, pq)
    info = np.einsum("nf,bn,bnqr->bfqr", z**2, counts.sum(-1), w)
    return info + _JITTER * np.eye(q)


def score_test(counts: np.ndarray, probs: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score test of each covariate against a model fitted without covariates.

    ``s_f = Z_f' (Y - N p_hat)[:, :q]`` and ``stat = s_f' I_f^-1 s_f ~ chi2(q)``
    (no adjustment for the estimated nuisance parameters, as SPLISOSM).

    Parameters
    ----------
    counts
        ``(B, n, p)`` counts.
    probs
        ``(B, n, p)`` fitted probabilities of the null model.
    z
        ``(n, F)`` covariates, tested one at a time.

    Returns
    -------
    statistic, pvalue
        Each ``(B, F)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64).reshape(counts.shape[1], -1)
    resid = counts - counts.sum(-1, keepdims=True) * probs
    s = np.einsum("nf,bnq->bfq", z, resid[..., :-1])
    info = covariate_information(counts, probs, z)
    stat = np.einsum("bfq,bfq->bf", s, np.linalg.solve(info, s[..., None])[..., 0])
    return stat, stats.chi2.sf(stat, counts.shape[-1] - 1)


def wald_test(beta: np.ndarray, info: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wald test ``beta_f' I_f beta_f ~ chi2(q)`` for ``beta`` ``(B, F, q)``, ``info`` ``(B, F, q, q)``."""
    stat = np.einsum("bfq,bfqr,bfr->bf", beta, info, beta)
    return stat, stats.chi2.sf(stat, beta.shape[-1])
