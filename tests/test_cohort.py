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
    # metadata changed in the manifest (inputs unchanged): recorded, nothing ingested again
    man = _manifest(inputs, [("A1", "s0.h5ad", "d9"), ("A2", "s1.h5ad", "d1"), ("B1", "s2.h5ad", "d2")])
    cohort = spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False)
    assert list(cohort.sections["donor"]) == ["d9", "d1", "d2"]
    assert {s: os.stat(tmp_path / "co" / "sections" / f"{s}.zarr" / "zarr.json").st_mtime_ns
            for s in ("A1", "B1")} == stamp
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


# ------------------------------------------------------------------ one graph over the sections
@pytest.fixture(scope="module")
def cohort(inputs, tmp_path_factory):
    man = _manifest(inputs, [("A1", "s0.h5ad", "d1"), ("A2", "s1.h5ad", "d1"), ("B1", "s2.h5ad", "d2")],
                    name="run.csv")
    return spatialscale.ingest_cohort(man, tmp_path_factory.mktemp("runs") / "co", scheduler="threads",
                                      progress=False)


def test_each_section_equals_its_own_run_and_evidence_is_combined(cohort, client):
    from spatialscale.stats.combine import cauchy_combine

    ds = spatialscale.sv_test(cohort, client=client, batch_size=2, progress=False)
    assert list(ds["section"].values) == ["A1", "A2", "B1"] and list(ds["donor"].values) == ["d1", "d1", "d2"]
    for sid in cohort.section_ids:
        own = spatialscale.sv_test(cohort.store(sid), scheduler="threads", progress=False)
        got = ds.sel(section=sid, gene=own["gene"].values)
        for v in ("sv_statistic", "sv_pvalue", "sv_pvalue_adj"):
            # other batches (a cohort's sections take fewer, larger ones) round differently in the last bits
            np.testing.assert_allclose(got[v].values, own[v].values, rtol=1e-10, atol=0)
    p = ds["sv_pvalue"].transpose("gene", "section").values
    np.testing.assert_array_equal(ds["combined_pvalue"].values, cauchy_combine(p))
    np.testing.assert_array_equal(ds["n_sections_tested"].values, np.isfinite(p).sum(1))
    assert ds.attrs["combine"] == "cauchy" and ds.attrs["n_sections"] == 3


def test_a_cohort_of_one_section_gives_the_single_section_results(inputs, tmp_path):
    man = _manifest(inputs, [("only", "s1.h5ad", "d1")], name="one.csv")
    one = spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False)
    ds = spatialscale.sv_test(one, combine="fisher", scheduler="threads", progress=False)
    own = spatialscale.sv_test(one.store("only"), scheduler="threads", progress=False)
    for v in ("sv_statistic", "sv_pvalue", "sv_pvalue_adj"):
        np.testing.assert_array_equal(ds[v].isel(section=0).values, own[v].values)
    np.testing.assert_allclose(ds["combined_pvalue"].values, own["sv_pvalue"].values, rtol=1e-10)


def test_cohort_run_resumes_per_section_and_cli(cohort, tmp_path, monkeypatch, capsys):
    import spatialscale.families.sv_hsic as fam

    real = fam._sv_task
    calls: list[str] = []

    def counting(store_path, *args):
        calls.append(store_path.rsplit("/", 1)[-1])
        return real(store_path, *args)

    monkeypatch.setattr(fam, "_sv_task", counting)
    ref = spatialscale.sv_test(cohort, batch_size=3, scheduler="threads", progress=False)
    planned = {sid: calls.count(f"{sid}.zarr") for sid in cohort.section_ids}
    assert all(n >= 3 for n in planned.values())  # 8 genes of 2-4 isoforms, at most 3 a batch
    calls.clear()

    def flaky(store_path, *args):
        if store_path.endswith("B1.zarr"):
            raise RuntimeError("node lost")
        return real(store_path, *args)

    monkeypatch.setattr(fam, "_sv_task", flaky)
    out = tmp_path / "sv.zarr"
    with pytest.raises(RuntimeError, match="node lost"):
        spatialscale.sv_test(cohort, out=out, batch_size=3, scheduler="threads", progress=False)
    recorded = {d.name: len(list((d / "_batches").iterdir())) for d in (out / "_sections").iterdir()}
    assert "B1" not in recorded or recorded["B1"] == 0
    assert sum(recorded.values()) > 0
    monkeypatch.setattr(fam, "_sv_task", counting)
    ds = spatialscale.sv_test(cohort, out=out, batch_size=3, scheduler="threads", progress=False)
    for sid in ("A1", "A2", "B1"):  # only what was not recorded ran again
        assert calls.count(f"{sid}.zarr") == planned[sid] - recorded.get(sid, 0)
    for v in ("sv_pvalue", "combined_pvalue"):
        np.testing.assert_array_equal(ds[v].values, ref[v].values)
    back = spatialscale.open_results(out)
    np.testing.assert_array_equal(back["combined_pvalue"].values, ref["combined_pvalue"].values)
    monkeypatch.undo()
    assert main(["sv", str(cohort.path), "--out", str(tmp_path / "cli.zarr"), "--scheduler", "threads",
                 "--no-progress", "--top", "3", "--combine", "stouffer"]) == 0
    assert "in 3 sections tested (hsic-ir, stouffer combination)" in capsys.readouterr().out
    with pytest.raises(InputError, match="combine applies to cohorts"):
        spatialscale.sv_test(cohort.store("A1"), combine="fisher", scheduler="threads")


