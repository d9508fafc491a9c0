"""Fractional (EM-estimated) isoform counts: stored exactly as float64, tested as SPLISOSM tests the same floats.

Long-read quantifiers (IsoQuant, Bambu, oarfish) give fractional counts. Ingest keeps them as float64
(integer inputs keep their integer store); the HSIC tests, the DU kernel tests, the feature summaries,
the raster path and the multinomial GLM / GLMM read them as floats. The GLM / GLMM fits are the
multinomial quasi-likelihood fits (docs/migration.md, "Fractional counts"): checked here by the exact
scaling of the GLM and live against SPLISOSM's GLMM.
"""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

import spatialscale
from spatialscale import InputError
from spatialscale.simulate import simulate_section
from tests.conftest import make_adata

splisosm = pytest.importorskip("splisosm")


def fractional(counts: np.ndarray, seed: int = 0) -> np.ndarray:
    """EM-like estimates: every count scaled by its own factor in (0.3, 1.2), zeros kept."""
    counts = np.asarray(counts.todense() if sp.issparse(counts) else counts, dtype=np.float64)
    return counts * np.random.default_rng(seed).uniform(0.3, 1.2, counts.shape)


def frac_adata(n: int = 200, n_genes: int = 10, *, seed: int = 3) -> ad.AnnData:
    """``make_adata``'s section with fractional float64 counts in ``layers["counts"]`` and ``X`` (dense)."""
    a = make_adata(n=n, n_genes=n_genes, sparse=False, seed=seed)
    x = fractional(a.layers["counts"], seed)
    a.layers["counts"] = x
    a.X = x.copy()
    rng = np.random.default_rng(seed)
    a.obs["cont"] = rng.normal(size=n) + 0.1 * a.obsm["spatial"][:, 0]
    a.obs["bin"] = (rng.random(n) > 0.6).astype(float)
    return a


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    a = frac_adata()
    return a, spatialscale.ingest(a, tmp_path_factory.mktemp("frac") / "s.zarr")


def stored_input(store, x: np.ndarray) -> np.ndarray:
    """The input's columns in the store's isoform order (``source_index``)."""
    return np.asarray(x.todense() if sp.issparse(x) else x, dtype=np.float64)[:, store.isoforms["source_index"]]


# --------------------------------------------------------------------------- ingest
@pytest.mark.parametrize("form", ["dense", "sparse", "h5ad-dense", "h5ad-sparse"])
def test_fractional_counts_are_stored_exactly_as_float64(tmp_path, form):
    a = frac_adata(n=120, n_genes=8, seed=5)
    x = a.layers["counts"]
    assert not np.all(x == np.round(x))
    if form.endswith("sparse"):
        a.layers["counts"] = sp.csr_matrix(x)
    source = a
    if form.startswith("h5ad"):
        a.write_h5ad(tmp_path / "in.h5ad")
        source = tmp_path / "in.h5ad"
    store = spatialscale.ingest(source, tmp_path / "s.zarr")
    assert store.integer_counts is False and store.meta["integer_counts"] is False
    assert zarr.open_array(str(store.path / "layers" / "counts"), mode="r").dtype == np.float64
    # every kept isoform's values come back bit for bit; min_counts filters on the fractional totals
    np.testing.assert_array_equal(store.read_counts(0, len(store.isoforms)), stored_input(store, x))
    want = set(a.var_names[x.sum(0) >= 10])
    want_genes = pd.Series(a.var["gene_symbol"].to_numpy(), index=a.var_names)[sorted(want)].value_counts()
    assert set(store.isoforms.index) == {i for i in want if want_genes[a.var.loc[i, "gene_symbol"]] >= 2}
    np.testing.assert_allclose(store.isoforms["total_counts"], x.sum(0)[store.isoforms["source_index"]], rtol=1e-15)
    # the store is still an AnnData
    back = ad.read_zarr(store.path)
    np.testing.assert_array_equal(back.layers["counts"], stored_input(store, x))


