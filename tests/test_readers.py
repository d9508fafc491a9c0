"""Readers of instrument outputs (spatialscale.readers): fixtures written here to each format's published layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse

import spatialscale
from spatialscale.errors import InputError
from spatialscale.readers import detect_format, read_instrument
from spatialscale.store import ingest, is_store

GENES = ["ACTB", "GAPDH", "MYC", "SOX2"]


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spatialscale.cli", *args], capture_output=True, text=True,
                          timeout=300)


def write_10x_h5(path: Path, counts: scipy.sparse.spmatrix, barcodes: list[str], features: dict[str, list]) -> None:
    """A 10x HDF5 feature-barcode matrix of ``counts`` (barcodes x features), stored features x barcodes (CSC)."""
    m = scipy.sparse.csc_matrix(scipy.sparse.csr_matrix(counts).T)  # features x barcodes, one column per barcode
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        g = f.create_group("matrix")
        g["data"] = m.data.astype(np.int32)
        g["indices"] = m.indices.astype(np.int64)
        g["indptr"] = m.indptr.astype(np.int64)
        g["shape"] = np.array(m.shape, dtype=np.int32)
        g["barcodes"] = np.array(barcodes, dtype="S")
        fg = g.create_group("features")
        for key, values in features.items():
            values = np.asarray(values)
            fg[key] = values.astype("S") if values.dtype.kind in "UO" else values
        fg["_all_tag_keys"] = np.array([b"genome"])


def _spots(n_rows: int = 15, n_cols: int = 20) -> pd.DataFrame:
    r, c = np.divmod(np.arange(n_rows * n_cols), n_cols)
    pos = pd.DataFrame({"barcode": [f"AAAC{i:05d}-1" for i in range(len(r))], "in_tissue": ((r + c) % 7 != 0) * 1,
                        "array_row": r, "array_col": 2 * c + r % 2,
                        "pxl_row_in_fullres": 1000 + 90 * r, "pxl_col_in_fullres": 500 + 100 * c + 50 * (r % 2)})
    return pos


def _patterned_counts(rng, xy: np.ndarray, n_genes: int, per_gene: int) -> scipy.sparse.csr_matrix:
    """Poisson counts; the first gene's probe usage follows x (spatially variable)."""
    frac = (xy[:, 0] - xy[:, 0].min()) / np.ptp(xy[:, 0])
    cols = []
    for g in range(n_genes):
        for k in range(per_gene):
            lam = 4.0 + (6.0 * frac if (g == 0 and k == 0) else 0.0) + (6.0 * (1 - frac) if (g == 0 and k == 1) else 0)
            cols.append(rng.poisson(lam + np.zeros(len(xy))))
    return scipy.sparse.csr_matrix(np.stack(cols, axis=1))


