"""Differential-usage tests of a batch of genes against many covariates at once.

Every function takes a ``(B, n, p)`` batch of counts (``B`` genes with ``p``
isoforms) and an ``(n, F)`` covariate matrix and returns ``(B, F)`` arrays:
all gene x covariate pairs of a batch come from a few batched matrix
products, never from a loop over pairs.

* ``hsic`` (linear HSIC, the multivariate RV / Pearson test): with ``Y`` the
  centred isoform ratios and ``z`` a centred covariate,
  ``T = ||Y' z||^2`` and, under independence, ``n T`` is approximately
  ``sum_k ||z||^2 mu_k chi2_1`` with ``mu`` the eigenvalues of ``Y'Y``
  (Liu's approximation).  The reported statistic is ``T / (n-1)^2``.
  A covariate of several columns ``Z`` (the indicators of a categorical's
  levels) is tested jointly with the linear kernel ``L = Z Z'``:
  ``T = tr(Y' H L H Y) = ||Y' Z_c||_F^2``, and ``n T`` is approximately
  ``sum_jk lambda_j mu_k chi2_1`` with ``lambda`` the eigenvalues of
  ``Z_c' Z_c``; the mixture's power sums are the products
  ``(sum lambda^r) (sum mu^r)``.  Its effect size is the RV coefficient
  (:func:`du_effect`), comparable between sections.
* ``t-fisher`` / ``t-tippett``: a two-sample Student t-test (pooled
  variance) per isoform ratio between the two values of a binary covariate,
  the isoforms' p-values combined by Fisher's or Tippett's method.

With ``nan_filling="none"`` a gene's spots without counts are left out of
its tests (its own ``n``); with ``"mean"`` they take the mean ratio.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from spatialscale.stats.nulls import liu_pvalue
from spatialscale.stats.responses import ratio_response

__all__ = ["DU_NP_METHODS", "DU_NULLS", "GPNull", "du_effect", "du_responses", "hsic_du", "hsic_du_gp_null", "ttest_du",
           "binary_levels", "kernel_power_sums"]

DU_NP_METHODS = ("hsic", "hsic-gp", "t-fisher", "t-tippett")
#: nulls of hsic-gp: SPLISOSM's (``liu``) and the GP-conditional one (``gp``)
DU_NULLS = ("liu", "gp")
#: eigenvalues of Y'Y and z'z at or below this do not enter the null mixture
_EIG_FLOOR = 1e-5


def du_responses(counts: np.ndarray, transformation: str = "none",
                 nan_filling: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Centred isoform-ratio responses and the spots each gene's tests use.

    Returns
    -------
    y : numpy.ndarray
        ``(B, n, d)`` ratios (transformed), centred over the spots used,
        zero at the others.
    used : numpy.ndarray
        ``(B, n)`` boolean: every spot for ``nan_filling="mean"``, the spots
        with counts for ``"none"``.
    """
    y, covered = ratio_response(counts, transformation)
    used = np.ones_like(covered) if nan_filling == "mean" else covered
    return y, used


def _centred_norms(z: np.ndarray, used: np.ndarray) -> np.ndarray:
    """``||z_f - mean_used(z_f)||^2`` over each gene's used spots, ``(B, F)``."""
    w = used.astype(np.float64)
    n_used = np.maximum(w.sum(1), 1.0)[:, None]
    s1 = w @ z
    s2 = w @ (z * z)
    return np.maximum(s2 - s1 * s1 / n_used, 0.0)