def test_command_line_ingests_fractional_counts(tmp_path, capsys):
    from spatialscale.cli import main

    a = frac_adata(n=60, n_genes=4, seed=2)
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["ingest", str(tmp_path / "in.h5ad"), str(tmp_path / "s.zarr"), "--no-progress"]) == 0, \
        capsys.readouterr().err
    store = spatialscale.open_store(tmp_path / "s.zarr")
    assert store.integer_counts is False
    np.testing.assert_array_equal(store.read_counts(0, len(store.isoforms)),
                                  stored_input(store, a.layers["counts"]))


def test_integer_stores_keep_their_format(tmp_path):
    a = make_adata(n=120, n_genes=8, seed=5)
    store = spatialscale.ingest(a, tmp_path / "i.zarr")
    assert "integer_counts" not in store.meta and store.integer_counts is True
    arr = zarr.open_array(str(store.path / "layers" / "counts"), mode="r")
    assert arr.dtype == np.int32 and arr.chunks == (120, len(store.isoforms))
    np.testing.assert_array_equal(store.read_counts(0, len(store.isoforms)), stored_input(store, a.layers["counts"]))
    # fractional values only in an isoform that min_counts drops: the kept counts are whole, the store integer
    x = a.layers["counts"].toarray().astype(np.float64)
    low = int(np.argmin(x.sum(0)))
    x[:, low] = 0.0
    x[:3, low] = 0.25
    a.layers["counts"] = x
    other = spatialscale.ingest(a, tmp_path / "j.zarr")
    assert a.var_names[low] not in other.isoforms.index
    assert other.integer_counts is True
    assert zarr.open_array(str(other.path / "layers" / "counts"), mode="r").dtype == np.int32
    # a store without the entry (every store written before fractional counts) reads as integer
    assert spatialscale.store.IsoformStore(path=store.path, meta={"n_spots": 1}).integer_counts is True


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize(("value", "words"), [(-0.5, "has negative counts (isoform "),
                                              (np.nan, "has NaN or infinite counts (isoform "),
                                              (np.inf, "has NaN or infinite counts (isoform "),
                                              (2.0**54, "has counts above 2^53 (isoform ")])
