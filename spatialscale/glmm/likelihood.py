"""Multinomial likelihood with the last isoform as reference, batched over genes."""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln, logsumexp

__all__ = ["probabilities", "multinomial_loglik", "eta_blocks"]


def probabilities(eta: np.ndarray) -> np.ndarray:
    """``softmax([eta, 0])``: ``(B, n, q)`` logits -> ``(B, n, q + 1)`` probabilities."""
    full = np.concatenate([eta, np.zeros(eta.shape[:-1] + (1,))], axis=-1)
    return np.exp(full - logsumexp(full, axis=-1, keepdims=True))


def multinomial_loglik(counts: np.ndarray, eta: np.ndarray, *, constant: bool = False) -> np.ndarray:
    """``sum_i log Multinomial(c_i | N_i, softmax([eta_i, 0]))`` per gene.

    Parameters
    ----------
    counts
        ``(B, n, p)`` counts.
    eta
        ``(B, n, p - 1)`` logits against the last isoform.
    constant
        Include the multinomial coefficient ``log N! - sum log c!``.
    """
    full = np.concatenate([eta, np.zeros(eta.shape[:-1] + (1,))], axis=-1)
    logp = full - logsumexp(full, axis=-1, keepdims=True)
    ll = np.sum(counts * logp, axis=(1, 2))
    if constant:
        ll = ll + np.sum(gammaln(counts.sum(-1) + 1), axis=1) - np.sum(gammaln(counts + 1), axis=(1, 2))
    return ll


def eta_blocks(design: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """Linear predictor ``X coef``: ``(n, F)`` x ``(B, F, q)`` -> ``(B, n, q)``."""
    return np.einsum("nf,bfq->bnq", design, coef)
