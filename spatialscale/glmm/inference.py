"""Score and Wald tests of differential usage from a fitted multinomial model."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["adjusted_covariate_information", "covariate_information", "llr_test", "pearson_dispersion",
           "score_test", "wald_test"]

#: ``variance`` options of :func:`score_test`
SCORE_VARIANCES = ("model", "pearson", "robust")
#: ``information`` options of :func:`score_test`
INFORMATION = ("unadjusted", "adjusted")

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


def adjusted_covariate_information(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, *,
                                   fit: dict | None = None, eigvals: np.ndarray | None = None,
                                   eigvecs: np.ndarray | None = None, config=None, design: np.ndarray | None = None,
                                   jitter: float = _JITTER, device: str = "cpu") -> np.ndarray:
    """Variance of the score ``s_f = Z_f' (Y - N p_hat)`` with the nuisance parameters accounted for.

    Linearising the GLMM at the fit (the working model of PQL / GMMAT),
    ``Y - N p_hat ~ P y~`` with ``Var(y~) = Sigma = W^-1 + C`` on the logit
    scale, so ``Var(s_f) = Z_f' P Z_f`` with::

        P = Sigma^-1 - Sigma^-1 X (X' Sigma^-1 X)^-1 X' Sigma^-1,
        Sigma^-1 = W - W (W + C^-1)^-1 W

    (``W`` the per-spot multinomial blocks at ``p_hat``, ``C`` the fitted
    random-effect covariance, ``X = [1, design] (x) I_q`` the null model's fixed
    effects).  ``(W + C^-1)^-1`` is applied by batched conjugate gradients
    (the ``joint_newton`` solver), one right-hand side per covariate and
    nuisance column; nothing ``n q x n q`` is formed.  Without a random
    effect (``glm``, or ``fit`` / ``config`` not given) ``Sigma^-1 = W`` and
    this is ``I_f - I_fb I_bb^-1 I_bf``.

    Parameters
    ----------
    counts, probs
        ``(B, n, p)`` counts and fitted probabilities of the null model.
    z
        ``(n, F)`` covariates.
    fit
        The null model's fit (:func:`~spatialscale.glmm.glmm.fit_glmm`):
        ``sigma`` and ``theta`` ``(B, v)``.
    eigvals, eigvecs
        The kernel's eigenpairs of the fit (``glmm-full``).
    config
        The fit's :class:`~spatialscale.glmm.glmm.GLMMConfig` (its ``model``).
    design
        ``(n, F0)`` covariates of the null model, if any (the intercept is always there).
    jitter
        Added to the diagonal, as :func:`covariate_information`.
    device
        Torch device.

    Returns
    -------
    numpy.ndarray
        ``(B, F, q, q)``.
    """
    import torch

    from spatialscale.glmm.newton import CG_TOL, pcg, precision_operators, prior_precision, weight_blocks

    counts = np.asarray(counts, dtype=np.float64)
    b, n, p = counts.shape
    q = p - 1
    z = np.asarray(z, dtype=np.float64).reshape(n, -1)
    f = z.shape[1]
    x0 = np.zeros((n, 0)) if design is None else np.asarray(design, dtype=np.float64).reshape(n, -1)
    x1 = np.concatenate([np.ones((n, 1)), x0], axis=1)
    opts = {"dtype": torch.float64, "device": device}
    blocks = weight_blocks(torch.as_tensor(np.asarray(probs)[..., :-1], **opts),
                           torch.as_tensor(counts.sum(-1), **opts))  # (B, n, q, q)
    eye = torch.eye(q, **opts)
    cols = torch.einsum("nf,kl->nlfk", torch.as_tensor(np.concatenate([z, x1], axis=1), **opts), eye)
    cols = cols.reshape(n, q, -1).expand(b, n, q, -1)  # (B, n, q, m): (covariate, logit) columns
    m = cols.shape[-1]
    w_cols = torch.einsum("bnkl,bnlm->bnkm", blocks, cols)
    random_effect = fit is not None and config is not None and config.model != "glm"
    if random_effect:
        data = {}
        if config.model == "glmm-full":
            data = {"eigvals": torch.as_tensor(np.asarray(eigvals), **opts),
                    "eigvecs": torch.as_tensor(np.asarray(eigvecs), **opts)}
        theta = torch.as_tensor(np.asarray(fit["theta"], dtype=np.float64), **opts)
        a, e = prior_precision(torch.logit(theta), torch.as_tensor(np.asarray(fit["sigma"]), **opts), data, config, q)
        matvec, precond = precision_operators(blocks, data.get("eigvecs"), a, e)
        sol, _ = pcg(matvec, w_cols.reshape(b, n * q, m), precond, tol=CG_TOL["float64"])
        w_cols = w_cols - torch.einsum("bnkl,bnlm->bnkm", blocks, sol.reshape(b, n, q, m))  # Sigma^-1 cols
    g = torch.einsum("bnkm,bnkl->bml", cols, w_cols)
    g = 0.5 * (g + g.transpose(1, 2))
    fq = f * q
    g_zz, g_zx, g_xx = g[:, :fq, :fq], g[:, :fq, fq:], g[:, fq:, fq:]
    adj = g_zx @ torch.linalg.pinv(g_xx, hermitian=True) @ g_zx.transpose(1, 2)
    full = (g_zz - adj).reshape(b, f, q, f, q)
    info = torch.stack([full[:, i, :, i, :] for i in range(f)], dim=1)
    return info.cpu().numpy() + jitter * np.eye(q)


def pearson_dispersion(counts: np.ndarray, probs: np.ndarray, n_params: int) -> tuple[np.ndarray, np.ndarray]:
    """Multinomial Pearson dispersion of each gene's fit: ``X^2 / df``, and ``df``.

    ``X^2 = sum_i sum_j (y_ij - N_i p_ij)^2 / (N_i p_ij)`` over the spots with
    counts (``N_i > 0``); ``df = n_covered (p - 1) - n_params``.  About 1 for
    multinomial data; larger when usage varies from spot to spot beyond the
    multinomial (quasi-likelihood, McCullagh and Nelder section 9).

    Parameters
    ----------
    counts, probs
        ``(B, n, p)`` counts and fitted probabilities.
    n_params
        Parameters fitted per gene (``p - 1`` intercepts for the GLM).
    """
    counts = np.asarray(counts, dtype=np.float64)
    tot = counts.sum(-1, keepdims=True)
    expected = tot * probs
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(expected > 0, (counts - expected) ** 2 / expected, 0.0)
    x2 = terms.sum(axis=(1, 2))
    df = (tot[..., 0] > 0).sum(1) * (counts.shape[-1] - 1) - n_params
    return x2 / np.maximum(df, 1), df


def score_test(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, *, information: str = "unadjusted",
               fit: dict | None = None, eigvals: np.ndarray | None = None, eigvecs: np.ndarray | None = None,
               config=None, design: np.ndarray | None = None,
               variance: str = "model") -> tuple[np.ndarray, np.ndarray]:
    """Score test of each covariate against a model fitted without covariates.

    ``s_f = Z_f' (Y - N p_hat)[:, :q]`` and ``stat = s_f' I_f^-1 s_f ~ chi2(q)``.

    Parameters
    ----------
    counts
        ``(B, n, p)`` counts.
    probs
        ``(B, n, p)`` fitted probabilities of the null model.
    z
        ``(n, F)`` covariates, tested one at a time.
    information
        ``unadjusted`` (default, as SPLISOSM): ``I_f = sum_i z_if^2 N_i
        (diag p_i - p_i p_i')``, which ignores the estimated intercepts and
        the random effect (with a GLMM fit it is conservative: on null data
        far fewer than ``alpha`` of the p-values fall below ``alpha``).
        ``adjusted``: the score's variance under the fitted model
        (:func:`adjusted_covariate_information`: nuisance intercepts and, given
        ``fit`` and ``config`` of a GLMM, the random effect).
    fit, eigvals, eigvecs, config, design
        For ``adjusted`` only; see :func:`adjusted_covariate_information`.
    variance
        The score's variance, for a GLM fit (``p - 1`` intercepts, so the
        residuals of each isoform sum to zero over spots): ``model`` (as
        SPLISOSM) the multinomial information, ``stat ~ chi2(q)``; ``pearson``
        that information times the gene's Pearson dispersion ``phi``
        (:func:`pearson_dispersion`; quasi-likelihood), ``stat / (q phi) ~
        F(q, df)``, the reported statistic ``stat / phi``; ``robust`` the
        empirical (sandwich) variance ``sum_i (z_i - zbar)^2 r_i r_i'`` of the
        spot residual vectors ``r_i = (y_i - N_i p_i)[:q]``, ``stat ~ chi2(q)``,
        valid whatever the form of the extra-multinomial variation.

    Returns
    -------
    statistic, pvalue
        Each ``(B, F)``.
    """
    if information not in INFORMATION:
        raise ValueError(f"unknown information {information!r}; choose one of {', '.join(INFORMATION)}.")
    counts = np.asarray(counts, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64).reshape(counts.shape[1], -1)
    resid = counts - counts.sum(-1, keepdims=True) * probs
    s = np.einsum("nf,bnq->bfq", z, resid[..., :-1])
    if information == "adjusted":
        info = adjusted_covariate_information(counts, probs, z, fit=fit, eigvals=eigvals, eigvecs=eigvecs,
                                              config=config, design=design)
    else:
        info = covariate_information(counts, probs, z)
    stat = np.einsum("bfq,bfq->bf", s, np.linalg.solve(info, s[..., None])[..., 0])
    q = counts.shape[-1] - 1
    if variance == "model":
        return stat, stats.chi2.sf(stat, q)
    if variance == "pearson":
        phi, df = pearson_dispersion(counts, probs, q)
        stat = stat / phi[:, None]
        return stat, stats.f.sf(stat / q, q, np.maximum(df, 1)[:, None])
    if variance != "robust":
        raise ValueError(f"unknown score variance {variance!r}; choose one of {', '.join(SCORE_VARIANCES)}.")
    zc = z - z.mean(0)
    r = resid[..., :-1]
    s = np.einsum("nf,bnq->bfq", zc, r)
    v = np.einsum("nf,bnq,bnr->bfqr", zc * zc, r, r)
    stat = np.einsum("bfq,bfq->bf", s, np.linalg.solve(v, s[..., None])[..., 0])
    return stat, stats.chi2.sf(stat, q)


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