def test_du_over_a_cohort(cohort):
    ds = spatialscale.du_test(cohort, ["rbp"], method="hsic", scheduler="threads", progress=False)
    assert ds["du_pvalue"].dims == ("section", "gene", "covariate")
    assert ds["combined_pvalue"].dims == ("gene", "covariate")
    own = spatialscale.du_test(cohort.store("A2"), ["rbp"], method="hsic", scheduler="threads", progress=False)
    # DU sums round differently in other batches and Liu amplifies that (as across batch sizes, test_du.py)
    np.testing.assert_allclose(ds["du_pvalue"].sel(section="A2", gene=own["gene"].values).values,
                               own["du_pvalue"].values, rtol=1e-7)
    with pytest.raises(InputError, match="does not run on cohorts yet"):
        spatialscale.glmm_fit(cohort, model="glm", scheduler="threads")


def test_simulate_cohort_and_the_cohort_demo(tmp_path, capsys):
    import pandas as pd

    from spatialscale.simulate import simulate_cohort

    manifest, truth = simulate_cohort(tmp_path / "sim", 3, 60, n_shared=6, n_specific=4, spots=(100, 160), seed=1)
    table = pd.read_csv(manifest)
    assert list(table["section"]) == ["S01", "S02", "S03"] and list(table["geometry"]) == ["grid", "hex", "random"]
    assert truth["shared"].sum() == 6 and (truth.drop(columns="shared").sum() == 10).all()
    assert truth.loc[truth["shared"]].drop(columns="shared").all(axis=None)
    a = spatialscale.ingest(tmp_path / "sim" / "S02.h5ad", tmp_path / "s2.zarr", min_counts=0)
    assert a.n_spots == table.loc[1, "n_spots"]
    assert main(["demo", "--cohort", "--sections", "2", "--genes", "40", "--workers", "1",
                 "--out-dir", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "Genes SV in every section, found at 5% FDR" in out and "combined (cauchy)" in out


def test_pooled_hsic_over_sections(cohort, inputs, tmp_path):
    from spatialscale.stats.combine import pooled_liu

    ds = spatialscale.sv_test(cohort, combine="pooled", scheduler="threads", progress=False)
    assert ds.attrs["combine"] == "pooled"
    pooled = ds["combined_pvalue"].values
    assert np.isfinite(pooled).all() and ((pooled >= 0) & (pooled <= 1)).all()
    # one section: the pooled test is the section's own Liu test
    man = _manifest(inputs, [("only", "s1.h5ad", "d1")], name="pool1.csv")
    one = spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False)
    ds1 = spatialscale.sv_test(one, combine="pooled", scheduler="threads", progress=False)
    np.testing.assert_array_equal(ds1["combined_pvalue"].values, ds1["sv_pvalue"].isel(section=0).values)
    # the sums are those of the sections' own null mixtures
    from spatialscale.stats.sv import sv_batch
    from spatialscale.worker import kernel_operator

    stat, cum = [], []
    for sid in cohort.section_ids:
        st = cohort.store(sid)
        op, sums = kernel_operator(str(st.path), st.kernel_token)
        g = ds["gene"].values[0]
        counts = st.gene_counts(g)[None] if g in st.genes.index else None
        out = sv_batch(counts, op, sums) if counts is not None else None
        stat.append(np.nan if out is None else out["null_statistic"][0])
        cum.append(np.full(4, np.nan) if out is None else out["null_cumulants"][0])
    np.testing.assert_allclose(ds["combined_pvalue"].values[0], pooled_liu(np.array([stat]), np.array([cum]))[0],
                               rtol=1e-12)
    with pytest.raises(InputError, match="combine='pooled'"):
        spatialscale.sv_test(cohort, null="welch", combine="pooled", scheduler="threads")


def test_an_interrupted_cohort_ingest_is_recognised_and_completed(inputs, tmp_path, monkeypatch):
    import spatialscale.cohort as co

    man = _manifest(inputs, [("A1", "s0.h5ad", "d1"), ("B1", "s2.h5ad", "d2")], name="int.csv")
    real, calls = co._write_meta, []

    def dies_at_the_end(out, rows):
        calls.append(len(rows))
        if rows:
            raise KeyboardInterrupt
        real(out, rows)

    monkeypatch.setattr(co, "_write_meta", dies_at_the_end)
    with pytest.raises(KeyboardInterrupt):
        spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False)
    monkeypatch.undo()
    assert calls == [0, 2]  # the folder was marked before anything went into it
    cohort = spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False)
    assert cohort.section_ids == ["A1", "B1"]


