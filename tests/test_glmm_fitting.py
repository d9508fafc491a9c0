"""GLMM fitting methods beyond joint_gd (joint_newton, marginal_gd, marginal_newton) and the adjusted score test."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from spatialscale.glmm.glm import fit_glm
from spatialscale.glmm.glmm import GLMMConfig, fit_glmm, laplace_log_marginal, neg_log_joint
from spatialscale.glmm.inference import adjusted_covariate_information, covariate_information, score_test
from spatialscale.glmm.marginal import dense_neg_hessian, neg_log_marginal
from spatialscale.glmm.newton import THETA_LOGIT_BOUND, joint_hessian_vector, pcg
from spatialscale.glmm.state import setup_fit
from spatialscale.kernel import build_kernel, kernel_eigenpairs
from spatialscale.simulate import grid_coords, simulate_section


def _section(n: int, genes: int, seed: int, n_sv: int | None = None):
    """Counts ``(genes, n, 3)`` of a simulated section and its kernel's eigenpairs."""
    adata = simulate_section(n, genes, n_sv=genes // 2 if n_sv is None else n_sv, effect=1.0, isoforms=(3, 3),
                             seed=seed)
    counts = np.asarray(adata.layers["counts"].todense(), dtype=float).reshape(n, genes, 3).transpose(1, 0, 2)
    lam, vec = kernel_eigenpairs(build_kernel(adata.obsm["spatial"]).precision)
    return counts, lam, vec, adata


@pytest.fixture(scope="module")
def small_section():
    return _section(144, 4, seed=2)


# --- joint_newton ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "rank", "fix_sigma", "share", "prior", "covariates"), [
    ("glmm-full", None, True, True, "none", 0),
    ("glmm-full", None, False, False, "gamma", 2),
    ("glmm-full", 12, False, True, "inv_gamma", 1),
    ("glmm-null", None, False, False, "inv_gamma", 1),
])
def test_hessian_vector_product_matches_autograd(model, rank, fix_sigma, share, prior, covariates):
    rng = np.random.default_rng(3)
    n, q, b = 30, 2, 3
    counts = torch.tensor(rng.poisson(3.0, size=(b, n, q + 1)).astype(float))
    lam, vec = kernel_eigenpairs(build_kernel(rng.uniform(0, 6, (n, 2))).precision)
    r = n if rank is None else rank
    data = {"counts": counts, "x": torch.tensor(rng.normal(size=(n, covariates))), "totals": counts.sum(-1),
            "lgamma_const": torch.zeros(b), "eigvals": torch.tensor(lam[:r]), "eigvecs": torch.tensor(vec[:, :r])}
    v = 1 if share else q
    params = {"nu": torch.tensor(rng.normal(0, 0.4, (b, n, q))),
              "beta": torch.tensor(rng.normal(0, 0.2, (b, covariates, q))),
              "bias": torch.tensor(rng.normal(0, 0.2, (b, q))), "sigma": torch.tensor(rng.uniform(0.4, 1.2, (b, v))),
              "theta_logit": torch.tensor(rng.normal(0, 1, (b, v)))}
    cfg = GLMMConfig(model=model, var_fix_sigma=fix_sigma, share_variance=share, var_prior=prior)
    learn = ["nu", "bias", "beta"] + ([] if model == "glmm-null" else ["theta_logit"])
    learn += [] if fix_sigma else ["sigma"]
    direction = {k: torch.tensor(rng.normal(size=params[k].shape)) if k in learn else torch.zeros_like(params[k])
                 for k in params}
    ours = joint_hessian_vector(params, data, cfg, learn, direction)
    names = list(params)
    _, ref = torch.autograd.functional.hvp(
        lambda *xs: neg_log_joint(dict(zip(names, xs)), data, cfg).sum(),
        tuple(params[k] for k in names), tuple(direction[k] for k in names))
    ref = dict(zip(names, ref))
    for k in learn:
        np.testing.assert_allclose(ours[k].numpy(), ref[k].numpy(), rtol=1e-8, atol=1e-9, err_msg=k)
    assert float(ours["nu"].abs().max()) > 1.0  # a non-trivial product


