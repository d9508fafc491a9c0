"""Raster (FFT) kernels: the periodic CAR spectrum, ingest of binned data, SV parity with SplisosmFFT."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialscale
from spatialscale import InputError
from spatialscale.raster import (
    FFTKernelOperator,
    RasterParams,
    build_raster_kernel,
    car_spectrum,
    dense_raster_kernel,
    spectrum_power_sums,
)

CASES = [((6, 7), (1.0, 1.0), 1), ((8, 5), (1.0, 2.0), 2), ((5, 5), (1.0, 1.0), 3), ((1, 9), (1.0, 1.0), 1),
         ((7, 8), (2.0, 1.0), 2), ((1, 6), (1.0, 1.0), 1)]  # even widths: rfft2 keeps a Nyquist column


@pytest.mark.parametrize("shape, spacing, degree", CASES)
def test_spectrum_products_and_power_sums_match_the_dense_periodic_kernel(shape, spacing, degree):
    params = RasterParams(shape, spacing, 0.95, degree)
    k = dense_raster_kernel(params)
    lam = np.linalg.eigvalsh(k)
    np.testing.assert_allclose(np.sort(car_spectrum(params).ravel()), lam, atol=1e-10)
    np.testing.assert_allclose(spectrum_power_sums(car_spectrum(params)),
                               [np.sum(lam[lam > 1e-8] ** r) for r in range(1, 5)], rtol=1e-12)
    op = FFTKernelOperator(params)
    x = np.random.default_rng(0).standard_normal((params.n, 3))
    np.testing.assert_allclose(op.apply(x), k @ x, atol=1e-11)
    np.testing.assert_allclose(op.quadratic_columns(x - x.mean(0)), np.diag((x - x.mean(0)).T @ k @ (x - x.mean(0))),
                               rtol=1e-10)
    np.testing.assert_allclose(op.diagonal_value, np.diag(k), rtol=1e-10)
    yc = np.random.default_rng(1).standard_normal((params.n, 6))
    yc -= yc.mean(0)
    want = np.stack([yc[:, 2 * g : 2 * g + 2].T @ k @ yc[:, 2 * g : 2 * g + 2] for g in range(3)])
    got = op.gene_quadratics(yc.reshape(params.n, 3, 2).transpose(1, 0, 2))
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())


@pytest.mark.parametrize("shape, spacing, degree", CASES[:3])
def test_spectrum_equals_splisosm_fft_kernel(shape, spacing, degree):
    fft_kernel = pytest.importorskip("splisosm.kernel").FFTKernel
    ref = fft_kernel(shape, spacing=spacing, rho=0.99, neighbor_degree=degree, centering=True)
    ours = car_spectrum(RasterParams(shape, spacing, 0.99, degree))
    np.testing.assert_allclose(ours.ravel(), np.asarray(ref.spectrum), rtol=1e-12, atol=1e-12)


def test_power_sums_of_a_large_raster_are_exact_and_cheap():
    """10^6 bins: the spectrum's power sums, no probes; the token is deterministic."""
    params = RasterParams((1000, 1000))
    a, b = build_raster_kernel(params), build_raster_kernel(params)
    assert a.token == b.token and np.all(a.power_sums > 0)
    # k1 = sum of the centred spectrum = n * mean eigenvalue
    np.testing.assert_allclose(a.power_sums[0], car_spectrum(params).sum(), rtol=1e-12)


def binned_adata(ny=23, nx=31, n_genes=12, missing=0.2, seed=0, offset=(5, 7)):
    """Isoform counts on a raster with some bins without tissue; the first isoform of even genes rises along rows."""
    rng = np.random.default_rng(seed)
    rr, cc = (v.ravel() for v in np.meshgrid(np.arange(ny), np.arange(nx), indexing="ij"))
    keep = rng.random(ny * nx) >= missing
    rr, cc = rr[keep], cc[keep]
    iso = [(f"g{i}", j) for i in range(n_genes) for j in range(int(rng.integers(2, 4)))]
    trend = 1.0 + 4.0 * np.array([j == 0 and int(g[1:]) % 2 == 0 for g, j in iso])[None, :] * (rr[:, None] / ny)
    counts = rng.poisson(rng.gamma(4.0, 0.75, size=(len(rr), len(iso))) * trend)
    counts[rng.random(counts.shape) < 0.1] = 0
    var = pd.DataFrame({"gene_symbol": [g for g, _ in iso]}, index=[f"{g}-{j}" for g, j in iso])
    obs = pd.DataFrame({"array_row": rr + offset[0], "array_col": cc + offset[1]},
                       index=[f"b{i}" for i in range(len(rr))])
    adata = ad.AnnData(obs=obs, var=var)
    adata.layers["counts"] = sp.csr_matrix(counts.astype(np.float64))
    return adata, counts


