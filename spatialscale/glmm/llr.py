"""The spatial-variability likelihood ratio: a glmm-null / glmm-full pair fitted from each other.

The LLR compares the Laplace marginal likelihoods of glmm-full (``theta``
free) and glmm-null (``theta = 0``).  Fitted independently from SPLISOSM's
default start, the pair is not comparable: the start sigma (the Fano factor
of the counts) is far above the spread of the random effect that data without
overdispersion support, and with ``var_fix_sigma`` glmm-full then uses
``theta`` to shrink its random effect onto a few smooth directions, which
the likelihood rewards whether or not usage varies in space (on null data
more than half of the genes get ``p < 0.05``).

:func:`fit_sv_pair` therefore fits the pair as SPLISOSM's
``fit(from_null=True, refit_null=True)`` does:

1. glmm-null from the default start;
2. glmm-full from the null fit (its ``nu``, intercepts and coefficients), with
   ``sigma`` reset to the largest standard deviation over spots of the null
   ``nu`` (at least 0.1) and ``theta_logit = -3``;
3. glmm-null again from the full fit; each gene keeps the better null;
4. where the null then beats the full fit, glmm-full again from that null;
   each gene keeps the better full fit.

Unlike SPLISOSM, every choice in steps 3 and 4 is made per gene (SPLISOSM
compares batch means), so a gene's result does not depend on its batch-mates,
and the warm-started fits keep the configured method (SPLISOSM switches
Newton fits to Adam with ``lr = 0.01``).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from spatialscale.glmm.glmm import fit_glmm, laplace_log_marginal

__all__ = ["fit_sv_pair", "sv_log_marginals", "llr_permutation_pvalues"]

_SIGMA_MIN = 0.1


def _start_from(fit: dict[str, np.ndarray], *, theta_logit: float | None, reset_sigma: bool,
                share_variance: bool) -> dict[str, np.ndarray]:
    """Starting values of one model from another's fit."""
    init = {"nu": fit["nu"], "beta": fit["beta"], "bias": fit["intercept"]}
    if reset_sigma:
        sd = np.asarray(fit["nu"], dtype=np.float64).std(axis=1, ddof=1)  # (B, q)
        sd = sd.max(axis=1, keepdims=True) if share_variance else sd
        init["sigma"] = np.maximum(sd, _SIGMA_MIN)
    else:
        init["sigma"] = fit["sigma"]
    if theta_logit is not None:
        init["theta_logit"] = np.full(init["sigma"].shape, theta_logit)
    return init


def _better(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per gene, the fit with the lower loss (``a`` on ties and where ``b`` is not finite)."""
    take_b = np.isfinite(b["loss"]) & (b["loss"] < a["loss"])
    return {k: np.where(take_b.reshape(-1, *([1] * (np.ndim(v) - 1))), b[k], v) for k, v in a.items()}


def fit_sv_pair(counts: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray, config, *,
                device: str = "cpu", work: dict | None = None,
                design: np.ndarray | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fit glmm-null and glmm-full of every gene of a batch, each from the other (see the module notes).

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    eigvals, eigvecs
        The kernel's eigenpairs (as :func:`spatialscale.glmm.glmm.fit_glmm`).
    config
        :class:`spatialscale.glmm.glmm.GLMMConfig` (its ``model`` is ignored).
    device
        Torch device.
    work
        If given, ``work["epochs"]`` is increased by the epochs of every fit made (all genes).
    design
        ``(n, F)`` fixed-effect covariates of both models (covariate-adjusted
        test: the LLR then tests the spatial random effect beyond them).

    Returns
    -------
    tuple of dict
        ``(null_fit, full_fit)`` as returned by :func:`~spatialscale.glmm.glmm.fit_glmm`.
    """

    null_cfg = dataclasses.replace(config, model="glmm-null")
    full_cfg = dataclasses.replace(config, model="glmm-full")
    share = config.share_variance
    work = {} if work is None else work

    def fit(c, lam, vec, cfg, init=None):
        out = fit_glmm(c, lam, vec, design=design, config=cfg, device=device, init=init)
        work["epochs"] = work.get("epochs", 0) + int(np.sum(out["epochs"]))
        return out

    null = fit(counts, None, None, null_cfg)
    full = fit(counts, eigvals, eigvecs, full_cfg,
               _start_from(null, theta_logit=-3.0, reset_sigma=True, share_variance=share))
    refit = fit(counts, None, None, null_cfg, _start_from(full, theta_logit=None, reset_sigma=False,
                                                           share_variance=share))
    null = _better(null, refit)
    redo = np.isfinite(null["loss"]) & (null["loss"] < full["loss"])
    if redo.any():
        sub = {k: v[redo] for k, v in null.items()}
        again = fit(counts[redo], eigvals, eigvecs, full_cfg,
                    _start_from(sub, theta_logit=-3.0, reset_sigma=True, share_variance=share))
        best = _better({k: v[redo] for k, v in full.items()}, again)
        full = {k: v.copy() for k, v in full.items()}
        for k, v in best.items():
            full[k][redo] = v
    return null, full


def sv_log_marginals(counts: np.ndarray, eigvals: np.ndarray, eigvecs: np.ndarray, config, *,
                     device: str = "cpu", work: dict | None = None,
                     design: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Laplace log marginal likelihoods ``(l_null, l_full)`` of the pair from :func:`fit_sv_pair` (and its ``work``;
    ``work["laplace_s"]`` adds the seconds of the two log marginals; ``design``: fixed effects of both models)."""
    work = {} if work is None else work
    null, full = fit_sv_pair(counts, eigvals, eigvecs, config, device=device, work=work, design=design)
    t = time.perf_counter()
    l_null = laplace_log_marginal(null, counts, eigvals, eigvecs, design=design,
                                  config=dataclasses.replace(config, model="glmm-null"))
    l_full = laplace_log_marginal(full, counts, eigvals, eigvecs, design=design,
                                  config=dataclasses.replace(config, model="glmm-full"))
    work["laplace_s"] = work.get("laplace_s", 0.0) + time.perf_counter() - t
    return l_null, l_full


def llr_permutation_pvalues(stat: np.ndarray, perm_stats: np.ndarray, groups: np.ndarray,
                            pool: bool) -> np.ndarray:
    """Permutation p-values ``(1 + #{null >= observed}) / (1 + #null)`` of the LLR.

    Parameters
    ----------
    stat
        ``(G,)`` observed statistics.
    perm_stats
        ``(G, K)`` statistics of the same genes on ``K`` spot permutations.
    groups
        ``(G,)`` pooling groups (isoform counts): with ``pool`` each gene is
        compared with the permutation statistics of every gene of its group,
        else only with its own ``K``.
    pool
        Pool within groups (resolution ``1 / (K n_group)``) or not (``1 / K``).
    """
    stat = np.asarray(stat, dtype=np.float64)
    perm_stats = np.asarray(perm_stats, dtype=np.float64)
    if not pool:
        finite = np.isfinite(perm_stats)
        pvals = (1.0 + (finite & (perm_stats >= stat[:, None])).sum(1)) / (1.0 + finite.sum(1))
    else:
        pvals = np.empty_like(stat)
        for g in np.unique(groups):
            sel = groups == g
            pooled = perm_stats[sel].ravel()
            pooled = np.sort(pooled[np.isfinite(pooled)])
            exceed = pooled.size - np.searchsorted(pooled, stat[sel], side="left")
            pvals[sel] = (1.0 + exceed) / (1.0 + pooled.size)
    return np.where(np.isfinite(stat), pvals, np.nan)
