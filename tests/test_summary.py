"""Feature summaries: the math, live agreement with SPLISOSM 1.2.0, the engine (cluster, batching, resume), merging."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import make_adata

import spatialscale
import spatialscale.families.summary as api
from spatialscale import InputError
from spatialscale.api import feature_summary, merge_summary
from spatialscale.engine import plan_batches
from spatialscale.results import GENE_SUMMARY_VARIABLES, ISOFORM_SUMMARY_VARIABLES, make_dataset
from spatialscale.stats.summary import GENE_SUMMARIES, ISOFORM_SUMMARIES, summary_batch

GENE_COLS = list(GENE_SUMMARIES)
ISO_COLS = list(ISOFORM_SUMMARIES)


def splisosm_summaries(adata) -> tuple[pd.DataFrame, pd.DataFrame]:
    """SPLISOSM's gene- and isoform-level tables for the AnnData."""
    splisosm = pytest.importorskip("splisosm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = splisosm.SplisosmNP()
        model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
        gene = model.extract_feature_summary(level="gene", print_progress=False)
        iso = model.extract_feature_summary(level="isoform", print_progress=False)
    gene.index = gene.index.astype(str)
    iso.index = iso.index.astype(str)
    return gene, iso


def assert_matches_splisosm(ds: xr.Dataset, gene_ref: pd.DataFrame, iso_ref: pd.DataFrame) -> None:
    assert sorted(ds["gene"].values) == sorted(gene_ref.index)
    assert sorted(ds["isoform"].values) == sorted(iso_ref.index)
    ours = ds[list(GENE_SUMMARY_VARIABLES)].to_dataframe().loc[gene_ref.index]
    for col in GENE_COLS:
        np.testing.assert_allclose(ours[f"gene_{col}"], gene_ref[col], rtol=1e-9, atol=1e-12, err_msg=col)
    ours = ds[list(ISOFORM_SUMMARY_VARIABLES)].to_dataframe().loc[iso_ref.index]
    for col in ISO_COLS:
        np.testing.assert_allclose(ours[f"iso_{col}"], iso_ref[col], rtol=1e-9, atol=1e-12, err_msg=col)
    iso_gene = ds["isoform_gene"].to_series().loc[iso_ref.index]
    assert list(iso_gene) == list(iso_ref["gene_symbol"].astype(str))


def assert_same(a: xr.Dataset, b: xr.Dataset) -> None:
    assert list(a["gene"].values) == list(b["gene"].values)
    assert list(a["isoform"].values) == list(b["isoform"].values)
    assert list(a["isoform_gene"].values) == list(b["isoform_gene"].values)
    for v in GENE_SUMMARY_VARIABLES + ISOFORM_SUMMARY_VARIABLES:
        np.testing.assert_allclose(a[v].values, b[v].values, rtol=1e-14, atol=0, err_msg=v)


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    """400 spots, 24 genes, a quarter of the spots without counts for each gene."""
    adata = make_adata(n=400, n_genes=24, zero_spots=0.25, seed=3)
    store = spatialscale.ingest(adata, tmp_path_factory.mktemp("summary") / "s.zarr")
    return adata, store


@pytest.fixture(scope="module")
def reference(section):
    return feature_summary(section[1], scheduler="threads", progress=False)


def test_summary_batch_by_hand():
    counts = np.array([
        [[2, 0], [1, 1], [0, 0]],  # spot 3 uncovered
        [[0, 0], [0, 0], [0, 0]],  # no counts at all
    ], dtype=float)
    gene, iso = summary_batch(counts)
    np.testing.assert_array_equal(gene["n_isos"], [2, 2])
    np.testing.assert_allclose(gene["pct_bin_on"], [2 / 3, 0.0])
    np.testing.assert_allclose(gene["count_avg"], [4 / 3, 0.0])
    np.testing.assert_allclose(gene["count_std"], [np.sqrt(8) / 3, 0.0])  # spot totals 2, 2, 0
    np.testing.assert_allclose(gene["perplexity"], [np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))), 1.0])
    np.testing.assert_allclose(gene["major_ratio_avg"], [0.75, 0.0])
    np.testing.assert_allclose(iso["pct_bin_on"], [[2 / 3, 1 / 3], [0, 0]])
    np.testing.assert_allclose(iso["count_total"], [[3, 1], [0, 0]])
    np.testing.assert_allclose(iso["count_avg"], [[1, 1 / 3], [0, 0]])
    np.testing.assert_allclose(iso["count_std"], [[np.sqrt(2 / 3), np.sqrt(2) / 3], [0, 0]])
    np.testing.assert_allclose(iso["ratio_total"], [[0.75, 0.25], [0, 0]])
    # per-spot ratios (1, 0) and (0.5, 0.5) on the two covered spots only
    np.testing.assert_allclose(iso["ratio_avg"], [[0.75, 0.25], [0, 0]])
    np.testing.assert_allclose(iso["ratio_std"], [[0.25, 0.25], [0, 0]])
    # a constant isoform has exactly zero spread
    _, iso = summary_batch(np.full((1, 5, 3), 7.0))
    np.testing.assert_array_equal(iso["count_std"], 0.0)
    np.testing.assert_array_equal(iso["ratio_std"], 0.0)