def test_binned_ingest_keeps_the_observed_bins_of_the_grid(tmp_path):
    adata, counts = binned_adata()
    store = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft", min_counts=0)
    assert store.kernel_kind == "fft" and store.n_spots == 23 * 31 and store.meta["n_observed"] == adata.n_obs
    assert store.kernel_attrs["shape"] == [23, 31] and store.kernel_attrs["power_sum_method"] == "exact"
    # obs: the observed bins, their names and grid positions; counts: only their non-zeros are stored
    obs = store.obs()
    r, c = adata.obs["array_row"].to_numpy() - 5, adata.obs["array_col"].to_numpy() - 7
    assert list(obs.index) == list(adata.obs_names)
    np.testing.assert_array_equal(obs["spatialscale_grid_index"].to_numpy(), r * 31 + c)
    import zarr

    stored = zarr.open_group(str(store.path / "layers" / "counts"), mode="r")
    assert stored["data"].shape[0] == np.count_nonzero(counts)
    # a gene's columns come back on the whole grid: the observed bins' counts, zeros elsewhere
    for gene in store.genes.index[[0, 5, -1]]:
        cols = [list(adata.var_names).index(n) for n in store.isoforms.index[store.isoforms["gene"] == gene]]
        got = store.gene_counts(gene)
        assert got.shape == (23 * 31, len(cols))
        np.testing.assert_array_equal(got[r * 31 + c], counts[:, cols])
        assert got.sum() == counts[:, cols].sum()
    # the store is an AnnData of the observed bins
    back = ad.read_zarr(store.path)
    assert back.shape == (adata.n_obs, len(store.isoforms)) and sp.issparse(back.layers["counts"])
    with pytest.raises(InputError, match="raster"):
        store.precision()


@pytest.mark.parametrize("method", ["hsic-ir", "hsic-ic", "hsic-gc"])
def test_sv_matches_splisosm_fft(tmp_path, method):
    """Statistics and p-values equal SPLISOSM 1.2.0's FFT SV computation on the same raster (its per-chunk
    worker, given the raster as an xarray DataArray: SplisosmFFT itself needs spatialdata)."""
    fft = pytest.importorskip("splisosm.hyptest.fft")
    from splisosm.kernel import FFTKernel
    from splisosm.utils.hsic import _cumulants_from_eigenvalues

    adata, counts = binned_adata(seed=1)
    store = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft", min_counts=0)
    ds = spatialscale.sv_test(store, method=method, scheduler="threads", progress=False)
    cube = np.zeros((adata.n_vars, 23, 31))
    cube[:, adata.obs["array_row"] - 5, adata.obs["array_col"] - 7] = counts.T
    import xarray as xr

    layer = xr.DataArray(cube, dims=("c", "y", "x"), coords={"c": list(adata.var_names)})
    kern = FFTKernel((23, 31), rho=0.99, neighbor_degree=1, centering=True)
    names = [list(adata.var_names[adata.var["gene_symbol"] == g]) for g in ds["gene"].values]
    ref = np.array(fft._sv_chunk_worker_fft(layer, names, kern, _cumulants_from_eigenvalues(kern.eigenvalues()),
                                            method, "none"))
    # SPLISOSM computes ratios in float32: hsic-ir agrees to ~1e-7, counts to rounding
    rtol = 1e-5 if method == "hsic-ir" else 1e-10
    np.testing.assert_allclose(ds["sv_statistic"].values, ref[:, 0], rtol=rtol)
    np.testing.assert_allclose(ds["sv_pvalue"].values, ref[:, 1], rtol=rtol)
    assert ds.attrs["kernel_kind"] == "fft"
    trend = np.array([int(g[1:]) % 2 == 0 for g in ds["gene"].values])
    assert np.all(ds["sv_pvalue"].values[trend] < 0.05)  # the genes with a trend are found
    assert np.median(ds["sv_pvalue"].values[~trend]) > 0.1