def test_pcg_matches_a_direct_solve_column_by_column():
    rng = np.random.default_rng(0)
    b, n, k = 3, 40, 4
    m = rng.normal(size=(b, n, n))
    a = torch.tensor(m @ m.transpose(0, 2, 1) + n * np.eye(n))
    rhs = torch.tensor(rng.normal(size=(b, n, k)))
    diag = torch.diagonal(a, dim1=1, dim2=2)[..., None]
    x, iters = pcg(lambda v: a @ v, rhs, lambda v: v / diag, tol=1e-12)
    np.testing.assert_allclose(x.numpy(), torch.linalg.solve(a, rhs).numpy(), rtol=1e-9, atol=1e-12)
    assert 1 < int(iters.max()) <= n
    # a column stops on its own: solving it alone gives the same numbers
    alone, _ = pcg(lambda v: a[1:2] @ v, rhs[1:2, :, 2:3], lambda v: v / diag[1:2], tol=1e-12)
    np.testing.assert_allclose(alone.numpy(), x[1:2, :, 2:3].numpy(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(("options", "rank", "design"), [
    ({}, None, False),                                              # SPLISOSM's defaults (float32, sigma fixed)
    ({"var_fix_sigma": False, "share_variance": False, "dtype": "float64"}, None, True),
    ({"model": "glmm-null", "dtype": "float64"}, None, True),
    ({"var_fix_sigma": False, "dtype": "float64"}, 48, False),     # low rank, isotropic remainder
])
def test_joint_newton_converges_fast_to_at_least_joint_gds_loss(small_section, options, rank, design):
    counts, lam, vec, adata = small_section
    r = len(lam) if rank is None else rank
    z = adata.obs[["rbp"]].to_numpy() if design else None
    gd = fit_glmm(counts, lam[:r], vec[:, :r], design=z, config=GLMMConfig(**options))
    newton = fit_glmm(counts, lam[:r], vec[:, :r], design=z, config=GLMMConfig(method="joint_newton", **options))
    assert newton["converged"].all()
    assert newton["epochs"].max() <= 25 and newton["epochs"].mean() <= 0.1 * gd["epochs"].mean()
    assert (newton["loss"] <= gd["loss"] + 1e-3 * np.abs(gd["loss"])).all(), (newton["loss"], gd["loss"])
    # the reported loss is the objective at the returned parameters
    cfg = GLMMConfig(**{**options, "dtype": "float64"})
    data, _, _ = setup_fit(counts, lam[:r], vec[:, :r], z, cfg, "cpu")
    params = {"nu": newton["nu"], "beta": newton["beta"], "bias": newton["intercept"], "sigma": newton["sigma"],
              "theta_logit": newton["theta"]}
    params = {k: torch.as_tensor(np.asarray(v, dtype=float)) for k, v in params.items()}
    params["theta_logit"] = torch.logit(params["theta_logit"])
    np.testing.assert_allclose(neg_log_joint(params, data, cfg).numpy(), newton["loss"], rtol=1e-5)
    if cfg.model == "glmm-full":
        assert (np.abs(params["theta_logit"].numpy()) <= THETA_LOGIT_BOUND + 1e-6).all()


def test_joint_newton_is_batch_invariant_and_converged_genes_stop(small_section):
    counts, lam, vec, _ = small_section
    cfg = GLMMConfig(method="joint_newton", dtype="float64", patience=2, max_epochs=12)
    together = fit_glmm(counts, lam, vec, config=cfg)
    alone = fit_glmm(counts[2:3], lam, vec, config=cfg)
    np.testing.assert_allclose(together["loss"][2], alone["loss"][0], rtol=1e-10)
    np.testing.assert_allclose(together["nu"][2], alone["nu"][0], atol=1e-7)
    done = together["converged"]
    assert done.any() and not done.all()
    longer = fit_glmm(counts, lam, vec, config=GLMMConfig(method="joint_newton", dtype="float64", patience=2))
    np.testing.assert_array_equal(longer["nu"][done], together["nu"][done])
    np.testing.assert_array_equal(longer["epochs"][done], together["epochs"][done])
    assert (longer["epochs"][~done] > together["epochs"][~done]).all()
    assert (longer["loss"][~done] <= together["loss"][~done]).all()


# --- marginal_gd / marginal_newton ---------------------------------------------------------------------------------


def _their_params(model):
    return {k: getattr(model, a).detach().double() for k, a in
            [("nu", "nu"), ("beta", "beta"), ("bias", "bias_eta"), ("sigma", "sigma"), ("theta_logit", "theta_logit")]}


def test_marginal_objective_is_splisosms_and_laplace_log_marginal(small_section):
    splisosm_glmm = pytest.importorskip("splisosm.glmm")
    counts, lam, vec, _ = small_section
    counts, n = counts[:2, :64], 64  # a 64-spot piece keeps SPLISOSM's dense Hessian small
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(n)).precision)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = splisosm_glmm.MultinomGLMM(fitting_method="marginal_gd", fitting_configs={"max_epochs": 20})
        f32 = {"dtype": torch.float32}
        ref.setup_data(torch.tensor(counts, **f32), corr_sp_eigvals=torch.tensor(lam, **f32),
                       corr_sp_eigvecs=torch.tensor(vec, **f32))
        ref.fit(quiet=True)
        with torch.no_grad():
            theirs = -ref().double().numpy()
    cfg = GLMMConfig(method="marginal_gd", dtype="float64")
    data, _, _ = setup_fit(counts, lam, vec, None, cfg, "cpu")
    with torch.no_grad():
        ours = neg_log_marginal(_their_params(ref), data, cfg).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    # and the numpy evaluation of the same Laplace approximation agrees, for glmm-full and glmm-null
    for model in ("glmm-full", "glmm-null"):
        cfg = GLMMConfig(model=model, method="marginal_newton", dtype="float64", max_epochs=15)
        fit = fit_glmm(counts, lam, vec, config=cfg)
        np.testing.assert_allclose(fit["loss"], -laplace_log_marginal(fit, counts, lam, vec, config=cfg), rtol=1e-9)
    # glmm-null's per-spot log-determinant equals the dense one
    params = {k: torch.as_tensor(np.asarray(v, dtype=float)) for k, v in
              [("nu", fit["nu"]), ("beta", fit["beta"]), ("bias", fit["intercept"]), ("sigma", fit["sigma"])]}
    params["theta_logit"] = torch.full_like(params["sigma"], -np.inf)
    dense = neg_log_joint(params, data, cfg) + 0.5 * torch.logdet(dense_neg_hessian(params, data, cfg))
    np.testing.assert_allclose(neg_log_marginal(params, data, cfg).numpy(), dense.numpy(), rtol=1e-10)


