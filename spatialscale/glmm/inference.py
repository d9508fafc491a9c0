"""Score and Wald tests of differential usage from a fitted multinomial model."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import stats

__all__ = ["adjusted_covariate_information", "covariate_information", "cross_information", "llr_test",
           "pearson_dispersion", "robust_score_test", "score_test", "wald_test", "working_model"]

#: ``variance`` options of :func:`score_test`
SCORE_VARIANCES = ("model", "pearson", "robust")
#: ``information`` options of :func:`score_test`
INFORMATION = ("unadjusted", "adjusted")

#: added to the information matrix's diagonal (keeps SPLISOSM's numbers)
_JITTER = 1e-5
#: relative PCG residual of the sandwich's solves (statistics to ~1e-5 relative; a variance needs no more)
SANDWICH_CG_TOL = 1e-6


def _fit_dtype(config) -> str:
    """The sandwich's solves run in the fit's precision (float32 halves their cost: statistics within ~3e-5
    relative of float64 ones at 2,500 spots)."""
    return "float64" if config is None else str(config.dtype)


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


def _covariates_given_nuisance(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, design: np.ndarray | None,
                               cg_tol: float | None = None, **fit_kw) -> tuple[np.ndarray, np.ndarray]:
    """The tested covariates' information and spot terms with the nuisance columns ``[1, design]`` projected
    out (:func:`working_model`, :func:`_projected`): ``(B, F q, F q)`` and ``(B, n, F q)``."""
    n, q = np.shape(counts)[1], np.shape(counts)[-1] - 1
    x0 = np.zeros((n, 0)) if design is None else np.asarray(design, dtype=np.float64).reshape(n, -1)
    g, contrib = working_model(counts, probs, np.concatenate([z, np.ones((n, 1)), x0], axis=1), cg_tol=cg_tol,
                               **fit_kw)
    return _projected(g, contrib, z.shape[1] * q)


def working_model(counts: np.ndarray, probs: np.ndarray, columns: np.ndarray, *, fit: dict | None = None,
                  eigvals: np.ndarray | None = None, eigvecs: np.ndarray | None = None, config=None,
                  device: str = "cpu", cg_tol: float | None = None,
                  solve_dtype: str = "float64") -> tuple[np.ndarray, np.ndarray]:
    """Information and per-spot score contributions of fixed effects in the linearised GLM / GLMM.

    Linearising the model at the fit (the working model of PQL / GMMAT), the
    working response ``y~ = eta + W^-1 (y - N p_hat)`` has ``Var(y~) = Sigma =
    W^-1 + C`` on the logit scale (``W`` the per-spot multinomial blocks at
    ``p_hat``, ``C`` the fitted random effect's covariance; ``C = 0`` for the
    GLM).  For fixed-effect columns ``D = columns (x) I_q`` this returns

    - ``G = D' Sigma^-1 D``, with ``Sigma^-1 = W - W (W + C^-1)^-1 W``;
    - ``c_i = B_i' (r_i + W_i u_i)``, the spot terms of ``D' Sigma^-1 e`` with
      ``B = D - (W + C^-1)^-1 W D``, ``r_i = (y_i - N_i p_i)[:q]`` and ``u_i``
      the fitted random effect, so that ``e_i = W_i^-1 r_i + u_i`` is the
      marginal working residual.  Spots without counts contribute 0.

    ``(W + C^-1)^-1`` is applied by batched conjugate gradients (the
    ``joint_newton`` solver), one right-hand side per column and logit;
    nothing ``n q x n q`` is formed.

    Parameters
    ----------
    counts, probs
        ``(B, n, p)`` counts and fitted probabilities.
    columns
        ``(n, m)`` fixed-effect columns.
    fit
        The fit (:func:`~spatialscale.glmm.glmm.fit_glmm`): ``sigma``,
        ``theta`` ``(B, v)`` and ``nu`` ``(B, n, q)``; ``None`` for a GLM.
    eigvals, eigvecs
        The kernel's eigenpairs of the fit (``glmm-full``).
    config
        The fit's :class:`~spatialscale.glmm.config.GLMMConfig` (its ``model``).
    device
        Torch device.
    cg_tol
        Relative PCG residual (default: the Newton tolerance of ``solve_dtype``,
        1e-9 in float64).
    solve_dtype
        Precision of the PCG solves (``float32`` halves their cost; the rest is
        float64).

    Returns
    -------
    G, contributions
        ``(B, m q, m q)`` and ``(B, n, m q)``, indexed ``(column, logit)``.
    """
    import torch

    from spatialscale.glmm.newton import CG_TOL, PrecisionOperators, carried_rows, pcg, prior_precision, weight_blocks

    counts = np.asarray(counts, dtype=np.float64)
    b, n, p = counts.shape
    q = p - 1
    opts = {"dtype": torch.float64, "device": device}
    blocks = weight_blocks(torch.as_tensor(np.asarray(probs)[..., :-1], **opts),
                           torch.as_tensor(counts.sum(-1), **opts))  # (B, n, q, q)
    d = torch.einsum("nf,kl->nlfk", torch.as_tensor(np.asarray(columns, dtype=np.float64), **opts),
                     torch.eye(q, **opts)).reshape(n, q, -1)  # (n, q, m q): D, indexed (column, logit)
    cols = d.expand(b, n, q, -1)  # B = D without a random effect
    resid = torch.as_tensor(counts - counts.sum(-1, keepdims=True) * np.asarray(probs), **opts)[..., :-1]
    if fit is not None and config is not None and config.model != "glm":
        sopts = {**opts, "dtype": getattr(torch, solve_dtype)}
        data = {}
        if config.model == "glmm-full":
            data = {"eigvals": torch.as_tensor(np.asarray(eigvals), **sopts),
                    "eigvecs": torch.as_tensor(np.asarray(eigvecs), **sopts)}
        theta = torch.as_tensor(np.asarray(fit["theta"], dtype=np.float64), **sopts)
        a, e = prior_precision(torch.logit(theta), torch.as_tensor(np.asarray(fit["sigma"]), **sopts), data, config,
                               q)
        ops = PrecisionOperators(blocks.to(sopts["dtype"]), data.get("eigvecs"), a, e, carry=True)  # V' v carried
        w_cols = torch.einsum("bnkl,bnlm->bnkm", blocks, cols).to(sopts["dtype"])
        rhs = w_cols.reshape(b, n * q, -1)
        if ops.carry:
            rhs = torch.cat([rhs, carried_rows(data["eigvecs"], w_cols)], 1)
        sol, _ = pcg(ops.matvec, rhs, ops.precond, tol=cg_tol or CG_TOL[solve_dtype], restrict=ops.restrict,
                     rows=n * q)
        sol = sol[:, : n * q].to(opts["dtype"])
        cols = cols - sol.reshape(b, n, q, -1)
        if "nu" in fit:  # not needed for G alone
            resid = resid + torch.einsum("bnkl,bnl->bnk", blocks, torch.as_tensor(np.asarray(fit["nu"]), **opts))
    g = torch.einsum("nkm,bnkl,bnlj->bmj", d, blocks, cols)
    g = 0.5 * (g + g.transpose(1, 2))
    contrib = torch.einsum("bnkm,bnk->bnm", cols, resid)
    return g.cpu().numpy(), contrib.cpu().numpy()


def _per_covariate(full: np.ndarray, f: int, q: int) -> np.ndarray:
    """The ``(q, q)`` diagonal blocks of a ``(B, f q, f q)`` matrix: ``(B, f, q, q)``."""
    b = full.shape[0]
    full = full.reshape(b, f, q, f, q)
    return np.stack([full[:, i, :, i, :] for i in range(f)], axis=1)


def _projected(g: np.ndarray, contrib: np.ndarray, fq: int) -> tuple[np.ndarray, np.ndarray]:
    """Information and spot contributions of the first ``fq`` columns after projecting out the others."""
    m = np.linalg.pinv(g[:, fq:, fq:], hermitian=True) @ g[:, fq:, :fq]
    info = g[:, :fq, :fq] - g[:, :fq, fq:] @ m
    return info, contrib[..., :fq] - contrib[..., fq:] @ m


def adjusted_covariate_information(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, *,
                                   fit: dict | None = None, eigvals: np.ndarray | None = None,
                                   eigvecs: np.ndarray | None = None, config=None, design: np.ndarray | None = None,
                                   jitter: float = _JITTER, device: str = "cpu") -> np.ndarray:
    """Variance of the score ``s_f = Z_f' (Y - N p_hat)`` with the nuisance parameters accounted for.

    In the linearised model (:func:`working_model`) ``Var(s_f) = Z_f' P Z_f``
    with ``P = Sigma^-1 - Sigma^-1 X (X' Sigma^-1 X)^-1 X' Sigma^-1`` and
    ``X = [1, design] (x) I_q`` the null model's fixed effects.  Without a
    random effect (``glm``, or ``fit`` / ``config`` not given) ``Sigma^-1 = W``
    and this is ``I_f - I_fb I_bb^-1 I_bf``.

    Parameters
    ----------
    counts, probs
        ``(B, n, p)`` counts and fitted probabilities of the null model.
    z
        ``(n, F)`` covariates.
    fit, eigvals, eigvecs, config, device
        As :func:`working_model`.
    design
        ``(n, F0)`` covariates of the null model, if any (the intercept is always there).
    jitter
        Added to the diagonal, as :func:`covariate_information`.

    Returns
    -------
    numpy.ndarray
        ``(B, F, q, q)``.
    """
    n, q = np.shape(counts)[1], np.shape(counts)[-1] - 1
    z = np.asarray(z, dtype=np.float64).reshape(n, -1)
    info, _ = _covariates_given_nuisance(counts, probs, z, design, fit=fit, eigvals=eigvals, eigvecs=eigvecs,
                                         config=config, device=device)
    return _per_covariate(info, z.shape[1], q) + jitter * np.eye(q)


def robust_score_test(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, *, fit: dict | None = None,
                      eigvals: np.ndarray | None = None, eigvecs: np.ndarray | None = None, config=None,
                      design: np.ndarray | None = None, device: str = "cpu",
                      groups: Groups = None) -> tuple[np.ndarray, np.ndarray]:
    """Score test with the empirical (sandwich) variance of the score's spot terms.

    With ``c_i`` the spot terms of the working model (:func:`working_model`)
    for the columns ``[z_f, 1, design]`` and the nuisance columns projected
    out (``c_if = c_i,z - M' c_i,x``, ``M = G_xx^-1 G_xz``), the score is
    ``s_f = sum_i c_if`` (``Z_f' (Y - N p_hat)`` at the fit) and its variance
    ``V_f = sum_i c_if c_if'``: ``s_f' V_f^-1 s_f ~ chi2(q)`` whatever the
    form of the spot-level variation beyond the model (overdispersion, a
    misspecified random-effect variance), as long as spots are independent
    given the fitted random effect.  For a GLM with intercepts only,
    ``c_if = (z_if - zbar_f) r_i`` with ``zbar_f`` the information-weighted mean.

    Parameters
    ----------
    counts, probs
        ``(B, n, p)`` counts and fitted probabilities of the model without ``z``.
    z
        ``(n, F)`` covariates, tested one at a time.
    fit, eigvals, eigvecs, config, device
        As :func:`working_model`.
    design
        ``(n, F0)`` covariates of the fitted model, if any.
    groups
        The columns each test takes jointly (the indicators of a
        categorical's levels): the score of a test of ``k`` columns is the
        ``k q``-vector of its columns' scores, ``V`` the sandwich of their
        spot terms, ``stat ~ chi2(k q)``.  ``None``: one test per column.

    Returns
    -------
    statistic, pvalue
        Each ``(B, T)``.
    """
    n, q = np.shape(counts)[1], np.shape(counts)[-1] - 1
    z = np.asarray(z, dtype=np.float64).reshape(n, -1)
    f = z.shape[1]
    _, c = _covariates_given_nuisance(counts, probs, z, design, cg_tol=SANDWICH_CG_TOL, fit=fit, eigvals=eigvals,
                                      eigvecs=eigvecs, config=config, device=device, solve_dtype=_fit_dtype(config))
    c = c.reshape(c.shape[0], n, f, q)

    def single(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        cs = c if len(cols) == f else c[:, :, cols]
        return _quadratic_form(cs.sum(1), np.einsum("bnfq,bnfr->bfqr", cs, cs), q)

    def joint(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        cg = c[:, :, cols].reshape(c.shape[0], n, -1)
        return _joint_quadratic_form(cg.sum(1), np.einsum("bni,bnj->bij", cg, cg))

    if not _joint(groups):
        return single(list(range(f)))
    return _by_test(groups, single, joint)


def _quadratic_form(s: np.ndarray, v: np.ndarray, q: int) -> tuple[np.ndarray, np.ndarray]:
    """``s' V^-1 s`` and its ``chi2(q)`` p-value per gene and covariate (NaN where ``V`` is singular)."""
    b, f = s.shape[:2]
    stat = np.full((b, f), np.nan)
    ok = np.linalg.matrix_rank(v, hermitian=True) == q
    if ok.any():
        stat[ok] = np.einsum("kq,kq->k", s[ok], np.linalg.solve(v[ok], s[ok][..., None])[..., 0])
    return stat, stats.chi2.sf(stat, q)


#: the columns each test takes jointly (``None``: one test per column)
Groups = tuple[tuple[int, ...], ...] | None


def _joint(groups: Groups) -> bool:
    """Whether some test takes several columns."""
    return groups is not None and any(len(g) > 1 for g in groups)


def _rows(cols: list[int], q: int) -> np.ndarray:
    """Rows of the columns ``cols`` in a matrix indexed ``(column, logit)``."""
    return (np.asarray(cols)[:, None] * q + np.arange(q)[None, :]).ravel()


def _by_test(groups: tuple[tuple[int, ...], ...], single: Callable[[list[int]], tuple[np.ndarray, np.ndarray]],
             joint: Callable[[list[int]], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """``(B, T)`` statistics and p-values: ``single(cols)`` (``(B, len(cols))`` each) for the one-column tests
    at once, ``joint(cols)`` (``(B,)`` each) for every test of several columns."""
    parts: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    singles = [t for t, g in enumerate(groups) if len(g) == 1]
    if singles:
        stat, pval = single([groups[t][0] for t in singles])
        parts.update({t: (stat[:, j], pval[:, j]) for j, t in enumerate(singles)})
    parts.update({t: joint(list(g)) for t, g in enumerate(groups) if len(g) > 1})
    return (np.stack([parts[t][0] for t in range(len(groups))], axis=1),
            np.stack([parts[t][1] for t in range(len(groups))], axis=1))


def _joint_quadratic_form(s: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``s' V^-1 s ~ chi2(m)`` per gene for ``(B, m)`` ``s`` and ``(B, m, m)`` ``V``: ``(B,)`` each."""
    stat, pval = _quadratic_form(s[:, None, :], v[:, None], s.shape[-1])
    return stat[:, 0], pval[:, 0]


def cross_information(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, jitter: float = _JITTER) -> np.ndarray:
    """The multinomial information of several covariate columns jointly, cross terms included.

    ``I_fg = sum_i z_if z_ig N_i (diag p_i - p_i p_i')`` for every pair of
    columns ``f, g`` of ``z`` ``(n, k)``, plus ``jitter I``: ``(B, k q, k q)``
    indexed ``(column, logit)``; for one column :func:`covariate_information`.
    """
    pq = probs[..., :-1]
    b, q, k = pq.shape[0], pq.shape[-1], z.shape[1]
    w = np.einsum("bnq,qr->bnqr", pq, np.eye(q)) - np.einsum("bnq,bnr->bnqr", pq, pq)
    info = np.einsum("nf,ng,bn,bnqr->bfqgr", z, z, counts.sum(-1), w).reshape(b, k * q, k * q)
    return info + jitter * np.eye(k * q)


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


def score_test(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, *, variance: str = "model",
               information: str = "unadjusted", fit: dict | None = None, eigvals: np.ndarray | None = None,
               eigvecs: np.ndarray | None = None, config=None, design: np.ndarray | None = None,
               device: str = "cpu", groups: Groups = None) -> tuple[np.ndarray, np.ndarray]:
    """Score test of each covariate against a model fitted without covariates.

    ``s_f = Z_f' (Y - N p_hat)[:, :q]`` and ``stat = s_f' V_f^-1 s_f``.

    Parameters
    ----------
    counts
        ``(B, n, p)`` counts.
    probs
        ``(B, n, p)`` fitted probabilities of the null model.
    z
        ``(n, F)`` covariates, tested one at a time.
    variance
        ``V_f``: ``model`` (SPLISOSM's) the information of the fitted model,
        ``stat ~ chi2(q)``; ``robust`` the sandwich variance of the score's
        spot terms (:func:`robust_score_test`; calibrated under
        overdispersion and whatever random-effect variance was fitted),
        ``stat ~ chi2(q)``; ``pearson`` (GLM fits) that
        information times the gene's Pearson dispersion ``phi``
        (:func:`pearson_dispersion`; quasi-likelihood), ``stat / (q phi) ~
        F(q, df)``, the reported statistic ``stat / phi``.
    information
        With ``model`` / ``pearson`` only: ``unadjusted`` (as SPLISOSM)
        ``I_f = sum_i z_if^2 N_i (diag p_i - p_i p_i')``, which ignores the
        estimated intercepts and the random effect, or ``adjusted``
        (:func:`adjusted_covariate_information`).
    fit, eigvals, eigvecs, config, design, device
        The null model's fit, as :func:`working_model` (``robust`` and
        ``adjusted``; ``fit=None`` is a GLM).
    groups
        The columns each test takes jointly (the indicators of a
        categorical's levels but the reference): a test of ``k`` columns
        takes the ``k q``-vector of their scores and the ``(k q, k q)`` block
        of ``V`` with the cross terms (:func:`cross_information` for
        ``unadjusted``), ``stat ~ chi2(k q)`` (``F(k q, df)`` for
        ``pearson``).  ``None``: one test per column.

    Returns
    -------
    statistic, pvalue
        Each ``(B, T)``.
    """
    if variance not in SCORE_VARIANCES:
        raise ValueError(f"unknown score variance {variance!r}; choose one of {', '.join(SCORE_VARIANCES)}.")
    if information not in INFORMATION:
        raise ValueError(f"unknown information {information!r}; choose one of {', '.join(INFORMATION)}.")
    counts = np.asarray(counts, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64).reshape(counts.shape[1], -1)
    kw = {"fit": fit, "eigvals": eigvals, "eigvecs": eigvecs, "config": config, "design": design, "device": device}
    if variance == "robust":
        if information != "unadjusted":
            raise ValueError("information applies to variance='model' or 'pearson', not 'robust'.")
        return robust_score_test(counts, probs, z, groups=groups, **kw)
    resid = counts - counts.sum(-1, keepdims=True) * probs
    s = np.einsum("nf,bnq->bfq", z, resid[..., :-1])
    q = counts.shape[-1] - 1
    if variance == "pearson":
        phi, df = pearson_dispersion(counts, probs, q)

    def pvalues(stat: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
        """``stat ~ chi2(m)`` (``model``) or ``stat / phi / m ~ F(m, df)`` (``pearson``), ``stat`` ``(B, ...)``."""
        if variance == "model":
            return stat, stats.chi2.sf(stat, m)
        extra = (1,) * (stat.ndim - 1)
        stat = stat / phi.reshape(-1, *extra)
        return stat, stats.f.sf(stat / m, m, np.maximum(df, 1).reshape(-1, *extra))

    if not _joint(groups):
        if information == "adjusted":
            info = adjusted_covariate_information(counts, probs, z, **kw)
        else:
            info = covariate_information(counts, probs, z)
        return pvalues(np.einsum("bfq,bfq->bf", s, np.linalg.solve(info, s[..., None])[..., 0]), q)
    full = None
    if information == "adjusted":  # every column's projected information, cross terms included, at once
        kw.pop("design")
        full, _ = _covariates_given_nuisance(counts, probs, z, design, **kw)

    def single(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if full is None:
            info = covariate_information(counts, probs, z[:, cols])
        else:
            info = _per_covariate(full[:, _rows(cols, q)][:, :, _rows(cols, q)], len(cols), q) + _JITTER * np.eye(q)
        sc = s[:, cols]
        return pvalues(np.einsum("bfq,bfq->bf", sc, np.linalg.solve(info, sc[..., None])[..., 0]), q)

    def joint(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = _rows(cols, q)
        if full is None:
            info = cross_information(counts, probs, z[:, cols])
        else:
            info = full[:, rows][:, :, rows] + _JITTER * np.eye(len(rows))
        sg = s[:, cols].reshape(s.shape[0], -1)
        return pvalues(np.einsum("bi,bi->b", sg, np.linalg.solve(info, sg[..., None])[..., 0]), len(rows))

    return _by_test(groups, single, joint)


def wald_test(counts: np.ndarray, probs: np.ndarray, z: np.ndarray, beta: np.ndarray, *, variance: str = "model",
              fit: dict | None = None, eigvals: np.ndarray | None = None, eigvecs: np.ndarray | None = None,
              config=None, device: str = "cpu", groups: Groups = None) -> tuple[np.ndarray, np.ndarray]:
    """Wald test of each covariate of a model fitted with them: ``stat = beta_f' Cov_f^-1 beta_f ~ chi2(q)``.

    Parameters
    ----------
    counts, probs
        ``(B, n, p)`` counts and fitted probabilities.
    z
        ``(n, F)`` covariates of the fit.
    beta
        ``(B, F, q)`` fitted coefficients.
    variance
        ``Cov_f``: ``model`` (SPLISOSM's) the inverse of the covariate's block
        of the multinomial information, without the cross terms; ``robust``
        the covariate's block of the sandwich ``G^-1 (sum_i c_i c_i') G^-1``
        over every fixed effect (covariates and intercepts;
        :func:`working_model`), times ``n / (n - m)`` (``n`` spots with
        counts, ``m`` fixed effects: the HC1 small-sample factor).
    fit, eigvals, eigvecs, config, device
        The fit, as :func:`working_model` (``robust``; ``fit=None`` is a GLM).
    groups
        The columns each test takes jointly (the indicators of a
        categorical's levels but the reference): ``beta_G' Cov_GG^-1 beta_G ~
        chi2(k q)`` over the ``k`` columns' coefficients, ``Cov_GG`` their
        block of the sandwich (``robust``) or, for ``model``, ``Cov_GG^-1``
        their block of the information with the cross terms between them
        (:func:`cross_information`, no jitter).  ``None``: one test per column.

    Returns
    -------
    statistic, pvalue
        Each ``(B, T)``.
    """
    counts = np.asarray(counts, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64).reshape(counts.shape[1], -1)
    q = beta.shape[-1]
    if variance == "model":
        def single_model(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
            info = covariate_information(counts, probs, z[:, cols], jitter=0.0)
            stat = np.einsum("bfq,bfqr,bfr->bf", beta[:, cols], info, beta[:, cols])
            return stat, stats.chi2.sf(stat, q)

        def joint_model(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
            bg = beta[:, cols].reshape(beta.shape[0], -1)
            stat = np.einsum("bi,bij,bj->b", bg, cross_information(counts, probs, z[:, cols], jitter=0.0), bg)
            return stat, stats.chi2.sf(stat, bg.shape[1])

        return _by_test(groups, single_model, joint_model) if _joint(groups) else single_model(list(range(z.shape[1])))
    if variance != "robust":
        raise ValueError(f"unknown Wald variance {variance!r}; choose one of model, robust.")
    f = z.shape[1]
    g, contrib = working_model(counts, probs, np.concatenate([z, np.ones((z.shape[0], 1))], axis=1), fit=fit,
                               eigvals=eigvals, eigvecs=eigvecs, config=config, device=device, cg_tol=SANDWICH_CG_TOL,
                               solve_dtype=_fit_dtype(config))
    g_inv = np.linalg.pinv(g, hermitian=True)
    m = g.shape[-1]
    covered = (counts.sum(-1) > 0).sum(1).astype(np.float64)
    small_sample = covered / np.maximum(covered - m, 1.0)  # HC1: n / (n - parameters)
    cov = small_sample[:, None, None] * (g_inv @ np.einsum("bnm,bnk->bmk", contrib, contrib) @ g_inv)

    def single(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = _rows(cols, q)
        return _quadratic_form(beta[:, cols], _per_covariate(cov[:, rows][:, :, rows], len(cols), q), q)

    def joint(cols: list[int]) -> tuple[np.ndarray, np.ndarray]:
        rows = _rows(cols, q)
        return _joint_quadratic_form(beta[:, cols].reshape(beta.shape[0], -1), cov[:, rows][:, :, rows])

    if not _joint(groups):
        return _quadratic_form(beta, _per_covariate(cov[:, :f * q, :f * q], f, q), q)
    return _by_test(groups, single, joint)


def llr_test(log_marginal_full: np.ndarray, log_marginal_null: np.ndarray, df: int) -> tuple[np.ndarray, np.ndarray]:
    """Spatial-variability likelihood ratio ``2 (l_full - l_null) ~ chi2(df)``."""
    stat = 2.0 * (np.asarray(log_marginal_full) - np.asarray(log_marginal_null))
    return stat, stats.chi2.sf(np.maximum(stat, 0.0), df)