def test_bad_counts_are_still_refused(tmp_path, sparse, value, words):
    a = frac_adata(n=60, n_genes=4, seed=1)
    x = a.layers["counts"]
    x[4, 2] = value
    a.layers["counts"] = sp.csr_matrix(x) if sparse else x
    with pytest.raises(InputError) as info:
        spatialscale.ingest(a, tmp_path / "s.zarr")
    msg = str(info.value)
    assert msg.startswith("layers['counts'] ") and words in msg and f"'{a.var_names[2]}'" in msg
    assert "\n" not in msg
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- HSIC, DU kernel tests, summaries
def splisosm_sv(adata, **kw) -> pd.DataFrame:
    """SPLISOSM's SplisosmNP.test_spatial_variability on the same AnnData (floats as given)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = splisosm.SplisosmNP()
        model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
        res = model.test_spatial_variability(print_progress=False, return_results=True, **kw)
    return pd.DataFrame({"statistic": res["statistic"], "pvalue": res["pvalue"]},
                        index=[str(g) for g in model.gene_names])


@pytest.mark.parametrize("method", ["hsic-ir", "hsic-ic", "hsic-gc"])
def test_sv_matches_splisosm_on_fractional_counts(section, method):
    adata, store = section
    ref = splisosm_sv(adata, method=method)
    ds = spatialscale.sv_test(store, method=method, scheduler="threads", progress=False)
    ours = ds[["sv_statistic", "sv_pvalue"]].to_dataframe().loc[ref.index]
    assert len(ours) == len(ref) == store.n_genes == 10
    np.testing.assert_allclose(ours["sv_statistic"], ref["statistic"], rtol=1e-5, atol=0)
    np.testing.assert_allclose(ours["sv_pvalue"], ref["pvalue"], rtol=1e-4, atol=1e-12)
    assert float(ds["sv_pvalue"].min()) < 1e-3  # the fixture's spatial genes are found
    if method == "hsic-ir":  # the fractions matter: the rounded counts give other statistics
        rounded = adata.copy()
        rounded.layers["counts"] = np.round(adata.layers["counts"])
        other = splisosm_sv(rounded, method=method).loc[ref.index]
        assert np.max(np.abs(other["statistic"] / ref["statistic"] - 1)) > 1e-3


def test_du_kernel_tests_match_splisosm_on_fractional_counts(section):
    adata, store = section
    for method, covs in (("hsic", ["cont", "bin"]), ("t-fisher", ["bin"])):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = splisosm.SplisosmNP()
            ref.setup_data(adata, layer="counts", group_iso_by="gene_symbol", design_mtx=covs)
            ref.test_differential_usage(method=method, print_progress=False)
        ds = spatialscale.du_test(store, covs, method=method, scheduler="threads", progress=False)
        ours = ds.sel(gene=[str(g) for g in ref.gene_names])
        s_ref = np.asarray(ref._du_test_results["statistic"], dtype=float)
        p_ref = np.asarray(ref._du_test_results["pvalue"], dtype=float)
        # SPLISOSM's ratios are float32: statistics to ~1e-7 of the largest
        np.testing.assert_allclose(ours["du_statistic"].values, s_ref, rtol=1e-5, atol=2e-6 * np.abs(s_ref).max(),
                                   err_msg=method)
        ok = p_ref > 1e-8
        assert ok.sum() >= 0.5 * ok.size
        np.testing.assert_allclose(ours["du_pvalue"].values[ok], p_ref[ok], rtol=1e-4, err_msg=method)


def test_feature_summary_matches_splisosm_on_fractional_counts(section):
    from test_summary import splisosm_summaries

    from spatialscale.stats.summary import GENE_SUMMARIES, ISOFORM_SUMMARIES

    adata, store = section
    gene, iso = splisosm_summaries(adata)
    ds = spatialscale.feature_summary(store, scheduler="threads", progress=False)
    g = ds[[f"gene_{c}" for c in GENE_SUMMARIES]].to_dataframe().loc[gene.index.astype(str)]
    for col in GENE_SUMMARIES:
        np.testing.assert_allclose(g[f"gene_{col}"], gene[col], rtol=1e-9, atol=1e-12, err_msg=col)
    i = ds[[f"iso_{c}" for c in ISOFORM_SUMMARIES]].to_dataframe().loc[iso.index.astype(str)]
    for col in ISOFORM_SUMMARIES:
        np.testing.assert_allclose(i[f"iso_{col}"], iso[col], rtol=1e-9, atol=1e-12, err_msg=col)
    # the isoform totals are the fractional sums, not those of truncated counts
    x = adata.layers["counts"]
    np.testing.assert_allclose(i["iso_count_total"], x[:, [list(adata.var_names).index(n) for n in i.index]].sum(0),
                               rtol=1e-12)


# --------------------------------------------------------------------------- raster (kernel="fft")
def frac_raster(n_genes: int = 10, seed: int = 1):
    """test_raster's binned counts made fractional, with a smooth and a two-group covariate."""
    from test_raster import binned_adata

    adata, counts = binned_adata(n_genes=n_genes, seed=seed)
    counts = fractional(counts, seed)
    rr, cc = adata.obs["array_row"].to_numpy() - 5, adata.obs["array_col"].to_numpy() - 7
    rng = np.random.default_rng(seed)
    adata.obs["smooth"] = np.sin(rr / 4.0) + rng.normal(0, 0.3, rr.size)
    adata.obs["group"] = (cc > cc.mean()).astype(float) + 1.0
    adata.layers["counts"] = sp.csr_matrix(counts)
    return adata, counts