def test_raster_sv_on_a_local_cluster_equals_threads(tmp_path):
    from distributed import Client

    from spatialscale.engine import local_cluster

    adata, _ = binned_adata(seed=2)
    store = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft", min_counts=0)
    ref = spatialscale.sv_test(store, scheduler="threads", progress=False)
    with local_cluster(2) as cluster, Client(cluster) as client:
        ds = spatialscale.sv_test(store, client=client, batch_size=3, progress=False)
    np.testing.assert_allclose(ds["sv_pvalue"].values, ref["sv_pvalue"].values, rtol=1e-12, atol=0)


def test_bad_raster_input_is_named(tmp_path):
    adata, _ = binned_adata()
    other = adata.copy()
    other.obs["array_row"] = other.obs["array_row"] + 0.5
    with pytest.raises(InputError, match="whole-number"):
        spatialscale.ingest(other, tmp_path / "a.zarr", kernel="fft")
    dup = adata.copy()
    dup.obs.iloc[1, :] = dup.obs.iloc[0, :].to_numpy()
    with pytest.raises(InputError, match="share a bin"):
        spatialscale.ingest(dup, tmp_path / "b.zarr", kernel="fft")
    with pytest.raises(InputError, match="no grid column 'row'"):
        spatialscale.ingest(adata, tmp_path / "c.zarr", kernel="fft", grid_keys=("row", "col"))
    with pytest.raises(InputError, match="unknown kernel"):
        spatialscale.ingest(adata, tmp_path / "d.zarr", kernel="fourier")
    assert not any(tmp_path.iterdir())
    store = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft", min_counts=0)
    x = pd.DataFrame({"x": np.arange(adata.n_obs, dtype=float)}, index=store.obs().index)
    with pytest.raises(InputError, match=r"\['max_inducing'\] do not apply to the grid GP"):
        spatialscale.du_test(store, covariates=x, method="hsic-gp", gp={"max_inducing": 10}, progress=False)
    with pytest.raises(InputError, match="null='gp' needs the coordinate GP"):
        spatialscale.du_test(store, covariates=x, method="hsic-gp", null="gp", progress=False)
    for gp, message in [({"length_scale": -1}, "length_scale must be a positive number"),
                        ({"noise_bounds": [1.0, 0.1]}, "noise_bounds must be two positive numbers"),
                        ({"standardize": "yes"}, "standardize must be true or false")]:
        with pytest.raises(InputError, match=message):
            spatialscale.du_test(store, covariates=x, method="hsic-gp", gp=gp, progress=False)
    with pytest.raises(InputError, match="does not run on fft"):
        spatialscale.du_test(store, covariates=x, method="glmm-score", progress=False)


def binned_sdata(adata):
    """A SpatialData object as Visium HD readers build it: square bin polygons and a table annotating them."""
    pytest.importorskip("spatialdata")
    from spatialscale.bench import raster_spatialdata

    return raster_spatialdata(adata, bins="bins_002um", table="square_002um")


