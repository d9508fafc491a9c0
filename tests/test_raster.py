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

CASES = [((6, 7), (1.0, 1.0), 1), ((8, 5), (1.0, 2.0), 2), ((5, 5), (1.0, 1.0), 3), ((1, 9), (1.0, 1.0), 1)]


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


def test_binned_ingest_holds_the_whole_grid(tmp_path):
    adata, counts = binned_adata()
    store = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft", min_counts=0)
    assert store.kernel_kind == "fft" and store.n_spots == 23 * 31
    assert store.kernel_attrs["shape"] == [23, 31] and store.kernel_attrs["power_sum_method"] == "exact"
    obs = store.obs()
    assert int(obs["observed"].sum()) == adata.n_obs
    # the observed bins keep their names and counts; the others are zero
    r, c = adata.obs["array_row"].to_numpy() - 5, adata.obs["array_col"].to_numpy() - 7
    gene = store.genes.index[0]
    cols = [list(adata.var_names).index(n) for n in store.isoforms.index[store.isoforms["gene"] == gene]]
    got = store.gene_counts(gene)
    np.testing.assert_array_equal(got[r * 31 + c], counts[:, cols])
    assert got[~obs["observed"].to_numpy()].sum() == 0
    assert list(obs.index[r * 31 + c]) == list(adata.obs_names)
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
    with pytest.raises(InputError, match="raster"):
        spatialscale.du_test(store, covariates=pd.DataFrame({"x": np.arange(store.n_spots)},
                                                            index=store.obs().index), progress=False)