def kernel_power_sums(z: np.ndarray, used: np.ndarray, groups: tuple[tuple[int, ...], ...] | None = None
                      ) -> np.ndarray:
    """Power sums ``sum_j lambda_j^r`` (``r = 1..4``) of each covariate kernel's eigenvalues, per gene.

    ``lambda`` are the eigenvalues of ``Z_c' Z_c``, with ``Z`` a test's
    columns centred over each gene's used spots (floor ``1e-5``): for one
    column the single eigenvalue ``||z_c||^2``.

    Parameters
    ----------
    z
        ``(n, C)`` covariate columns.
    used
        ``(B, n)`` spots entering each gene's tests.
    groups
        The columns of each test (``None``: one test per column).

    Returns
    -------
    numpy.ndarray
        ``(B, T, 4)``.
    """
    r = np.arange(1, 5)
    if groups is None:
        lam = _centred_norms(z, used)  # the one eigenvalue of z_c' z_c
        lam = np.where(lam > _EIG_FLOOR, lam, 0.0)
        return lam[..., None] ** r
    w = used.astype(np.float64)
    if w.all():  # every gene uses every spot: one kernel for the batch
        w = w[:1]
    n_used = np.maximum(w.sum(1), 1.0)
    out = np.empty((w.shape[0], len(groups), 4))
    for t, cols in enumerate(groups):
        zg = z[:, list(cols)]
        k = zg.shape[1]
        s1 = w @ zg  # (B, k)
        s2 = (w @ (zg[:, :, None] * zg[:, None, :]).reshape(len(zg), k * k)).reshape(-1, k, k)
        gram = s2 - s1[:, :, None] * s1[:, None, :] / n_used[:, None, None]
        lam = np.linalg.eigvalsh(gram)
        lam = np.where(np.isfinite(lam) & (lam > _EIG_FLOOR), lam, 0.0)
        out[:, t] = (lam[..., None] ** r).sum(1)
    return np.broadcast_to(out, (used.shape[0], *out.shape[1:]))


def hsic_du(y: np.ndarray, used: np.ndarray, z: np.ndarray, groups: tuple[tuple[int, ...], ...] | None = None,
            *, effect: bool = False) -> tuple[np.ndarray, ...]:
    """Linear HSIC test of every gene x covariate pair.

    Parameters
    ----------
    y
        ``(B, n, d)`` responses from :func:`du_responses` (centred over the
        used spots, zero elsewhere).
    used
        ``(B, n)`` spots entering each gene's tests.
    z
        ``(n, C)`` covariate columns (raw or residualised; centred here).
    groups
        The columns each test takes jointly, with the linear kernel of those
        columns (the indicators of a categorical's levels); ``None``: one
        test per column.
    effect
        Also return :func:`du_effect` of every test.

    Returns
    -------
    statistic, pvalue[, effect]
        ``(B, T)`` each: ``||Y' Z_c||_F^2 / (n_g - 1)^2``, its Liu p-value
        (and the RV coefficient).
    """
    z = np.asarray(z, dtype=np.float64)
    n_used = used.sum(1).astype(np.float64)  # (B,)
    # y is centred over the used spots and zero elsewhere, so Y' z_c = Y' z
    cross = np.einsum("bnd,nf->bdf", y, z)
    t_scaled = np.einsum("bdf,bdf->bf", cross, cross)
    if groups is not None:  # ||Y' Z_c||_F^2: the columns' energies add up
        t_scaled = np.stack([t_scaled[:, list(cols)].sum(1) for cols in groups], axis=1)
    lam_sums = kernel_power_sums(z, used, groups)  # (B, T, 4)
    gram = np.einsum("bnd,bne->bde", y, y)
    mu = np.linalg.eigvalsh(gram)
    mu = np.where(np.isfinite(mu) & (mu > _EIG_FLOOR), mu, 0.0)
    r = np.arange(1, 5)
    mu_sums = (mu[..., None] ** r).sum(1)  # (B, 4)
    c = lam_sums * mu_sums[:, None, :]  # (B, T, 4): the power sums of the products lambda_j mu_k
    t = n_used[:, None] * t_scaled
    p = liu_pvalue(t.reshape(-1), c.reshape(-1, 4)).reshape(t.shape)
    stat = t_scaled / np.maximum(n_used - 1.0, 1.0)[:, None] ** 2
    if effect:
        return stat, p, du_effect(t_scaled, gram, lam_sums, n_used)
    return stat, p