def test_matches_splisosm_on_cluster(section, client):
    adata, store = section
    gene_ref, iso_ref = splisosm_summaries(adata)
    ds = feature_summary(store, client=client, batch_size=5, progress=False)
    assert ds.attrs["execution"] == "distributed"
    assert ds.attrs["n_spots"] == store.n_spots == 400
    assert_matches_splisosm(ds, gene_ref, iso_ref)
    # the section has uncovered spots for every gene, and genes of 2..6 isoforms
    assert float(ds["gene_pct_bin_on"].max()) < 0.9
    assert set(ds["gene_n_isos"].values) == {2, 3, 4, 5, 6}
    np.testing.assert_array_equal(ds["gene_n_isos"].values, store.genes["n_isoforms"].to_numpy())
    # isoforms in store order, each gene's contiguous; per-gene usage sums to one
    assert list(ds["isoform"].values) == list(store.isoforms["source_name"].astype(str))
    sums = ds["iso_ratio_total"].groupby("isoform_gene").sum().sel(isoform_gene=ds["gene"].values)
    np.testing.assert_allclose(sums.values, 1.0, rtol=1e-12)
    major = ds["iso_ratio_total"].groupby("isoform_gene").max().sel(isoform_gene=ds["gene"].values)
    np.testing.assert_allclose(ds["gene_major_ratio_avg"].values, major.values, rtol=1e-15)


def test_matches_splisosm_dense_hex_input(tmp_path):
    adata = make_adata(n=300, n_genes=10, geometry="hex", sparse=False, zero_spots=0.4, depth=2.0, seed=9)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    gene_ref, iso_ref = splisosm_summaries(adata)
    assert_matches_splisosm(feature_summary(store, scheduler="threads", progress=False), gene_ref, iso_ref)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_does_not_change_results(section, reference, batch_size):
    ds = feature_summary(section[1], batch_size=batch_size, scheduler="threads", progress=False)
    assert_same(ds, reference)


