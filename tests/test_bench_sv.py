"""``spatialscale bench`` (sv): whole-transcriptome sections, SPLISOSM's extrapolated time, where the time goes."""

import numpy as np
import pytest

import spatialscale.bench as bench
from spatialscale.simulate import simulate_transcriptome


def test_simulate_transcriptome_depth_and_truth():
    ad = simulate_transcriptome(2500, 400, n_sv=80, umis_per_spot=500.0, seed=1)
    x = ad.layers["counts"]
    assert x.format == "csr" and x.shape == (2500, ad.n_vars)
    assert abs(x.sum() / 2500 / 500.0 - 1.0) < 0.05  # counts per spot as asked
    assert ad.var.groupby("gene_symbol")["is_sv"].first().sum() == 80
    assert np.array_equal(x.data, np.round(x.data)) and x.data.min() >= 1
    again = simulate_transcriptome(2500, 400, n_sv=80, umis_per_spot=500.0, seed=1).layers["counts"]
    assert (x != again).nnz == 0


def test_transcriptome_sv_genes_are_found():
    from spatialscale.api import sv_test

    ad = simulate_transcriptome(900, 200, n_sv=40, umis_per_spot=4000.0, gene_sd=0.5, effect=1.5, seed=2)
    ds = sv_test(ad, progress=False, scheduler="threads")
    truth = ad.var.groupby("gene_symbol")["is_sv"].first().reindex(ds["gene"].values).to_numpy()
    p = ds["sv_pvalue"].values
    assert np.mean(p[truth] < 0.01) > 0.8
    assert 0.01 < np.mean(p[~truth] < 0.05) < 0.12


@pytest.mark.slow
def test_bench_extrapolates_splisosm_and_splits_the_time(monkeypatch, capsys):
    monkeypatch.setattr(bench, "TRANSCRIPTOME_GENES", 100)  # the sparse simulator
    monkeypatch.setattr(bench, "SPLISOSM_FULL_MAX", 0)  # SPLISOSM on a subset, extrapolated
    table = bench.run_bench([900], [160], splisosm_genes=40, umis_per_spot=3000.0, workers=1)
    row = table.iloc[0]
    assert bool(row["splisosm_extrapolated"]) and row["genes"] == 160 and row["genes_compared"] <= 40
    assert row["genes_compared"] >= 30
    assert row["speedup"] == pytest.approx(row["splisosm_s"] / row["spatialscale_s"])
    assert row["splisosm_s"] > row["splisosm_setup_s"] > 0
    assert 0 < row["kernel_s"] < row["ingest_s"] < row["spatialscale_s"]
    assert 0 < row["write_s"] < row["test_s"]
    assert row["task_test_s"] > 0 and row["task_read_s"] > 0
    assert row["worker_peak_MB"] > 50 and row["client_peak_MB"] > 50
    assert row["p_spearman"] > 0.99 and row["top20_overlap"] >= 0.9
    assert "simulate_transcriptome" in capsys.readouterr().out