def test_raster_path_on_fractional_counts(tmp_path):
    """A raster store keeps the fractional non-zeros as float64; its SV tests equal SPLISOSM's FFT computation,
    its sparse hsic-ir path equals the dense batch, its DU tests equal those of the same bins as a CAR store."""
    import xarray as xr
    from splisosm.hyptest import fft
    from splisosm.kernel import FFTKernel
    from splisosm.utils.hsic import _cumulants_from_eigenvalues

    from spatialscale.raster import FFTKernelOperator, RasterParams, build_raster_kernel
    from spatialscale.stats.sv import sv_batch, sv_batch_sparse_ratios
    from spatialscale.store import read_count_columns, read_sparse_columns

    adata, counts = frac_raster()
    store = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft", min_counts=0)
    assert store.integer_counts is False and store.n_spots == 23 * 31
    assert zarr.open_array(str(store.path / "layers" / "counts" / "data"), mode="r").dtype == np.float64
    r, c = adata.obs["array_row"].to_numpy() - 5, adata.obs["array_col"].to_numpy() - 7
    m = len(store.isoforms)
    np.testing.assert_array_equal(store.read_counts(0, m)[r * 31 + c], stored_input(store, counts))

    cube = np.zeros((adata.n_vars, 23, 31))
    cube[:, r, c] = counts.T
    layer = xr.DataArray(cube, dims=("c", "y", "x"), coords={"c": list(adata.var_names)})
    kern = FFTKernel((23, 31), rho=0.99, neighbor_degree=1, centering=True)
    for method in ("hsic-ir", "hsic-ic", "hsic-gc"):
        ds = spatialscale.sv_test(store, method=method, scheduler="threads", progress=False)
        names = [list(adata.var_names[adata.var["gene_symbol"] == g]) for g in ds["gene"].values]
        ref = np.array(fft._sv_chunk_worker_fft(layer, names, kern, _cumulants_from_eigenvalues(kern.eigenvalues()),
                                                method, "none"))
        rtol = 1e-5 if method == "hsic-ir" else 1e-10  # SPLISOSM's ratios are float32
        np.testing.assert_allclose(ds["sv_statistic"].values, ref[:, 0], rtol=rtol, err_msg=method)
        np.testing.assert_allclose(ds["sv_pvalue"].values, ref[:, 1], rtol=rtol, err_msg=method)

    # hsic-ir's sparse ratios (compiled, from the stored non-zeros) against the dense batch of the grid
    params = RasterParams((23, 31), (1.0, 1.0), 0.99, 1)
    op, sums = FFTKernelOperator(params), build_raster_kernel(params).power_sums
    genes = store.genes[store.genes["n_isoforms"] == 3]
    start, stop = int(genes["start"].iloc[0]), int(genes["stop"].iloc[-1])
    data, rows, ptr = read_sparse_columns(store.path, start, stop)
    assert np.any(data != np.round(data))
    got = sv_batch_sparse_ratios(data, rows, ptr, store.grid_index(), len(genes), 3, op, sums)
    dense = read_count_columns(store.path, start, stop)
    want = sv_batch(dense.reshape(store.n_spots, len(genes), 3).transpose(1, 0, 2), op, sums, method="hsic-ir")
    for key in ("statistic", "pvalue", "null_statistic", "null_cumulants"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-300, err_msg=key)

    # DU over the observed bins: the same numbers as the bins ingested as a CAR store
    car = adata.copy()
    car.obsm["spatial"] = car.obs[["array_col", "array_row"]].to_numpy(float)
    car_store = spatialscale.ingest(car, tmp_path / "c.zarr", min_counts=0)
    assert car_store.integer_counts is False
    for method, covs in (("hsic", ["smooth", "group"]), ("t-fisher", ["group"])):
        got = spatialscale.du_test(store, covs, method=method, scheduler="threads", progress=False)
        want = spatialscale.du_test(car_store, covs, method=method, scheduler="threads", progress=False)
        np.testing.assert_allclose(got["du_pvalue"].values, want["du_pvalue"].values, rtol=1e-10, err_msg=method)