@pytest.fixture(scope="module")
def visium(tmp_path_factory) -> tuple[Path, pd.DataFrame, scipy.sparse.csr_matrix, pd.DataFrame]:
    """Space Ranger outs/ of a probe-based assay: probe and gene matrices, tissue positions with a header."""
    rng = np.random.default_rng(0)
    outs = tmp_path_factory.mktemp("visium") / "outs"
    pos = _spots()
    counts = _patterned_counts(rng, pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float), 4, 3)
    # probe ids of a 10x probe set: gene id|gene name|tag; one extra probe Space Ranger filtered out
    ids = [f"ENSG{i:011d}" for i in range(4)]
    probes = pd.DataFrame({"gene_name": np.repeat(GENES, 3), "gene_id": np.repeat(ids, 3)})
    probes["id"] = [f"{gi}|{gn}|{k:07x}" for k, (gn, gi) in enumerate(zip(probes.gene_name, probes.gene_id))]
    probes["filtered_probes"] = 0
    extra = pd.DataFrame({"gene_name": ["ACTB"], "gene_id": ["ENSG00000000000"], "id": ["ENSG00000000000|ACTB|fffffff"],
                          "filtered_probes": [1]})
    probes = pd.concat([probes, extra], ignore_index=True)
    full = scipy.sparse.hstack([counts, scipy.sparse.csr_matrix(rng.poisson(5.0, (len(pos), 1)))]).tocsr()
    # the raw matrix also holds barcodes that are not in the positions file
    raw_bcs = [*pos.barcode, "TTTT00000-1"]
    raw = scipy.sparse.vstack([full, scipy.sparse.csr_matrix(np.ones((1, full.shape[1])))]).tocsr()
    write_10x_h5(outs / "raw_probe_bc_matrix.h5", raw, raw_bcs, {
        "id": probes.id, "name": probes.gene_name, "gene_id": probes.gene_id, "gene_name": probes.gene_name,
        "feature_type": ["Gene Expression"] * len(probes), "genome": ["GRCh38"] * len(probes),
        "filtered_probes": probes.filtered_probes.to_numpy(np.int8)})
    gene_counts = scipy.sparse.csr_matrix(np.add.reduceat(counts.toarray(), [0, 3, 6, 9], axis=1))
    write_10x_h5(outs / "filtered_feature_bc_matrix.h5", gene_counts, list(pos.barcode), {
        "id": [f"ENSG{i:011d}" for i in range(4)], "name": GENES, "feature_type": ["Gene Expression"] * 4,
        "genome": ["GRCh38"] * 4})
    (outs / "spatial").mkdir()
    pos.to_csv(outs / "spatial" / "tissue_positions.csv", index=False)
    (outs / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"tissue_hires_scalef": 0.25, "tissue_lowres_scalef": 0.05, "spot_diameter_fullres": 89.4,
         "fiducial_diameter_fullres": 144.4}))
    return outs, pos, counts, probes


def test_visium_probe_matrix_groups_probes_by_gene_and_drops_spots_outside_tissue(visium):
    outs, pos, counts, probes = visium
    a = read_instrument(outs)
    inside = pos.in_tissue.to_numpy() == 1
    assert a.n_obs == inside.sum() and list(a.obs_names) == list(pos.barcode[inside])
    assert a.n_vars == 12 and "fffffff" not in "".join(a.var_names)  # Space Ranger's filtered probe dropped
    assert list(a.var["gene_symbol"]) == list(np.repeat(GENES, 3))
    assert list(a.var_names) == list(probes.id[:12])
    assert scipy.sparse.issparse(a.layers["counts"])
    np.testing.assert_array_equal(a.layers["counts"].toarray(), counts.toarray()[inside])
    np.testing.assert_array_equal(a.obsm["spatial"], pos.loc[inside, ["pxl_col_in_fullres", "pxl_row_in_fullres"]])
    for col in ("in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"):
        np.testing.assert_array_equal(a.obs[col], pos.loc[inside, col])
    hires = read_instrument(outs, "visium", {"coordinates": "hires"})
    np.testing.assert_allclose(hires.obsm["spatial"], a.obsm["spatial"] * 0.25)
    everything = read_instrument(outs, options={"in_tissue_only": False})
    assert everything.n_obs == len(pos)  # every barcode with a position (not the one without)
    gene = read_instrument(outs, options={"matrix": "gene"})
    assert list(gene.var["gene_symbol"]) == GENES and gene.n_obs == inside.sum()


def test_visium_probe_folder_ingests_and_runs_sv_end_to_end(visium, tmp_path):
    outs = visium[0]
    assert detect_format(outs) == "visium" and detect_format(outs.parent) == "visium"  # run folder: its outs/
    assert detect_format(outs / "raw_probe_bc_matrix.h5") == "visium"
    store = ingest(outs, tmp_path / "s.zarr")
    assert store.n_genes == 4 and store.n_spots == int((visium[1].in_tissue == 1).sum())
    sv = spatialscale.sv_test(tmp_path / "s.zarr", progress=False)
    assert sv.sizes["gene"] == 4 and np.isfinite(sv["sv_pvalue"].values).all()
    assert sv["sv_pvalue"].sel(gene="ACTB").item() < 1e-3  # the probe usage written to follow x
    direct = spatialscale.sv_test(outs, progress=False)  # a folder wherever an AnnData path is taken
    np.testing.assert_array_equal(direct["sv_pvalue"].values, sv["sv_pvalue"].values)