def du_effect(cross: np.ndarray, gram: np.ndarray, kernel_sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Effect size of linear-HSIC DU: the RV coefficient of the isoform ratios and a covariate, less its null mean.

    ``RV = ||Y' Z_c||_F^2 / sqrt(tr((Y'Y)^2) tr((Z_c' Z_c)^2))`` is the
    cosine between the Gram matrices ``Y Y'`` and ``Z_c Z_c'`` over the
    gene's spots: in ``[0, 1]``, 1 when the ratios vary only along the
    covariate (for a test of several columns, such as a categorical's level
    indicators, the columns jointly).  Under independence
    ``E ||Y' Z_c||_F^2 = tr(Y'Y) tr(Z_c'Z_c) / (n - 1)``, so RV has a floor
    that depends on the section's size and the covariate's rank; it is
    subtracted (as for the SV effect, :func:`spatialscale.stats.sv.sv_effect`),
    which centres genes without DU at 0 in every section.  Free of the
    ratios' and the covariate's scales, so comparable between sections.

    Parameters
    ----------
    cross
        ``(B, T)`` ``||Y' Z_c||_F^2``.
    gram
        ``(B, d, d)`` ``Y'Y`` of each gene (``Y`` centred over its spots).
    kernel_sums
        ``(B, T, >=2)`` (or broadcastable) ``tr(Z_c'Z_c)`` and ``tr((Z_c' Z_c)^2)`` of each test.
    n
        ``(B,)`` spots of each gene's tests.

    Returns
    -------
    numpy.ndarray
        ``(B, T)``; NaN where the ratios or the covariate do not vary.
    """
    ks = np.asarray(kernel_sums, dtype=np.float64)
    yy = np.einsum("bde,bde->b", gram, gram)  # tr((Y'Y)^2) = ||Y'Y||_F^2
    scale = np.sqrt(np.clip(yy[:, None] * ks[..., 1], 0.0, None))
    ok = np.isfinite(scale) & (scale > 0)
    trace_y = np.einsum("bdd->b", gram)
    null_mean = trace_y[:, None] * ks[..., 0] / np.maximum(np.asarray(n, dtype=np.float64) - 1.0, 1.0)[:, None]
    return np.where(ok, (np.asarray(cross, dtype=np.float64) - null_mean) / np.where(ok, scale, 1.0), np.nan)


@dataclass(frozen=True)
class GPNull:
    """What the GP-conditional null of hsic-gp needs, shared by all tasks of a run.

    Attributes
    ----------
    z
        ``(n, F)`` GP residuals of the covariates.
    vectors
        ``(n, r)`` orthonormal eigenvectors ``U`` of the GP's spatial kernel.
    shrink
        ``(F, r)`` ``a_f s_k / (a_f s_k + eps_f)``: the share of direction
        ``k`` the covariate's GP removes.
    noise
        ``(F,)`` fitted white-noise variances ``eps_f``.
    """

    z: np.ndarray
    vectors: np.ndarray
    shrink: np.ndarray
    noise: np.ndarray


def hsic_du_gp_null(y: np.ndarray, used: np.ndarray, null: GPNull, *, effect: bool = False
                    ) -> tuple[np.ndarray, ...]:
    """hsic-gp with the null distribution of the residual covariate under its own GP.

    If covariate ``z`` follows its fitted GP ``N(0, a K + eps I)``, its
    residual ``r = eps (a K + eps I)^-1 z`` has covariance ``eps S`` with
    ``S = I - U diag(shrink) U'``, so, given the isoform ratios ``Y``,
    ``||Y' r||^2`` is exactly ``sum_k w_k chi2_1`` with ``w = eig(eps Y' S Y)``.
    SPLISOSM's null (:func:`hsic_du` on the residuals) takes ``r`` as white
    noise, ``w = ||r||^2 / n eig(Y'Y)``, which overstates the null when the
    ratios have a spatial pattern of their own (the pattern the residual no
    longer carries): conservative.  Same statistic, Liu p-value on ``w``.

    Returns
    -------
    statistic, pvalue[, effect]
        ``(B, F)``; the statistic (and with ``effect`` the RV coefficient,
        :func:`du_effect`) is :func:`hsic_du`'s.
    """
    z = np.asarray(null.z, dtype=np.float64)
    n_used = used.sum(1).astype(np.float64)
    cross = np.einsum("bnd,nf->bdf", y, z)
    t = np.einsum("bdf,bdf->bf", cross, cross)
    proj = np.einsum("nr,bnd->brd", null.vectors, y)  # U'Y
    gram = np.einsum("bnd,bne->bde", y, y)
    m = gram[:, None] - np.einsum("fr,brd,bre->bfde", null.shrink, proj, proj)  # Y' S_f Y
    w = null.noise[None, :, None] * np.linalg.eigvalsh(m)
    w = np.where(np.isfinite(w) & (w > _EIG_FLOOR * 1e-3), w, 0.0)
    c = np.stack([(w**r).sum(-1) for r in range(1, 5)], axis=-1)
    p = liu_pvalue(t.reshape(-1), c.reshape(-1, 4)).reshape(t.shape)
    stat = t / np.maximum(n_used - 1.0, 1.0)[:, None] ** 2
    if effect:
        return stat, p, du_effect(t, gram, kernel_power_sums(z, used), n_used)
    return stat, p


def binary_levels(z: np.ndarray, names: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The two values of each binary covariate (lower first), ``(F,)`` each.

    Raises
    ------
    ValueError
        A covariate with other than two distinct values.
    """
    z = np.asarray(z, dtype=np.float64)
    lo, hi = np.empty(z.shape[1]), np.empty(z.shape[1])
    for f in range(z.shape[1]):
        levels = np.unique(z[:, f])
        if levels.size != 2:
            name = names[f] if names else f"column {f}"
            raise ValueError(f"the t-tests need binary covariates; {name!r} has {levels.size} distinct values.")
        lo[f], hi[f] = levels
    return lo, hi


def ttest_du(y: np.ndarray, used: np.ndarray, z: np.ndarray, combine: str = "fisher") -> tuple[np.ndarray, np.ndarray]:
    """Two-sample t-tests of each isoform ratio between the groups of each binary covariate.

    Parameters
    ----------
    y
        ``(B, n, d)`` responses from :func:`du_responses` (any per-column shift
        leaves the t statistics unchanged).
    used
        ``(B, n)`` spots entering the tests.
    z
        ``(n, F)`` binary covariates; group 1 is each column's lower value.
    combine
        ``fisher`` (``-2 sum log p ~ chi2(2 d)``) or ``tippett``
        (``min p``, ``1 - (1 - min p)^d``).

    Returns
    -------
    statistic, pvalue
        ``(B, F)`` combined statistics and p-values; NaN where a t-test is
        undefined (no variance in either group), as scipy.
    """
    lo, hi = binary_levels(z)
    w = used.astype(np.float64)
    g1 = (z == lo).astype(np.float64)  # (n, F)
    g2 = (z == hi).astype(np.float64)
    n1, n2 = w @ g1, w @ g2  # (B, F)
    yw = y * w[..., None]
    s1, s2 = np.einsum("bnd,nf->bdf", yw, g1), np.einsum("bnd,nf->bdf", yw, g2)
    q1, q2 = np.einsum("bnd,nf->bdf", yw * y, g1), np.einsum("bnd,nf->bdf", yw * y, g2)
    n1e, n2e = n1[:, None, :], n2[:, None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        m1, m2 = s1 / n1e, s2 / n2e
        ss = np.maximum(q1 - s1 * m1, 0.0) + np.maximum(q2 - s2 * m2, 0.0)
        df = n1e + n2e - 2.0
        se = np.sqrt(ss / df * (1.0 / n1e + 1.0 / n2e))
        t = (m1 - m2) / se
    p = 2.0 * stats.t.sf(np.abs(t), np.broadcast_to(df, t.shape))  # (B, d, F)
    d = y.shape[2]
    if combine == "fisher":
        with np.errstate(divide="ignore"):
            stat = -2.0 * np.log(p).sum(1)
        pval = stats.chi2.sf(stat, 2 * d)
    elif combine == "tippett":
        stat = p.min(1)
        stat = np.where(np.isnan(p).any(1), np.nan, stat)
        pval = -np.expm1(d * np.log1p(-stat))
    else:
        raise ValueError(f"unknown combination {combine!r}; choose fisher or tippett.")
    return stat, pval