@pytest.mark.parametrize("method", ["hsic-ir", "hsic-ic", "hsic-gc"])
def test_sv_from_spatialdata_matches_splisosm_fft(tmp_path, method):
    """Ingest from a SpatialData store on disk; statistics and p-values equal SplisosmFFT's on the same object."""
    fft = pytest.importorskip("splisosm.hyptest.fft")
    adata, _ = binned_adata(seed=3)
    sdata = binned_sdata(adata)
    sdata.write(tmp_path / "hd.zarr")
    store = spatialscale.ingest(tmp_path / "hd.zarr", tmp_path / "r.zarr", table="square_002um", kernel="fft",
                                min_counts=5)
    ds = spatialscale.sv_test(store, method=method, scheduler="threads", progress=False)

    model = fft.SplisosmFFT(rho=0.99, neighbor_degree=1)
    model.setup_data(sdata, bins="bins_002um", table_name="square_002um", col_key="array_col", row_key="array_row",
                     layer="counts", group_iso_by="gene_symbol", min_counts=5)
    model.test_spatial_variability(method=method)
    ref = model.get_formatted_test_results("sv").set_index("gene").loc[ds["gene"].values]
    assert model.n_grid == store.n_spots and model.n_genes == ds.sizes["gene"]
    rtol = 1e-5 if method == "hsic-ir" else 1e-10  # SPLISOSM's ratios are float32
    np.testing.assert_allclose(ds["sv_statistic"].values, ref["statistic"].to_numpy(), rtol=rtol)
    np.testing.assert_allclose(ds["sv_pvalue"].values, ref["pvalue"].to_numpy(), rtol=rtol)
    # the in-memory object gives the same store contents and results
    again = spatialscale.ingest(sdata, tmp_path / "m.zarr", kernel="fft", min_counts=5)
    ds2 = spatialscale.sv_test(again, method=method, scheduler="threads", progress=False)
    np.testing.assert_array_equal(ds2["sv_pvalue"].values, ds["sv_pvalue"].values)


def test_spatialdata_tables_are_named(tmp_path):
    pytest.importorskip("spatialdata")
    adata, _ = binned_adata(seed=4)
    sdata = binned_sdata(adata)
    sdata.tables["other"] = sdata.tables["square_002um"].copy()
    sdata.write(tmp_path / "hd.zarr")
    adata.write_h5ad(tmp_path / "a.h5ad")
    cases = [(tmp_path / "hd.zarr", None, "2 tables \\(other, square_002um\\); name one"),
             (sdata, "square_008um", "no table 'square_008um' \\(tables: other, square_002um\\)"),
             (tmp_path / "a.h5ad", "square_002um", "is an AnnData, not a SpatialData")]
    for source, table, message in cases:
        with pytest.raises(InputError, match=message):
            spatialscale.ingest(source, tmp_path / "s.zarr", table=table, kernel="fft")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.h5ad", "hd.zarr"]
    from spatialscale.cli import main

    code = main(["ingest", str(tmp_path / "hd.zarr"), str(tmp_path / "s.zarr"), "--table", "other", "--kernel", "fft",
                 "--min-counts", "0", "--no-progress"])
    assert code == 0 and spatialscale.open_store(tmp_path / "s.zarr").n_spots == 23 * 31


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_raster_ingest_from_files_reads_sparse_columns(tmp_path, monkeypatch, fmt):
    """An on-disk CSR layer is read in column blocks without densifying; the store equals the in-memory ingest."""
    import spatialscale.sources

    monkeypatch.setattr(spatialscale.sources, "small_enough", lambda ds, limit=0: False)  # keep the layer on disk
    adata, counts = binned_adata(seed=5, n_genes=20)
    path = tmp_path / f"bins.{fmt}"
    adata.write_h5ad(path) if fmt == "h5ad" else adata.write_zarr(path)
    ref = spatialscale.ingest(adata, tmp_path / "a.zarr", kernel="fft", min_counts=3)
    got = spatialscale.ingest(path, tmp_path / "b.zarr", kernel="fft", min_counts=3, block_bytes=20_000)
    assert list(got.isoforms.index) == list(ref.isoforms.index)
    np.testing.assert_array_equal(got.read_counts(0, len(got.isoforms)), ref.read_counts(0, len(ref.isoforms)))
    assert got.kernel_token == ref.kernel_token


