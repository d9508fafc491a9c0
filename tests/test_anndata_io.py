"""AnnData in and out: counts in X or any layer, coordinates from obsm arrays / DataFrames / obs columns,
AnnData inputs to the test functions and the CLI, backed and sparse inputs, and results written back."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_adata

import spatialscale
from spatialscale import sources
from spatialscale.cli import main
from spatialscale.errors import InputError
from spatialscale.results import write_anndata_copy


def _store_counts(store: spatialscale.IsoformStore) -> np.ndarray:
    return store.read_counts(0, store.isoforms.shape[0])


def _same_store(a: spatialscale.IsoformStore, b: spatialscale.IsoformStore) -> None:
    assert list(a.isoforms.index) == list(b.isoforms.index)
    np.testing.assert_array_equal(_store_counts(a), _store_counts(b))
    np.testing.assert_array_equal(a.coords(), b.coords())
    assert a.kernel_token == b.kernel_token


@pytest.fixture(scope="module")
def adata() -> ad.AnnData:
    a = make_adata(n=150, n_genes=8, seed=3)
    a.obs["x"], a.obs["y"] = a.obsm["spatial"][:, 0], a.obsm["spatial"][:, 1]
    return a


@pytest.fixture(scope="module")
def reference(adata, tmp_path_factory) -> spatialscale.IsoformStore:
    return spatialscale.ingest(adata, tmp_path_factory.mktemp("ref") / "ref.zarr")


# --------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("dense", [False, True])
def test_counts_in_x(adata, reference, tmp_path, dense):
    a = adata.copy()
    a.X = a.layers["counts"].toarray() if dense else a.layers["counts"].copy()
    del a.layers["counts"]
    with pytest.raises(InputError, match=r"layer 'counts' not found .* layer='X' \(--layer X\)"):
        spatialscale.ingest(a, tmp_path / "no.zarr")
    assert not (tmp_path / "no.zarr").exists()
    _same_store(spatialscale.ingest(a, tmp_path / "mem.zarr", layer="X"), reference)
    a.write_h5ad(tmp_path / "x.h5ad")
    a.write_zarr(tmp_path / "x.zarr")
    _same_store(spatialscale.ingest(tmp_path / "x.h5ad", tmp_path / "h5.zarr", layer="X"), reference)
    _same_store(spatialscale.ingest(tmp_path / "x.zarr", tmp_path / "z.zarr", layer="X"), reference)


def test_coordinates_from_dataframe_and_obs_columns(adata, reference, tmp_path):
    a = adata.copy()
    xy = a.obsm["spatial"]
    # a DataFrame in obsm (numeric columns x, y; a text column is ignored), in memory and on disk
    a.obsm["spatial"] = pd.DataFrame({"label": "s", "x": xy[:, 0], "y": xy[:, 1]}, index=a.obs_names)
    _same_store(spatialscale.ingest(a, tmp_path / "df.zarr"), reference)
    a.write_h5ad(tmp_path / "df.h5ad")
    _same_store(spatialscale.ingest(tmp_path / "df.h5ad", tmp_path / "dfh.zarr"), reference)
    # two obs columns, as a pair or "x,y"
    del a.obsm["spatial"]
    with pytest.raises(InputError, match=r"obsm has no coordinates 'spatial' .*spatial_key=\('x', 'y'\)"):
        spatialscale.ingest(a, tmp_path / "none.zarr")
    _same_store(spatialscale.ingest(a, tmp_path / "pair.zarr", spatial_key=("x", "y")), reference)
    _same_store(spatialscale.ingest(a, tmp_path / "text.zarr", spatial_key="x, y"), reference)
    with pytest.raises(InputError, match=r"obs has no column 'z'"):
        spatialscale.ingest(a, tmp_path / "bad.zarr", spatial_key=("x", "z"))
    a.obs.loc[a.obs_names[4], "y"] = np.nan
    with pytest.raises(InputError, match=r"obs\[\['x', 'y'\]\] has 1 spot\(s\) with NaN"):
        spatialscale.ingest(a, tmp_path / "nan.zarr", spatial_key=("x", "y"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["df.h5ad", "df.zarr", "dfh.zarr", "pair.zarr", "text.zarr"]


def test_backed_anndata_is_read_in_blocks(adata, reference, tmp_path, monkeypatch):
    """A backed AnnData's sparse X is scanned in row blocks, never loaded whole."""
    a = adata.copy()
    a.X = a.layers["counts"].tocsr()
    del a.layers["counts"]
    a.write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    monkeypatch.setattr(sources, "small_enough", lambda ds, limit=0: False)
    src = sources.AnnDataSource(backed, "X")
    assert not sp.issparse(src._matrix) and src._matrix.format == "csr"  # the on-disk dataset itself
    block = src.read_columns(np.array([5, 0, 3]))
    np.testing.assert_array_equal(block, a.X[:, [5, 0, 3]].toarray())
    _same_store(spatialscale.ingest(backed, tmp_path / "b.zarr", layer="X", block_bytes=4096), reference)
    backed.file.close()


