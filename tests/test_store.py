"""Ingest: layout, sources, filters, and clear errors that leave nothing behind."""

from __future__ import annotations

import subprocess
import sys

import anndata as ad
import h5py
import numpy as np
import pytest
import scipy.sparse as sp
import zarr
from conftest import make_adata

import spatialscale
from spatialscale import InputError


def _leftovers(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_layout_sorted_by_isoform_count_and_counts_round_trip(tmp_path, small_adata):
    store = spatialscale.ingest(small_adata, tmp_path / "s.zarr")
    genes = store.genes
    assert list(genes["n_isoforms"]) == sorted(genes["n_isoforms"])
    order = list(zip(genes["n_isoforms"], genes.index))
    assert order == sorted(order)
    # columns of each gene are contiguous and equal the input columns
    dense = small_adata.layers["counts"].toarray()
    for gene in genes.index[[0, len(genes) // 2, -1]]:
        cols = np.flatnonzero(small_adata.var["gene_symbol"] == gene)
        np.testing.assert_array_equal(store.gene_counts(gene), dense[:, cols])
    assert store.n_spots == small_adata.n_obs
    # the store is a genuine AnnData zarr
    back = ad.read_zarr(tmp_path / "s.zarr")
    assert back.shape == (store.n_spots, len(store.isoforms))
    assert "spatialscale_precision" in back.obsp
    assert list(back.obs["region"].cat.categories) == ["A", "B"]


@pytest.mark.parametrize("fmt", ["h5ad", "zarr", "memory-dense"])
def test_sources_give_identical_stores(tmp_path, small_adata, fmt):
    ref = spatialscale.ingest(small_adata, tmp_path / "ref.zarr")
    if fmt == "h5ad":
        small_adata.write_h5ad(tmp_path / "in.h5ad")
        src = tmp_path / "in.h5ad"
    elif fmt == "zarr":
        small_adata.write_zarr(tmp_path / "in.zarr")
        src = tmp_path / "in.zarr"
    else:
        src = small_adata.copy()
        src.layers["counts"] = src.layers["counts"].toarray()
    # tiny blocks force many column blocks
    store = spatialscale.ingest(src, tmp_path / "s.zarr", block_bytes=small_adata.n_obs * 8 * 3)
    assert store.kernel_token == ref.kernel_token
    np.testing.assert_array_equal(store.read_counts(0, len(store.isoforms)), ref.read_counts(0, len(ref.isoforms)))


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_dense_layer_on_disk_is_read_in_column_blocks(tmp_path, fmt):
    adata = make_adata(n=200, n_genes=10, sparse=False)
    getattr(adata, f"write_{fmt}")(tmp_path / f"d.{fmt}")
    store = spatialscale.ingest(tmp_path / f"d.{fmt}", tmp_path / "s.zarr", block_bytes=200 * 8 * 2)
    ref = spatialscale.ingest(adata, tmp_path / "r.zarr")
    np.testing.assert_array_equal(store.read_counts(0, 10), ref.read_counts(0, 10))


def test_filters_follow_splisosm(tmp_path):
    adata = make_adata(n=300, n_genes=15, seed=2)
    splisosm = pytest.importorskip("splisosm")
    model = splisosm.SplisosmNP()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.setup_data(adata, min_counts=60, min_bin_pct=20)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr", min_counts=60, min_bin_pct=20)
    assert sorted(store.genes.index) == sorted(str(g) for g in model.gene_names)
    kept = {(str(g), int(c.shape[1])) for g, c in zip(model.gene_names, model._data)}
    assert set(zip(store.genes.index, store.genes["n_isoforms"].astype(int))) == kept


def test_min_component_size_drops_small_islands(tmp_path):
    adata = make_adata(n=100, n_genes=6)
    adata.obsm["spatial"][:3] += 1000.0  # an island of three spots far away
    with pytest.warns(UserWarning, match="removed 3 spot"):
        store = spatialscale.ingest(adata, tmp_path / "s.zarr", min_component_size=10)
    assert store.n_spots == 97


def test_user_adjacency_from_obsp(tmp_path, small_adata):
    from spatialscale.kernel import knn_adjacency

    small_adata.obsp["graph"] = knn_adjacency(small_adata.obsm["spatial"], 6)
    store = spatialscale.ingest(small_adata, tmp_path / "s.zarr", adj_key="graph")
    assert store.kernel_attrs["source"] == "adjacency"
    default = spatialscale.ingest(small_adata, tmp_path / "d.zarr")
    assert store.kernel_token != default.kernel_token


def test_store_in_a_new_folder(tmp_path, small_adata):
    store = spatialscale.ingest(small_adata, tmp_path / "new" / "deeper" / "s.zarr")
    assert store.n_genes > 0 and sorted(p.name for p in (tmp_path / "new" / "deeper").iterdir()) == ["s.zarr"]
    bad = small_adata.copy()
    bad.layers["counts"] = bad.layers["counts"].toarray()
    bad.layers["counts"][0, 0] = -1
    with pytest.raises(InputError, match="negative counts"):
        spatialscale.ingest(bad, tmp_path / "other" / "deeper" / "s.zarr")
    assert not (tmp_path / "other").exists()


def test_existing_store_is_not_overwritten(tmp_path, small_adata):
    first = spatialscale.ingest(small_adata, tmp_path / "s.zarr")
    before = (tmp_path / "s.zarr" / "zarr.json").read_bytes()
    # the same content with the same options: the store is reused as it is, from this process or another
    again = spatialscale.ingest(small_adata.copy(), tmp_path / "s.zarr")
    assert again.content_token == first.content_token
    small_adata.write_h5ad(tmp_path / "in.h5ad")
    code = ("import sys, spatialscale; s = spatialscale.ingest(sys.argv[1], sys.argv[2]); "
            "print(s.meta['source_fingerprint'], s.content_token)")
    runs = [subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.h5ad"), str(tmp_path / "f.zarr")],
                           capture_output=True, text=True, check=True).stdout.split() for _ in range(2)]
    assert runs[0] == runs[1] and runs[0][0] == spatialscale.store.ingest_fingerprint(tmp_path / "in.h5ad")
    assert (tmp_path / "s.zarr" / "zarr.json").read_bytes() == before
    changed = small_adata.copy()
    changed.layers["counts"][3, 3] += 1  # one count more: another input
    for data, opts in ((changed, {}), (small_adata, {"k_neighbors": 6})):
        with pytest.raises(InputError, match="holds an isoform store of another input or other ingest options; "
                                             "pass overwrite=True"):
            spatialscale.ingest(data, tmp_path / "s.zarr", **opts)
    assert (tmp_path / "s.zarr" / "zarr.json").read_bytes() == before
    spatialscale.ingest(small_adata[:, :20].copy(), tmp_path / "s.zarr", overwrite=True, min_counts=0,
                        filter_single_iso_genes=False)
    assert len(spatialscale.open_store(tmp_path / "s.zarr").isoforms) == 20


def _bad(kind: str) -> tuple[ad.AnnData, dict, str]:
    a = make_adata(n=120, n_genes=8, seed=1)
    kw: dict = {}
    if kind == "layer":
        kw["layer"] = "raw"
        msg = "layer 'raw' not found"
    elif kind == "gene_key":
        kw["gene_key"] = "gene_id"
        msg = "no column 'gene_id'"
    elif kind == "spatial_key":
        kw["spatial_key"] = "xy"
        msg = "no coordinates 'xy'"
    elif kind == "nan_coords":
        a.obsm["spatial"][5, 0] = np.nan
        msg = "NaN or infinite coordinates"
    elif kind == "inf_coords":
        a.obsm["spatial"][7, 1] = np.inf
        msg = "NaN or infinite coordinates"
    elif kind == "duplicate_coords":
        a.obsm["spatial"][9] = a.obsm["spatial"][3]
        msg = "sharing coordinates"
    elif kind == "negative":
        x = a.layers["counts"].toarray()
        x[2, 4] = -1
        a.layers["counts"] = sp.csr_matrix(x)
        msg = "negative counts"
    elif kind == "inf_counts":
        x = a.layers["counts"].toarray()
        x[2, 4] = np.inf
        a.layers["counts"] = x
        msg = "NaN or infinite counts"
    elif kind == "nan_counts":
        x = a.layers["counts"].toarray()
        x[0, 0] = np.nan
        a.layers["counts"] = x
        msg = "NaN or infinite counts"
    elif kind == "nothing_left":
        kw["min_counts"] = 10**9
        msg = "no genes left after filtering"
    else:
        raise AssertionError(kind)
    return a, kw, msg


@pytest.mark.parametrize("kind", ["layer", "gene_key", "spatial_key", "nan_coords", "inf_coords",
                                  "duplicate_coords", "negative", "inf_counts", "nan_counts", "nothing_left"])
def test_bad_input_is_named_and_leaves_nothing(tmp_path, kind):
    adata, kw, msg = _bad(kind)
    with pytest.raises(InputError, match=msg):
        spatialscale.ingest(adata, tmp_path / "s.zarr", **kw)
    assert _leftovers(tmp_path) == []


def test_fractional_counts_are_accepted(tmp_path):
    """Non-integer counts (EM estimates) were refused before; now the store keeps them as float64
    (tests/test_fractional.py has the rest)."""
    a = make_adata(n=120, n_genes=8, seed=1)
    x = a.layers["counts"].toarray().astype(np.float64)
    x[2, 4] = 1.5
    a.layers["counts"] = x
    store = spatialscale.ingest(a, tmp_path / "s.zarr", min_counts=0)
    assert store.integer_counts is False
    assert zarr.open_array(str(store.path / "layers" / "counts"), mode="r").dtype == np.float64
    j = int(np.flatnonzero(store.isoforms["source_index"].to_numpy() == 4)[0])
    assert store.read_counts(j, j + 1)[2, 0] == 1.5


def test_shape_mismatch_in_file_is_named(tmp_path, small_adata):
    small_adata.write_h5ad(tmp_path / "in.h5ad")
    with h5py.File(tmp_path / "in.h5ad", "a") as f:
        xy = f["obsm/spatial"][:]
        del f["obsm/spatial"]
        f.create_dataset("obsm/spatial", data=xy[:-5])
    with pytest.raises(InputError, match="expected"):
        spatialscale.ingest(tmp_path / "in.h5ad", tmp_path / "s.zarr")
    assert _leftovers(tmp_path) == ["in.h5ad"]


def test_missing_input_and_incomplete_store(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        spatialscale.ingest(tmp_path / "nope.h5ad", tmp_path / "s.zarr")
    (tmp_path / "broken.zarr").mkdir()
    with pytest.raises(InputError, match="not .*store"):
        spatialscale.open_store(tmp_path / "broken.zarr")


def test_interrupted_ingest_leaves_no_store(tmp_path, small_adata, monkeypatch):
    import zarr

    def boom(*a, **k):
        raise OSError("No space left on device")

    # fails at the very end, after all counts were written to the temporary store
    monkeypatch.setattr(zarr, "consolidate_metadata", boom)
    with pytest.raises(OSError, match="No space"):
        spatialscale.ingest(small_adata, tmp_path / "s.zarr")
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("fmt", ["h5ad", "zarr"])
def test_large_backed_csr_is_scanned_in_row_blocks(tmp_path, small_adata, monkeypatch, fmt):
    """A CSR layer too big for memory is read in row blocks per column block, never whole."""
    import spatialscale.sources as st

    getattr(small_adata, f"write_{fmt}")(tmp_path / f"in.{fmt}")
    monkeypatch.setattr(st, "small_enough", lambda ds, limit=0: False)
    scans: list[int] = []
    real = st.AnnDataSource._scan_csr

    def scan(self, ds, cols, row_block=200_000):
        scans.append(len(cols))
        return real(self, ds, cols, row_block=97)

    monkeypatch.setattr(st.AnnDataSource, "_scan_csr", scan)
    store = spatialscale.ingest(tmp_path / f"in.{fmt}", tmp_path / "s.zarr", block_bytes=small_adata.n_obs * 8 * 16)
    ref = spatialscale.ingest(small_adata, tmp_path / "r.zarr")
    assert len(scans) > 2 and max(scans) <= 16
    np.testing.assert_array_equal(store.read_counts(0, len(store.isoforms)), ref.read_counts(0, len(ref.isoforms)))


def test_metadata_copy_in_root_attributes_and_store_formats(tmp_path, small_adata):
    """Opening reads the JSON copy of uns/spatialscale; stores of an older, newer or unknown format are refused."""
    import json

    from anndata.io import read_elem

    path = tmp_path / "s.zarr"
    store = spatialscale.ingest(small_adata, path)
    root = zarr.open_group(str(path), mode="r")
    assert root.attrs["spatialscale"]["meta"] == json.loads(read_elem(root["uns/spatialscale"]))
    assert json.loads(ad.read_zarr(path).uns["spatialscale"])["n_spots"] == store.n_spots
    assert root.attrs["spatialscale"]["format"] == 2 and len(store.content_token) == 32
    zj = path / "zarr.json"
    original = zj.read_text()
    for fmt, match in ((1, r"earlier spatialscale \(store format 1, without checksums\); re-ingest it: "
                           r"spatialscale ingest <AnnData> .*s\.zarr --overwrite"),
                       (999, r"newer spatialscale \(store format 999; this version .* reads format 2\); upgrade"),
                       ("x", r"unknown store format 'x'")):
        doc = json.loads(original)
        doc["attributes"]["spatialscale"]["format"] = fmt
        zj.write_text(json.dumps(doc))
        with pytest.raises(InputError, match=match):
            spatialscale.open_store(path)
        r = subprocess.run([sys.executable, "-m", "spatialscale.cli", "sv", str(path), "--out", str(tmp_path / "o"),
                            "--scheduler", "threads"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "Traceback" not in r.stderr and "store format" in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()
    zj.write_text(original)
    assert spatialscale.open_store(path).content_token == store.content_token


def test_eigenpairs_at_ingest_are_those_a_glmm_run_computes(tmp_path, small_adata):
    """ingest(eigenpairs=True) keeps the GLMM's eigenpairs (the HSIC power sums from the same decomposition)."""
    late = spatialscale.ingest(small_adata, tmp_path / "late.zarr")
    early = spatialscale.ingest(small_adata, tmp_path / "early.zarr", eigenpairs=True)
    assert early.has_eigenpairs() and not late.has_eigenpairs()
    lam, vec = early.eigenpairs()
    ref_lam, ref_vec = late.ensure_eigenpairs()
    assert vec.shape == (early.n_spots, early.n_spots)
    np.testing.assert_allclose(lam, ref_lam, rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(vec * ref_vec, axis=0)), 1.0, atol=1e-8)
    np.testing.assert_allclose(early.meta["kernel"]["power_sums"], late.meta["kernel"]["power_sums"], rtol=1e-11)
    with pytest.raises(InputError, match="kernel='car'"):
        spatialscale.ingest(small_adata, tmp_path / "r.zarr", eigenpairs=True, kernel="fft")
    assert not (tmp_path / "r.zarr").exists()