def test_cohort_of_spatialdata_stores_with_a_table_column(tmp_path):
    """A manifest's ``table`` column names each SpatialData store's table; cohort results equal each section's."""
    pytest.importorskip("spatialdata")
    paths = []
    for i, table in enumerate(["square_008um", "square_016um"]):
        sdata = binned_sdata(binned_adata(seed=10 + i, n_genes=8)[0])
        sdata.tables[table] = sdata.tables.pop("square_002um")
        sdata.tables["other"] = sdata.tables[table].copy()  # two tables: the manifest must name one
        sdata.write(tmp_path / f"s{i}.zarr")
        paths.append(str(tmp_path / f"s{i}.zarr"))
    man = pd.DataFrame({"section": ["a", "b"], "path": paths, "table": ["square_008um", "square_016um"]})
    cohort = spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False, kernel="fft",
                                        min_counts=0)
    ds = spatialscale.sv_test(cohort, scheduler="threads", progress=False)
    for sid in ("a", "b"):
        one = spatialscale.sv_test(cohort.store(sid), scheduler="threads", progress=False)
        assert cohort.store(sid).kernel_kind == "fft" and cohort.store(sid).n_spots == 23 * 31
        got = ds["sv_pvalue"].sel(section=sid, gene=one["gene"].values).values
        np.testing.assert_allclose(got, one["sv_pvalue"].values, rtol=1e-12)
    with pytest.raises(InputError, match="2 tables"):
        spatialscale.ingest_cohort(man.drop(columns="table"), tmp_path / "co2", scheduler="threads", progress=False,
                                   kernel="fft", min_counts=0)


def test_grid_gp_equals_the_dense_periodic_gp():
    """The FFT residuals and likelihood equal those of the dense periodic RBF kernel's eigen-decomposition."""
    from spatialscale.stats.gp import fit_hyperparameters, log_marginal_likelihood
    from spatialscale.stats.gp_grid import residualize_grid

    rng = np.random.default_rng(0)
    for (ny, nx), spacing, ls in [((7, 9), (1.0, 1.0), 1.0), ((6, 8), (1.0, 2.0), 1.5), ((1, 10), (1.0, 1.0), 2.0)]:
        yy, xx = (v.ravel() for v in np.meshgrid(np.arange(ny) * spacing[0], np.arange(nx) * spacing[1],
                                                  indexing="ij"))
        dy = np.abs(yy[:, None] - yy[None, :])
        dx = np.abs(xx[:, None] - xx[None, :])
        dy, dx = np.minimum(dy, ny * spacing[0] - dy), np.minimum(dx, nx * spacing[1] - dx)
        # on a small torus the periodic RBF kernel has small negative eigenvalues: the model (SPLISOSM's too)
        # takes them as zero
        s, u = np.linalg.eigh(np.exp(-(dy**2 + dx**2) / (2 * ls**2)))
        s = np.maximum(s, 0.0)
        r = (u * s) @ u.T
        z = np.sin(yy / 2.0)[:, None] + 0.4 * rng.standard_normal((ny * nx, 2))
        z -= z.mean(0)
        got, info = residualize_grid(z.reshape(ny, nx, 2), spacing=spacing, length_scale=ls)
        c = u.T @ z
        amp, noise, lml = fit_hyperparameters(s, np.ones_like(s), c * c, jitter=0.0)
        np.testing.assert_allclose(info["amplitude"], amp, rtol=1e-5)
        np.testing.assert_allclose(info["noise"], noise, rtol=1e-5)
        a, e = info["amplitude"], info["noise"]
        want = np.stack([e[f] * np.linalg.solve(a[f] * r + e[f] * np.eye(ny * nx), z[:, f]) for f in range(2)], 1)
        np.testing.assert_allclose(got.reshape(-1, 2), want, atol=1e-10)
        # the spectrum seen by the fit is the dense kernel's: same likelihood at the fitted point
        np.testing.assert_allclose(log_marginal_likelihood(s, np.ones_like(s), c * c, a, e, jitter=0.0), lml,
                                   rtol=1e-9)
        # joint: one (a, eps) for both columns, the likelihood summed over them
        _, joint = residualize_grid(z.reshape(ny, nx, 2), spacing=spacing, length_scale=ls, joint=True)
        amp_j, noise_j, _ = fit_hyperparameters(s, 2 * np.ones_like(s), (c * c).sum(1, keepdims=True), jitter=0.0)
        np.testing.assert_allclose([joint["amplitude"][0], joint["noise"][0]], [amp_j[0], noise_j[0]], rtol=1e-5)


def _du_raster_data(tmp_path, missing):
    adata, _ = binned_adata(seed=7, missing=missing, n_genes=10)
    r, c = adata.obs["array_row"].to_numpy(), adata.obs["array_col"].to_numpy()
    rng = np.random.default_rng(3)
    adata.obs["smooth"] = np.sin(r / 4.0) + 0.3 * rng.standard_normal(adata.n_obs)
    adata.obs["group"] = (c > c.mean()).astype(float) + 1.0
    return adata, spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft", min_counts=0)


