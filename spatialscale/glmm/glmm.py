"""Multinomial GLMM with a spatial random effect, fitted for a batch of genes at once.

Model (docs/statistics.md), for one gene with ``p`` isoforms and
``q = p - 1`` logits against the last isoform::

    Y_i ~ Multinomial(N_i, softmax([eta_i, 0]))
    eta = X beta + b + nu
    nu_j ~ N(0, sigma^2 (theta K + (1 - theta) I)),   theta = sigmoid(theta_logit)

With eigenpairs ``K = V diag(lambda) V'`` the covariance has eigenvalues
``c = sigma^2 (theta lambda + 1 - theta)``; a rank-``r`` ``V`` keeps the
remaining ``n - r`` directions at the isotropic ``d = sigma^2 (1 - theta)``
(Woodbury).  ``glmm-null`` fixes ``theta = 0`` (white noise); ``glm`` has
no ``nu`` (see :mod:`spatialscale.glmm.glm`).

The modules, in dependency order (each imports only those before it):
:mod:`~spatialscale.glmm.config` (options), :mod:`~spatialscale.glmm.objective`
(the joint likelihood and its gradients), :mod:`~spatialscale.glmm.state`
(per-gene set-up, optimiser and the one stopping rule),
:mod:`~spatialscale.glmm.joint` (``joint_gd``), :mod:`~spatialscale.glmm.newton`
(``joint_newton``), :mod:`~spatialscale.glmm.marginal` (``marginal_gd`` /
``marginal_newton``), this module (:func:`fit_glmm` dispatches on the method;
:func:`laplace_log_marginal`), then :mod:`~spatialscale.glmm.llr` and
:mod:`~spatialscale.glmm.inference` (the tests).
"""

from __future__ import annotations

import math

import numpy as np

from spatialscale.glmm.config import FIT_METHODS, VAR_FLOOR, GLMMConfig, initial_sigma
from spatialscale.glmm.joint import fit_joint_gd
from spatialscale.glmm.marginal import fit_marginal
from spatialscale.glmm.newton import fit_joint_newton
from spatialscale.glmm.objective import loss_and_gradients, neg_log_joint

__all__ = ["FIT_METHODS", "GLMMConfig", "fit_glmm", "initial_sigma", "laplace_log_marginal", "loss_and_gradients",
           "neg_log_joint"]


