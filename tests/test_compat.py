"""spatialscale.compat against SPLISOSM 1.2.0: the same calls give the same DataFrames.

Each test runs SPLISOSM and the compat class with the same arguments and
compares ``get_formatted_test_results`` / ``extract_feature_summary``: the
same columns, index and dtypes, and values within the tolerances of the
parity tests (test_parity.py, test_du.py, test_glmm.py, test_summary.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from spatialscale import InputError, open_store
from spatialscale.simulate import simulate_section
from tests.conftest import make_adata

splisosm = pytest.importorskip("splisosm")
compat = pytest.importorskip("spatialscale.compat")

COVS = ["cont", "region", "bin"]


def quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kw)


def assert_same_table(theirs: pd.DataFrame, ours: pd.DataFrame, *, stat_rtol: float = 1e-5,
                      p_rtol: float = 1e-4) -> None:
    """Same columns, index and dtypes; text equal; statistics and p-values as in the parity tests.

    SPLISOSM keeps some results in float32: statistics near 0 carry its
    rounding (compared against the largest statistic) and p-values below
    1e-8 are compared on the log scale.
    """
    assert list(ours.columns) == list(theirs.columns)
    pd.testing.assert_index_equal(ours.index, theirs.index)
    pd.testing.assert_series_equal(ours.dtypes, theirs.dtypes)
    for col in theirs.columns:
        if col in ("statistic", "pvalue", "pvalue_adj"):
            continue
        if pd.api.types.is_float_dtype(theirs[col]):
            np.testing.assert_allclose(ours[col], theirs[col], rtol=1e-9, atol=1e-12, err_msg=col)
        else:
            pd.testing.assert_series_equal(ours[col], theirs[col])
    s, s_ref = ours["statistic"].to_numpy(float), theirs["statistic"].to_numpy(float)
    np.testing.assert_allclose(s, s_ref, rtol=stat_rtol, atol=2e-6 * np.abs(s_ref).max())
    big = np.abs(s_ref) > 0.01 * np.abs(s_ref).max()
    np.testing.assert_allclose(s[big], s_ref[big], rtol=stat_rtol)
    for col in ("pvalue", "pvalue_adj"):
        p, p_ref = ours[col].to_numpy(float), theirs[col].to_numpy(float)
        ok = p_ref > 1e-8
        np.testing.assert_allclose(p[ok], p_ref[ok], rtol=p_rtol, err_msg=col)
        tiny = (p_ref > 1e-30) & ~ok
        np.testing.assert_allclose(np.log10(p[tiny]), np.log10(p_ref[tiny]), rtol=1e-3, err_msg=col)
        assert np.all(p[p_ref == 0] < 1e-30), col


@pytest.fixture(scope="module")
def section():
    """Genes named out of sorted order, isoforms of a gene not adjacent, display names in another var column."""
    a = make_adata(240, 10, zero_spots=0.15, seed=7)
    rng = np.random.default_rng(0)
    a = a[:, rng.permutation(a.n_vars)].copy()
    rename = {f"gene{g:03d}": f"G{n}" for g, n in zip(range(10), rng.permutation(10) + 3)}
    a.var["gene_symbol"] = a.var["gene_symbol"].map(rename).astype("category")
    a.var["gene_name"] = ("name-" + a.var["gene_symbol"].astype(str)).to_numpy()
    a.obs["cont"] = rng.normal(size=a.n_obs) + 0.05 * a.obsm["spatial"][:, 0]
    a.obs["bin"] = (rng.random(a.n_obs) > 0.6).astype(float)
    return a


SETUP = {"layer": "counts", "group_iso_by": "gene_symbol", "gene_names": "gene_name"}


@pytest.fixture(scope="module")
def np_models(section):
    ref = splisosm.SplisosmNP()
    quiet(ref.setup_data, section, design_mtx=COVS, **SETUP)
    with compat.SplisosmNP() as ours:
        quiet(ours.setup_data, section, design_mtx=COVS, **SETUP)
        yield ref, ours


def test_setup_matches(np_models):
    ref, ours = np_models
    assert ours.gene_names == ref.gene_names and ours.gene_names != sorted(ours.gene_names)
    assert ours.gene_names[0].startswith("name-")
    assert (ours.n_genes, ours.n_spots, ours.n_factors) == (ref.n_genes, ref.n_spots, ref.n_factors)
    assert ours.n_isos_per_gene == ref.n_isos_per_gene and ours.covariate_names == ref.covariate_names
    np.testing.assert_array_equal(ours.design_mtx.numpy(), ref.design_mtx.numpy())
    assert list(ours.filtered_adata.var_names) == list(ref.filtered_adata.var_names)
    assert "SplisosmNP" in str(ours)


@pytest.mark.parametrize("kw", [{"method": "hsic-ir"}, {"method": "hsic-gc"},
                                {"method": "hsic-ir", "ratio_transformation": "clr", "null_method": "welch"}],
                         ids=["hsic-ir", "hsic-gc", "hsic-ir-clr-welch"])
def test_sv(np_models, kw):
    ref, ours = np_models
    quiet(ref.test_spatial_variability, print_progress=False, **kw)
    got = ours.test_spatial_variability(print_progress=False, return_results=True, **kw)
    assert list(got) == list(ref._sv_test_results)
    for key in ("statistic", "pvalue", "pvalue_adj"):
        assert type(got[key]) is type(ref._sv_test_results[key])
        assert got[key].dtype == ref._sv_test_results[key].dtype and got[key].shape == (ref.n_genes,)
    assert ours.sv_test_results is ours._sv_test_results
    assert_same_table(ref.get_formatted_test_results("sv"), ours.get_formatted_test_results("sv"))


@pytest.mark.parametrize("method", ["hsic", "t-fisher"])
def test_du(section, np_models, method):
    if method == "hsic":
        ref, ours = np_models
    else:  # the t-tests take binary covariates only
        ref, ours = splisosm.SplisosmNP(), compat.SplisosmNP()
        for m in (ref, ours):
            quiet(m.setup_data, section, design_mtx=["bin", "region"], **SETUP)
    quiet(ref.test_differential_usage, method=method, print_progress=False)
    ours.test_differential_usage(method=method, print_progress=False)
    theirs = ref._du_test_results
    assert list(ours.du_test_results) == list(theirs)
    for key in ("statistic", "pvalue", "pvalue_adj"):
        assert ours.du_test_results[key].dtype == theirs[key].dtype
        assert ours.du_test_results[key].shape == (ref.n_genes, ref.n_factors)
    assert_same_table(ref.get_formatted_test_results("du"), ours.get_formatted_test_results("du"))


def test_du_hsic_gp(np_models):
    """The GP optimum agrees closely (as test_du's sklearn-backend comparison), not to rounding."""
    ref, ours = np_models
    quiet(ref.test_differential_usage, method="hsic-gp", print_progress=False)
    ours.test_differential_usage(method="hsic-gp", print_progress=False)
    theirs, got = ref.get_formatted_test_results("du"), ours.get_formatted_test_results("du")
    assert list(got.columns) == list(theirs.columns)
    pd.testing.assert_series_equal(got.dtypes, theirs.dtypes)
    pd.testing.assert_frame_equal(got[["gene", "covariate"]], theirs[["gene", "covariate"]])
    s_ref = theirs["statistic"].to_numpy(float)
    np.testing.assert_allclose(got["statistic"], s_ref, rtol=1e-3, atol=1e-4 * s_ref.max())
    p, p_ref = got["pvalue"].to_numpy(float), np.maximum(theirs["pvalue"].to_numpy(float), 1e-300)
    assert spearmanr(-np.log10(np.maximum(p, 1e-300)), -np.log10(p_ref)).statistic >= 0.99


def test_feature_summary_and_merged_results(np_models):
    ref, ours = np_models
    for level in ("gene", "isoform"):
        theirs = quiet(ref.extract_feature_summary, level, print_progress=False)
        got = ours.extract_feature_summary(level, print_progress=False)
        pd.testing.assert_frame_equal(got, theirs, check_exact=False, rtol=1e-9, atol=1e-12)
    quiet(ref.test_spatial_variability, print_progress=False)
    ours.test_spatial_variability(print_progress=False)
    assert_same_table(ref.get_formatted_test_results("sv", with_gene_summary=True),
                      ours.get_formatted_test_results("sv", with_gene_summary=True))


def test_setup_from_count_tensors(np_models):
    """Per-gene count tensors (the pre-1.0 form) give what SPLISOSM gives on the AnnData holding them."""
    import torch

    ref, _ = np_models
    kept = ref.filtered_adata
    counts = kept.layers["counts"].toarray()
    blocks, start = [], 0
    for p in ref.n_isos_per_gene:
        blocks.append(torch.tensor(counts[:, start:start + p]).to_sparse() if p % 2 else counts[:, start:start + p])
        start += p
    design = kept.obs[["cont", "bin"]].to_numpy()
    with compat.SplisosmNP() as ours:
        quiet(ours.setup_data, blocks, coordinates=torch.tensor(kept.obsm["spatial"]), gene_names=ref.gene_names,
              design_mtx=design)
        assert ours.gene_names == ref.gene_names and ours.covariate_names == ["factor_1", "factor_2"]
        quiet(ref.test_spatial_variability, print_progress=False)
        ours.test_spatial_variability(print_progress=False)
        assert_same_table(ref.get_formatted_test_results("sv"), ours.get_formatted_test_results("sv"))
        store = Path(ours.store.path)
        assert store.exists()
    assert not store.exists()  # the temporary store leaves with the object


def test_on_a_local_cluster(section, np_models, client):
    ref, _ = np_models
    with compat.SplisosmNP(client=client) as ours:
        quiet(ours.setup_data, section, design_mtx=COVS, **SETUP)
        quiet(ref.test_spatial_variability, method="hsic-ic", print_progress=False)
        ours.test_spatial_variability(method="hsic-ic", print_progress=False)
        assert_same_table(ref.get_formatted_test_results("sv"), ours.get_formatted_test_results("sv"))


@pytest.fixture
def one_torch_thread():
    """SPLISOSM's GLMM fits run far faster on one thread when the CPUs are shared."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_glmm_score_test(one_torch_thread):
    """SplisosmGLMM (joint_gd) fit + score test: SPLISOSM's objective and Adam steps, so the statistics agree
    to the tolerance of test_glmm.py."""
    adata = simulate_section(100, 5, n_sv=2, n_du=3, effect=1.0, isoforms=(2, 3), seed=2)

    def settings():  # SPLISOSM records fit()'s arguments in the fitting_configs dict it is given
        return {"model_type": "glmm-full", "fitting_method": "joint_gd", "fitting_configs": {"max_epochs": 60}}

    ref = splisosm.SplisosmGLMM(**settings())
    quiet(ref.setup_data, adata, design_mtx=["celltype", "rbp"], group_iso_by="gene_symbol")
    quiet(ref.fit, print_progress=False)
    quiet(ref.test_differential_usage, method="score", print_progress=False)
    with compat.SplisosmGLMM(**settings()) as ours:
        quiet(ours.setup_data, adata, design_mtx=["celltype", "rbp"], group_iso_by="gene_symbol")
        ours.fit(print_progress=False)
        ours.test_differential_usage(method="score", print_progress=False)
        theirs, got = ref._du_test_results, ours.du_test_results
        assert list(got) == list(theirs)
        for key in ("statistic", "pvalue"):
            assert type(got[key]) is type(theirs[key]) and got[key].dtype == theirs[key].dtype
        a, b = ref.get_formatted_test_results("du"), ours.get_formatted_test_results("du")
        assert list(b.columns) == list(a.columns)
        pd.testing.assert_series_equal(b.dtypes, a.dtypes)
        pd.testing.assert_frame_equal(b[["gene", "covariate"]], a[["gene", "covariate"]])
        np.testing.assert_allclose(b["statistic"], a["statistic"], rtol=2e-2, atol=1e-3)
        p, p_ref = b["pvalue"].to_numpy(), np.maximum(a["pvalue"].to_numpy(), 1e-300)
        assert spearmanr(-np.log10(np.maximum(p, 1e-300)), -np.log10(p_ref)).statistic >= 0.98
        summary, ref_summary = ours.get_training_summary(), ref.get_training_summary()
        assert list(summary.columns) == list(ref_summary.columns)
        pd.testing.assert_index_equal(summary.index, ref_summary.index)
        np.testing.assert_allclose(summary["best_loss"], ref_summary["best_loss"], rtol=1e-3)
        for level in ("gene", "isoform"):
            pd.testing.assert_frame_equal(ours.extract_feature_summary(level, print_progress=False),
                                          quiet(ref.extract_feature_summary, level, print_progress=False),
                                          check_exact=False, rtol=1e-9)
        ratios = ours.get_fitted_ratios_anndata()
        got = ratios.layers["fitted_ratios"]
        assert got.shape == ref.filtered_adata.shape and np.all(np.isfinite(got))
        np.testing.assert_allclose(got, quiet(ref.get_fitted_ratios_anndata).layers["fitted_ratios"], atol=2e-2)


def test_glmm_likelihood_ratio_sv_test(one_torch_thread):
    """fit(from_null=True) + the LLR test: each gene's statistic to test_glmm.py's tolerance."""
    adata = simulate_section(80, 6, n_sv=3, isoforms=(2, 3), mean_depth=10, seed=1)
    ref = splisosm.SplisosmGLMM(fitting_configs={"max_epochs": 80})
    quiet(ref.setup_data, adata)
    quiet(ref.fit, print_progress=False, from_null=True)
    quiet(ref.test_spatial_variability, print_progress=False)
    with compat.SplisosmGLMM(fitting_configs={"max_epochs": 80}) as ours:
        quiet(ours.setup_data, adata)
        with pytest.raises(InputError, match="from_null"):
            ours.test_spatial_variability()
        ours.fit(print_progress=False, from_null=True)
        got = ours.test_spatial_variability(print_progress=False, return_results=True)
        assert list(got) == list(ref._sv_test_results)
        for key, value in ref._sv_test_results.items():
            if isinstance(value, np.ndarray):
                assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        a, b = ref.get_formatted_test_results("sv"), ours.get_formatted_test_results("sv")
        pd.testing.assert_series_equal(b.dtypes, a.dtypes)
        pd.testing.assert_series_equal(b["gene"], a["gene"])
        np.testing.assert_allclose(b["statistic"], a["statistic"], atol=0.05, rtol=0.01)
        big = a["pvalue"] > 1e-6
        np.testing.assert_allclose(b["pvalue"][big], a["pvalue"][big], rtol=0.05, atol=1e-4)


def test_fft(tmp_path):
    """SplisosmFFT on a fully observed raster: SV over the grid, DU over the bins, summaries."""
    pytest.importorskip("spatialdata")
    from spatialscale.bench import raster_spatialdata
    from tests.test_raster import binned_adata

    adata, _ = binned_adata(ny=15, nx=17, n_genes=8, missing=0.0, seed=3)
    r, c = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    adata.obs["smooth"] = np.sin(r / 4.0) + 0.3 * np.random.default_rng(3).standard_normal(adata.n_obs)
    adata.obs["group"] = (c > c.mean()).astype(float) + 1.0
    kw = {"bins": "bins_002um", "table_name": "square_002um", "col_key": "array_col", "row_key": "array_row",
          "layer": "counts", "group_iso_by": "gene_symbol", "min_counts": 5}
    models = {}
    for covs in (["smooth", "group"], ["group"]):  # the t-tests take binary covariates only
        ref, ours = splisosm.SplisosmFFT(), compat.SplisosmFFT(store=tmp_path / f"r{len(covs)}.zarr")
        for m in (ref, ours):
            quiet(m.setup_data, raster_spatialdata(adata, bins="bins_002um", table="square_002um"), design_mtx=covs,
                  **kw)
        models[len(covs)] = (ref, ours)
    ref, ours = models[2]
    assert ours.gene_names == ref.gene_names and ours.n_grid == ref.n_grid == 15 * 17
    for method in ("hsic-ir", "hsic-gc"):
        quiet(ref.test_spatial_variability, method=method, print_progress=False)
        ours.test_spatial_variability(method=method, print_progress=False)
        assert list(ours.sv_test_results) == list(ref._sv_test_results)
        assert_same_table(ref.get_formatted_test_results("sv"), ours.get_formatted_test_results("sv"))
    for method, n in (("hsic", 2), ("hsic-gp", 2), ("t-fisher", 1)):
        ref, ours = models[n]
        quiet(ref.test_differential_usage, method=method, print_progress=False)
        ours.test_differential_usage(method=method, print_progress=False)
        assert list(ours.du_test_results) == list(ref._du_test_results)
        assert_same_table(ref.get_formatted_test_results("du"), ours.get_formatted_test_results("du"),
                          stat_rtol=3e-5, p_rtol=3e-5)
    for level in ("gene", "isoform"):
        pd.testing.assert_frame_equal(ours.extract_feature_summary(level, print_progress=False),
                                      quiet(ref.extract_feature_summary, level, print_progress=False),
                                      check_exact=False, rtol=1e-9)
    ours.close()
    assert (tmp_path / "r2.zarr").exists()  # a named store stays


def test_unsupported_options_name_the_alternative(np_models):
    _, ours = np_models
    cases = [
        (lambda: ours.test_spatial_variability(method="spark-x"), "method='hsic-gc'"),
        (lambda: ours.test_spatial_variability(null_configs={"approx_rank": 20}), "power_sums"),
        (lambda: ours.test_differential_usage(gpr_backend="gpytorch"), "'lowrank'"),
        (lambda: ours.test_differential_usage(gpr_configs={"covariate": {"length_scale_bounds": (0.1, 10)}}),
         "length_scale"),
        (lambda: compat.SplisosmGLMM(fitting_configs={"optim": "lbfgs"}), "joint_newton"),
        (lambda: compat.SplisosmGLMM(device="mps"), "cuda"),
        (lambda: compat.SplisosmGLMM().get_fitted_models(), "fitted_ratios"),
    ]
    for call, alternative in cases:
        with pytest.raises(InputError, match="spatialscale.compat does not support") as info:
            call()
        assert alternative in str(info.value)
    # SPLISOSM's own argument checks stay ValueErrors (InputError is one)
    with pytest.raises(ValueError, match="Invalid method"):
        ours.test_spatial_variability(method="moran")
    with pytest.raises(RuntimeError, match="setup_data"):
        compat.SplisosmNP().test_spatial_variability()


def test_compat_bench_runs_both_classes_and_compares_their_frames(capsys):
    """``spatialscale bench --test compat``: both packages on the same data, the same DataFrames."""
    from spatialscale.cli import main

    assert main(["bench", "--test", "compat", "--spots", "120", "--genes", "6", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "SPLISOSM 1.2.0 vs spatialscale.compat on 1 workers" in out
    from spatialscale.bench import run_compat_bench

    table = run_compat_bench([120], [6], workers=1, seed=1)
    row = table.iloc[0]
    assert bool(row["same_frames"]) and row["splisosm_s"] > 0 and row["compat_s"] > 0
    assert row["sv_p_max_abs_diff"] < 1e-4 and row["du_p_max_abs_diff"] < 1e-4
    assert main(["bench", "--test", "compat", "--method", "hsic-gc"]) == 2


def test_a_named_store_is_replaced_only_by_the_object_that_wrote_it(section, tmp_path):
    path = tmp_path / "named.zarr"
    with compat.SplisosmNP(store=path) as first:
        quiet(first.setup_data, section, **SETUP)
        quiet(first.setup_data, section, **{**SETUP, "min_counts": 20})  # its own store: replaced
        assert first.store.meta["min_counts"] == 20
    with compat.SplisosmNP(store=path) as second, pytest.raises(InputError, match="holds an isoform store of another"):
        quiet(second.setup_data, section, **SETUP)
    assert open_store(path).meta["min_counts"] == 20 and path.is_dir()  # a close() does not delete it