# --------------------------------------------------------------------------- AnnData wherever a store goes
def test_anndata_input_to_the_test_functions(adata, reference, tmp_path, monkeypatch, client):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    expected = spatialscale.sv_test(reference, progress=False)
    a = adata.copy()
    a.X = a.layers["counts"]
    del a.layers["counts"], a.obsm["spatial"]
    got = spatialscale.sv_test(a, ingest={"layer": "X", "spatial_key": ("x", "y")}, client=client, progress=False)
    np.testing.assert_array_equal(got["gene"].values, expected["gene"].values)
    np.testing.assert_allclose(got["sv_pvalue"].values, expected["sv_pvalue"].values, rtol=1e-10, atol=0)
    # ingested once into this process's cache (a temporary folder), reused while the input is unchanged
    from spatialscale.families.common import INGEST_CACHE

    cached = list(tmp_path.glob("spatialscale-store-*/*.zarr"))
    assert len(cached) == 1 and INGEST_CACHE.holds(cached[0]) and got.attrs["store"] == ""
    again = spatialscale.sv_test(a, layer="X", spatial_key=("x", "y"), progress=False)  # top-level ingest options
    assert list(tmp_path.glob("spatialscale-store-*/*.zarr")) == cached
    np.testing.assert_array_equal(again["sv_pvalue"].values, got["sv_pvalue"].values)
    b = a.copy()
    b.obs["x"] = b.obs["x"] * 2.0  # other coordinates: another store
    spatialscale.sv_test(b, layer="X", spatial_key=("x", "y"), progress=False)
    assert len(list(tmp_path.glob("spatialscale-store-*/*.zarr"))) == 2
    with pytest.raises(InputError, match="ingest option.s. layer given both as keywords and in ingest="):
        spatialscale.sv_test(a, layer="X", ingest={"layer": "X"})
    # a named store is kept, and is the same store
    du = spatialscale.du_test(a, "region", method="hsic", ingest={"layer": "X", "spatial_key": "x,y"},
                              ingest_to=tmp_path / "kept.zarr", progress=False)
    _same_store(spatialscale.open_store(tmp_path / "kept.zarr"), reference)
    ref_du = spatialscale.du_test(reference, "region", method="hsic", progress=False)
    np.testing.assert_allclose(du["du_pvalue"].values, ref_du["du_pvalue"].values, rtol=1e-10, atol=0)
    # an .h5ad path too
    a.write_h5ad(tmp_path / "in.h5ad")
    summ = spatialscale.feature_summary(tmp_path / "in.h5ad", ingest={"layer": "X", "spatial_key": "x,y"},
                                        progress=False)
    ref_summ = spatialscale.feature_summary(reference, progress=False)
    np.testing.assert_allclose(summ["gene_perplexity"].values, ref_summ["gene_perplexity"].values, rtol=1e-12)
    with pytest.raises(InputError, match=r"unknown ingest option\(s\) 'layr'"):
        spatialscale.sv_test(a, ingest={"layr": "X"})
    with pytest.raises(InputError, match="apply to AnnData inputs; .* is an isoform store"):
        spatialscale.sv_test(reference, ingest={"layer": "X"})
    with pytest.raises(InputError, match="ingest must be a dict of ingest options"):
        spatialscale.sv_test(a, ingest="X")


