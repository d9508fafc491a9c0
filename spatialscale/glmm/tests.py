"""Score and Wald tests of differential usage from a fitted multinomial model."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["score_test", "wald_test", "llr_test", "covariate_information"]

#: added to the information matrix's diagonal (keeps SPLISOSM's numbers)
_JITTER = 1e-5


def covariate_information(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, jitter: float = _JITTER) -> np.ndarray:
    """Per covariate ``I_f = sum_i z_if^2 N_i (diag p_i - p_i p_i') + jitter I``.

    Returns ``(B, F, q, q)`` for ``counts`` ``(B, n, p)``, fitted ``probs``
    ``(B, n, p)`` and covariates ``z`` ``(n, F)``.
    """
    pq = probs[..., :-1]
    q = pq.shape[-1]
    w = np.einsum("bnq,qr->bnqr", pq, np.eye(q)) - np.einsum("bnq,bnr->bnqr", pq, pq)
    info = np.einsum("nf,bn,bnqr->bfqr", z**2, counts.sum(-1), w)
    return info + jitter * np.eye(q)


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


def wald_test(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, beta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Wald test of each covariate of a model fitted with them.

    ``stat = beta_f' I_f beta_f ~ chi2(q)`` with ``I_f`` the covariate's block
    of the fitted model's information (as SPLISOSM, without the cross terms).

    Parameters
    ----------
    counts, probs
        ``(B, n, p)`` counts and fitted probabilities.
    z
        ``(n, F)`` covariates of the fit.
    beta
        ``(B, F, q)`` fitted coefficients.
    """
    info = covariate_information(np.asarray(counts, dtype=np.float64), probs, np.asarray(z, dtype=np.float64),
                                 jitter=0.0)
    stat = np.einsum("bfq,bfqr,bfr->bf", beta, info, beta)
    return stat, stats.chi2.sf(stat, beta.shape[-1])


def llr_test(log_marginal_full: np.ndarray, log_marginal_null: np.ndarray, df: int) -> tuple[np.ndarray, np.ndarray]:
    """Spatial-variability likelihood ratio ``2 (l_full - l_null) ~ chi2(df)``."""
    stat = 2.0 * (np.asarray(log_marginal_full) - np.asarray(log_marginal_null))
    return stat, stats.chi2.sf(np.maximum(stat, 0.0), df)
