"""A user's data is never lost or corrupted: overwrite, verified resume, locked outputs, late tasks."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from conftest import lock_held_elsewhere

import spatialscale
import spatialscale.families.sv_hsic as api
from spatialscale import InputError
from spatialscale.engine import Batch
from spatialscale.output import FileLock, PartialStore, StaleRunError, claim_output


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from conftest import make_adata

    return spatialscale.ingest(make_adata(n=200, n_genes=24, seed=5), tmp_path_factory.mktemp("safe") / "s.zarr")


@pytest.fixture(scope="module")
def reference(store):
    return spatialscale.sv_test(store, scheduler="threads", progress=False)


def same(a: xr.Dataset, b: xr.Dataset) -> None:
    assert list(a["gene"].values) == list(b["gene"].values)
    for v in ("sv_statistic", "sv_pvalue", "sv_pvalue_adj"):
        np.testing.assert_array_equal(a[v].values, b[v].values)


def _fail_last(store):
    real = api._sv_task

    def flaky(*args):
        if args[-1].gene_stop == store.n_genes:
            raise RuntimeError("worker lost power")
        return real(*args)

    return flaky


def test_failed_overwrite_keeps_previous_results(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "sv.zarr"
    spatialscale.sv_test(store, out=out, scheduler="threads", progress=False)
    before = spatialscale.open_results(out)
    # options that fail validation: nothing touched
    with pytest.raises(InputError, match="not a size"):
        spatialscale.sv_test(store, out=out, method="hsic-ic", overwrite=True, batch_memory="abc")
    # a rerun that fails while computing: the old results stay, the new batches are kept beside them
    monkeypatch.setattr(api, "_sv_task", _fail_last(store))
    with pytest.raises(RuntimeError, match="lost power"):
        spatialscale.sv_test(store, out=out, method="hsic-ic", overwrite=True, batch_size=5, scheduler="threads",
                             progress=False)
    same(spatialscale.open_results(out), before)
    staged = [p for p in tmp_path.iterdir() if p.name.startswith(".sv.zarr.partial-")]
    assert len(staged) == 1 and any((staged[0] / "_batches").iterdir())
    monkeypatch.undo()
    # the same rerun resumes from the staged batches and then replaces the old results
    ic = spatialscale.sv_test(store, out=out, method="hsic-ic", overwrite=True, batch_size=5, scheduler="threads",
                              progress=False)
    assert spatialscale.open_results(out).attrs["method"] == "hsic-ic"
    np.testing.assert_array_equal(spatialscale.open_results(out)["sv_pvalue"].values, ic["sv_pvalue"].values)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sv.zarr"]  # no staging, lock or old copy left


def _first_chunk(batch_dir: Path) -> Path:
    return next(p for p in sorted((batch_dir / "statistic").rglob("*")) if p.is_file() and p.name != "zarr.json")


@pytest.mark.parametrize("damage", ["delete", "flip", "truncate"])
def test_damaged_batches_are_named_and_recomputed(store, reference, tmp_path, monkeypatch, caplog, damage):
    out = tmp_path / "sv.zarr"
    monkeypatch.setattr(api, "_sv_task", _fail_last(store))
    with pytest.raises(RuntimeError):
        spatialscale.sv_test(store, out=out, batch_size=5, scheduler="threads", progress=False)
    monkeypatch.undo()
    victim = sorted((out / "_batches").iterdir())[0]
    chunk = _first_chunk(victim)
    data = bytearray(chunk.read_bytes())
    if damage == "delete":
        chunk.unlink()
    elif damage == "flip":
        data[len(data) // 2] ^= 0x01
        chunk.write_bytes(bytes(data))
    else:
        chunk.write_bytes(bytes(data[: len(data) // 2]))
    calls: list[int] = []
    real = api._sv_task
    monkeypatch.setattr(api, "_sv_task", lambda *a: calls.append(a[-1].gene_start) or real(*a))
    with caplog.at_level(logging.WARNING, logger="spatialscale"):
        ds = spatialscale.sv_test(store, out=out, batch_size=5, scheduler="threads", progress=False)
    same(ds, reference)
    assert any(victim.name in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert int(victim.name[1:9]) in calls  # the damaged batch ran again


def test_damaged_final_results_are_recomputed(store, reference, tmp_path, caplog):
    out = tmp_path / "sv.zarr"
    spatialscale.sv_test(store, out=out, scheduler="threads", progress=False)
    chunk = next(p for p in sorted((out / "sv_pvalue").rglob("*")) if p.is_file() and p.name != "zarr.json")
    blob = bytearray(chunk.read_bytes())
    blob[-1] ^= 0x40
    chunk.write_bytes(bytes(blob))
    with caplog.at_level(logging.WARNING, logger="spatialscale"):
        ds = spatialscale.sv_test(store, out=out, scheduler="threads", progress=False)
    same(ds, reference)
    same(spatialscale.open_results(out), reference)
    assert any("recomputing" in r.getMessage() for r in caplog.records)


def test_a_second_run_on_a_locked_output_fails_at_once(store, tmp_path):
    out = tmp_path / "sv.zarr"
    with lock_held_elsewhere(out):
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "spatialscale.cli", "sv", str(store.path), "--out", str(out),
                            "--scheduler", "threads", "--no-progress"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr
        assert "being written by another spatialscale run (pid" in r.stderr and "Traceback" not in r.stderr
        assert time.monotonic() - t0 < 60
        assert not out.exists()
    # the lock died with its process: the next run goes ahead
    ds = spatialscale.sv_test(store, out=out, scheduler="threads", progress=False)
    assert ds.sizes["gene"] == store.n_genes


def test_lock_is_exclusive_within_a_process(tmp_path):
    out = tmp_path / "x.zarr"
    lock = FileLock(out).acquire()
    with pytest.raises(InputError, match="being written"):
        FileLock(out).acquire()
    lock.release()
    FileLock(out).acquire().release()
    assert not lock.path.exists()


def test_late_tasks_of_an_earlier_run_cannot_write(tmp_path):
    out = tmp_path / "r.zarr"
    first = claim_output(out, "fp", overwrite=False)
    old = first.start()
    first.release()  # the first driver died here; its tasks live on
    second = claim_output(out, "fp", overwrite=False)
    new = second.start()  # takes the output over
    b = Batch(0, 2, 0, 4, 2)
    with pytest.raises(StaleRunError):
        old.write(b, {"x": np.ones(2)})
    assert new.load(b) is None
    new.write(b, {"x": np.ones(2)})
    np.testing.assert_array_equal(new.load(b)["x"], np.ones(2))
    second.release()


def test_partial_store_rejects_missing_arrays(tmp_path):
    import shutil

    b = Batch(0, 2, 0, 4, 2)
    ps = PartialStore(tmp_path, "fp")
    ps.write(b, {"x": np.ones(2), "y": np.zeros(2)})
    shutil.rmtree(tmp_path / "_batches" / b.name / "y")
    assert ps.load(b) is None
    assert not (tmp_path / "_batches" / b.name).exists()


def test_ctrl_c_is_one_line_and_resumable(tmp_path):
    import signal

    from spatialscale.simulate import simulate_section

    spatialscale.ingest(simulate_section(400, 40, n_sv=5, isoforms=(3, 3), seed=2), tmp_path / "s.zarr")
    out = tmp_path / "llr.zarr"
    proc = subprocess.Popen([sys.executable, "-m", "spatialscale.cli", "sv", str(tmp_path / "s.zarr"), "--out",
                             str(out), "--method", "glmm-llr", "--scheduler", "threads", "--batch-size", "2",
                             "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not (out / "_batches").exists() and time.monotonic() - t0 < 120:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["spatialscale sv: interrupted; finished batches are kept and re-running the same command "
                     "resumes."], err
    assert not (tmp_path / ".llr.zarr.spatialscale-lock").exists()


def test_single_isoform_genes_get_nan_in_glmm_tests(tmp_path):
    from conftest import make_adata

    st = spatialscale.ingest(make_adata(n=100, n_genes=8, isoforms=(1, 3), seed=1), tmp_path / "s.zarr",
                             filter_single_iso_genes=False)
    single = st.genes["n_isoforms"].to_numpy() == 1
    assert single.any() and not single.all()
    du = spatialscale.du_test(st, "region", method="glmm-score", scheduler="threads", progress=False)
    assert np.isnan(du["du_pvalue"].values[single]).all() and np.isfinite(du["du_pvalue"].values[~single]).all()
    fit = spatialscale.glmm_fit(st, model="glmm-null", glmm={"max_epochs": 20}, scheduler="threads", progress=False)
    assert np.isnan(fit["loss"].values[single]).all() and np.isfinite(fit["loss"].values[~single]).all()
    llr = spatialscale.sv_test(st, method="glmm-llr", glmm={"max_epochs": 20}, scheduler="threads", progress=False)
    assert np.isnan(llr["sv_pvalue"].values[single]).all() and np.isfinite(llr["sv_pvalue"].values[~single]).all()


@pytest.mark.parametrize("content", ["my notes", ""])
def test_a_file_that_is_not_our_lock_is_never_rewritten(store, tmp_path, content):
    out = tmp_path / "sv.zarr"
    foreign = tmp_path / ".sv.zarr.spatialscale-lock"
    foreign.write_text(content)  # an empty file too: never taken for a lock, never removed
    with pytest.raises(InputError, match="is not a spatialscale lock"):
        spatialscale.sv_test(store, out=out, scheduler="threads", progress=False)
    assert foreign.read_text() == content and not out.exists()
    assert not (tmp_path / ".sv.zarr.lock").exists()  # the old lock name: nothing of ours there