def test_visium_incomplete_folder_is_named_exit_2_nothing_written(visium, tmp_path):
    folder = tmp_path / "outs"
    folder.mkdir()
    (folder / "raw_probe_bc_matrix.h5").write_bytes((visium[0] / "raw_probe_bc_matrix.h5").read_bytes())
    with pytest.raises(InputError, match="spatial/tissue_positions.csv"):
        ingest(folder, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()
    r = cli("ingest", str(folder), str(tmp_path / "c.zarr"), "--no-progress")
    assert r.returncode == 2 and "spatial/tissue_positions.csv" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c.zarr").exists()


def test_visium_positions_without_header(visium, tmp_path):
    outs, pos = tmp_path / "outs", visium[1]
    (outs / "spatial").mkdir(parents=True)
    (outs / "filtered_feature_bc_matrix.h5").write_bytes((visium[0] / "filtered_feature_bc_matrix.h5").read_bytes())
    pos.to_csv(outs / "spatial" / "tissue_positions_list.csv", index=False, header=False)
    a = read_instrument(outs)
    assert a.n_obs == (pos.in_tissue == 1).sum() and list(a.var["gene_symbol"]) == GENES
    np.testing.assert_array_equal(a.obs["array_col"], pos.array_col[pos.in_tissue == 1])


def _write_hd_bin(folder: Path, rng, n_rows: int, n_cols: int, size: int) -> tuple[pd.DataFrame, np.ndarray]:
    r, c = np.divmod(np.arange(n_rows * n_cols), n_cols)
    pos = pd.DataFrame({"barcode": [f"s_{size:03d}um_{a:05d}_{b:05d}-1" for a, b in zip(r, c)],
                        "in_tissue": (r > 0).astype(np.int32), "array_row": r, "array_col": c,
                        "pxl_row_in_fullres": 10.0 * size * r, "pxl_col_in_fullres": 10.0 * size * c})
    counts = rng.poisson(3.0, (len(pos), 4))
    write_10x_h5(folder / "filtered_feature_bc_matrix.h5", scipy.sparse.csr_matrix(counts), list(pos.barcode), {
        "id": [f"ENSG{i:011d}" for i in range(4)], "name": GENES, "feature_type": ["Gene Expression"] * 4,
        "genome": ["GRCh38"] * 4})
    (folder / "spatial").mkdir()
    pos.to_parquet(folder / "spatial" / "tissue_positions.parquet")
    (folder / "spatial" / "scalefactors_json.json").write_text(json.dumps(
        {"bin_size_um": float(size), "microns_per_pixel": 0.27, "tissue_hires_scalef": 0.1}))
    return pos, counts


def test_visium_hd_bins_default_16um_and_bin_size_option(tmp_path):
    rng = np.random.default_rng(1)
    outs = tmp_path / "outs"
    p16, c16 = _write_hd_bin(outs / "binned_outputs" / "square_016um", rng, 12, 20, 16)
    p8, c8 = _write_hd_bin(outs / "binned_outputs" / "square_008um", rng, 24, 40, 8)
    assert detect_format(outs) == "visium-hd"
    a = read_instrument(outs)
    keep = p16.in_tissue.to_numpy() == 1
    assert a.n_obs == keep.sum() and a.uns["spatialscale_reader"]["format"] == "visium-hd"
    np.testing.assert_array_equal(a.layers["counts"].toarray(), c16[keep])
    np.testing.assert_array_equal(a.obs[["array_row", "array_col"]], p16.loc[keep, ["array_row", "array_col"]])
    b = read_instrument(outs, options={"bin_size": 8})
    np.testing.assert_array_equal(b.layers["counts"].toarray(), c8[p8.in_tissue.to_numpy() == 1])
    assert detect_format(outs / "binned_outputs" / "square_008um") == "visium-hd"
    with pytest.raises(InputError, match="square_002um.*8, 16"):
        read_instrument(outs, options={"bin_size": 2})
    with pytest.raises(InputError, match="unknown visium-hd reader option.*'bin'"):
        read_instrument(outs, options={"bin": 8})


@pytest.fixture(scope="module")
def xenium(tmp_path_factory) -> tuple[Path, pd.DataFrame, np.ndarray, pd.DataFrame]:
    """Xenium outs/: cells.parquet, transcripts.parquet (one row per transcript), cell_feature_matrix.h5."""
    rng = np.random.default_rng(2)
    folder = tmp_path_factory.mktemp("xenium")
    n = 200
    cells = pd.DataFrame({"cell_id": [f"aaab{i:04d}-1" for i in range(n)], "x_centroid": rng.uniform(0, 500, n),
                          "y_centroid": rng.uniform(0, 500, n), "transcript_counts": 0, "cell_area": 50.0})
    codewords = pd.DataFrame({"codeword_index": [3, 7, 11, 12, 20, 21, 22, 30, 31],
                              "feature_name": ["ACTB", "ACTB", "GAPDH", "GAPDH", "MYC", "MYC", "MYC", "SOX2", "SOX2"]})
    truth = rng.poisson(1.5, (n, len(codewords)))
    rows = [(cells.cell_id[i], codewords.feature_name[j], codewords.codeword_index[j], 30.0)
            for i in range(n) for j in range(len(codewords)) for _ in range(truth[i, j])]
    noise = [("UNASSIGNED", "ACTB", 3, 35.0)] * 40 + [(cells.cell_id[0], "NegControlProbe_00001", 50, 35.0)] * 5 \
        + [(cells.cell_id[1], "BLANK_0006", 60, 35.0)] * 5 + [(cells.cell_id[2], "MYC", 20, 10.0)] * 7
    tx = pd.DataFrame(rows + noise, columns=["cell_id", "feature_name", "codeword_index", "qv"])
    tx = tx.sample(frac=1.0, random_state=0).reset_index(drop=True)
    tx["transcript_id"] = np.arange(len(tx), dtype=np.uint64)
    tx["x_location"] = rng.uniform(0, 500, len(tx))
    tx["y_location"] = rng.uniform(0, 500, len(tx))
    tx.to_parquet(folder / "transcripts.parquet", row_group_size=500)
    cells.to_parquet(folder / "cells.parquet")
    genes = np.stack([truth[:, codewords.feature_name == g].sum(1) for g in GENES], axis=1)
    controls = np.zeros((n, 1), dtype=int)
    write_10x_h5(folder / "cell_feature_matrix.h5", scipy.sparse.csr_matrix(np.hstack([genes, controls])),
                 list(cells.cell_id), {"id": [*GENES, "NegControlProbe_00001"],
                                       "name": [*GENES, "NegControlProbe_00001"],
                                       "feature_type": ["Gene Expression"] * 4 + ["Negative Control Probe"],
                                       "genome": ["Unknown"] * 5})
    return folder, cells, truth, codewords


def test_xenium_codewords_counted_per_cell_and_grouped_by_gene(xenium):
    folder, cells, truth, codewords = xenium
    assert detect_format(folder) == "xenium"
    a = read_instrument(folder, options={"batch_rows": 700})  # several record batches
    assert list(a.obs_names) == list(cells.cell_id)
    assert list(a.var["gene_symbol"]) == list(codewords.feature_name)  # controls, unassigned and low qv dropped
    assert list(a.var["codeword_index"]) == list(codewords.codeword_index)
    np.testing.assert_array_equal(a.layers["counts"].toarray(), truth)
    np.testing.assert_array_equal(a.obsm["spatial"], cells[["x_centroid", "y_centroid"]])
    assert "cell_area" in a.obs
    lowq = read_instrument(folder, "xenium", {"min_qv": 0})
    assert lowq.layers["counts"].sum() == truth.sum() + 7
    gene = read_instrument(folder, options={"counts": "gene"})
    assert list(gene.var["gene_symbol"]) == GENES
    np.testing.assert_array_equal(gene.layers["counts"].toarray(),
                                  np.stack([truth[:, codewords.feature_name == g].sum(1) for g in GENES], axis=1))


def test_xenium_without_cells_names_it(xenium, tmp_path):
    (tmp_path / "transcripts.parquet").write_bytes((xenium[0] / "transcripts.parquet").read_bytes())
    with pytest.raises(InputError, match="cells.parquet"):
        ingest(tmp_path, tmp_path / "s.zarr")
    assert not (tmp_path / "s.zarr").exists()


@pytest.fixture(scope="module")
def long_read(tmp_path_factory) -> tuple[Path, pd.DataFrame, scipy.sparse.csr_matrix, pd.DataFrame]:
    """matrix.mtx (isoforms x barcodes, as 10x MEX), barcodes.tsv, features.tsv, coordinates.csv, isoforms.csv."""
    rng = np.random.default_rng(3)
    folder = tmp_path_factory.mktemp("longread")
    r, c = np.divmod(np.arange(300), 20)
    coords = pd.DataFrame({"barcode": [f"BC{i:04d}" for i in range(300)], "x": c * 10.0, "y": r * 10.0,
                           "region": np.where(c < 10, "left", "right")})
    counts = _patterned_counts(rng, coords[["x", "y"]].to_numpy(), 4, 2)
    isoforms = pd.DataFrame({"isoform": [f"{g}-20{k}" for g in GENES for k in range(2)], "gene": np.repeat(GENES, 2)})
    scipy.io.mmwrite(str(folder / "matrix.mtx"), counts.T.tocoo())
    pd.Series([*coords.barcode]).to_csv(folder / "barcodes.tsv", index=False, header=False)
    pd.Series([*isoforms.isoform]).to_csv(folder / "features.tsv", index=False, header=False)
    coords.iloc[:290].to_csv(folder / "coordinates.csv", index=False)  # ten barcodes without coordinates
    isoforms.to_csv(folder / "isoforms.csv", index=False)
    return folder, coords, counts, isoforms


def test_long_read_folder_reads_ingests_and_runs_sv(long_read, tmp_path):
    folder, coords, counts, isoforms = long_read
    assert detect_format(folder) == "long-read"
    a = read_instrument(folder)
    assert list(a.obs_names) == list(coords.barcode[:290]) and list(a.var_names) == list(isoforms.isoform)
    assert list(a.var["gene_symbol"]) == list(isoforms.gene)
    np.testing.assert_array_equal(a.layers["counts"].toarray(), counts.toarray()[:290])
    np.testing.assert_array_equal(a.obsm["spatial"], coords.loc[:289, ["x", "y"]])
    assert list(a.obs["region"]) == list(coords.region[:290])
    r = cli("ingest", str(folder), str(tmp_path / "s.zarr"), "--no-progress")
    assert r.returncode == 0, r.stderr
    sv = spatialscale.sv_test(tmp_path / "s.zarr", progress=False)
    assert sv.sizes["gene"] == 4 and sv["sv_pvalue"].sel(gene="ACTB").item() < 1e-3


def test_long_read_renamed_files_and_columns_with_format_forced(long_read, tmp_path):
    folder, coords, counts, isoforms = long_read
    own = tmp_path / "run"
    own.mkdir()
    scipy.io.mmwrite(str(own / "iso_counts.mtx"), counts.tocoo())  # barcodes x isoforms this time
    pd.Series([*coords.barcode]).to_csv(own / "cells.txt", index=False, header=False)
    pd.Series([*isoforms.isoform]).to_csv(own / "tx.txt", index=False, header=False)
    coords.rename(columns={"barcode": "spot", "x": "X", "y": "Y"}).to_csv(own / "spots.tsv", sep="\t", index=False)
    isoforms.rename(columns={"isoform": "transcript_id", "gene": "gene_name"}).to_csv(own / "t2g.csv", index=False)
    assert detect_format(own) is None  # nothing it knows by name: --format names the reader
    opts = ["matrix=iso_counts.mtx", "barcodes=cells.txt", "features=tx.txt", "coordinates=spots.tsv",
            "isoforms=t2g.csv", "barcode_col=spot", "x_col=X", "y_col=Y", "isoform_col=transcript_id",
            "gene_col=gene_name"]
    args = [a for o in opts for a in ("--reader", o)]
    r = cli("ingest", str(own), str(tmp_path / "s.zarr"), "--format", "long-read", *args, "--no-progress")
    assert r.returncode == 0, r.stderr
    reference = ingest(folder, tmp_path / "ref.zarr")
    from spatialscale.store import open_store

    got = open_store(tmp_path / "s.zarr")
    assert got.n_spots == 300 and reference.n_spots == 290 and got.n_genes == reference.n_genes == 4
    with pytest.raises(InputError, match="matrix.mtx"):  # the default names are not there
        ingest(own, tmp_path / "t.zarr", format="long-read")
    assert not (tmp_path / "t.zarr").exists()


def test_format_forced_and_anndata_inputs_unchanged(long_read, visium, tmp_path):
    # --format visium on a long-read folder reads it as Space Ranger output, and says what is missing
    with pytest.raises(InputError, match="filtered_probe_bc_matrix.h5"):
        ingest(long_read[0], tmp_path / "s.zarr", format="visium")
    with pytest.raises(InputError, match="unknown format 'cosmx'"):
        ingest(long_read[0], tmp_path / "s.zarr", format="cosmx")
    # an .h5ad is read as before (no detection), with the fingerprint it had: format / reader are not settings
    from spatialscale.store import ingest_fingerprint, ingest_settings

    a = read_instrument(long_read[0])
    a.write_h5ad(tmp_path / "a.h5ad")
    assert detect_format(tmp_path / "a.h5ad") is None
    assert "format" not in ingest_settings() and "reader" not in ingest_settings()
    assert ingest_fingerprint(tmp_path / "a.h5ad") == ingest_fingerprint(tmp_path / "a.h5ad", format="anndata")
    # a folder: the AnnData its reader gives (read afresh: writing an h5ad turns a's strings into categoricals)
    assert ingest_fingerprint(long_read[0]) == ingest_fingerprint(read_instrument(long_read[0]))
    with pytest.raises(InputError, match="reader="):
        ingest(tmp_path / "a.h5ad", tmp_path / "s.zarr", reader={"bin_size": 8})
    assert not (tmp_path / "s.zarr").exists() and not is_store(tmp_path / "s.zarr")


def test_cohort_manifest_of_instrument_folders(visium, long_read, tmp_path):
    from spatialscale.cohort import ingest_cohort

    manifest = pd.DataFrame({"section": ["vis", "lr"], "path": [str(visium[0]), str(long_read[0])]})
    manifest.to_csv(tmp_path / "m.csv", index=False)
    cohort = ingest_cohort(tmp_path / "m.csv", tmp_path / "cohort", progress=False)
    assert sorted(cohort.section_ids) == ["lr", "vis"]
    assert cohort.store("vis").n_spots == int((visium[1].in_tissue == 1).sum())
    assert cohort.store("lr").n_spots == 290


def test_readers_sit_with_the_data_layer():
    """The readers import only spatialscale.errors and each other (nothing above the data layer)."""
    import ast

    root = Path(spatialscale.__file__).parent / "readers"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("spatialscale"):
                assert node.module == "spatialscale.errors" or node.module.startswith("spatialscale.readers"), \
                    f"{path.name} imports {node.module}"


def test_visium_hd_probe_bins_ingest_as_a_raster(tmp_path):
    """HD bins keep array_row / array_col: a probe-level bin folder is tested with the raster (fft) kernel."""
    rng = np.random.default_rng(5)
    outs = tmp_path / "outs"
    pos, _ = _write_hd_bin(outs / "binned_outputs" / "square_016um", rng, 12, 20, 16)
    xy = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    probe = _patterned_counts(rng, xy, 3, 2)
    ids = [f"ENSG{g:011d}|{GENES[g]}|{k:07x}" for g in range(3) for k in range(2)]
    write_10x_h5(outs / "binned_outputs" / "square_016um" / "filtered_probe_bc_matrix.h5", probe, list(pos.barcode),
                 {"id": ids, "name": [i.split("|")[1] for i in ids], "feature_type": ["Gene Expression"] * 6,
                  "genome": ["GRCh38"] * 6})
    sv = spatialscale.sv_test(outs, kernel="fft", reader={"bin_size": 16}, progress=False)
    assert list(sv["gene"].values) == GENES[:3] and sv["sv_pvalue"].sel(gene="ACTB").item() < 1e-3
