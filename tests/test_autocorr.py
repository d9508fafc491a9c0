"""Moran's I and Geary's C SV tests (methods moran / geary): statistics, null moments, calibration, engine, CLI."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

import spatialscale
from spatialscale import InputError
from spatialscale.cli import main
from spatialscale.graph import knn_adjacency
from spatialscale.simulate import simulate_raster, simulate_section, truth
from spatialscale.stats.autocorr import (
    autocorr_batch,
    autocorr_sums,
    column_scale,
    null_moments,
    spatial_weights,
)


# ------------------------------------------------------------------ dense references, from the definitions
def _dense_weights(adjacency, weighting: str) -> np.ndarray:
    a = np.asarray(sp.csr_matrix(adjacency).todense(), dtype=np.float64)
    np.fill_diagonal(a, 0.0)
    if weighting == "binary":
        return (a > 0).astype(np.float64)
    rows = a.sum(1, keepdims=True)
    return a / np.where(rows > 0, rows, 1.0)


def _dense_responses(counts: np.ndarray, response: str) -> np.ndarray:
    """``(n, d)`` centred responses of one gene's ``(n, p)`` counts."""
    c = np.asarray(counts, dtype=np.float64)
    if response == "gene-counts":
        y = c.sum(1, keepdims=True)
    elif response == "isoform-counts":
        y = c
    else:  # ratios at covered spots, the covered mean ratio elsewhere
        tot = c.sum(1)
        cov = tot > 0
        y = np.empty_like(c)
        y[cov] = c[cov] / tot[cov, None]
        y[~cov] = y[cov].mean(0)
    return y - y.mean(0)