def test_sections_are_also_combined_within_groups(cohort, tmp_path, capsys):
    from spatialscale.stats.combine import cauchy_combine, fisher_combine

    ds = spatialscale.sv_test(cohort, group_by="donor", scheduler="threads", progress=False)
    assert list(ds["group"].values) == ["d1", "d2"] and ds.attrs["group_by"] == "donor"
    assert ds["group_combined_pvalue"].dims == ("group", "gene")
    p = ds["sv_pvalue"].transpose("gene", "section").values
    np.testing.assert_array_equal(ds["group_combined_pvalue"].sel(group="d1").values, cauchy_combine(p[:, :2]))
    # a group of one section: its own p-value (NaN where the section did not test the gene)
    np.testing.assert_allclose(ds["group_combined_pvalue"].sel(group="d2").values, p[:, 2], rtol=1e-12)
    np.testing.assert_array_equal(ds["group_n_sections_tested"].sel(group="d1").values, np.isfinite(p[:, :2]).sum(1))
    np.testing.assert_array_equal(ds["combined_pvalue"].values, cauchy_combine(p))  # overall unchanged
    fi = spatialscale.sv_test(cohort, group_by="donor", combine="fisher", scheduler="threads", progress=False)
    np.testing.assert_allclose(fi["group_combined_pvalue"].sel(group="d1").values, fisher_combine(p[:, :2]),
                               rtol=1e-12)
    pooled = spatialscale.sv_test(cohort, group_by="donor", combine="pooled", scheduler="threads", progress=False)
    # pooling one section is that section's own Liu test
    np.testing.assert_allclose(pooled["group_combined_pvalue"].sel(group="d2").values, p[:, 2], rtol=1e-10)
    with pytest.raises(InputError, match=r"group_by 'tissue' is not a column .*'donor'"):
        spatialscale.sv_test(cohort, group_by="tissue", scheduler="threads")
    with pytest.raises(InputError, match="group_by applies to cohorts"):
        spatialscale.sv_test(cohort.store("A1"), group_by="donor", scheduler="threads")
    assert main(["sv", str(cohort.path), "--group-by", "donor", "--out", str(tmp_path / "g.zarr"), "--scheduler",
                 "threads", "--no-progress", "--top", "0"]) == 0
    out = capsys.readouterr().out
    assert "donor = d1:" in out and "(2 sections)" in out and "donor = d2:" in out