@pytest.mark.parametrize("method", ["marginal_gd", "marginal_newton"])
def test_marginal_fit_is_batch_invariant_and_converged_genes_stop(small_section, method):
    counts = small_section[0][:, :64]
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(64)).precision)
    opts = {"method": method, "dtype": "float64", "lr": 0.1, "patience": 3}
    together = fit_glmm(counts, lam, vec, config=GLMMConfig(max_epochs=40, **opts))
    alone = fit_glmm(counts[1:2], lam, vec, config=GLMMConfig(max_epochs=40, **opts))
    np.testing.assert_allclose(together["loss"][1], alone["loss"][0], rtol=1e-10)
    np.testing.assert_allclose(together["theta"][1], alone["theta"][0], rtol=1e-8)
    done = together["converged"]
    assert done.any() and (together["epochs"][done] < 40).all()
    longer = fit_glmm(counts, lam, vec, config=GLMMConfig(max_epochs=80, **opts))
    np.testing.assert_array_equal(longer["nu"][done], together["nu"][done])
    np.testing.assert_array_equal(longer["loss"][done], together["loss"][done])


@pytest.fixture(scope="module")
def marginal_fits():
    """SPLISOSM's and our marginal fits of a 100-spot section (SPLISOSM gene by gene: its batches scale the
    Newton step of nu by 1 / batch size), with the same settings as SPLISOSM's wrapper: lr 0.1, patience 10."""
    splisosm_glmm = pytest.importorskip("splisosm.glmm")
    counts, lam, vec, _ = _section(100, 3, seed=4, n_sv=2)
    out = {}
    for method in ("marginal_gd", "marginal_newton"):
        opts = {"max_epochs": 150, "patience": 10, "lr": 0.1, "update_nu_every_k": 3}
        theirs = []
        for g in range(len(counts)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref = splisosm_glmm.MultinomGLMM(fitting_method=method, fitting_configs=opts)
                ref.setup_data(torch.tensor(counts[g:g + 1], dtype=torch.float32),
                               corr_sp_eigvals=torch.tensor(lam, dtype=torch.float32),
                               corr_sp_eigvecs=torch.tensor(vec, dtype=torch.float32))
                ref.fit(quiet=True)
                with torch.no_grad():
                    theirs.append(-float(ref()[0]))
        cfg = GLMMConfig(method=method, **opts)
        out[method] = (cfg, fit_glmm(counts, lam, vec, config=cfg), np.array(theirs))
    return counts, lam, vec, out


@pytest.mark.parametrize("method", ["marginal_gd", "marginal_newton"])
def test_marginal_fit_at_least_as_good_as_splisosm_and_joint_gd(marginal_fits, method):
    counts, lam, vec, fits = marginal_fits
    cfg, fit, theirs = fits[method]
    ours = -laplace_log_marginal(fit, counts, lam, vec, config=cfg)  # the objective, in float64, at our fit
    np.testing.assert_allclose(fit["loss"], ours, rtol=1e-5)
    assert (ours <= theirs + 1e-4 * np.abs(theirs)).all(), (ours, theirs)
    joint = fit_glmm(counts, lam, vec)  # joint_gd, SPLISOSM's default
    at_joint = -laplace_log_marginal(joint, counts, lam, vec, config=cfg)
    assert (ours <= at_joint).all(), (ours, at_joint)


# --- adjusted score test -------------------------------------------------------------------------------------------


def _dense_adjusted_information(counts, probs, z, cov):
    """``Z_f' P Z_f`` from dense matrices (spot-major index ``i q + k``), for one gene."""
    n, p = counts.shape
    q = p - 1
    pq = probs[:, :q]
    w = np.zeros((n * q, n * q))
    for i in range(n):
        w[i * q:(i + 1) * q, i * q:(i + 1) * q] = counts[i].sum() * (np.diag(pq[i]) - np.outer(pq[i], pq[i]))
    sigma_inv = w if cov is None else w - w @ np.linalg.solve(w + np.linalg.inv(np.kron(cov, np.eye(q))), w)
    x = np.kron(np.ones((n, 1)), np.eye(q))
    proj = sigma_inv - sigma_inv @ x @ np.linalg.solve(x.T @ sigma_inv @ x, x.T @ sigma_inv)
    return np.stack([np.kron(z[:, [f]], np.eye(q)).T @ proj @ np.kron(z[:, [f]], np.eye(q)) for f in range(z.shape[1])])


@pytest.mark.parametrize(("model", "rank"), [("glm", None), ("glmm-null", None), ("glmm-full", None),
                                             ("glmm-full", 20)])
def test_adjusted_information_matches_dense_formula(model, rank):
    rng = np.random.default_rng(5)
    n, b = 36, 2
    counts = rng.poisson(4.0, size=(b, n, 3)).astype(float)
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(n)).precision)
    r = n if rank is None else rank
    z = rng.normal(size=(n, 2))
    probs = rng.dirichlet(np.ones(3) * 5, size=(b, n))
    fit = {"sigma": np.array([[0.6], [1.1]]), "theta": np.array([[0.3], [0.8]])}
    cfg = GLMMConfig(model=model)
    ours = adjusted_covariate_information(counts, probs, z, fit=fit, eigvals=lam[:r], eigvecs=vec[:, :r],
                                          config=cfg, jitter=0.0)
    for g in range(b):
        s2, th = fit["sigma"][g, 0] ** 2, fit["theta"][g, 0]
        if model == "glm":
            cov = None
        elif model == "glmm-null":
            cov = s2 * np.eye(n)
        else:
            v = vec[:, :r]
            cov = s2 * (v @ np.diag(th * lam[:r] + 1 - th) @ v.T + (1 - th) * (np.eye(n) - v @ v.T))
        np.testing.assert_allclose(ours[g], _dense_adjusted_information(counts[g], probs[g], z, cov), rtol=1e-7)
    # the random effect lowers the information (more variance in the residuals)
    plain = covariate_information(counts, probs, z, jitter=0.0)
    assert (np.trace(ours, axis1=2, axis2=3) < np.trace(plain, axis1=2, axis2=3)).all()


