"""``spatialscale bench --cohort``: one cohort graph vs a loop of section runs, SplisosmNP and 1 worker."""

from __future__ import annotations

import math

import pytest

from spatialscale.bench import run_cohort_bench, task_stream_stats
from spatialscale.cli import main


def _record(worker: str, start: float, stop: float) -> dict:
    return {"worker": worker, "startstops": ({"action": "transfer", "start": start - 0.5, "stop": start},
                                             {"action": "compute", "start": start, "stop": stop})}


def test_task_stream_stats_definitions():
    # two threads for 10 s; 6 s of compute in 4 tasks; transfers are not compute
    records = [_record("a", 0.0, 2.0), _record("a", 2.1, 3.0), _record("b", 1.0, 3.0), _record("b", 3.3, 4.4)]
    got = task_stream_stats(records, wall=10.0, n_threads=2)
    assert got["tasks"] == 4
    assert got["compute_s"] == pytest.approx(6.0)
    assert got["idle_fraction"] == pytest.approx(1 - 6.0 / 20.0)
    assert got["overhead_ms_per_task"] == pytest.approx(1e3 * (20.0 - 6.0) / 4)
    assert got["gap_ms"] == pytest.approx(200.0)  # median of the gaps 100 ms (a) and 300 ms (b)
    empty = task_stream_stats([], wall=1.0, n_threads=2)
    assert empty["tasks"] == 0 and empty["idle_fraction"] == 1.0 and math.isnan(empty["gap_ms"])


@pytest.mark.slow
def test_cohort_bench_small(tmp_path, capsys):
    fig = run_cohort_bench(3, (100, 150), 20, workers=2, seed=1, out_dir=tmp_path, repeats=3)
    # the one-graph run gives every section the numbers of its own run (and of a 1-worker cluster), to rounding
    assert fig["identical"] is True and fig["max_rel_diff"] <= 1e-10
    assert fig["identical_1_worker"] is True
    assert fig["pairs_tested"] == 3 * 20
    planned = {k: sum(v.values()) for k, v in fig["planned_tasks"].items()}
    assert set(fig["planned_tasks"]["cohort"]) == {"S01", "S02", "S03"}
    assert 3 <= planned["cohort"] < planned["single"]  # a cohort's sections take fewer, larger batches
    assert planned["cohort_tasks"] == 3  # each section's batches (at most 8) in one task
    assert set(fig["runs"]) == {"cohort", "loop", "cohort_1_worker"}
    for name, run in fig["runs"].items():
        # one task per planned batch (a cohort: per bundle of a section's batches), nothing else in the timed window
        assert run["tasks"] == planned["single" if name == "loop" else "cohort_tasks"], name
        assert run["threads"] == (1 if name == "cohort_1_worker" else 2)
        assert len(run["walls"]) == 3 and run["wall_s"] == sorted(run["walls"])[1]  # the median run
        assert 0.0 <= run["idle_fraction"] <= 1.0
        assert 0.0 < run["compute_s"] <= run["wall_s"] * run["threads"] * 1.05
        for key in ("wall_s", "overhead_ms_per_task", "client_cpu_s", "worker_cpu_s"):
            assert math.isfinite(run[key]) and run[key] >= 0, (name, key)
        # a diagnostic from the task stream's per-worker records: once seen at -29 ms in a 3-task run (records
        # of one worker overlapping), so only finite is asserted
        assert math.isfinite(run["gap_ms"]) or run["tasks"] < 3, name
    for key in ("loop_over_cohort", "scaling_speedup", "scaling_efficiency", "splisosm_over_cohort", "ingest_s"):
        assert math.isfinite(fig[key]) and fig[key] > 0, key
    assert fig["scaling_efficiency"] == pytest.approx(fig["scaling_speedup"] / 2)
    # the SPLISOSM reference ran on the same sections and agrees
    agree = fig["splisosm_agreement"]
    assert agree["p_spearman_min"] > 0.99 and agree["p_max_rel_diff"] < 1e-3
    out = capsys.readouterr().out
    assert "loop / cohort" in out and "idle_fraction = 1 - sum(task compute)" in out
    assert "SplisosmNP: section by section" in out and "efficiency" in out


def test_cli_bench_cohort(capsys):
    code = main(["bench", "--cohort", "--sections", "2", "--spots", "80", "100", "--genes", "12", "--workers", "1",
                 "--no-splisosm", "--no-scaling"])
    assert code == 0
    out = capsys.readouterr().out
    assert "cohort: one graph, 1 worker " in out and "loop: 2 single-section runs, 1 worker " in out
    assert "cohort vs loop (sv_statistic, sv_pvalue of every section): max relative difference" in out
    assert "within 1e-10: True" in out
    assert "SplisosmNP:" not in out and "SplisosmNP (setup_data" not in out and "efficiency" not in out


def test_cli_bench_cohort_bad_options(capsys):
    assert main(["bench", "--cohort", "--spots", "100"]) == 2
    assert "LO HI" in capsys.readouterr().err
    assert main(["bench", "--cohort", "--genes", "10", "20"]) == 2
    assert "one --genes" in capsys.readouterr().err
