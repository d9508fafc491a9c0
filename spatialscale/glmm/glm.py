"""Multinomial GLM fitted by iteratively reweighted least squares (Newton).

For a design ``X`` (intercept included) the log-likelihood of one gene has
gradient ``X' (C - N p)[:, :q]`` and Hessian ``-sum_i N_i x_i x_i' (x)
(diag p_i - p_i p_i')`` over the ``q = p - 1`` non-reference logits; IWLS is
Newton's method on it, here for all genes of a batch at once, each gene
stopping when its own step is below ``tol``.
"""

from __future__ import annotations

import numpy as np

from spatialscale.glmm.likelihood import eta_blocks, multinomial_loglik, probabilities

__all__ = ["fit_glm", "gradient", "hessian"]


def _weights(p: np.ndarray) -> np.ndarray:
    """``diag(p) - p p'`` over the first ``q`` classes: ``(B, n, q, q)``."""
    pq = p[..., :-1]
    return np.einsum("bnq,qr->bnqr", pq, np.eye(pq.shape[-1])) - np.einsum("bnq,bnr->bnqr", pq, pq)


def gradient(counts: np.ndarray, x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``d loglik / d coef``: ``(B, F, q)``."""
    p = probabilities(eta_blocks(x, coef))
    resid = counts - counts.sum(-1, keepdims=True) * p
    return np.einsum("nf,bnq->bfq", x, resid[..., :-1])


def hessian(counts: np.ndarray, x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """``d^2 loglik / d coef^2`` flattened as ``(B, F*q, F*q)`` (index ``f*q + r``)."""
    p = probabilities(eta_blocks(x, coef))
    w = counts.sum(-1)[..., None, None] * _weights(p)
    b, _, q = coef.shape
    f = x.shape[1]
    h = -np.einsum("nf,bnqr,ng->bfqgr", x, w, x)
    return h.reshape(b, f * q, f * q)


def fit_glm(
    counts: np.ndarray,
    design: np.ndarray | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    ridge: float = 1e-8,
) -> dict[str, np.ndarray]:
    """Fit the multinomial GLM of every gene in a batch.

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    design
        ``(n, F)`` covariates (no intercept column; one is added).
    tol
        A gene has converged when its largest Newton step is below ``tol``.
    max_iter
        Newton iterations at most.
    ridge
        Added to the negative Hessian's diagonal, for separable data.

    Returns
    -------
    dict
        ``beta`` ``(B, F, q)``, ``intercept`` ``(B, q)``, ``probs``
        ``(B, n, p)``, ``loglik`` ``(B,)`` (with the multinomial coefficient), ``converged`` ``(B,)`` and
        ``iterations`` ``(B,)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    b, n, p = counts.shape
    q = p - 1
    z = np.zeros((n, 0)) if design is None else np.asarray(design, dtype=np.float64).reshape(n, -1)
    x = np.concatenate([z, np.ones((n, 1))], axis=1)
    f = x.shape[1]
    coef = np.zeros((b, f, q))
    # start at the pooled proportions (the exact answer without covariates)
    pooled = counts.sum(axis=1) + 0.5
    coef[:, -1, :] = np.log(pooled[:, :-1] / pooled[:, -1:])
    converged = np.zeros(b, dtype=bool)
    iterations = np.zeros(b, dtype=np.int64)
    for _ in range(max_iter):
        active = ~converged
        if not active.any():
            break
        c, k = counts[active], coef[active]
        g = gradient(c, x, k).reshape(-1, f * q)
        h = -hessian(c, x, k) + ridge * np.eye(f * q)
        # pseudo-inverse: designs with every level of a factor plus the intercept are collinear
        step = np.einsum("bij,bj->bi", np.linalg.pinv(h, rcond=1e-12, hermitian=True), g).reshape(-1, f, q)
        coef[active] = k + step
        iterations[active] += 1
        converged[active] = np.max(np.abs(step), axis=(1, 2)) < tol
    eta = eta_blocks(x, coef)
    return {
        "beta": coef[:, :-1, :],
        "intercept": coef[:, -1, :],
        "probs": probabilities(eta),
        "loglik": multinomial_loglik(counts, eta, constant=True),
        "converged": converged,
        "iterations": iterations,
    }