# --------------------------------------------------------------------------- results back into AnnData
def test_to_anndata_round_trip(adata, reference, tmp_path):
    sv = spatialscale.sv_test(reference, progress=False, with_summary=True)
    gc = spatialscale.sv_test(reference, method="hsic-gc", progress=False)
    du = spatialscale.du_test(reference, "region", method="hsic", progress=False)
    summ = spatialscale.feature_summary(reference, progress=False)
    assert "gene_perplexity" in sv and "iso_ratio_total" not in sv and "iso_ratio_total" in summ
    a = adata.copy()
    var_before = list(a.var.columns)
    out = spatialscale.to_anndata(sv, a)
    assert out is a
    spatialscale.to_anndata(gc, a)  # another method: its own key, the first one's table kept
    spatialscale.to_anndata(du, a, key_added="du_region")
    spatialscale.to_anndata(summ, a)
    assert spatialscale.results.result_keys(a) == ["spatialscale_sv_hsic-ir", "spatialscale_sv_hsic-gc", "du_region",
                                                   "spatialscale_summary"]
    table = a.uns["spatialscale_sv_hsic-ir"]
    assert isinstance(table, pd.DataFrame) and list(table.columns[:3]) == ["statistic", "pvalue", "pvalue_adj"]
    np.testing.assert_array_equal(table.loc[sv["gene"].values, "pvalue"], sv["sv_pvalue"].values)
    assert table["n_isoforms"].dtype == np.int64 and table["n_spots_used"].dtype == np.int64
    np.testing.assert_array_equal(table["n_isoforms"], sv["n_isoforms"].values)
    assert not np.array_equal(a.uns["spatialscale_sv_hsic-gc"]["pvalue"], table["pvalue"])
    # gene-level values stay in the table; var gains the isoform-level summaries only
    np.testing.assert_array_equal(table.loc[sv["gene"].values, "gene_perplexity"], sv["gene_perplexity"].values)
    new_columns = [c for c in a.var.columns if c not in var_before]
    assert new_columns == [f"spatialscale_summary_{v}" for v in summ.data_vars if summ[v].dims == ("isoform",)]
    iso = a.var["spatialscale_summary_iso_ratio_total"]
    np.testing.assert_array_equal(iso.loc[summ["isoform"].values], summ["iso_ratio_total"].values)
    assert iso.drop(summ["isoform"].values).isna().all()  # isoforms filtered at ingest have no value
    dtab = a.uns["du_region"]
    assert list(dtab.columns[:2]) == ["gene", "covariate"] and len(dtab) == du.sizes["gene"] * du.sizes["covariate"]
    for row in dtab.itertuples():
        assert row.pvalue == du["du_pvalue"].sel(gene=row.gene, covariate=row.covariate).item()
    params = a.uns["spatialscale"]["spatialscale_sv_hsic-ir"]["params"]
    assert params["method"] == "hsic-ir" and params["test"] == "spatial_variability"
    # written and read back as .h5ad and zarr: the same tables, provenance a mapping, the Dataset rebuilt
    a.write_h5ad(tmp_path / "annotated.h5ad")
    a.write_zarr(tmp_path / "annotated.zarr")
    for back in (ad.read_h5ad(tmp_path / "annotated.h5ad"), ad.read_zarr(tmp_path / "annotated.zarr")):
        pd.testing.assert_frame_equal(back.uns["spatialscale_sv_hsic-ir"], table)
        assert back.uns["spatialscale"]["du_region"]["params"]["method"] == "hsic"
        rebuilt = spatialscale.results.dataset_from_anndata(back, "du_region")
        np.testing.assert_array_equal(rebuilt["du_pvalue"].sel(gene=du["gene"], covariate=du["covariate"]).values,
                                      du["du_pvalue"].values)
        rebuilt = spatialscale.results.dataset_from_anndata(back, "spatialscale_summary")
        np.testing.assert_array_equal(rebuilt["iso_ratio_total"].sel(isoform=summ["isoform"]).values,
                                      summ["iso_ratio_total"].values)
    with pytest.raises(InputError, match="holds 4 spatialscale results .*; name one with key="):
        spatialscale.results.dataset_from_anndata(a)
    # a second write under the same key replaces its own entry; a user's entry or column is refused
    spatialscale.to_anndata(sv, a)
    user = adata.copy()
    user.uns["spatialscale_sv_hsic-ir"] = {"mine": 1}
    with pytest.raises(InputError, match="uns already has an entry 'spatialscale_sv_hsic-ir' that spatialscale did "
                                         "not write"):
        spatialscale.to_anndata(sv, user)
    user = adata.copy()
    user.var["spatialscale_summary_iso_ratio_total"] = 7.0
    with pytest.raises(InputError, match=r"var already has column\(s\) 'spatialscale_summary_iso_ratio_total'"):
        spatialscale.to_anndata(summ, user)
    assert (user.var["spatialscale_summary_iso_ratio_total"] == 7.0).all()
    copy = spatialscale.to_anndata(summ, user, overwrite=True, copy=True)
    assert (user.var["spatialscale_summary_iso_ratio_total"] == 7.0).all()
    assert copy.var["spatialscale_summary_iso_ratio_total"].isna().sum() < len(copy.var)
    with pytest.raises(InputError, match="to_anndata writes into an AnnData object, got str"):
        spatialscale.to_anndata(sv, "sample.h5ad")
    other = adata.copy()
    other.var["gene_symbol"] = "nogene"
    with pytest.raises(InputError, match="none of the results' genes is in var"):
        spatialscale.to_anndata(sv, other)