DU_CASES = [("hsic", {}, "mean"), ("hsic-gp", {}, "mean"), ("hsic-gp", {"residualize": "both"}, "mean"),
            ("t-fisher", {}, "none"), ("t-tippett", {}, "none")]


def test_du_on_a_raster_matches_splisosm_fft(tmp_path):
    """On a fully observed grid, every DU method's statistics and p-values equal SplisosmFFT's on the same
    SpatialData object (to its float32 ratios)."""
    fft = pytest.importorskip("splisosm.hyptest.fft")
    pytest.importorskip("spatialdata")
    adata, store = _du_raster_data(tmp_path, missing=0.0)
    models = {}
    for names in (["smooth", "group"], ["group"]):  # SplisosmFFT's t-tests take binary designs only
        models[len(names)] = fft.SplisosmFFT(rho=0.99, neighbor_degree=1)
        models[len(names)].setup_data(binned_sdata(adata), bins="bins_002um", table_name="square_002um",
                                      col_key="array_col", row_key="array_row", layer="counts",
                                      group_iso_by="gene_symbol", min_counts=0,
                                      design_mtx=adata.obs[names].to_numpy(), covariate_names=names)
    for method, kw, fill in DU_CASES:
        names = ["smooth", "group"] if not method.startswith("t-") else ["group"]
        model = models[len(names)]
        ds = spatialscale.du_test(store, covariates=names, method=method, nan_filling=fill, scheduler="threads",
                                  progress=False, **kw)
        model.test_differential_usage(method=method, print_progress=False, **kw)
        ref = model.get_formatted_test_results("du")
        for cov in names:
            want = ref[ref["covariate"] == cov].set_index("gene").loc[ds["gene"].values]
            stat = ds["du_statistic"].sel(covariate=cov).values
            if method == "t-tippett":  # SplisosmFFT reports -log10(min p); spatialscale min p, as for SplisosmNP
                stat = -np.log10(stat)
            np.testing.assert_allclose(ds["du_pvalue"].sel(covariate=cov).values, want["pvalue"].to_numpy(),
                                       rtol=3e-5, err_msg=f"{method} {kw} {cov}")
            np.testing.assert_allclose(stat, want["statistic"].to_numpy(), rtol=3e-5, err_msg=f"{method} {kw} {cov}")
        assert ds.attrs["kernel_kind"] == "fft" and ds.attrs["n_spots"] == 23 * 31


def test_raster_du_tests_the_observed_bins(tmp_path):
    """With bins missing, the tests without a GP equal those of the same bins ingested as a CAR store; hsic-gp
    gives the same answers on a local cluster as in threads."""
    from distributed import Client

    from spatialscale.engine import local_cluster

    adata, store = _du_raster_data(tmp_path, missing=0.25)
    car = adata.copy()
    car.obsm["spatial"] = car.obs[["array_col", "array_row"]].to_numpy(float)
    car_store = spatialscale.ingest(car, tmp_path / "c.zarr", min_counts=0)
    assert list(car_store.genes.index) == list(store.genes.index)
    for method, kw, fill in [c for c in DU_CASES if c[0] != "hsic-gp"] + [("hsic", {}, "none")]:
        names = ["smooth", "group"] if not method.startswith("t-") else ["group"]
        got = spatialscale.du_test(store, covariates=names, method=method, nan_filling=fill, scheduler="threads",
                                   progress=False, **kw)
        want = spatialscale.du_test(car_store, covariates=names, method=method, nan_filling=fill,
                                    scheduler="threads", progress=False, **kw)
        np.testing.assert_allclose(got["du_pvalue"].values, want["du_pvalue"].values, rtol=1e-10)
    # the coordinate GP (backend exact / lowrank) runs on the observed bins: a CAR store's results
    for kw in ({"null": "gp"}, {"residualize": "both"}):
        got = spatialscale.du_test(store, covariates=["smooth", "group"], method="hsic-gp", gp={"backend": "exact"},
                                   scheduler="threads", progress=False, **kw)
        want = spatialscale.du_test(car_store, covariates=["smooth", "group"], method="hsic-gp",
                                    gp={"backend": "exact"}, scheduler="threads", progress=False, **kw)
        np.testing.assert_allclose(got["du_pvalue"].values, want["du_pvalue"].values, rtol=1e-6)
    ref = spatialscale.du_test(store, covariates=["smooth", "group"], method="hsic-gp", residualize="both",
                               scheduler="threads", progress=False)
    with local_cluster(2) as cluster, Client(cluster) as client:
        ds = spatialscale.du_test(store, covariates=["smooth", "group"], method="hsic-gp", residualize="both",
                                  client=client, batch_size=3, progress=False)
    np.testing.assert_allclose(ds["du_pvalue"].values, ref["du_pvalue"].values, rtol=1e-10)
    assert np.all(np.isfinite(ds["du_pvalue"].values)) and ds.attrs["residualize"] == "both"
    # the command line: grid-GP options as KEY=VALUE; a bad one is one line, exit code 2, nothing written
    from spatialscale.cli import main

    args = ["du", str(store.path), "--covariates", "smooth", "--method", "hsic-gp", "--scheduler", "threads",
            "--no-progress", "--out", str(tmp_path / "du.zarr")]
    assert main([*args, "--gp", "length_scale=2", "--gp", "standardize=true"]) == 0
    out = spatialscale.open_results(tmp_path / "du.zarr")
    assert out.attrs["gp_length_scale"] == 2 and out.attrs["kernel_kind"] == "fft"
    assert main([*args[:-1], str(tmp_path / "bad.zarr"), "--gp", "length_scale=-2"]) == 2
    assert not (tmp_path / "bad.zarr").exists()