def _dense_working_model(counts, probs, nu, cov):
    """Dense ``Sigma^-1`` (``Sigma = W^-1 + C (x) I_q``) and marginal working residuals ``e_i = W_i^-1 r_i + nu_i``
    of one gene, spelled out."""
    n, p = counts.shape
    q = p - 1
    w = [counts[i].sum() * (np.diag(probs[i, :q]) - np.outer(probs[i, :q], probs[i, :q])) for i in range(n)]
    sigma = np.zeros((n * q, n * q))
    for i in range(n):
        sigma[i * q:(i + 1) * q, i * q:(i + 1) * q] = np.linalg.inv(w[i])
    if cov is not None:
        sigma += np.kron(cov, np.eye(q))
    r = (counts - counts.sum(1, keepdims=True) * probs)[:, :q]
    e = np.stack([np.linalg.solve(w[i], r[i]) for i in range(n)]) + (0 if nu is None else nu)
    return np.linalg.inv(sigma), e


def _spot_terms(a, e):
    """``c_i = A_i' e_i`` for the ``(q, m)`` row blocks ``A_i`` of ``A``."""
    q = e.shape[1]
    return np.stack([a[i * q:(i + 1) * q].T @ e[i] for i in range(e.shape[0])])


@pytest.mark.parametrize(("model", "rank"), [("glm", None), ("glmm-null", None), ("glmm-full", None),
                                             ("glmm-full", 20)])
