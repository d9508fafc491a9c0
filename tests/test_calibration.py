"""Known truth: calibration under the null, power under the alternative."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest

import spatialscale
from spatialscale.simulate import null_section, simulate_section, truth

pytestmark = pytest.mark.slow  # in CI too; `-m "not slow"` for a quick local run


@pytest.fixture(scope="module")
def null_store(tmp_path_factory):
    # 2000 genes with gene-specific depths and zero-coverage spots, no spatial effect
    adata = null_section(n_spots=900, n_genes=2000, mean_depth=10.0, zero_spot_frac=0.05, seed=22)
    return spatialscale.ingest(adata, tmp_path_factory.mktemp("null") / "null.zarr")


@pytest.mark.parametrize("null", ["liu", "welch", "liu-perm"])
@pytest.mark.parametrize("method", ["hsic-ir", "hsic-ic", "hsic-gc"])
def test_null_calibration(null_store, client, method, null):
    ds = spatialscale.sv_test(null_store, method=method, null=null, client=client, progress=False)
    p = ds["sv_pvalue"].values
    assert p.size >= 2000
    frac = float(np.mean(p < 0.05))
    assert 0.035 <= frac <= 0.065, f"{method}/{null}: {frac:.4f} of null p-values below 0.05"
    if null != "welch":
        # Liu matches the third and fourth cumulants, so its far tail holds up too;
        # Welch matches two and its far tail is light (a few BH "discoveries" for gene counts)
        assert int(np.sum(ds["sv_pvalue_adj"].values < 0.05)) <= 1


def test_exact_permutation_moments_remove_the_under_dispersion(null_store):
    from scipy import stats

    sd = {}
    for null in ("liu", "liu-perm"):
        p = spatialscale.sv_test(null_store, null=null, scheduler="threads", progress=False)["sv_pvalue"].values
        sd[null] = float(np.std(stats.norm.isf(np.clip(p, 1e-300, 1 - 1e-15))))
    # uniform p-values give standard normal z: the mixture's are too concentrated, the exact moments' are not
    assert sd["liu"] < 0.95
    assert 0.95 <= sd["liu-perm"] <= 1.05, sd


def test_permutation_null_calibration(null_store):
    sub = spatialscale.ingest(null_section(n_spots=400, n_genes=300, seed=5), null_store.path.parent / "small.zarr")
    p = spatialscale.sv_test(sub, null="perm", n_perms=199, scheduler="threads", progress=False)["sv_pvalue"].values
    assert 0.02 <= float(np.mean(p < 0.05)) <= 0.09


def test_power_at_least_splisosm(tmp_path):
    from splisosm import SplisosmNP

    adata = simulate_section(n_spots=900, n_genes=200, n_sv=50, effect=0.6, mean_depth=6.0, seed=8)
    store = spatialscale.ingest(adata, tmp_path / "sv.zarr")
    ds = spatialscale.sv_test(store, scheduler="threads", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = SplisosmNP()
        model.setup_data(adata)
        ref = model.test_spatial_variability(print_progress=False, return_results=True)
    is_sv = truth(adata)
    ours = ds["sv_pvalue_adj"].to_series() < 0.05
    theirs = dict(zip([str(g) for g in model.gene_names], ref["pvalue_adj"] < 0.05))
    power = ours[is_sv[is_sv].index].mean()
    power_ref = np.mean([theirs[g] for g in is_sv[is_sv].index])
    assert power >= power_ref
    assert power > 0.6
    fdr = (ours & ~is_sv.reindex(ours.index)).sum() / max(ours.sum(), 1)
    assert fdr < 0.15


def _smooth_fields(xy: np.ndarray, k: int, rng: np.random.Generator, noise: float = 1.0) -> np.ndarray:
    """``k`` covariates: a smooth random field on z-scored coordinates (length ~ 1) plus white noise."""
    x = (xy - xy.mean(0)) / xy.std(0)
    out = np.empty((len(x), k))
    for j in range(k):
        w = rng.normal(0, 0.8, (3, 2))
        out[:, j] = sum(np.sin(x @ wi + rng.uniform(0, 2 * np.pi)) for wi in w) + rng.normal(0, noise, len(x))
    return out


@pytest.fixture(scope="module")
def du_null_store(tmp_path_factory):
    # every gene's isoform usage has its own spatial pattern; no covariate below is related to usage.
    # Many covariates (not many genes): pairs that share a covariate are correlated, so the fraction
    # of small p-values only settles with many covariates.
    adata = simulate_section(900, 100, n_sv=100, n_du=0, effect=1.0, mean_depth=10.0, seed=31)
    return spatialscale.ingest(adata, tmp_path_factory.mktemp("du_null") / "s.zarr"), adata


def test_du_null_calibration_with_spatial_confounding(du_null_store, client):
    store, adata = du_null_store
    z = _smooth_fields(np.asarray(adata.obsm["spatial"], dtype=float), 200, np.random.default_rng(7))
    frac = {}
    for method, null in (("hsic-gp", "gp"), ("hsic-gp", "liu"), ("hsic", "liu")):
        ds = spatialscale.du_test(store, z, method=method, null=null, client=client, progress=False)
        assert ds.du_pvalue.size >= 2000
        frac[method, null] = float(np.mean(ds.du_pvalue.values < 0.05))
    # the covariate's own GP gives the null of its residual: calibrated
    assert 0.035 <= frac["hsic-gp", "gp"] <= 0.065, frac
    # SPLISOSM's null takes the residual as white noise: safe but conservative here (~1%)
    assert frac["hsic-gp", "liu"] <= 0.065, frac
    # usage and covariate share spatial autocorrelation only: the unconditional test is anti-conservative
    assert frac["hsic", "liu"] > 0.2, frac


def test_du_null_calibration_with_independent_covariates(du_null_store, client):
    store, _ = du_null_store
    z = np.random.default_rng(8).normal(size=(store.n_spots, 200))
    for method, null in (("hsic", "liu"), ("hsic-gp", "gp")):
        p = spatialscale.du_test(store, z, method=method, null=null, client=client, progress=False).du_pvalue.values
        assert p.size >= 2000
        assert 0.035 <= float(np.mean(p < 0.05)) <= 0.065, (method, null, float(np.mean(p < 0.05)))


#: null settings of the GLM / GLMM calibration: gene-specific depths (every setting), spots without counts, and
#: extra-multinomial usage noise (per-spot logit noise) from none to strong, with per-spot library sizes
GLMM_NULL_SETTINGS = {
    "logit-sd-0.5": {"isoforms": (3, 3), "mean_depth": 10.0, "zero_spot_frac": 0.05, "logit_sd": 0.5},
    "multinomial": {"isoforms": (2, 4), "mean_depth": 5.0, "zero_spot_frac": 0.05, "logit_sd": 0.0},
    "logit-sd-1-libsize": {"isoforms": (2, 4), "mean_depth": 20.0, "zero_spot_frac": 0.1, "logit_sd": 1.0,
                           "library_sd": 0.3},
}


@pytest.mark.parametrize("setting", ["logit-sd-0.5", "multinomial"])
def test_sv_llr_null_calibration(client, tmp_path, setting):
    """glmm-llr on 1,000 null genes (100 spots, gene-specific depths, 5% empty spots): the pooled permutation
    null (2 permutations, each a refit of the pair) keeps the level in [0.035, 0.065] (measured 5.3% with
    per-spot logit noise, 4.3% without); SPLISOSM's chi2 reference is not calibrated (0.1% and 3.1%)."""
    kw = {k: v for k, v in GLMM_NULL_SETTINGS[setting].items() if k not in ("mean_depth", "zero_spot_frac")}
    adata = null_section(100, 1000, mean_depth=10.0, zero_spot_frac=0.05, seed=5, **kw)
    store = spatialscale.ingest(adata, tmp_path / "null.zarr")
    perm = spatialscale.sv_test(store, method="glmm-llr", null="perm", n_perms=2, client=client, progress=False)
    frac = float((perm["sv_pvalue"] < 0.05).mean())
    assert perm["sv_pvalue"].size == 1000 and 0.035 <= frac <= 0.065, frac
    chi2 = float((perm["sv_statistic"] > 3.841).mean())  # chi2(1) at 0.05: the statistics are the chi2 run's
    assert chi2 < 0.035, chi2


