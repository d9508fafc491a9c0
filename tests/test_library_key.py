"""Cohorts from one multi-section AnnData (squidpy's ``library_key``): sections, metadata, equality, errors."""

from __future__ import annotations

import json
import os
import shutil

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from conftest import make_adata

import spatialscale
from spatialscale import InputError
from spatialscale.cli import main

#: library_id -> (spots, geometry, seed, condition, donor, depth); "B 1" is no folder name: it becomes "B_1"
SECTIONS = {"s2": (60, "grid", 1, "ctrl", "d1", 3), "s10": (70, "hex", 2, "ko", "d1", 4),
            "B 1": (50, "random", 3, "ko", "d2", 5)}


def _multi() -> ad.AnnData:
    """Three sections in one AnnData, as squidpy keeps them: ``obs["library_id"]`` (categories not sorted)."""
    parts = {lib: make_adata(n, 8, geometry=geo, seed=seed) for lib, (n, geo, seed, *_) in SECTIONS.items()}
    adata = ad.concat(parts, label="library_id", index_unique="-", merge="same")
    lib = adata.obs["library_id"].astype(str)
    for j, name in enumerate(("condition", "donor", "depth")):
        adata.obs[name] = lib.map({k: v[3 + j] for k, v in SECTIONS.items()}).to_numpy()
    adata.obs["section"] = "sec-" + lib  # a column named like the records' own field: kept as obs_section
    adata.obs["qc"] = np.arange(adata.n_obs, dtype=float)  # varies within sections: stays in the stores' obs
    return adata


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """The AnnData, its .h5ad, and a manifest of the same sections written one file each."""
    root = tmp_path_factory.mktemp("library")
    adata = _multi()
    adata.write_h5ad(root / "multi.h5ad")
    rows = []
    for lib, (*_, condition, donor, _depth) in SECTIONS.items():
        sid = lib.replace(" ", "_")
        adata[(adata.obs["library_id"] == lib).to_numpy()].copy().write_h5ad(root / f"{sid}.h5ad")
        rows.append({"section": sid, "path": str(root / f"{sid}.h5ad"), "condition": condition, "donor": donor})
    return adata, root, pd.DataFrame(rows)


def _stamps(co) -> dict[str, int]:
    return {p.name: os.stat(p / "zarr.json").st_mtime_ns for p in sorted((co / "sections").iterdir())}


@pytest.fixture(scope="module")
def cohorts(multi, tmp_path_factory):
    """The cohort of the in-memory AnnData (by library_id) and the cohort of its per-section files."""
    adata, _, manifest = multi
    root = tmp_path_factory.mktemp("cohorts")
    by_key = spatialscale.ingest_cohort(adata, root / "co", library_key="library_id", scheduler="threads",
                                        progress=False)
    return by_key, spatialscale.ingest_cohort(manifest, root / "files", scheduler="threads", progress=False)


def test_sections_by_library_with_constant_columns_as_metadata_equal_the_per_file_cohort(multi, cohorts):
    adata = multi[0]
    cohort, per_file = cohorts
    assert cohort.section_ids == ["s2", "s10", "B_1"]  # category order, "B 1" made a folder name
    table = cohort.sections
    assert list(table["library_id"]) == ["s2", "s10", "B 1"]  # the original values
    assert list(table["condition"]) == ["ctrl", "ko", "ko"] and list(table["donor"]) == ["d1", "d1", "d2"]
    assert list(table["depth"]) == [3, 4, 5] and list(table["obs_section"]) == ["sec-s2", "sec-s10", "sec-B 1"]
    assert list(table["n_spots"]) == [60, 70, 50] and list(table["path"]) == ["", "", ""]
    assert "region" not in table.columns and "qc" not in table.columns  # vary within sections
    # each section keeps its own coordinates, and its varying columns in its store's obs
    b1 = adata[(adata.obs["library_id"] == "B 1").to_numpy()]
    np.testing.assert_array_equal(cohort.store("B_1").coords(), b1.obsm["spatial"])
    assert cohort.store("B_1").obs()["qc"].tolist() == b1.obs["qc"].tolist()

    ds = spatialscale.sv_test(cohort, group_by="condition", scheduler="threads", progress=False)
    ref = spatialscale.sv_test(per_file, group_by="condition", scheduler="threads", progress=False)
    assert list(ds["section"].values) == list(ref["section"].values) and ds.sizes["gene"] == ref.sizes["gene"] == 5
    for v in ("sv_statistic", "sv_pvalue", "sv_pvalue_adj", "combined_pvalue", "group_combined_pvalue"):
        np.testing.assert_array_equal(ds[v].values, ref[v].values)
    assert list(ds["group"].values) == ["ctrl", "ko"] and list(ds["library_id"].values) == ["s2", "s10", "B 1"]
    assert np.isfinite(ds["sv_pvalue"].values).all() and ds["n_sections_tested"].values.tolist() == [3] * 5


