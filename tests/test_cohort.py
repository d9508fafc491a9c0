"""Cohorts: a manifest of sections ingested in parallel, bad sections named, re-runs ingest only what is missing."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import spatialscale
from spatialscale import InputError
from spatialscale.cli import main
from spatialscale.simulate import simulate_section


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    for i, (n, geometry) in enumerate([(120, "grid"), (150, "hex"), (100, "random")]):
        simulate_section(n, 8, n_sv=2, geometry=geometry, seed=10 + i).write_h5ad(root / f"s{i}.h5ad")
    return root


def _manifest(root, rows, name="manifest.csv", sep=","):
    lines = [sep.join(["section", "path", "donor"])] + [sep.join(r) for r in rows]
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def test_manifest_sections_are_ingested_in_parallel_and_reopened(inputs, tmp_path, client):
    man = _manifest(inputs, [("A1", "s0.h5ad", "d1"), ("A2", "s1.h5ad", "d1"), ("B1", "s2.h5ad", "d2")],
                    name="m.tsv", sep="\t")
    cohort = spatialscale.ingest_cohort(man, tmp_path / "co", client=client, progress=False)
    assert cohort.section_ids == ["A1", "A2", "B1"]
    assert list(cohort.sections["donor"]) == ["d1", "d1", "d2"]
    assert [cohort.store(s).n_spots for s in cohort.section_ids] == [120, 150, 100]
    # each section's store equals a single-section ingest of the same file
    single = spatialscale.ingest(inputs / "s1.h5ad", tmp_path / "single.zarr")
    # (ingested in a worker process with one BLAS thread: power sums agree to rounding, not bit for bit)
    np.testing.assert_allclose(cohort.store("A2").kernel_attrs["power_sums"], single.kernel_attrs["power_sums"],
                               rtol=1e-12)
    assert (cohort.store("A2").precision() != single.precision()).nnz == 0
    np.testing.assert_array_equal(cohort.store("A2").read_counts(0, 4), single.read_counts(0, 4))
    again = spatialscale.open_cohort(tmp_path / "co")
    assert again.section_ids == cohort.section_ids


def test_a_bad_section_is_named_the_others_kept_and_a_rerun_ingests_only_it(inputs, tmp_path):
    man = _manifest(inputs, [("A1", "s0.h5ad", "d1"), ("A2", "missing.h5ad", "d1"), ("B1", "s2.h5ad", "d2")])
    with pytest.raises(InputError, match=r"1 of 3 section\(s\) failed: section 'A2' \(.*missing.h5ad: input does "
                                         r"not exist\)"):
        spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False)
    kept = spatialscale.open_cohort(tmp_path / "co")
    assert kept.section_ids == ["A1", "B1"]
    stamp = {s: os.stat(tmp_path / "co" / "sections" / f"{s}.zarr" / "zarr.json").st_mtime_ns for s in ("A1", "B1")}
    man = _manifest(inputs, [("A1", "s0.h5ad", "d1"), ("A2", "s1.h5ad", "d1"), ("B1", "s2.h5ad", "d2")])
    cohort = spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False)
    assert cohort.section_ids == ["A1", "A2", "B1"]
    assert {s: os.stat(tmp_path / "co" / "sections" / f"{s}.zarr" / "zarr.json").st_mtime_ns
            for s in ("A1", "B1")} == stamp  # untouched
    # a section whose data are bad (too few spots) is named with its problem
    simulate_section(6, 3, n_sv=1).write_h5ad(inputs / "tiny.h5ad")
    man = _manifest(inputs, [("A1", "s0.h5ad", "d1"), ("T", "tiny.h5ad", "d3")])
    with pytest.raises(InputError, match=r"section 'T' \(.*tiny.h5ad: the input has 6 spot\(s\)"):
        spatialscale.ingest_cohort(man, tmp_path / "co2", scheduler="threads", progress=False)


@pytest.mark.parametrize(("rows", "header", "words"), [
    ([("A", "s0.h5ad"), ("A", "s1.h5ad")], "section,path", "appear more than once"),
    ([("A", "s0.h5ad")], "section,file", "no column(s) ['path']"),
    ([("a b", "s0.h5ad")], "section,path", "characters other than"),
    ([], "section,path", "no sections"),
])
def test_bad_manifests_write_nothing(inputs, tmp_path, rows, header, words):
    man = tmp_path / "m.csv"
    man.write_text("\n".join([header] + [",".join(r) for r in rows]) + "\n")
    with pytest.raises(InputError) as info:
        spatialscale.ingest_cohort(man, tmp_path / "co", progress=False)
    assert words in str(info.value)
    assert not (tmp_path / "co").exists()


def test_cli_cohort_ingest(inputs, tmp_path, capsys):
    man = _manifest(inputs, [("A1", "s0.h5ad", "d1"), ("B1", "s2.h5ad", "d2")])
    assert main(["cohort", "ingest", str(man), str(tmp_path / "co"), "--scheduler", "threads", "--no-progress"]) == 0
    assert "cohort of 2 section(s)" in capsys.readouterr().out
    meta = json.loads((tmp_path / "co" / "cohort.json").read_text())
    assert [s["section"] for s in meta["sections"]] == ["A1", "B1"] and meta["spatialscale_cohort"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    assert main(["cohort", "ingest", str(man), str(tmp_path / "mine"), "--no-progress"]) == 2
    assert "not a cohort folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