def test_du_null_calibration_on_a_raster(tmp_path):
    """Raster store, every gene spatially patterned, no DU; 200 smooth covariates (confounded) and 200 white-noise
    ones. SplisosmFFT's grid GP (backend fft, length scale one bin, periodic) removes little of a smooth,
    non-periodic covariate, so its hsic-gp is anti-conservative under confounding (measured 36%); the coordinate
    GP on the observed bins with the GP-conditional null is calibrated (measured 4.55%)."""
    from spatialscale.simulate import simulate_raster

    adata = simulate_raster((40, 40), 100, n_sv=100, effect=1.0, mean_depth=10.0, seed=31, tissue_frac=np.pi / 4)
    store = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft")
    xy = adata.obs[["array_col", "array_row"]].to_numpy(float)
    confounded = _smooth_fields(xy, 200, np.random.default_rng(7))
    independent = np.random.default_rng(8).normal(size=(adata.n_obs, 200))
    frac = {}
    for name, z in (("confounded", confounded), ("independent", independent)):
        for backend, null in (("fft", "liu"), ("exact", "gp")):
            ds = spatialscale.du_test(store, z, method="hsic-gp", gp={"backend": backend}, null=null,
                                      scheduler="threads", progress=False)
            assert ds.du_pvalue.size == 20000
            frac[name, backend] = float(np.mean(ds.du_pvalue.values < 0.05))
    assert frac["confounded", "fft"] > 0.2, frac
    assert 0.03 <= frac["confounded", "exact"] <= 0.065, frac
    assert 0.025 <= frac["independent", "fft"] <= 0.065, frac
    assert 0.025 <= frac["independent", "exact"] <= 0.065, frac