def test_robust_score_and_wald_match_the_dense_sandwich(model, rank):
    """The sandwich score and Wald statistics equal their dense construction: score terms ``(P Z_f)_i' e_i`` with
    ``P = Sigma^-1 - Sigma^-1 X (X' Sigma^-1 X)^-1 X' Sigma^-1``; Wald covariance ``G^-1 (sum_i c_i c_i') G^-1``
    with ``G = D' Sigma^-1 D`` and ``c_i = (Sigma^-1 D)_i' e_i`` over covariates and intercepts, times
    ``n / (n - m)``."""
    from spatialscale.glmm.inference import wald_test

    rng = np.random.default_rng(11)
    n, b, q = 36, 2, 2
    counts = (rng.poisson(4.0, size=(b, n, 3)) + 1).astype(float)  # every spot covered: W_i invertible
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(n)).precision)
    r = n if rank is None else rank
    z = rng.normal(size=(n, 2))
    probs = rng.dirichlet(np.ones(3) * 5, size=(b, n))
    fit = {"sigma": np.array([[0.6], [1.1]]), "theta": np.array([[0.3], [0.8]]), "nu": rng.normal(0, 0.3, (b, n, q))}
    beta = rng.normal(0, 0.2, size=(b, 2, q))
    kw = {"fit": None if model == "glm" else fit, "eigvals": lam[:r], "eigvecs": vec[:, :r],
          "config": GLMMConfig(model=model)}
    stat, pval = score_test(counts, probs, z, variance="robust", **kw)
    wstat, _ = wald_test(counts, probs, z, beta, variance="robust", **kw)
    x = np.kron(np.ones((n, 1)), np.eye(q))
    d = np.kron(np.concatenate([z, np.ones((n, 1))], axis=1), np.eye(q))
    for g in range(b):
        s2, th = fit["sigma"][g, 0] ** 2, fit["theta"][g, 0]
        cov = {"glm": None, "glmm-null": s2 * np.eye(n)}.get(model)
        if model == "glmm-full":
            v = vec[:, :r]
            cov = s2 * (v @ np.diag(th * lam[:r] + 1 - th) @ v.T + (1 - th) * (np.eye(n) - v @ v.T))
        si, e = _dense_working_model(counts[g], probs[g], None if model == "glm" else fit["nu"][g], cov)
        proj = si - si @ x @ np.linalg.solve(x.T @ si @ x, x.T @ si)
        for f in range(2):
            c = _spot_terms(proj @ np.kron(z[:, [f]], np.eye(q)), e)
            sc = c.sum(0)
            np.testing.assert_allclose(stat[g, f], sc @ np.linalg.solve(c.T @ c, sc), rtol=1e-4)  # PCG at 1e-6
        c = _spot_terms(si @ d, e)
        ginv = np.linalg.inv(d.T @ si @ d)
        cov_beta = ginv @ (c.T @ c) @ ginv * n / (n - d.shape[1])  # HC1 (every spot has counts)
        for f in range(2):
            block = cov_beta[f * q:(f + 1) * q, f * q:(f + 1) * q]
            np.testing.assert_allclose(wstat[g, f], beta[g, f] @ np.linalg.solve(block, beta[g, f]), rtol=1e-4)
    assert np.all((pval > 0) & (pval <= 1))