def test_interrupted_run_resumes_from_out(section, reference, tmp_path, monkeypatch):
    store = section[1]
    out = tmp_path / "summary.zarr"
    real = api._summary_task

    def flaky(*args):
        if args[-1].gene_stop == store.n_genes:  # the last batch fails
            raise RuntimeError("worker lost power")
        return real(*args)

    monkeypatch.setattr(api, "_summary_task", flaky)
    with pytest.raises(RuntimeError, match="lost power"):
        feature_summary(store, out=out, batch_size=4, scheduler="threads", progress=False)
    done = len(list((out / "_batches").iterdir()))
    plan = plan_batches(store.genes, store.n_spots, bytes_per_gene=lambda p: 1.0, batch_size=4,
                        min_batches=spatialscale.api.MIN_BATCHES)
    assert 0 < done < len(plan)

    calls: list[int] = []
    monkeypatch.setattr(api, "_summary_task", lambda *a: calls.append(a[-1].gene_start) or real(*a))
    ds = feature_summary(store, out=out, batch_size=4, scheduler="threads", progress=False)
    assert len(calls) == len(plan) - done
    assert plan[-1].gene_start in calls
    assert_same(ds, reference)
    # finished: read back from zarr, coordinates included, nothing recomputed
    calls.clear()
    back = feature_summary(store, out=out, batch_size=4, scheduler="threads", progress=False)
    assert calls == []
    assert_same(back, reference)
    assert back["gene_n_isos"].dtype.kind == "i"
    assert back.attrs["summary"] == "feature_summary"


def test_merge_onto_sv_results(section, reference):
    store = section[1]
    sv = spatialscale.sv_test(store, scheduler="threads", progress=False)
    ranked = sv.isel(gene=np.argsort(sv["sv_pvalue"].values))  # another gene order than the summary's
    merged = merge_summary(ranked, reference)
    assert merged.attrs == ranked.attrs
    assert "isoform" not in merged.dims
    assert list(merged["gene"].values) == list(ranked["gene"].values)
    table = merged.to_dataframe()
    assert len(table) == store.n_genes  # one row per gene, as SPLISOSM's with_gene_summary table
    by_gene = reference[list(GENE_SUMMARY_VARIABLES)].to_dataframe().loc[table.index]
    for v in GENE_SUMMARY_VARIABLES:
        np.testing.assert_array_equal(table[v].to_numpy(), by_gene[v].to_numpy())
    np.testing.assert_array_equal(table["gene_n_isos"], table["n_isoforms"])
    np.testing.assert_array_equal(table["sv_pvalue"], ranked["sv_pvalue"].values)
    # with isoforms; merging again replaces, not duplicates
    full = merge_summary(merge_summary(ranked, reference, isoforms=True), reference, isoforms=True)
    assert full.sizes["isoform"] == len(store.isoforms)
    np.testing.assert_array_equal(full["iso_count_total"].values, reference["iso_count_total"].values)
    # a subset of genes: their isoforms only
    top = merge_summary(ranked.isel(gene=slice(0, 3)), reference, isoforms=True)
    assert set(top["isoform_gene"].values) == set(ranked["gene"].values[:3])
    assert top.sizes["isoform"] == int(ranked["n_isoforms"].values[:3].sum())


def test_merge_onto_du_results_and_mismatches(reference):
    genes = reference["gene"].values[::-1][:5]
    du = make_dataset(genes, {"du_pvalue": np.linspace(0.1, 0.5, 10).reshape(5, 2)}, {"n_spots": 400},
                      covariates=["region_A", "region_B"])
    merged = merge_summary(du, reference)
    assert merged["du_pvalue"].dims == ("gene", "covariate")
    assert merged["gene_count_avg"].dims == ("gene",)
    np.testing.assert_array_equal(merged["gene_count_avg"].values,
                                  reference["gene_count_avg"].sel(gene=genes).values)
    table = merged.to_dataframe()
    assert len(table) == 10
    np.testing.assert_array_equal(table.xs("region_B", level="covariate")["gene_perplexity"].values,
                                  reference["gene_perplexity"].sel(gene=genes).values)
    # a gene the summary does not know: NaN, with a warning
    other = make_dataset(["gene_x", genes[0]], {"sv_pvalue": np.array([0.5, 0.1])}, {"n_spots": 400})
    with pytest.warns(UserWarning, match="1 gene"):
        part = merge_summary(other, reference)
    assert np.isnan(part["gene_perplexity"].values[0])
    assert part["gene_perplexity"].values[1] == reference["gene_perplexity"].sel(gene=genes[0]).item()
    with pytest.raises(InputError, match="different sections"):
        merge_summary(other.assign_attrs(n_spots=999), reference)