#: (model, method) of the GLM / GLMM DU tests
GLMM_DU_TESTS = (("glm", "glmm-score"), ("glm", "glmm-wald"), ("glmm-null", "glmm-score"), ("glmm-null", "glmm-wald"),
                 ("glmm-full", "glmm-score"), ("glmm-full", "glmm-wald"))


@pytest.mark.parametrize("setting", list(GLMM_NULL_SETTINGS))
def test_glmm_du_tests_are_calibrated(tmp_path, setting):
    """Every GLM / GLMM DU test with its default (sandwich) variance on 1,000 null genes (300 spots), 2 smooth
    covariates and a cell-type indicator: the fraction of p < 0.05 over the 3,000 pairs is in [0.035, 0.065]
    (measured in docs/statistics.md).  SPLISOSM's variance (``variance="model"``) is not calibrated: the GLM
    score test with it is anti-conservative under overdispersion."""
    kw = GLMM_NULL_SETTINGS[setting]
    seed = 40 + int(kw["mean_depth"])
    adata = simulate_section(300, 1000, n_sv=0, n_du=0, seed=seed, **kw)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    z = np.c_[_smooth_fields(adata.obsm["spatial"], 2, np.random.default_rng(seed)),
              (adata.obs["celltype"] == "ct1").to_numpy(float)]
    level = {}
    for model, method in GLMM_DU_TESTS:
        ds = spatialscale.du_test(store, z, method=method, model=model, scheduler="threads", progress=False)
        assert ds.attrs["variance"] == "robust"
        p = ds.du_pvalue.values
        assert p.size == 3000 and np.isfinite(p).all()
        level[model, method] = float(np.mean(p < 0.05))
    print(setting, level)
    assert all(0.035 <= v <= 0.065 for v in level.values()), level
    if kw["logit_sd"] >= 1.0:
        glm = spatialscale.du_test(store, z, method="glmm-score", model="glm", glmm={"variance": "model"},
                                   scheduler="threads", progress=False)
        assert float(np.mean(glm.du_pvalue.values < 0.05)) > 0.2


def test_glmm_score_power_at_least_splisosm(tmp_path):
    """30 DU genes of 50 (effect 0.6 on cell type ct1, logit noise SD 0.5, 200 spots): the glmm-full score test
    with its default sandwich variance finds at least as many at p < 0.05 as SplisosmGLMM's glmm-full score test
    (whose variance makes it conservative), and its level on the 40 null genes stays small."""
    from splisosm import SplisosmGLMM

    adata = simulate_section(200, 50, n_sv=0, n_du=30, effect=0.6, isoforms=(3, 3), mean_depth=10.0, logit_sd=0.5,
                             zero_spot_frac=0.05, seed=14)
    adata.obs["ct1"] = (adata.obs["celltype"] == "ct1").astype(float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SplisosmGLMM(model_type="glmm-full")
        ref.setup_data(adata, design_mtx=["ct1"], group_iso_by="gene_symbol")
        ref.fit(print_progress=False)
        ref.test_differential_usage(method="score", print_progress=False)
    theirs = pd.Series(np.asarray(ref._du_test_results["pvalue"])[:, 0], index=[str(g) for g in ref.gene_names])
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    ours = spatialscale.du_test(store, "ct1", method="glmm-score", model="glmm-full", scheduler="threads",
                                progress=False)["du_pvalue"].to_pandas().iloc[:, 0]
    du = adata.var.groupby("gene_symbol", observed=True)["is_du"].first().astype(bool).reindex(ours.index).to_numpy()
    hit, hit_ref = (ours < 0.05).to_numpy(), (theirs.reindex(ours.index) < 0.05).to_numpy()
    power, power_ref = hit[du].mean(), hit_ref[du].mean()
    assert power >= power_ref and power > 0.5, (power, power_ref)
    assert hit[~du].mean() <= 0.15, hit[~du].mean()
