"""Live agreement with SPLISOSM 1.2.0 (SplisosmNP.test_spatial_variability)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from conftest import make_adata

import spatialscale

splisosm = pytest.importorskip("splisosm")


def reference(adata, model=None, **kw) -> pd.DataFrame:
    """SplisosmNP's SV results on ``adata`` (``model``: one already set up on it, to test it again)."""
    from splisosm import SplisosmNP

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if model is None:
            model = SplisosmNP()
            model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
        res = model.test_spatial_variability(print_progress=False, return_results=True, **kw)
    return pd.DataFrame({"statistic": res["statistic"], "pvalue": res["pvalue"]},
                        index=[str(g) for g in model.gene_names])


def assert_agree(ds, ref: pd.DataFrame, stat_rtol: float = 1e-5, p_rtol: float = 1e-4) -> None:
    ours = ds[["sv_statistic", "sv_pvalue"]].to_dataframe().loc[ref.index]
    assert len(ours) == len(ref) > 0
    np.testing.assert_allclose(ours["sv_statistic"], ref["statistic"], rtol=stat_rtol, atol=0)
    np.testing.assert_allclose(ours["sv_pvalue"], ref["pvalue"], rtol=p_rtol, atol=1e-12)


@pytest.fixture(scope="module", params=[("grid", True), ("hex", False), ("random", True)],
                ids=["grid-sparse", "hex-dense", "random-sparse"])
def section(request, tmp_path_factory):
    geometry, sparse = request.param
    adata = make_adata(n=500, n_genes=30, geometry=geometry, sparse=sparse, seed=len(geometry))
    store = spatialscale.ingest(adata, tmp_path_factory.mktemp(geometry) / "s.zarr")
    return adata, store


CASES = [("hsic-ir", t) for t in ("none", "clr", "ilr", "alr", "radial")] + [("hsic-ic", "none"), ("hsic-gc", "none")]


@pytest.mark.parametrize("null", ["liu", "welch"])
@pytest.mark.parametrize(("method", "transformation"), CASES, ids=[f"{m}-{t}" for m, t in CASES])
def test_matches_splisosm(section, method, transformation, null):
    adata, store = section
    ref = reference(adata, method=method, ratio_transformation=transformation, null_method=null)
    ds = spatialscale.sv_test(store, method=method, null=null, transformation=transformation, progress=False)
    assert_agree(ds, ref)
    # the fixture has genes of every size from 2 to 6 isoforms and signal to find
    assert set(ds["n_isoforms"].values) == {2, 3, 4, 5, 6}
    assert float(ds["sv_pvalue"].min()) < 1e-3


@pytest.mark.parametrize("n", [240, 600])
def test_nan_filling_none_matches_splisosm(tmp_path, n):
    """Genes with every spot covered, a single empty spot, and many empty spots, at two section sizes."""
    adata = make_adata(n=n, n_genes=12, zero_spots=0.0, depth=30.0, seed=5)
    counts = adata.layers["counts"].toarray()
    genes = adata.var["gene_symbol"].to_numpy()
    rng = np.random.default_rng(n)
    for g in ("gene004", "gene005"):  # one empty spot
        counts[rng.integers(n), genes == g] = 0
    for g in ("gene006", "gene007", "gene011"):  # a third of the spots empty
        counts[np.ix_(rng.random(n) < 0.3, genes == g)] = 0
    adata.layers["counts"] = counts
    adata.X = counts.copy()
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    ref = reference(adata, method="hsic-ir", nan_filling="none")
    ds = spatialscale.sv_test(store, method="hsic-ir", nan_filling="none", progress=False)
    assert_agree(ds, ref)
    used = ds["n_spots_used"].to_series()
    assert (used[["gene000", "gene001", "gene002", "gene003"]] == n).all()  # full coverage
    assert (used[["gene004", "gene005"]] == n - 1).all()
    assert (used[["gene006", "gene007", "gene011"]] < 0.8 * n).all()


def test_large_section_hutchinson_matches_splisosm(tmp_path):
    """Above 5000 spots SPLISOSM uses seeded Hutchinson power sums (60 probes); so does power_sums="hutchinson"."""
    adata = make_adata(n=5184, n_genes=8, isoforms=(2, 3), zero_spots=0.05, seed=3)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr", power_sums="hutchinson")
    assert store.kernel_attrs["power_sum_method"] == "hutchinson"
    ref = reference(adata, method="hsic-ir")
    ds = spatialscale.sv_test(store, method="hsic-ir", progress=False)
    assert_agree(ds, ref)


@pytest.mark.slow
def test_5000_spot_section_matches_splisosm(tmp_path):
    adata = make_adata(n=5000, n_genes=10, geometry="hex", seed=11)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    assert store.kernel_attrs["power_sum_method"] == "exact"
    from splisosm import SplisosmNP

    model = SplisosmNP()  # set up once (its dense 5,000-spot kernel), tested with both methods
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
    for method in ("hsic-ir", "hsic-gc"):
        ref = reference(adata, model=model, method=method)
        assert_agree(spatialscale.sv_test(store, method=method, progress=False), ref)