def test_input_order(adata, reference):
    sv = spatialscale.sv_test(reference, progress=False)
    first_seen = list(pd.unique(adata.var["gene_symbol"]))
    assert list(sv["gene"].values) != first_seen  # the store orders genes by isoform count
    for genes in (adata, reference, first_seen[::-1]):
        want = first_seen[::-1] if isinstance(genes, list) else first_seen
        ordered = spatialscale.input_order(sv, genes)
        assert list(ordered["gene"].values) == want
        np.testing.assert_array_equal(ordered["sv_pvalue"].values, sv["sv_pvalue"].sel(gene=want).values)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_cli_anndata_input_and_annotated_copy(adata, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = adata.copy()
    a.X = a.layers["counts"]
    del a.layers["counts"], a.obsm["spatial"]
    a.write_h5ad("in.h5ad")
    before = _digest(tmp_path / "in.h5ad")
    args = ["sv", "in.h5ad", "--out", "sv.zarr", "--layer", "X", "--spatial-key", "x,y", "--no-progress"]
    assert main([*args, "--anndata-out", "annotated.h5ad"]) == 0
    assert "annotated copy of in.h5ad in" in capsys.readouterr().out
    ds = spatialscale.open_results("sv.zarr")
    back = ad.read_h5ad("annotated.h5ad")
    table = back.uns["spatialscale_sv_hsic-ir"]
    np.testing.assert_array_equal(table.loc[ds["gene"].values, "pvalue"].to_numpy(), ds["sv_pvalue"].values)
    np.testing.assert_array_equal(back.X.toarray(), a.X.toarray())
    assert _digest(tmp_path / "in.h5ad") == before  # the input is never touched
    # a second run resumes from the same file's results; the copy exists: refused before anything runs
    assert main([*args, "--anndata-out", "annotated.h5ad"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--anndata-out", "in.h5ad", "--overwrite"]) == 2
    assert "would overwrite or nest in the input" in capsys.readouterr().err
    (tmp_path / "mine.h5ad").write_bytes(b"user data")
    assert main([*args, "--anndata-out", "mine.h5ad", "--overwrite"]) == 2
    assert "spatialscale never replaces what it did not write" in capsys.readouterr().err
    assert (tmp_path / "mine.h5ad").read_bytes() == b"user data"
    saved = ad.read_h5ad("annotated.h5ad")  # the user's own file, annotated in memory and saved: never replaced
    spatialscale.to_anndata(ds, saved)
    saved.write_h5ad("saved.h5ad")
    assert main([*args, "--anndata-out", "saved.h5ad", "--overwrite"]) == 2
    assert "spatialscale never replaces what it did not write" in capsys.readouterr().err
    assert main([*args, "--anndata-out", "annotated.h5ad", "--overwrite"]) == 0
    assert "already holds verified results" not in capsys.readouterr().out
    # from a store: its source file is annotated
    assert main(["ingest", "in.h5ad", "st.zarr", "--layer", "X", "--spatial-key", "x,y", "--no-progress"]) == 0
    assert main(["du", "st.zarr", "--covariates", "region", "--method", "hsic", "--out", "du.zarr", "--no-progress",
                 "--anndata-out", "du.h5ad", "--top", "0"]) == 0
    assert set(ad.read_h5ad("du.h5ad").uns["spatialscale_du_hsic"]["covariate"]) == set(
        spatialscale.open_results("du.zarr")["covariate"].values)
    assert main(["sv", "st.zarr", "--out", "x.zarr", "--layer", "X", "--no-progress"]) == 2
    assert "apply to AnnData inputs" in capsys.readouterr().err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_annotated_copy_of_a_zarr_anndata(adata, reference, tmp_path):
    sv = spatialscale.sv_test(reference, progress=False)
    adata.write_zarr(tmp_path / "in.zarr")
    with pytest.raises(InputError, match=r"keeps the input's format: name it \*\.zarr"):
        write_anndata_copy(sv, tmp_path / "in.zarr", tmp_path / "out.h5ad")
    write_anndata_copy(sv, tmp_path / "in.zarr", tmp_path / "out.zarr")
    back = ad.read_zarr(tmp_path / "out.zarr")
    assert np.isfinite(back.uns["spatialscale_sv_hsic-ir"]["pvalue"]).all()
    assert "spatialscale_sv_hsic-ir" not in ad.read_zarr(tmp_path / "in.zarr").uns
    assert sorted(os.listdir(tmp_path)) == ["in.zarr", "out.zarr"]