def test_adding_a_section_computes_only_that_section(inputs, tmp_path, monkeypatch, capsys):
    import spatialscale.families.sv_hsic as fam

    rows = [("A1", "s0.h5ad", "d1"), ("A2", "s1.h5ad", "d1"), ("B1", "s2.h5ad", "d2")]
    two = spatialscale.ingest_cohort(_manifest(inputs, [rows[0], rows[2]], name="add2.csv"), tmp_path / "co",
                                     scheduler="threads", progress=False)
    out = tmp_path / "sv.zarr"
    first = spatialscale.sv_test(two, out=out, scheduler="threads", progress=False)
    assert list(first["section"].values) == ["A1", "B1"]
    three = spatialscale.ingest_cohort(_manifest(inputs, rows, name="add3.csv"), tmp_path / "co",
                                       scheduler="threads", progress=False)
    real, calls = fam._sv_task, []

    def counting(store_path, *args):
        calls.append(store_path.rsplit("/", 1)[-1])
        return real(store_path, *args)

    monkeypatch.setattr(fam, "_sv_task", counting)
    ds = spatialscale.sv_test(three, out=out, scheduler="threads", progress=False)  # no overwrite needed
    assert set(calls) == {"A2.zarr"}  # only the new section's batches ran
    monkeypatch.undo()
    fresh = spatialscale.sv_test(three, scheduler="threads", progress=False)
    for v in ("sv_pvalue", "combined_pvalue", "combined_pvalue_adj", "n_sections_tested"):
        np.testing.assert_array_equal(ds[v].values, fresh[v].values)
    np.testing.assert_array_equal(spatialscale.open_results(out)["combined_pvalue"].values,
                                  fresh["combined_pvalue"].values)
    assert sorted(p.name for p in (out / "_sections").iterdir()) == ["A1", "A2", "B1"]
    # other options are not an extension: they need --overwrite, and then reuse what they can
    with pytest.raises(InputError, match="other options"):
        spatialscale.sv_test(three, out=out, combine="fisher", scheduler="threads", progress=False)
    assert main(["sv", str(three.path), "--out", str(out), "--combine", "fisher", "--scheduler", "threads",
                 "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    monkeypatch.setattr(fam, "_sv_task", counting)
    calls.clear()
    fi = spatialscale.sv_test(three, out=out, combine="fisher", overwrite=True, scheduler="threads", progress=False)
    assert calls == [] and fi.attrs["combine"] == "fisher"  # same sections, same batches: only recombined
    np.testing.assert_array_equal(fi["sv_pvalue"].values, fresh["sv_pvalue"].values)
    assert spatialscale.open_results(out).attrs["combine"] == "fisher"
    # a section dropped from the cohort: nothing recomputed, its batches not carried into the new results
    calls.clear()
    fewer = spatialscale.ingest_cohort(_manifest(inputs, rows[:2], name="add4.csv"), tmp_path / "co",
                                       scheduler="threads", progress=False)
    ds = spatialscale.sv_test(fewer, out=out, combine="fisher", scheduler="threads", progress=False)
    assert calls == [] and list(ds["section"].values) == ["A1", "A2"]
    assert sorted(p.name for p in (out / "_sections").iterdir()) == ["A1", "A2"]
    np.testing.assert_array_equal(ds["sv_pvalue"].values, fresh["sv_pvalue"].sel(section=["A1", "A2"]).values)


def test_cohort_results_do_not_depend_on_order_batches_workers_or_mode(inputs, tmp_path, client):
    rows = [("A1", "s0.h5ad", "d1"), ("A2", "s1.h5ad", "d1"), ("B1", "s2.h5ad", "d2")]
    fwd = spatialscale.ingest_cohort(_manifest(inputs, rows, name="fwd.csv"), tmp_path / "fwd", scheduler="threads",
                                     progress=False)
    rev = spatialscale.ingest_cohort(_manifest(inputs, rows[::-1], name="rev.csv"), tmp_path / "rev",
                                     scheduler="threads", progress=False)
    ref = spatialscale.sv_test(fwd, combine="stouffer", group_by="donor", scheduler="threads", progress=False)
    runs = [spatialscale.sv_test(rev, combine="stouffer", group_by="donor", scheduler="threads", progress=False),
            spatialscale.sv_test(fwd, combine="stouffer", group_by="donor", batch_size=1, workers=1,
                                 progress=False),
            spatialscale.sv_test(fwd, combine="stouffer", group_by="donor", client=client, batch_size=3,
                                 progress=False)]
    for ds in runs:
        ds = ds.sel(section=ref["section"].values, gene=ref["gene"].values)
        for v in ("sv_statistic", "sv_pvalue", "combined_pvalue", "group_combined_pvalue", "n_sections_tested"):
            # worker processes use one BLAS thread: equal to rounding, not bit for bit
            np.testing.assert_allclose(ds[v].values, ref[v].values, rtol=1e-10, atol=0)
        assert list(ds["donor"].values) == list(ref["donor"].values)


def test_sections_that_differ_or_filter_out_are_named_and_a_manifest_column_sets_their_key(tmp_path, capsys):
    good = simulate_section(100, 8, n_sv=2, seed=1)
    good.write_h5ad(tmp_path / "a.h5ad")
    other = simulate_section(100, 8, n_sv=2, seed=2)
    other.obsm["X_spatial"] = other.obsm.pop("spatial")
    other.write_h5ad(tmp_path / "b.h5ad")
    simulate_section(100, 8, n_sv=2, mean_depth=0.01, seed=3).write_h5ad(tmp_path / "c.h5ad")
    man = tmp_path / "m.csv"
    man.write_text("section,path\nA,a.h5ad\nB,b.h5ad\nC,c.h5ad\n")
    assert main(["cohort", "ingest", str(man), str(tmp_path / "co"), "--scheduler", "threads", "--no-progress",
                 "--min-counts", "50"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "section 'B' (" in err and "no coordinates 'spatial' (available: ['X_spatial'])" in err
    assert "A spatial_key column in the manifest" in err
    assert "section 'C' (" in err and "no genes left after filtering" in err
    assert spatialscale.open_cohort(tmp_path / "co").section_ids == ["A"]  # the good section is kept
    # a per-section key in the manifest; the section without genes left is dropped from the manifest
    man.write_text("section,path,spatial_key\nA,a.h5ad,\nB,b.h5ad,X_spatial\n")
    cohort = spatialscale.ingest_cohort(man, tmp_path / "co", scheduler="threads", progress=False, min_counts=50)
    assert cohort.section_ids == ["A", "B"] and cohort.store("B").n_spots == 100
    np.testing.assert_array_equal(cohort.store("B").coords(), other.obsm["X_spatial"])