def fit_glmm(
    counts: np.ndarray,
    eigvals: np.ndarray | None,
    eigvecs: np.ndarray | None,
    *,
    design: np.ndarray | None = None,
    config: GLMMConfig | None = None,
    device: str = "cpu",
    init: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Fit the GLMM of every gene in a batch by ``config.method``.

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    eigvals, eigvecs
        Leading eigenpairs of the standardised spatial covariance ``K``
        (``(r,)``, ``(n, r)``; ``r = n`` for the full kernel).  Unused for
        ``glmm-null``.
    design
        ``(n, F)`` fixed-effect covariates (intercepts are always fitted).
    config
        :class:`GLMMConfig`.
    device
        Torch device.
    init
        Starting values instead of SPLISOSM's (any of ``nu``, ``beta``,
        ``bias``, ``sigma``, ``theta_logit``, shaped as the parameters).

    Returns
    -------
    dict
        ``nu (B, n, q)``, ``beta (B, F, q)``, ``intercept (B, q)``,
        ``sigma (B, v)``, ``theta (B, v)``, ``probs (B, n, p)``, ``loss``
        ``(B,)`` (best negative log joint), ``epochs`` and ``converged`` ``(B,)``.
    """
    cfg = config or GLMMConfig()
    if cfg.method == "joint_newton" and cfg.model != "glm":
        return fit_joint_newton(counts, eigvals, eigvecs, design=design, config=cfg, device=device, init=init)
    if cfg.method in ("marginal_gd", "marginal_newton") and cfg.model != "glm":
        return fit_marginal(counts, eigvals, eigvecs, design=design, config=cfg, device=device, init=init)
    return fit_joint_gd(counts, eigvals, eigvecs, design=design, config=cfg, device=device, init=init)


def _full_logdet(w: np.ndarray, vec: np.ndarray, cov: np.ndarray, rest: tuple | None) -> float:
    """``logdet(W + C^-1)`` of one gene (``n q x n q``, dense Cholesky), ``C^-1 = V diag(1 / cov_j) V'`` per logit.

    ``w`` ``(n, q, q)`` and ``cov`` ``(q, r)`` are the gene's.  Each logit's
    ``C^-1`` is one symmetric product ``(V D^1/2)(V D^1/2)'``, formed once
    where the logits share their variance; with a low-rank basis
    ``rest = (1 / d, I - V V')`` (``d`` per logit) adds the isotropic
    remainder.  One gene at a time: the matrix is ``(n q)^2`` doubles.
    """
    n, q = w.shape[0], w.shape[-1]
    scale = np.zeros(q) if rest is None else rest[0]
    neg_h = np.zeros((q * n, q * n))
    idx = np.arange(n)
    prec = None
    for j in range(q):
        if prec is None or not np.array_equal(cov[j], cov[j - 1]) or scale[j] != scale[j - 1]:
            half = vec * np.sqrt(1.0 / cov[j])
            prec = half @ half.T
            if rest is not None:
                prec = prec + scale[j] * rest[1]
        neg_h[j * n:(j + 1) * n, j * n:(j + 1) * n] = prec
        for k in range(q):
            neg_h[j * n + idx, k * n + idx] += w[:, j, k]
    return float(2.0 * np.log(np.diagonal(np.linalg.cholesky(neg_h))).sum())


def laplace_log_marginal(fit: dict[str, np.ndarray], counts: np.ndarray, eigvals: np.ndarray | None,
                         eigvecs: np.ndarray | None, *, design: np.ndarray | None = None,
                         config: GLMMConfig | None = None) -> np.ndarray:
    """Laplace approximation of ``log p(Y)`` with ``nu`` integrated out, at a fit.

    ``log p(Y) ~ log p(Y, nu_hat) - 1/2 logdet(-H)`` with ``H`` the Hessian of
    the log joint in ``nu`` (``n q x n q``: the multinomial's per-spot blocks
    ``-N_i (diag p_i - p_i p_i')`` plus ``-C^-1`` per logit).  Dense for
    ``glmm-full`` (sections of a few thousand spots); per-spot ``q x q``
    blocks for ``glmm-null``, where ``C^-1`` is diagonal.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` log marginal likelihoods.
    """
    import torch

    cfg = config or GLMMConfig()
    c = np.asarray(counts, dtype=np.float64)
    b, n, p = c.shape
    q = p - 1
    z = np.zeros((n, 0)) if design is None else np.asarray(design, dtype=np.float64).reshape(n, -1)
    ct = torch.as_tensor(c)
    data = {"counts": ct, "x": torch.as_tensor(z),
            "lgamma_const": torch.lgamma(ct.sum(-1) + 1).sum(1) - torch.lgamma(ct + 1).sum((1, 2))}
    params = {"nu": torch.as_tensor(fit["nu"], dtype=torch.float64),
              "beta": torch.as_tensor(fit["beta"], dtype=torch.float64),
              "bias": torch.as_tensor(fit["intercept"], dtype=torch.float64),
              "sigma": torch.as_tensor(fit["sigma"], dtype=torch.float64),
              "theta_logit": torch.logit(torch.as_tensor(fit["theta"], dtype=torch.float64))}
    var = np.maximum(np.asarray(fit["sigma"], dtype=np.float64) ** 2, VAR_FLOOR)
    var = np.broadcast_to(var, (b, q)) if var.shape[1] == 1 else var
    if cfg.model == "glmm-full":
        data["eigvals"] = torch.as_tensor(np.asarray(eigvals, dtype=np.float64))
        data["eigvecs"] = torch.as_tensor(np.asarray(eigvecs, dtype=np.float64))
        theta = np.asarray(fit["theta"], dtype=np.float64)
        theta = np.broadcast_to(theta, (b, q)) if theta.shape[1] == 1 else theta
        lam, vec = np.asarray(eigvals, dtype=np.float64), np.asarray(eigvecs, dtype=np.float64)
        cov = var[..., None] * (theta[..., None] * lam + 1.0 - theta[..., None])  # (B, q, r)
        low_rank = lam.shape[0] < n  # the isotropic remainder: its precision per logit and projector
        scale, rest_proj = (1.0 / (var * (1.0 - theta)), np.eye(n) - vec @ vec.T) if low_rank else (None, None)
    else:
        params["theta_logit"] = torch.full_like(params["sigma"], -math.inf)
    log_joint = -neg_log_joint(params, data, cfg).numpy()
    probs = np.asarray(fit["probs"], dtype=np.float64)[..., :-1]  # (B, n, q)
    w = c.sum(-1)[..., None, None] * (np.einsum("bnq,qr->bnqr", probs, np.eye(q))
                                      - np.einsum("bnq,bnr->bnqr", probs, probs))
    if cfg.model != "glmm-full":  # glmm-null: C^-1 = I / sigma^2 per logit, so -H is block diagonal over spots
        blocks = w + np.einsum("bq,qr->bqr", 1.0 / var, np.eye(q))[:, None]
        logdet = 2.0 * np.log(np.diagonal(np.linalg.cholesky(blocks), axis1=-2, axis2=-1)).sum((-2, -1))
        return log_joint - 0.5 * logdet
    logdet = np.array([_full_logdet(w[i], vec, cov[i], None if scale is None else (scale[i], rest_proj))
                       for i in range(b)])
    return log_joint - 0.5 * logdet