def _dense_statistic(method: str, w: np.ndarray, y: np.ndarray) -> float:
    n, s0 = w.shape[0], w.sum()
    denom = np.sum(y * y)
    if method == "moran":
        return n / s0 * np.sum(y * (w @ y)) / denom
    diff = ((y[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    return (n - 1) * np.sum(w * diff) / (2 * s0 * denom)


def _store_adjacency(store) -> sp.csr_matrix:
    return sp.csr_matrix(ad.read_zarr(store.path).obsp["spatialscale_adjacency"])


def _run(store, method, **kw):
    return spatialscale.sv_test(store, method=method, scheduler="threads", progress=False, **kw)


def _poisson_genes(rng, n_genes: int, n: int, p: int, depth: float = 4.0, zero: float = 0.1) -> np.ndarray:
    """Null genes: independent Poisson isoform counts (multinomial usage given each spot's total), no pattern."""
    prob = rng.dirichlet(np.full(p, 2.0), size=n_genes)
    level = rng.lognormal(np.log(depth), 0.5, n_genes)
    mask = rng.random((n_genes, n, 1)) > zero
    return rng.poisson(level[:, None, None] * prob[:, None, :] * mask).astype(np.float64)


def _grid(side: int) -> np.ndarray:
    return np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2).astype(float)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """conftest's small section (400 spots, 24 genes of 2-6 isoforms, 10% spots without counts), ingested once."""
    from conftest import make_adata

    return spatialscale.ingest(make_adata(), tmp_path_factory.mktemp("autocorr-small") / "small.zarr")


# ------------------------------------------------------------------ statistics on a store = the dense formula
@pytest.mark.parametrize("weighting", ["row", "binary"])
@pytest.mark.parametrize("method", ["moran", "geary"])
def test_statistics_equal_the_dense_formula(store, method, weighting):
    w = _dense_weights(_store_adjacency(store), weighting)
    for response in ("isoform-ratios", "isoform-counts", "gene-counts"):
        ds = _run(store, method, response=response, weighting=weighting)
        assert ds.attrs["method"] == method and ds.attrs["response"] == response
        assert ds.attrs["weighting"] == weighting and ds.attrs["null"] == "normal"
        want = np.array([_dense_statistic(method, w, _dense_responses(store.gene_counts(g), response))
                         for g in ds["gene"].values])
        np.testing.assert_allclose(ds["sv_statistic"].values, want, rtol=1e-10)
        effect = want if method == "moran" else 1.0 - want
        np.testing.assert_allclose(ds["sv_effect"].values, effect, rtol=1e-10, atol=1e-13)
        assert (ds["n_spots_used"].values == store.n_spots).all()
        np.testing.assert_array_equal(ds["n_isoforms"].values, store.genes["n_isoforms"].to_numpy())
        p = ds["sv_pvalue"].values
        assert ((p > 0) & (p <= 1)).all()
        np.testing.assert_allclose(ds["sv_pvalue_adj"].values, stats.false_discovery_control(p), rtol=1e-12)


def test_univariate_case_equals_squidpys_definitions():
    """One column (gene counts; a 2-isoform gene's ratio): I, C and Moran's pval_norm as squidpy defines them."""
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 15, (150, 2))
    conn = knn_adjacency(xy, 6)  # binary connectivities
    w = _dense_weights(conn, "row")  # squidpy's transformation=True: l1-normalised rows
    n, s0 = w.shape[0], w.sum()
    pattern = np.sin(xy[:, 0] / 3.0)
    counts = rng.poisson(np.exp(1.0 + 0.8 * pattern)[None, :, None] * np.array([0.3, 0.7])
                         * rng.uniform(0.2, 1.5, 40)[:, None, None])
    weights = spatial_weights(conn, "row")
    for method in ("moran", "geary"):
        got = autocorr_batch(counts, weights, method=method, response="gene-counts")
        ratio = autocorr_batch(counts, weights, method=method, response="isoform-ratios")
        for g in range(counts.shape[0]):
            x = counts[g].sum(1)
            z = x - x.mean()
            if method == "moran":
                want = n / s0 * (z @ w @ z) / (z @ z)
            else:
                want = (n - 1) * np.sum(w * (x[:, None] - x[None, :]) ** 2) / (2 * s0 * (z @ z))
            assert got["statistic"][g] == pytest.approx(want, rel=1e-10)
            # a 2-isoform gene's two ratio columns are one variable (the multivariate form equals it)
            tot = counts[g].sum(1)
            r = np.where(tot > 0, counts[g, :, 0] / np.maximum(tot, 1), np.nan)
            r = np.where(tot > 0, r, np.nanmean(r))
            r0 = r - r.mean()
            uni = (n / s0 * (r0 @ w @ r0) / (r0 @ r0) if method == "moran"
                   else (n - 1) * np.sum(w * (r[:, None] - r[None, :]) ** 2) / (2 * s0 * (r0 @ r0)))
            assert ratio["statistic"][g] == pytest.approx(uni, rel=1e-10)
    # squidpy's pval_norm (one-tailed) for Moran: the normality variance from S0, S1, S2 of the weights
    t = w + w.T
    s1, s2 = 0.5 * np.sum(t * t), np.sum((w.sum(1) + w.sum(0)) ** 2)
    var = (n * n * s1 - n * s2 + 3 * s0 * s0) / ((n - 1) * (n + 1) * s0 * s0) - 1.0 / (n - 1) ** 2
    got = autocorr_batch(counts, weights, method="moran", response="gene-counts")
    zscore = (got["statistic"] + 1.0 / (n - 1)) / np.sqrt(var)
    assert (zscore > 0).all()  # a smooth pattern: every gene positively autocorrelated
    np.testing.assert_allclose(got["pvalue"], stats.norm.sf(zscore), rtol=1e-10)
    assert (weights.s0, weights.s1, weights.s2) == pytest.approx((s0, s1, s2), rel=1e-12)


def test_null_moments_are_exact_for_a_gaussian_variable():
    """The closed-form null mean / variance of I and C: against E[q^2] of the quadratic forms, and simulation."""
    rng = np.random.default_rng(0)
    xy = _grid(6)
    n = len(xy)
    adj = knn_adjacency(xy, 4)
    for weighting in ("row", "binary"):
        weights = spatial_weights(adj, weighting)
        w = _dense_weights(adj, weighting)
        s0 = w.sum()
        m = np.eye(n) - 1.0 / n
        sym = (w + w.T) / 2
        lap = np.diag(sym.sum(1)) - sym
        # I = (n/S0) z'MSMz / z'Mz, C = ((n-1)/S0) z'Lz / z'Mz: ratio and denominator are independent for
        # Gaussian z, so E[ratio^k] = E[num^k] / E[den^k], with E[(z'Az)^2] = tr(A)^2 + 2 tr(A^2)
        for method, a, scale in (("moran", m @ sym @ m, n / s0), ("geary", lap, (n - 1) / s0)):
            first = scale * np.trace(a) / (n - 1)
            second = scale**2 * (np.trace(a) ** 2 + 2 * np.trace(a @ a)) / ((n - 1) * (n + 1))
            mean, var = null_moments(method, weights)
            assert mean == pytest.approx(first, rel=1e-12)
            assert var == pytest.approx(second - first**2, rel=1e-10)
        # brute force: 20000 Gaussian draws, one column and three (isotropic: the variance scales by about 1/d)
        z = rng.standard_normal((20000, n, 1))
        z -= z.mean(1, keepdims=True)
        cross, spread, total = autocorr_sums(weights, z)
        for method, stat in (("moran", n / s0 * cross / total), ("geary", (n - 1) * (spread - cross) / (s0 * total))):
            mean, var = null_moments(method, weights)
            assert stat.mean() == pytest.approx(mean, abs=4 * np.sqrt(var / len(stat)))
            assert stat.var() == pytest.approx(var, rel=0.05)
    # three columns: the variance times sum(mu^2) / (sum mu)^2 of Y'Y; slightly conservative at small n
    # (the sample eigenvalues spread more than the true ones: +3-4% at n = 100, +5-8% at n = 36)
    xy = _grid(10)
    n = len(xy)
    for weighting in ("row", "binary"):
        weights = spatial_weights(knn_adjacency(xy, 4), weighting)
        z3 = rng.standard_normal((20000, n, 3))
        z3 -= z3.mean(1, keepdims=True)
        cross, spread, total = autocorr_sums(weights, z3)
        scale = column_scale(z3).mean()
        assert 1 / 3 < scale < 0.36
        for method, stat in (("moran", n / weights.s0 * cross / total),
                             ("geary", (n - 1) * (spread - cross) / (weights.s0 * total))):
            assert 0.99 <= null_moments(method, weights)[1] * scale / stat.var() <= 1.06


# ------------------------------------------------------------------ calibration and power
@pytest.mark.parametrize("method", ["moran", "geary"])
def test_calibrated_without_spatial_signal(method):
    """1200 null genes (2-4 isoforms, Poisson counts, 10% spots without counts): level 0.05 within [0.03, 0.07]."""
    rng = np.random.default_rng(11)
    xy = _grid(20)
    adj = knn_adjacency(xy, 4)
    counts = {p: _poisson_genes(rng, 400, len(xy), p) for p in (2, 3, 4)}
    for weighting in ("row", "binary"):
        weights = spatial_weights(adj, weighting)
        for response in ("isoform-ratios", "gene-counts"):
            p = np.concatenate([autocorr_batch(c, weights, method=method, response=response)["pvalue"]
                                for c in counts.values()])
            assert len(p) == 1200
            level = float(np.mean(p < 0.05))
            assert 0.03 <= level <= 0.07, (weighting, response, level)
            assert 0.25 <= float(np.mean(p < 0.5)) <= 0.75


@pytest.fixture(scope="module")
def sv_section(tmp_path_factory):
    adata = simulate_section(400, 40, n_sv=12, isoforms=(2, 4), mean_depth=8.0, seed=5)
    store = spatialscale.ingest(adata, tmp_path_factory.mktemp("autocorr") / "sv.zarr")
    return store, truth(adata)


@pytest.mark.parametrize("method", ["moran", "geary"])
def test_power_on_simulated_sv_genes(sv_section, method):
    store, is_sv = sv_section
    ds = _run(store, method)
    sv = is_sv.reindex(ds["gene"].values).to_numpy()
    called = ds["sv_pvalue_adj"].values < 0.05
    assert called[sv].mean() >= 0.75
    assert called[~sv].sum() <= 2
    effect = ds["sv_effect"].values
    assert np.median(effect[sv]) > 5 * np.abs(np.median(effect[~sv]))


# ------------------------------------------------------------------ engine: batches, cluster, cohorts
def test_results_identical_across_batch_sizes(store):
    for method in ("moran", "geary"):
        a = _run(store, method, batch_size=1)
        b = _run(store, method, batch_size=7)
        c = _run(store, method)
        for name in ("sv_statistic", "sv_pvalue", "sv_effect"):
            np.testing.assert_array_equal(a[name].values, b[name].values)
            np.testing.assert_array_equal(a[name].values, c[name].values)


def test_runs_on_a_local_cluster(store, client, tmp_path):
    ds = spatialscale.sv_test(store, method="geary", weighting="binary", client=client, batch_size=4,
                              out=tmp_path / "geary.zarr", progress=False)
    assert ds.attrs["execution"] == "distributed"
    ref = _run(store, "geary", weighting="binary")
    np.testing.assert_array_equal(ds["sv_statistic"].values, ref["sv_statistic"].values)
    np.testing.assert_array_equal(ds["sv_pvalue"].values, ref["sv_pvalue"].values)
    again = spatialscale.open_results(tmp_path / "geary.zarr")
    np.testing.assert_array_equal(again["sv_pvalue"].values, ds["sv_pvalue"].values)


def test_cohort_sections_equal_their_own_runs(tmp_path):
    rows = ["section,path,donor"]
    for i, (n, geometry) in enumerate([(120, "grid"), (150, "hex"), (100, "random")]):
        simulate_section(n, 8, n_sv=2, geometry=geometry, seed=20 + i).write_h5ad(tmp_path / f"s{i}.h5ad")
        rows.append(f"S{i},s{i}.h5ad,d{i % 2}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    cohort = spatialscale.ingest_cohort(tmp_path / "manifest.csv", tmp_path / "co", scheduler="threads",
                                        progress=False)
    ds = spatialscale.sv_test(cohort, method="moran", response="gene-counts", scheduler="threads", batch_size=3,
                              combine="fisher", progress=False)
    assert list(ds["section"].values) == ["S0", "S1", "S2"] and ds.attrs["method"] == "moran"
    assert ds.attrs["combine"] == "fisher" and "combined_pvalue" in ds
    for sid in ds["section"].values:
        own = _run(cohort.store(sid), "moran", response="gene-counts")
        got = ds.sel(section=sid).sel(gene=own["gene"].values)
        np.testing.assert_array_equal(got["sv_statistic"].values, own["sv_statistic"].values)
        np.testing.assert_array_equal(got["sv_pvalue"].values, own["sv_pvalue"].values)
    assert (ds["n_sections_tested"].values >= 1).all()


# ------------------------------------------------------------------ bad input, CLI
def test_bad_input_is_refused_in_one_line(store):
    for kw, match in (({"response": "ratios"}, "unknown response 'ratios'; choose one of isoform-ratios"),
                      ({"weighting": "dense"}, "unknown weighting 'dense'; choose one of row, binary"),
                      ({"null": "liu"}, r"option 'null' does not apply to method 'moran'"),
                      ({"covariates": "region"}, "sv moran takes no covariates"),
                      ({"nan_filling": "none"}, r"option 'nan_filling' does not apply to method 'moran'")):
        with pytest.raises(InputError, match=match) as err:
            _run(store, "moran", **kw)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match=r"option 'response' does not apply to method 'hsic-ir' \(it applies to "
                                         r"moran, geary\)"):
        _run(store, "hsic-ir", response="gene-counts")