def test_h5ad_and_zarr_paths_the_cli_and_reruns(multi, cohorts, tmp_path, client, capsys):
    adata, root, _ = multi
    assert main(["cohort", "ingest", str(root / "multi.h5ad"), str(tmp_path / "h5"), "--library-key", "library_id",
                 "--scheduler", "threads", "--no-progress"]) == 0
    assert "cohort of 3 section(s)" in capsys.readouterr().out
    h5 = spatialscale.open_cohort(tmp_path / "h5")
    assert h5.section_ids == ["s2", "s10", "B_1"] and set(h5.sections["path"]) == {str(root / "multi.h5ad")}
    stamps = _stamps(tmp_path / "h5")
    # a re-run (here from Python: the same options) reads obs and var only and ingests nothing
    spatialscale.ingest_cohort(root / "multi.h5ad", tmp_path / "h5", library_key="library_id", scheduler="threads",
                               progress=False)
    assert _stamps(tmp_path / "h5") == stamps
    # an AnnData zarr, ingested on a cluster (each worker gets its section's rows): the same stores
    adata.write_zarr(tmp_path / "multi.zarr")
    zr = spatialscale.ingest_cohort(tmp_path / "multi.zarr", tmp_path / "zr", library_key="library_id",
                                    client=client, progress=False)
    for sid in h5.section_ids:
        a, b, c = h5.store(sid), zr.store(sid), cohorts[0].store(sid)
        np.testing.assert_array_equal(a.read_counts(0, a.meta["n_isoforms"]), b.read_counts(0, b.meta["n_isoforms"]))
        np.testing.assert_array_equal(a.read_counts(0, a.meta["n_isoforms"]), c.read_counts(0, c.meta["n_isoforms"]))
        np.testing.assert_allclose(a.kernel_attrs["power_sums"], b.kernel_attrs["power_sums"], rtol=1e-12)
    # in memory, a changed section is the only one ingested again (its content token changed)
    co = tmp_path / "mem"
    shutil.copytree(cohorts[0].path, co)
    before = _stamps(co)
    changed = adata.copy()
    changed.obs.loc[(changed.obs["library_id"] == "B 1").to_numpy(), "qc"] += 0.5  # section B 1's obs only
    again = spatialscale.ingest_cohort(changed, co, library_key="library_id", scheduler="threads", progress=False)
    after = _stamps(co)
    assert [k for k in before if before[k] != after[k]] == ["B_1.zarr"]
    assert again.store("B_1").obs()["qc"].iloc[0] == changed.obs["qc"].iloc[130] == 130.5


def test_bad_inputs_are_one_line_and_write_nothing(multi, tmp_path, capsys):
    adata, root, manifest = multi
    out = tmp_path / "co"
    assert main(["cohort", "ingest", str(root / "multi.h5ad"), str(out), "--library-key", "sample",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no column 'sample' (library_key)" in err and "'library_id'" in err
    small = _multi()[:-45]  # section "B 1" keeps 5 of its 50 spots
    with pytest.raises(InputError, match=r"^section 'B_1' \(library_id='B 1'\) has 5 spot\(s\); a section needs at "
                                         r"least 10 .*isin\(\['B 1'\]\)"):
        spatialscale.ingest_cohort(small, out, library_key="library_id", progress=False)
    clash = _multi()
    clash.obs["library_id"] = clash.obs["library_id"].cat.rename_categories({"s10": "B_1"})
    with pytest.raises(InputError, match="values 'B_1' and 'B 1' both give the section id 'B_1'"):
        spatialscale.ingest_cohort(clash, out, library_key="library_id", progress=False)
    with pytest.raises(InputError, match=r"layer 'raw' not found .*\['counts'\]"):
        spatialscale.ingest_cohort(adata, out, library_key="library_id", layer="raw", progress=False)
    with pytest.raises(InputError, match="library_key= \\(--library-key\\)"):
        spatialscale.ingest_cohort(root / "multi.h5ad", out, progress=False)
    with pytest.raises(InputError, match="not to a manifest"):
        spatialscale.ingest_cohort(manifest, out, library_key="library_id", progress=False)
    assert not out.exists()


def test_a_section_with_nothing_left_is_named_and_the_others_are_kept(tmp_path):
    parts = {"ok": make_adata(60, 8, seed=1), "thin": make_adata(60, 8, depth=0.01, seed=2)}
    adata = ad.concat(parts, label="library_id", index_unique="-", merge="same")
    with pytest.raises(InputError, match=r"1 of 2 section\(s\) failed: section 'thin' \(<AnnData>\[library_id="
                                         r"'thin'\]: no genes left after filtering"):
        spatialscale.ingest_cohort(adata, tmp_path / "co", library_key="library_id", scheduler="threads",
                                   progress=False)
    kept = spatialscale.open_cohort(tmp_path / "co")
    assert kept.section_ids == ["ok"] and kept.store("ok").n_spots == 60
    assert sorted(p.name for p in (tmp_path / "co" / "sections").iterdir()) == ["ok.zarr"]
    assert json.loads((tmp_path / "co" / "cohort.json").read_text())["sections"][0]["library_id"] == "ok"