def _overdispersed_null(n: int, genes: int, sigma2: float, seed: int):
    """Counts with a spatial random effect ``nu ~ N(0, sigma2 K)`` and no covariate effect: ``(genes, n, 3)``."""
    rng = np.random.default_rng(seed)
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(n)).precision)
    nu = np.sqrt(sigma2) * np.einsum("nr,grq->gnq", vec * np.sqrt(lam), rng.normal(size=(genes, n, 2)))
    eta = np.concatenate([rng.normal(0, 0.5, (genes, 1, 2)) + nu, np.zeros((genes, n, 1))], -1)
    probs = np.exp(eta - eta.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    totals = rng.poisson(10 * rng.lognormal(0, 0.2, (genes, n)))
    counts = np.array([[rng.multinomial(t, p) for t, p in zip(tg, pg)] for tg, pg in zip(totals, probs)], float)
    return counts, lam, vec


def test_adjusted_glmm_score_test_is_calibrated():
    """250 null genes x 4 null covariates, with a spatial random effect: the GLM score test is anti-conservative,
    SPLISOSM's (unadjusted) GLMM score test very conservative, the adjusted one at its level."""
    n, genes = 144, 250
    counts, lam, vec = _overdispersed_null(n, genes, 0.3, seed=1)
    z = np.random.default_rng(7).normal(size=(n, 4))
    glm = fit_glm(counts)
    assert (score_test(counts, glm["probs"], z, information="adjusted")[1] < 0.05).mean() > 0.1
    # glmm-null, variance from the Laplace marginal (block-diagonal there: cheap)
    cfg = GLMMConfig(model="glmm-null", method="marginal_newton", var_fix_sigma=False, lr=0.1, max_epochs=150)
    fit = fit_glmm(counts, None, None, config=cfg)
    default = score_test(counts, fit["probs"], z)
    adjusted = score_test(counts, fit["probs"], z, information="adjusted", fit=fit, config=cfg)
    frac_default, frac_adjusted = (default[1] < 0.05).mean(), (adjusted[1] < 0.05).mean()
    assert frac_default < 0.02, frac_default
    assert 0.03 <= frac_adjusted <= 0.07, frac_adjusted
    # glmm-full, SPLISOSM's default fit (joint, sigma fixed at its Fano-factor start, which overstates the
    # variance here): still conservative, but much less so
    cfg = GLMMConfig(method="joint_newton")
    fit = fit_glmm(counts, lam, vec, config=cfg)
    default = score_test(counts, fit["probs"], z)
    adjusted = score_test(counts, fit["probs"], z, information="adjusted", fit=fit, eigvals=lam, eigvecs=vec,
                          config=cfg)
    frac_default, frac_adjusted = (default[1] < 0.05).mean(), (adjusted[1] < 0.05).mean()
    assert frac_default < 0.02 and max(0.01, frac_default) < frac_adjusted <= 0.07, (frac_default, frac_adjusted)


def test_default_score_test_is_unchanged():
    rng = np.random.default_rng(2)
    counts = rng.poisson(3.0, size=(3, 25, 3)).astype(float)
    probs = rng.dirichlet(np.ones(3), size=(3, 25))
    z = rng.normal(size=(25, 2))
    stat, pval = score_test(counts, probs, z)
    s = np.einsum("nf,bnq->bfq", z, (counts - counts.sum(-1, keepdims=True) * probs)[..., :-1])
    info = np.einsum("nf,bn,bnqr->bfqr", z**2, counts.sum(-1),
                     np.einsum("bnq,qr->bnqr", probs[..., :-1], np.eye(2))
                     - np.einsum("bnq,bnr->bnqr", probs[..., :-1], probs[..., :-1])) + 1e-5 * np.eye(2)
    np.testing.assert_allclose(stat, np.einsum("bfq,bfq->bf", s, np.linalg.solve(info, s[..., None])[..., 0]))
    np.testing.assert_array_equal(score_test(counts, probs, z, information="unadjusted")[1], pval)
    with pytest.raises(ValueError, match="information"):
        score_test(counts, probs, z, information="gmmat")


def test_du_test_passes_the_adjusted_information_through(tmp_path):
    import spatialscale
    from spatialscale.simulate import simulate_section

    adata = simulate_section(144, 6, n_sv=2, n_du=2, isoforms=(3, 3), seed=4)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    # float64: batched float32 fits differ at the optimiser's precision (README, "Reproducibility")
    opts = {"max_epochs": 60, "dtype": "float64"}
    ds = spatialscale.du_test(store, "rbp", method="glmm-score", model="glmm-null", fit="joint_newton",
                              glmm={**opts, "variance": "model", "information": "adjusted"}, scheduler="threads",
                              progress=False)
    plain = spatialscale.du_test(store, "rbp", method="glmm-score", model="glmm-null", fit="joint_newton",
                                 glmm={**opts, "variance": "model"}, scheduler="threads", progress=False)
    counts = np.stack([store.gene_counts(g) for g in ds.gene.values]).astype(float)
    z = store.obs()[["rbp"]].to_numpy(float)
    cfg = GLMMConfig(model="glmm-null", method="joint_newton", **opts)
    fit = fit_glmm(counts, None, None, config=cfg)
    stat, _ = score_test(counts, fit["probs"], z, information="adjusted", fit=fit, config=cfg)
    np.testing.assert_allclose(ds.du_statistic.values, stat, rtol=1e-6)
    assert ds.attrs["glmm_information"] == "adjusted"
    assert not np.allclose(ds.du_statistic.values, plain.du_statistic.values)
    with pytest.raises(spatialscale.InputError, match="applies to method='glmm-score' only"):
        spatialscale.du_test(store, "rbp", method="glmm-wald", model="glmm-null",
                             glmm={"information": "adjusted"}, scheduler="threads", progress=False)
    with pytest.raises(spatialscale.InputError, match="applies to variance='model' or 'pearson'"):
        spatialscale.du_test(store, "rbp", method="glmm-score", model="glmm-null",
                             glmm={"information": "adjusted"}, scheduler="threads", progress=False)


@pytest.mark.parametrize("method", ["joint_gd", "marginal_gd"])
def test_sgd_optimiser_descends_and_adam_is_the_default(method):
    from spatialscale.simulate import simulate_section

    adata = simulate_section(100, 3, n_sv=1, isoforms=(3, 3), seed=9)
    counts = np.stack([adata.layers["counts"][:, i:i + 3].toarray() if hasattr(adata.layers["counts"], "toarray")
                       else np.asarray(adata.layers["counts"][:, i:i + 3]) for i in range(0, 9, 3)]).astype(float)
    kw = {"model": "glmm-null", "method": method, "max_epochs": 30, "dtype": "float64"}
    first = fit_glmm(counts, None, None, config=GLMMConfig(**{**kw, "max_epochs": 1}, optim="sgd", lr=1e-3))["loss"]
    sgd = fit_glmm(counts, None, None, config=GLMMConfig(**kw, optim="sgd", lr=1e-3))
    adam = fit_glmm(counts, None, None, config=GLMMConfig(**kw))
    assert np.all(np.isfinite(first))
    assert np.all(sgd["loss"] < first - 1e-6) and np.all(adam["loss"] < first)
    assert not np.allclose(sgd["loss"], adam["loss"])
    with pytest.raises(ValueError, match="optim"):
        GLMMConfig(optim="lbfgs")


def test_the_fitting_method_has_one_name(tmp_path):
    import spatialscale
    from spatialscale.simulate import simulate_section

    store = spatialscale.ingest(simulate_section(100, 3, n_sv=1, isoforms=(3, 3), seed=2), tmp_path / "s.zarr")
    kw = {"model": "glmm-null", "scheduler": "threads", "progress": False}
    a = spatialscale.glmm_fit(store, fit="joint_newton", glmm={"max_epochs": 40}, **kw)
    assert a.attrs["fit"] == "joint_newton" and a.attrs["glmm_method"] == "joint_newton"
    assert a.epochs.values.max() < 40
    with pytest.raises(spatialscale.InputError, match=r"fit=\.\.\. \(--fit\), not glmm\['method'\]"):
        spatialscale.glmm_fit(store, glmm={"method": "joint_newton"}, **kw)


def test_joint_newton_batches_run_concurrently_in_threads(tmp_path):
    # forward-mode AD levels are process-global: two batches fitting at once in threads must not clash
    import spatialscale
    from spatialscale.simulate import simulate_section

    store = spatialscale.ingest(simulate_section(100, 40, n_sv=8, isoforms=(3, 3), seed=6), tmp_path / "s.zarr")
    kw = {"model": "glmm-full", "fit": "joint_newton", "glmm": {"max_epochs": 30, "dtype": "float64"},
          "progress": False}
    one = spatialscale.glmm_fit(store, scheduler="threads", batch_size=4, **kw)
    together = spatialscale.glmm_fit(store, scheduler="threads", **kw)
    np.testing.assert_allclose(one.loss.values, together.loss.values, rtol=1e-9)


def test_pcg_dropping_finished_genes_changes_nothing():
    """pcg(restrict=...) drops genes whose columns have all stopped: same solutions and iteration counts."""
    from spatialscale.glmm.newton import PrecisionOperators, weight_blocks

    rng = np.random.default_rng(4)
    n, b, q = 49, 6, 2
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(n)).precision)
    opts = {"dtype": torch.float64}
    probs = torch.as_tensor(rng.dirichlet(np.ones(3) * 4, size=(b, n))[..., :q], **opts)
    totals = torch.as_tensor(rng.poisson(np.r_[1.0, 3.0, 10.0, 30.0, 100.0, 300.0][:, None], size=(b, n)), **opts)
    blocks = weight_blocks(probs, totals)  # depths from 1 to 300: very different iteration counts
    vec_t = torch.as_tensor(vec, **opts)
    a = torch.as_tensor(rng.uniform(0.5, 2.0, size=(b, q, 1)) / lam, **opts)
    e = torch.zeros(b, q, **opts)
    rhs = torch.as_tensor(rng.normal(size=(b, n * q, 3)), **opts)
    ops = PrecisionOperators(blocks, vec_t, a, e)
    matvec, precond = ops.matvec, ops.precond
    plain, it_plain = pcg(matvec, rhs, precond, tol=1e-10)
    calls = []
    restrict = ops.restrict

    def counted(genes):
        calls.append(genes.tolist())
        return restrict(genes)

    dropped, it_dropped = pcg(matvec, rhs, precond, tol=1e-10, restrict=counted)
    assert calls and len(calls[0]) <= b // 2  # genes finish at different times: some were dropped
    np.testing.assert_array_equal(it_dropped.numpy(), it_plain.numpy())
    np.testing.assert_allclose(dropped.numpy(), plain.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(matvec(dropped).numpy(), rhs.numpy(), atol=1e-7)


@pytest.mark.parametrize("rank", [None, 20])
def test_newton_system_carrying_the_projections_solves_the_same(rank):
    """TWOperators(carry=True): PCG on vectors that carry V' t (fewer GEMMs) gives the plain solution."""
    from spatialscale.glmm.newton import TWOperators, _newton_system, carried_rows

    rng = np.random.default_rng(5)
    n, b = 49, 5
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(n)).precision, rank)
    counts = rng.poisson(rng.uniform(0.5, 20.0, size=(b, 1, 1)) * rng.dirichlet(np.ones(3), size=(b, n)))
    design = rng.normal(size=(n, 2))
    cfg = GLMMConfig(model="glmm-full", method="joint_newton", dtype="float64")
    data, params, learn = setup_fit(counts.astype(float), lam, vec, design, cfg, "cpu")
    params["nu"] = params["nu"] + torch.as_tensor(rng.normal(0, 0.3, size=params["nu"].shape))
    params["theta_logit"] = torch.full_like(params["theta_logit"], 0.5)
    system = _newton_system(params, data, cfg, learn)
    vec_t = data["eigvecs"]
    rhs_t = torch.as_tensor(rng.normal(size=(b, n, 2, 3)))
    rhs = torch.cat([rhs_t.reshape(b, 2 * n, 3), torch.as_tensor(rng.normal(size=(b, 3 * 2, 3)))], 1)
    plain_ops = TWOperators(system, vec_t, n)
    carry_ops = TWOperators(system, vec_t, n, carry=True)
    assert carry_ops.carry and not plain_ops.carry
    plain, it_plain = pcg(plain_ops.matvec, rhs, plain_ops.precond, tol=1e-10, restrict=plain_ops.restrict)
    rows = rhs.shape[1]
    aug = torch.cat([rhs, carried_rows(vec_t, rhs_t)], 1)
    carried, it_carried = pcg(carry_ops.matvec, aug, carry_ops.precond, tol=1e-10, restrict=carry_ops.restrict,
                              rows=rows)
    np.testing.assert_allclose(carried[:, :rows].numpy(), plain.numpy(), rtol=1e-7, atol=1e-9)
    assert np.abs(it_carried.numpy() - it_plain.numpy()).max() <= 1
    # the carried rows are V' of the solution's t part
    np.testing.assert_allclose(carried[:, rows:].numpy(),
                               carried_rows(vec_t, carried[:, : 2 * n].reshape(b, n, 2, 3)).numpy(), atol=1e-8)


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("rank", [None, 20])
def test_laplace_logdet_equals_the_dense_one(q, rank):
    """glmm-full's log det(W + C^-1) (one gene at a time, shared logit precisions) equals numpy's slogdet."""
    from spatialscale.glmm.glmm import _full_logdet

    rng = np.random.default_rng(q)
    n = 64
    lam, vec = kernel_eigenpairs(build_kernel(grid_coords(n)).precision, rank)
    cov = rng.uniform(0.2, 2.0, size=(2, 1, 1)) * (0.9 * lam + 0.1) * np.r_[1.0, rng.uniform(0.5, 2.0, q - 1)][:, None]
    rest = (np.full((2, q), 8.0), np.eye(n) - vec @ vec.T) if rank else None
    p = rng.dirichlet(np.ones(q + 1), size=n)[:, :q]
    w = rng.poisson(5, n)[:, None, None] * (np.einsum("nq,qr->nqr", p, np.eye(q)) - p[:, :, None] * p[:, None, :])
    for gene in range(2):
        dense = np.zeros((q * n, q * n))
        for j in range(q):
            dense[j * n:(j + 1) * n, j * n:(j + 1) * n] = (vec / cov[gene, j]) @ vec.T + (
                rest[0][gene, j] * rest[1] if rank else 0.0)
            for k in range(q):
                dense[j * n + np.arange(n), k * n + np.arange(n)] += w[:, j, k]
        rest_gene = (rest[0][gene], rest[1]) if rank else None
        np.testing.assert_allclose(_full_logdet(w, vec, cov[gene], rest_gene), np.linalg.slogdet(dense)[1],
                                   rtol=1e-11)
