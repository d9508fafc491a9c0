"""Multinomial GLMM (joint_gd) against SPLISOSM 1.2.0 and known truth."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import spatialscale
from spatialscale import InputError
from spatialscale.glmm.glmm import GLMMConfig, fit_glmm, neg_log_joint
from spatialscale.kernel import build_kernel, kernel_eigenpairs
from spatialscale.simulate import simulate_section

splisosm = pytest.importorskip("splisosm")


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    adata = simulate_section(400, 16, n_sv=4, n_du=6, effect=1.0, isoforms=(2, 4), seed=2)
    store = spatialscale.ingest(adata, tmp_path_factory.mktemp("glmm") / "s.zarr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = splisosm.SplisosmGLMM(model_type="glmm-full")
        ref.setup_data(adata, design_mtx=["celltype", "rbp"], group_iso_by="gene_symbol")
        ref.fit(print_progress=False, batch_size=1)
        ref.test_differential_usage(method="score", print_progress=False)
    return adata, store, ref


def _their_params(model):
    return {k: getattr(model, a).detach().double() for k, a in
            [("nu", "nu"), ("beta", "beta"), ("bias", "bias_eta"), ("sigma", "sigma"), ("theta_logit", "theta_logit")]}


def test_objective_is_splisosms_and_fit_at_least_as_good(section):
    adata, store, ref = section
    lam, vec = store.ensure_eigenpairs()
    for i, model in enumerate(ref.get_fitted_models()):
        counts = ref._get_gene_counts(i).to_dense().numpy().astype(float)
        with torch.no_grad():
            theirs = -float(model())
        ct = torch.tensor(counts)
        data = {"counts": ct, "x": torch.zeros(counts.shape[1], 0, dtype=torch.float64),
                "lgamma_const": torch.lgamma(ct.sum(-1) + 1).sum(1) - torch.lgamma(ct + 1).sum((1, 2)),
                "eigvals": torch.tensor(lam), "eigvecs": torch.tensor(vec)}
        # the same objective: ours evaluated at SPLISOSM's optimum equals SPLISOSM's own value
        np.testing.assert_allclose(float(neg_log_joint(_their_params(model), data, GLMMConfig())), theirs, rtol=1e-5)
        ours = float(fit_glmm(counts, lam, vec)["loss"][0])
        assert ours <= theirs * (1 + 1e-3)


def test_du_score_matches_splisosm(section):
    adata, store, ref = section
    from scipy.stats import spearmanr

    ds = spatialscale.du_test(store, ["celltype", "rbp"], method="glmm-score", model="glmm-full", fit="joint_gd",
                              glmm={"variance": "model"}, per_level=True,  # SPLISOSM's one-hot layout
                              scheduler="threads", progress=False)
    names = [str(g) for g in ref.gene_names]
    ours = ds["du_pvalue"].to_pandas().loc[names].to_numpy().ravel()
    theirs = np.maximum(ref._du_test_results["pvalue"].numpy().ravel(), 1e-300)
    assert spearmanr(-np.log10(ours), -np.log10(theirs)).statistic >= 0.98
    np.testing.assert_allclose(ds["du_statistic"].to_pandas().loc[names].to_numpy(),
                               ref._du_test_results["statistic"].numpy(), rtol=2e-2, atol=1e-3)


def test_glmm_fit_is_batch_invariant_and_converged_genes_stop(section):
    adata, store, _ = section
    lam, vec = store.ensure_eigenpairs()
    counts = np.stack([store.gene_counts(g) for g in store.genes.index[store.genes["n_isoforms"] == 2]])
    cfg = GLMMConfig(max_epochs=150, patience=3, tol=1.0, dtype="float64")
    together = fit_glmm(counts, lam, vec, config=cfg)
    alone = fit_glmm(counts[:1], lam, vec, config=cfg)
    np.testing.assert_allclose(together["loss"][0], alone["loss"][0], rtol=1e-10)
    np.testing.assert_allclose(together["nu"][0], alone["nu"][0], atol=1e-8)
    done = together["converged"]
    assert done.any() and (together["epochs"][done] < 150).all()
    # a converged gene no longer changes, however long its batch-mates keep going
    longer = fit_glmm(counts, lam, vec, config=GLMMConfig(max_epochs=400, patience=3, tol=1.0, dtype="float64"))
    np.testing.assert_array_equal(longer["nu"][done], together["nu"][done])
    np.testing.assert_array_equal(longer["epochs"][done], together["epochs"][done])


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(0)
    counts = rng.poisson(3.0, size=(2, 30, 3)).astype(float)
    kern = build_kernel(rng.uniform(0, 6, (30, 2)))
    lam, vec = kernel_eigenpairs(kern.precision)
    ct = torch.tensor(counts)
    data = {"counts": ct, "x": torch.zeros(30, 0, dtype=torch.float64), "lgamma_const": torch.zeros(2),
            "eigvals": torch.tensor(lam), "eigvecs": torch.tensor(vec)}
    params = {"nu": torch.tensor(rng.normal(0, 0.3, (2, 30, 2)), requires_grad=True),
              "beta": torch.zeros(2, 0, 2, dtype=torch.float64), "bias": torch.zeros(2, 2, dtype=torch.float64),
              "sigma": torch.full((2, 1), 0.5, dtype=torch.float64),
              "theta_logit": torch.tensor([[0.3], [-1.0]], dtype=torch.float64, requires_grad=True)}
    cfg = GLMMConfig()
    assert torch.autograd.gradcheck(lambda nu, th: neg_log_joint({**params, "nu": nu, "theta_logit": th}, data, cfg),
                                    (params["nu"], params["theta_logit"]))
    # low rank with the isotropic remainder equals the full kernel when all eigenpairs are kept
    low = {**data, "eigvals": data["eigvals"][:29], "eigvecs": data["eigvecs"][:, :29]}
    full_val = neg_log_joint(params, data, cfg)
    assert torch.all(torch.abs(neg_log_joint(params, low, cfg) - full_val) < 5.0)


def test_glmm_options_are_checked(section, tmp_path):
    _, store, _ = section
    with pytest.raises(InputError, match="GLMM options"):
        spatialscale.du_test(store, "rbp", method="glmm-score", model="glmm-full", glmm={"init_ratio": "random"},
                             out=tmp_path / "o.zarr")
    with pytest.raises(InputError, match="unknown model"):
        spatialscale.du_test(store, "rbp", method="glmm-score", model="glmm-xx", out=tmp_path / "o.zarr")
    assert not (tmp_path / "o.zarr").exists()


def test_glmm_score_test_is_not_anti_conservative(tmp_path):
    """SPLISOSM's GLMM score test ignores that nu was fitted (no nuisance adjustment of the
    information), so with a random effect it is conservative; it must never be anti-conservative.
    The GLM score test, which has no random effect, is calibrated (test_glm.py)."""
    adata = simulate_section(225, 120, n_sv=0, isoforms=(3, 3), mean_depth=10, seed=9)
    store = spatialscale.ingest(adata, tmp_path / "null.zarr")
    rng = np.random.default_rng(0)
    z = rng.normal(size=(store.n_spots, 10))  # 1200 null gene x covariate pairs
    ds = spatialscale.du_test(store, z,
                              method="glmm-score", model="glmm-null", glmm={"max_epochs": 200, "variance": "model"},
                              scheduler="threads", progress=False)
    frac = float((ds["du_pvalue"] < 0.05).mean())
    assert frac <= 0.07, frac
    glm = spatialscale.du_test(store, z, method="glmm-score", model="glm", scheduler="threads", progress=False)
    assert 0.03 <= float((glm["du_pvalue"] < 0.05).mean()) <= 0.07


def test_sv_llr_separates_spatial_genes(tmp_path):
    adata = simulate_section(225, 12, n_sv=5, n_du=3, effect=1.5, isoforms=(2, 3), seed=3)
    store = spatialscale.ingest(adata, tmp_path / "llr.zarr")
    ds = spatialscale.sv_test(store, method="glmm-llr", scheduler="threads", progress=False)
    from spatialscale.simulate import truth

    is_sv = truth(adata).reindex(ds["gene"].values).to_numpy()
    is_du = adata.var.groupby("gene_symbol", observed=True)["is_du"].first().reindex(ds["gene"].values).to_numpy()
    stat = ds["sv_statistic"].values
    # (a DU gene's usage varies with the cell type of each spot: overdispersion that is not spatial, which
    # can still raise its LLR, in SPLISOSM as here; see test_sv_llr_matches_splisosm)
    assert stat[is_sv].min() > stat[~is_sv & ~is_du].max()
    assert ds.attrs["method"] == "glmm-llr" and ds.attrs["null"] == "chi2"
    assert (ds["sv_pvalue"].values[is_sv] < 1e-3).all()
    # the permutation null: the same statistics, p-values from refits on permuted spots
    perm = spatialscale.sv_test(store, method="glmm-llr", null="perm-gene", n_perms=3, scheduler="threads",
                                progress=False)
    np.testing.assert_allclose(perm["sv_statistic"].values, stat, rtol=1e-6)
    np.testing.assert_allclose(perm["sv_pvalue"].values[is_sv], 0.25)  # above all 3 of its permutations
    assert perm.attrs["n_perms"] == 3


def test_sv_llr_matches_splisosm(tmp_path):
    """The null/full pair fitted each from the other gives SPLISOSM's LLR statistics gene by gene."""
    adata = simulate_section(100, 30, n_sv=8, n_du=4, isoforms=(2, 4), mean_depth=10, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = splisosm.SplisosmGLMM(model_type="glmm-full")
        ref.setup_data(adata, group_iso_by="gene_symbol")
        ref.fit(n_jobs=1, batch_size=20, print_progress=False, from_null=True)
        ref.test_spatial_variability(method="llr", print_progress=False)
    want = ref.get_formatted_test_results("sv").set_index("gene")
    store = spatialscale.ingest(adata, tmp_path / "llr.zarr")
    ds = spatialscale.sv_test(store, method="glmm-llr", fit="joint_gd", scheduler="threads", progress=False)
    got = ds.to_dataframe().loc[want.index]
    np.testing.assert_allclose(got["sv_statistic"], want["statistic"], atol=0.05, rtol=0.01)
    big = want["pvalue"] > 1e-6
    np.testing.assert_allclose(got["sv_pvalue"][big], want["pvalue"][big], rtol=0.05, atol=1e-4)
    assert (got["sv_pvalue"] < 0.05).sum() == (want["pvalue"] < 0.05).sum()


def test_sv_llr_is_batch_invariant(tmp_path):
    adata = simulate_section(100, 12, n_sv=4, isoforms=(3, 3), seed=4)
    store = spatialscale.ingest(adata, tmp_path / "b.zarr")
    one = spatialscale.sv_test(store, method="glmm-llr", scheduler="threads", progress=False)
    small = spatialscale.sv_test(store, method="glmm-llr", batch_size=3, scheduler="threads", progress=False)
    # float32 sums over differently shaped batches move each gene's stopping epoch a little
    np.testing.assert_allclose(small["sv_statistic"].values, one["sv_statistic"].values, rtol=1e-3, atol=0.05)


def test_llr_permutation_pvalues():
    from spatialscale.glmm.llr import llr_permutation_pvalues

    stat = np.array([5.0, 0.5, np.nan, 2.0])
    perm = np.array([[1.0, 6.0], [0.0, 0.5], [1.0, 1.0], [np.nan, 3.0]])
    groups = np.array([2, 2, 2, 3])
    # per gene: (1 + #{own perms >= stat}) / (1 + #finite own perms)
    np.testing.assert_allclose(llr_permutation_pvalues(stat, perm, groups, pool=False),
                               [2 / 3, 2 / 3, np.nan, 2 / 2])
    # pooled over the genes of a group: group 2 has 6 permutation statistics, group 3 one
    np.testing.assert_allclose(llr_permutation_pvalues(stat, perm, groups, pool=True),
                               [2 / 7, 6 / 7, np.nan, 2 / 2])


def test_sv_llr_options_are_checked(tmp_path):
    adata = simulate_section(64, 4, n_sv=1, isoforms=(2, 2), seed=5)
    store = spatialscale.ingest(adata, tmp_path / "o.zarr")
    with pytest.raises(InputError, match="unknown null 'liu'"):
        spatialscale.sv_test(store, method="glmm-llr", null="liu", progress=False)
    with pytest.raises(InputError, match="n_perms must be >= 1"):
        spatialscale.sv_test(store, method="glmm-llr", null="perm", n_perms=0, progress=False)


def test_wald_matches_splisosm_glm(tmp_path):
    adata = simulate_section(300, 20, n_sv=0, n_du=8, effect=1.2, isoforms=(2, 3), seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = splisosm.SplisosmGLMM(model_type="glm", fitting_method="iwls")
        ref.setup_data(adata, design_mtx=["rbp"], group_iso_by="gene_symbol")
        ref.fit(print_progress=False, with_design_mtx=True)
        ref.test_differential_usage(method="wald", print_progress=False)
    store = spatialscale.ingest(adata, tmp_path / "w.zarr")
    ds = spatialscale.du_test(store, ["rbp"], method="glmm-wald", glmm={"variance": "model"}, scheduler="threads",
                              progress=False)
    names = [str(g) for g in ref.gene_names]
    from scipy.stats import spearmanr

    ours = ds["du_pvalue"].to_pandas().loc[names].to_numpy()[:, 0]
    theirs = np.maximum(np.asarray(ref._du_test_results["pvalue"])[:, 0], 1e-300)
    assert spearmanr(-np.log10(ours), -np.log10(theirs)).statistic > 0.99


def test_glmm_fit_results_and_fitted_ratios(section, tmp_path):
    _, store, _ = section
    ds = spatialscale.glmm_fit(store, model="glmm-full", glmm={"max_epochs": 40}, return_nu=True,
                               scheduler="threads", progress=False, out=tmp_path / "fit.zarr")
    assert ds.attrs["model"] == "glmm-full" and ds.attrs["glmm_max_epochs"] == 40
    import xarray as xr

    back = xr.open_zarr(tmp_path / "fit.zarr").load()
    for v in ("intercept", "sigma", "theta", "converged", "loss", "epochs", "nu"):
        assert v in back
    gene = str(store.genes.index[-1])
    p = int(store.genes.loc[gene, "n_isoforms"])
    ratios = spatialscale.fitted_ratios(back, gene)
    assert ratios.shape == (store.n_spots, p)
    np.testing.assert_allclose(ratios.sum(1), 1.0)
    lam, vec = store.ensure_eigenpairs()
    direct = fit_glmm(store.gene_counts(gene)[None], lam, vec, config=GLMMConfig(method="joint_newton", max_epochs=40))
    np.testing.assert_allclose(ratios, direct["probs"][0], atol=1e-5)
    # padding past a gene's own isoforms is NaN
    small = str(store.genes.index[0])
    assert np.isnan(back["intercept"].sel(gene=small).values[int(store.genes.loc[small, "n_isoforms"]) - 1:]).all()
    glm = spatialscale.glmm_fit(store, model="glm", covariates=["rbp"], scheduler="threads", progress=False)
    assert glm["converged"].all() and glm["beta"].dims == ("gene", "covariate", "contrast")
    obs = store.obs()
    r = spatialscale.fitted_ratios(glm, gene, covariates=obs[["rbp"]].to_numpy())
    assert r.shape == (store.n_spots, p)
    with pytest.raises(InputError, match="fit method"):
        spatialscale.glmm_fit(store, model="glm", fit="joint_gd")


@pytest.mark.parametrize(("model", "rank", "prior", "share"), [("glmm-full", 30, "none", True),
                                                               ("glmm-full", 12, "gamma", False),
                                                               ("glmm-null", 30, "inv_gamma", True)])
def test_analytic_gradients_match_autograd(model, rank, prior, share):
    from spatialscale.glmm.glmm import loss_and_gradients

    rng = np.random.default_rng(1)
    n, q, b = 30, 2, 3
    counts = torch.tensor(rng.poisson(3.0, size=(b, n, q + 1)).astype(float))
    kern = build_kernel(rng.uniform(0, 6, (n, 2)))
    lam, vec = kernel_eigenpairs(kern.precision)
    x = torch.tensor(rng.normal(size=(n, 2)))
    data = {"counts": counts, "x": x, "totals": counts.sum(-1),
            "lgamma_const": torch.lgamma(counts.sum(-1) + 1).sum(1) - torch.lgamma(counts + 1).sum((1, 2)),
            "eigvals": torch.tensor(lam[:rank]), "eigvecs": torch.tensor(vec[:, :rank])}
    v = 1 if share else q
    params = {"nu": torch.tensor(rng.normal(0, 0.3, (b, n, q))), "beta": torch.tensor(rng.normal(0, 0.2, (b, 2, q))),
              "bias": torch.tensor(rng.normal(0, 0.2, (b, q))), "sigma": torch.tensor(rng.uniform(0.3, 1.2, (b, v))),
              "theta_logit": torch.tensor(rng.normal(0, 1, (b, v)))}
    cfg = GLMMConfig(model=model, var_prior=prior, share_variance=share, var_fix_sigma=False)
    learn = ["nu", "beta", "bias", "sigma"] + ([] if model == "glmm-null" else ["theta_logit"])
    loss, grads = loss_and_gradients(params, data, cfg, learn)
    leaves = {k: params[k].clone().requires_grad_(k in learn) for k in params}
    ref = neg_log_joint(leaves, data, cfg)
    np.testing.assert_allclose(loss.numpy(), ref.detach().numpy(), rtol=1e-10)
    ref_grads = torch.autograd.grad(ref.sum(), [leaves[k] for k in learn])
    for k, g in zip(learn, ref_grads):
        np.testing.assert_allclose(grads[k].numpy(), g.numpy(), rtol=1e-8, atol=1e-10, err_msg=k)


def test_glm_by_gradient_descent_reaches_the_iwls_optimum(section):
    _, store, _ = section
    gd = spatialscale.glmm_fit(store, model="glm", fit="gd", scheduler="threads", progress=False)
    iwls = spatialscale.glmm_fit(store, model="glm", fit="iwls", scheduler="threads", progress=False)
    assert gd["converged"].mean() > 0.8
    # same objective (negative log likelihood with the multinomial coefficient); float32 Adam with an
    # absolute tolerance stops near, never meaningfully below, the exact optimum
    np.testing.assert_allclose(gd["loss"].values, iwls["loss"].values, rtol=1e-3)
    assert (gd["loss"].values >= iwls["loss"].values * (1 - 1e-5)).all()


def test_glmm_wald_finds_du_genes(tmp_path):
    adata = simulate_section(300, 12, n_sv=0, n_du=6, effect=1.5, isoforms=(2, 3), seed=12)
    store = spatialscale.ingest(adata, tmp_path / "wald.zarr")
    ds = spatialscale.du_test(store, ["rbp"], method="glmm-wald", model="glmm-null", glmm={"max_epochs": 150},
                              scheduler="threads", progress=False)
    obs = store.obs()
    # the simulated DU effect is on celltype ct1, not rbp: rbp is a null covariate here
    assert float(ds["du_pvalue"].min()) > 1e-4
    ct1 = (obs["celltype"] == "ct1").to_numpy(float)[:, None]
    hit = spatialscale.du_test(store, ct1, method="glmm-wald", model="glmm-null", glmm={"max_epochs": 150},
                               scheduler="threads", progress=False)
    du = adata.var.groupby("gene_symbol", observed=True)["is_du"].first().reindex(hit["gene"].values).to_numpy()
    p = hit["du_pvalue"].values[:, 0]
    assert (p[du] < 1e-3).mean() >= 0.8 and np.median(p[~du]) > 0.05