@pytest.mark.parametrize(("spacing", "degree"), [((1.0, 1.0), 1), ((1.0, 1.0), 2), ((1.0, 2.0), 3), ((2.0, 1.0), 2)])
def test_grid_offsets_follow_the_raster_kernels_neighbour_rule(spacing, degree):
    from spatialscale.raster import RasterParams, stencil
    from spatialscale.stats.autocorr import grid_offsets

    shape = (15, 17)  # large enough that the periodic stencil does not wrap onto itself
    sy, sx = np.nonzero(stencil(RasterParams(shape, spacing, 0.99, degree)))
    periodic = {(int(y if y <= shape[0] // 2 else y - shape[0]), int(x if x <= shape[1] // 2 else x - shape[1]))
                for y, x in zip(sy, sx)}
    assert {tuple(o) for o in grid_offsets(spacing, degree).tolist()} == periodic


def test_raster_stores_use_the_grid_neighbours_of_their_observed_bins(tmp_path):
    """A raster keeps no graph: its observed bins' rook neighbours (neighbor_degree 1), no wrap-around."""
    from spatialscale.store import read_count_columns

    raster = spatialscale.ingest(simulate_raster((12, 14), 6, n_sv=2, seed=1), tmp_path / "r.zarr", kernel="fft",
                                 min_counts=0)
    xy = raster.coords()  # the observed bins, unit spacing
    assert xy.shape[0] == raster.n_observed < raster.n_spots
    d2 = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    adj = ((d2 > 0) & (d2 <= 1.0)).astype(float)
    for method, weighting in (("moran", "row"), ("geary", "binary")):
        ds = _run(raster, method, weighting=weighting)
        w = _dense_weights(adj, weighting)
        genes = raster.genes
        want = [_dense_statistic(method, w, _dense_responses(
            read_count_columns(raster.path, int(genes.loc[g, "start"]), int(genes.loc[g, "stop"]), grid=False),
            "isoform-ratios")) for g in ds["gene"].values]
        np.testing.assert_allclose(ds["sv_statistic"].values, want, rtol=1e-10)
        assert (ds["n_spots_used"].values == raster.n_observed).all() and "no wrap-around" in ds.attrs["graph"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spatialscale.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_runs_moran_and_names_bad_input_with_exit_code_2(store, tmp_path, capsys):
    r = _cli("sv", str(store.path), "--method", "moran", "--weighting", "binary", "--response", "gene-counts",
             "--out", str(tmp_path / "m.zarr"), "--scheduler", "threads", "--no-progress", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert f"{store.n_genes} genes tested (moran, normal null)" in r.stdout
    got = spatialscale.open_results(tmp_path / "m.zarr")
    ref = _run(store, "moran", weighting="binary", response="gene-counts")
    np.testing.assert_array_equal(got["sv_pvalue"].values, ref["sv_pvalue"].values)
    for argv, words in ((["--method", "geary", "--covariates", "region"], "sv geary takes no covariates"),
                        (["--method", "moran", "--null", "liu"], "option 'null' does not apply to method 'moran'")):
        code = main(["sv", str(store.path), *argv, "--out", str(tmp_path / "g.zarr"), "--scheduler", "threads"])
        err = capsys.readouterr().err
        assert code == 2 and err.strip().count("\n") == 0 and err.startswith("spatialscale sv: error: ")
        assert words in err and "Traceback" not in err
        assert not (tmp_path / "g.zarr").exists()
