"""Multinomial GLM and the DU score test (issue: parametric tests, first slice)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch

import spatialscale
from spatialscale import InputError
from spatialscale.glmm import fit_glm, multinomial_loglik, score_test
from spatialscale.glmm.glm import gradient, hessian
from spatialscale.simulate import simulate_section


def _torch_loglik(counts, x, coef):
    eta = torch.einsum("nf,bfq->bnq", x, coef)
    full = torch.cat([eta, torch.zeros(eta.shape[:-1] + (1,), dtype=eta.dtype)], dim=-1)
    return (counts * torch.log_softmax(full, dim=-1)).sum()


def test_gradient_and_hessian_match_autograd():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(3, 50, 4)).astype(float)
    x = np.column_stack([rng.normal(size=(50, 2)), np.ones(50)])
    coef = rng.normal(0, 0.3, size=(3, 3, 3))
    ct, xt = torch.tensor(counts), torch.tensor(x)
    ref_g = torch.func.grad(lambda c: _torch_loglik(ct, xt, c))(torch.tensor(coef)).numpy()
    np.testing.assert_allclose(gradient(counts, x, coef), ref_g, rtol=1e-10, atol=1e-10)
    for g in range(3):
        h = torch.autograd.functional.hessian(lambda c, g=g: _torch_loglik(ct[g : g + 1], xt, c[None]),
                                              torch.tensor(coef[g])).numpy()
        # ours is indexed (f, q) -> f*q + q, the same row-major flattening as (F, q)
        np.testing.assert_allclose(hessian(counts[g : g + 1], x, coef[g : g + 1])[0], h.reshape(9, 9),
                                   rtol=1e-9, atol=1e-9)


def test_glm_fit_is_the_mle():
    rng = np.random.default_rng(1)
    counts = rng.poisson(4.0, size=(5, 80, 3)).astype(float)
    fit = fit_glm(counts)
    pooled = counts.sum(1) / counts.sum((1, 2))[:, None]
    np.testing.assert_allclose(fit["probs"][:, 0, :], pooled, rtol=1e-10)
    z = rng.normal(size=(80, 2))
    fit = fit_glm(counts, z)
    assert fit["converged"].all()
    x = np.column_stack([z, np.ones(80)])
    coef = np.concatenate([fit["beta"], fit["intercept"][:, None, :]], axis=1)
    assert np.abs(gradient(counts, x, coef)).max() < 1e-6
    # a worse point has a lower likelihood
    worse = multinomial_loglik(counts, np.einsum("nf,bfq->bnq", x, coef + 0.05), constant=True)
    assert np.all(worse < fit["loglik"])


def test_score_test_matches_splisosm_glm(tmp_path):
    splisosm = pytest.importorskip("splisosm")
    adata = simulate_section(400, 40, n_sv=5, n_du=10, effect=1.0, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = splisosm.SplisosmGLMM(model_type="glm", fitting_method="iwls")
        ref.setup_data(adata, design_mtx=["celltype", "rbp"], group_iso_by="gene_symbol")
        ref.fit(print_progress=False)
        ref.test_differential_usage(method="score", print_progress=False)
    res = ref._du_test_results
    ref_names = [str(g) for g in ref.gene_names]
    store = spatialscale.ingest(adata, tmp_path / "glm.zarr")
    ds = spatialscale.du_test(store, ["celltype", "rbp"], method="glmm-score", glmm={"variance": "model"},
                              per_level=True, scheduler="threads", progress=False)  # SPLISOSM's one-hot layout
    assert list(ds["covariate"].values) == ["celltype_ct0", "celltype_ct1", "celltype_ct2", "rbp"]
    ours = ds["du_statistic"].to_pandas().loc[ref_names].to_numpy()
    theirs = res["statistic"].numpy()
    # SPLISOSM stops IWLS on a loss tolerance; ours is the exact MLE, so statistics agree to
    # that tolerance (median 1e-4 relative), and the p-value ranking is the same
    rel = np.abs(ours - theirs) / theirs
    assert np.median(rel) < 1e-3
    from scipy.stats import spearmanr

    p_ours = ds["du_pvalue"].to_pandas().loc[ref_names].to_numpy().ravel()
    p_ref = np.maximum(res["pvalue"].numpy().ravel(), 1e-300)
    assert spearmanr(-np.log10(p_ours), -np.log10(p_ref)).statistic > 0.999
    # Given SPLISOSM's own fitted ratios (float32), our score test gives its statistics and p-values:
    # the score test is the same, the end-to-end differences above are IWLS's stopping point only
    z = ref.design_mtx.toarray() if hasattr(ref.design_mtx, "toarray") else np.asarray(ref.design_mtx)
    for i, model in enumerate(ref.get_fitted_models()):
        counts = ref._get_gene_counts(i).to_dense().numpy().astype(float)
        probs = model.get_isoform_ratio().detach().double().numpy().reshape(counts.shape)
        s, p = score_test(counts, probs, np.asarray(z, dtype=float))
        np.testing.assert_allclose(s[0], theirs[i], rtol=1e-4)
        ok = p_ref.reshape(theirs.shape)[i] > 1e-30
        np.testing.assert_allclose(p[0][ok], p_ref.reshape(theirs.shape)[i][ok], rtol=1e-3)
    # DU genes respond to celltype: the ct1 column finds them
    du_genes = adata.var.groupby("gene_symbol", observed=True)["is_du"].first()
    hits = ds["du_pvalue_adj"].sel(covariate="celltype_ct1").to_pandas() < 0.05
    assert hits[du_genes[du_genes].index].mean() >= 0.8


def test_score_test_calibration_with_null_covariates():
    rng = np.random.default_rng(3)
    counts = rng.multinomial(rng.poisson(8, size=(1200, 300)), [0.5, 0.3, 0.2]).astype(float)
    z = rng.normal(size=(300, 1))
    _, p = score_test(counts, fit_glm(counts)["probs"], z)
    frac = float(np.mean(p < 0.05))
    assert 0.03 <= frac <= 0.07, frac


@pytest.fixture(scope="module")
def du_store(tmp_path_factory):
    adata = simulate_section(300, 30, n_sv=0, n_du=8, effect=1.2, seed=4)
    return spatialscale.ingest(adata, tmp_path_factory.mktemp("du") / "du.zarr")


def test_du_results_are_invariant_across_execution(du_store, client):
    a = spatialscale.du_test(du_store, "celltype,rbp",
                             method="glmm-score", scheduler="threads", batch_size=1, progress=False)
    b = spatialscale.du_test(du_store, ["celltype", "rbp"],
                             method="glmm-score", client=client, batch_size=7, progress=False)
    np.testing.assert_allclose(a["du_pvalue"].values, b["du_pvalue"].values, rtol=1e-12)
    assert a["du_pvalue"].dims == ("gene", "covariate")
    for cov in a["covariate"].values:  # BH is per covariate
        from scipy.stats import false_discovery_control

        np.testing.assert_allclose(a["du_pvalue_adj"].sel(covariate=cov).values,
                                   false_discovery_control(a["du_pvalue"].sel(covariate=cov).values))


def test_du_covariates_as_array_and_dataframe(du_store, tmp_path):
    obs = du_store.obs()
    arr = obs["rbp"].to_numpy()
    a = spatialscale.du_test(du_store, arr,
                             method="glmm-score", scheduler="threads", progress=False, out=tmp_path / "du.zarr")
    assert list(a["covariate"].values) == ["factor_1"]
    frame = pd.DataFrame({"rbp": arr}, index=obs.index)[::-1]  # aligned by spot name
    b = spatialscale.du_test(du_store, frame, method="glmm-score", scheduler="threads", progress=False)
    np.testing.assert_allclose(a["du_statistic"].values, b["du_statistic"].values, rtol=1e-12)
    import xarray as xr

    assert xr.open_zarr(tmp_path / "du.zarr")["du_pvalue"].shape == (du_store.n_genes, 1)


@pytest.mark.parametrize(("cov", "msg"), [(["nope"], "not found in obs"), (np.ones(300), "constant"),
                                          (np.r_[np.nan, np.arange(299.0)], "NaN"), (np.arange(10.0), "300 spots")])
def test_du_bad_covariates(du_store, tmp_path, cov, msg):
    with pytest.raises(InputError, match=msg):
        spatialscale.du_test(du_store, cov, method="glmm-score", out=tmp_path / "du.zarr", progress=False)
    assert not (tmp_path / "du.zarr").exists()


def test_du_unknown_method(du_store, tmp_path):
    with pytest.raises(InputError, match="unknown method"):
        spatialscale.du_test(du_store, "rbp", method="hsic-xx", out=tmp_path / "du.zarr")
    assert not (tmp_path / "du.zarr").exists()


def test_robust_score_variance_is_the_sandwich_of_spot_residuals():
    """variance='robust' after the intercept-only GLM: s' V^-1 s with s = sum_i (z_i - zbar) r_i and
    V = sum_i (z_i - zbar)^2 r_i r_i', zbar the depth-weighted mean of z (the GLM's fitted probabilities are
    the same at every spot, so the information weights are the depths) and r_i the first q residuals; chi2(q)."""
    from scipy import stats

    from spatialscale.glmm import fit_glm
    from spatialscale.glmm.inference import score_test

    rng = np.random.default_rng(3)
    counts = rng.poisson(rng.gamma(2.0, 2.0, size=(4, 120, 3))).astype(float)
    counts[:, :5] = 0.0  # spots without counts contribute nothing
    z = rng.normal(size=(120, 2))
    fit = fit_glm(counts)
    stat, p = score_test(counts, fit["probs"], z, variance="robust")
    for b in range(4):
        n = counts[b].sum(1)
        p_hat = counts[b].sum(0) / n.sum()
        r = (counts[b] - n[:, None] * p_hat)[:, :2]
        for f in range(2):
            zc = z[:, f] - (n @ z[:, f]) / n.sum()
            s = zc @ r
            v = (zc[:, None, None] ** 2 * r[:, :, None] * r[:, None, :]).sum(0)
            want = s @ np.linalg.solve(v, s)
            np.testing.assert_allclose(stat[b, f], want, rtol=1e-6)
            np.testing.assert_allclose(p[b, f], stats.chi2.sf(want, 2), rtol=1e-5)
    with pytest.raises(ValueError, match="unknown score variance"):
        score_test(counts, fit["probs"], z, variance="sandwich")