def test_sparse_ratio_path_equals_the_dense_batch(tmp_path):
    """hsic-ir on a raster builds each gene's centred ratios from its stored counts alone; statistics, p-values
    and null terms equal :func:`sv_batch` on the counts scattered into the grid (explicit stored zeros, genes
    without counts and odd grid widths included)."""
    from spatialscale.stats.sv import sv_batch, sv_batch_sparse_ratios

    rng = np.random.default_rng(11)
    shape = (17, 23)
    params = RasterParams(shape, (1.0, 1.0), 0.99, 1)
    op, sums = FFTKernelOperator(params), build_raster_kernel(params).power_sums
    n_obs = 300
    grid = np.sort(rng.choice(params.n, n_obs, replace=False))
    for p in (2, 3, 5):
        b = 4
        dense = rng.poisson(0.6, size=(n_obs, b * p)).astype(float)
        dense[:, p : 2 * p] = 0.0  # the second gene has no counts at all
        csc = sp.csc_matrix(dense)
        # an explicitly stored zero (a store may keep one) changes nothing
        data, rows, ptr = csc.data.copy(), csc.indices.astype(np.int64), csc.indptr.astype(np.int64)
        data[0] = 0.0
        dense[rows[0], 0] = 0.0
        got = sv_batch_sparse_ratios(data, rows, ptr, grid, b, p, op, sums)
        counts = np.zeros((params.n, b * p))
        counts[grid] = dense
        want = sv_batch(counts.reshape(params.n, b, p).transpose(1, 0, 2), op, sums, method="hsic-ir")
        for key in ("statistic", "pvalue", "null_statistic", "null_cumulants"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-10, atol=1e-300, err_msg=f"p={p} {key}")
        assert got["pvalue"][1] == 1.0 and np.isnan(got["statistic"][1]) == np.isnan(want["statistic"][1])


def test_work_buffers_are_reused_up_to_a_cap(monkeypatch):
    """A thread's buffer is handed out again (no fresh pages per task); one above the cap is not kept."""
    import spatialscale.raster as raster

    a = raster.workspace("test", (3, 100))
    b = raster.workspace("test", (2, 50))
    assert np.shares_memory(a, b) and b.shape == (2, 50)
    monkeypatch.setattr(raster, "WORKSPACE_MAX_BYTES", 1000)
    c = raster.workspace("test", (3, 100))
    assert not np.shares_memory(a, c) and c.shape == (3, 100)
    op = FFTKernelOperator(RasterParams((4, 5)))
    cols = op.grid_columns(3)
    assert cols.shape == (3, 20) and not cols.any()