# --------------------------------------------------------------------------- multinomial GLM / GLMM
def test_glm_on_fractional_counts_is_the_quasi_likelihood_fit(tmp_path):
    """Halving every count (odd counts become x.5): the GLM's coefficients are unchanged, the model-variance
    Wald and score statistics halve, the robust (sandwich) ones do not move. Truncating the halves would
    change all of them."""
    adata = simulate_section(200, 8, n_sv=0, n_du=4, effect=1.2, isoforms=(2, 3), seed=6)
    whole = np.asarray(adata.layers["counts"].todense() if sp.issparse(adata.layers["counts"])
                       else adata.layers["counts"], dtype=np.float64)
    half = adata.copy()
    half.layers["counts"] = whole / 2
    a = spatialscale.ingest(adata, tmp_path / "a.zarr", min_counts=0)
    b = spatialscale.ingest(half, tmp_path / "b.zarr", min_counts=0)
    assert a.integer_counts and not b.integer_counts
    assert list(a.genes.index) == list(b.genes.index)
    assert np.any(b.read_counts(0, len(b.isoforms)) % 1 == 0.5)

    fa = spatialscale.glmm_fit(a, model="glm", covariates=["rbp"], scheduler="threads", progress=False)
    fb = spatialscale.glmm_fit(b, model="glm", covariates=["rbp"], scheduler="threads", progress=False)
    assert bool(fb["converged"].all())
    for key in ("intercept", "beta"):
        np.testing.assert_allclose(fb[key].values, fa[key].values, rtol=1e-7, atol=1e-9, err_msg=key)
    for method in ("glmm-wald", "glmm-score"):
        for variance, factor in (("model", 0.5), ("robust", 1.0)):
            kw = {"method": method, "glmm": {"variance": variance}, "scheduler": "threads", "progress": False}
            sa = spatialscale.du_test(a, ["rbp"], **kw)["du_statistic"].values
            sb = spatialscale.du_test(b, ["rbp"], **kw)["du_statistic"].values
            assert np.all(sa > 0)
            np.testing.assert_allclose(sb, factor * sa, rtol=1e-6, err_msg=f"{method} {variance}")


def test_glmm_matches_splisosm_on_fractional_counts(tmp_path):
    """glmm-full fitted by SPLISOSM's joint_gd on the same fractional counts: the same score statistics."""
    adata = simulate_section(80, 4, n_sv=1, n_du=2, effect=1.0, isoforms=(2, 3), seed=2)
    x = fractional(adata.layers["counts"], seed=1)
    adata.layers["counts"] = x
    adata.X = x.copy()
    adata.obs["ct1"] = (adata.obs["celltype"] == "ct1").astype(float)  # numeric: one design column each
    covs = ["ct1", "rbp"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = splisosm.SplisosmGLMM(model_type="glmm-full", fitting_configs={"max_epochs": 60})
        ref.setup_data(adata, design_mtx=covs, group_iso_by="gene_symbol")
        ref.fit(print_progress=False, batch_size=1)
        ref.test_differential_usage(method="score", print_progress=False)
    store = spatialscale.ingest(adata, tmp_path / "g.zarr")
    assert store.integer_counts is False
    ds = spatialscale.du_test(store, covs, method="glmm-score", model="glmm-full", fit="joint_gd",
                              glmm={"variance": "model", "max_epochs": 60}, scheduler="threads", progress=False)
    ours = ds["du_statistic"].to_pandas().loc[[str(g) for g in ref.gene_names]].to_numpy()
    theirs = ref._du_test_results["statistic"].numpy()
    assert ours.shape == theirs.shape == (4, 2) and np.all(theirs > 0)
    np.testing.assert_allclose(ours, theirs, rtol=1e-3, atol=1e-5)
