"""Fault injection: results are never stale or mixed, stores and results are verified, nothing is claimed early.

Each case ends in a named error (exit code 2 on the command line, nothing written) or in results equal to a
fresh run on the data as it is now.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import xarray as xr
from conftest import lock_held_elsewhere, make_adata

import spatialscale
import spatialscale.families.sv_hsic as fam
from spatialscale import InputError
from spatialscale.checksums import StoreChangedError, StoreDamagedError
from spatialscale.cli import main
from spatialscale.output import FileLock, ResultsDamagedError

SV = ("sv_statistic", "sv_pvalue", "sv_pvalue_adj")


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spatialscale.cli", *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd)


def same(a: xr.Dataset, b: xr.Dataset) -> None:
    assert list(a["gene"].values) == list(b["gene"].values)
    for v in SV:
        np.testing.assert_array_equal(a[v].values, b[v].values)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two different sections as .h5ad files (A and B: other counts, other genes)."""
    root = tmp_path_factory.mktemp("faults")
    make_adata(n=150, n_genes=10, seed=11).write_h5ad(root / "a.h5ad")
    make_adata(n=150, n_genes=10, seed=12, sv_frac=0.0).write_h5ad(root / "b.h5ad")
    return root


def _threads(store, **kw):
    return spatialscale.sv_test(store, scheduler="threads", progress=False, **kw)


def _fail_from(n_ok: int):
    """A task that fails after ``n_ok`` batches (a run interrupted half way)."""
    real, calls = fam._sv_task, []

    def flaky(*args):
        calls.append(1)
        if len(calls) > n_ok:
            raise RuntimeError("node lost")
        return real(*args)

    return flaky


def test_reingest_then_rerun_never_reuses_old_results(files, tmp_path):
    store, out = tmp_path / "s.zarr", tmp_path / "sv.zarr"
    a = spatialscale.ingest(files / "a.h5ad", store)
    first = _threads(a, out=out)
    b = spatialscale.ingest(files / "b.h5ad", store, overwrite=True)
    assert b.content_token != a.content_token
    with pytest.raises(InputError, match="results of other data"):
        _threads(b, out=out)
    r = cli("sv", str(store), "--out", str(out), "--scheduler", "threads", "--no-progress")
    assert r.returncode == 2 and "other data" in r.stderr and "Traceback" not in r.stderr
    same(spatialscale.open_results(out), first)  # refused: the old results are untouched
    fresh = _threads(spatialscale.open_store(store))
    same(_threads(b, out=out, overwrite=True), fresh)
    same(spatialscale.open_results(out), fresh)
    # the same content at another path is the same data: its results are reused as they are
    copy = tmp_path / "copy.zarr"
    shutil.copytree(store, copy)
    assert spatialscale.open_store(copy).content_token == b.content_token
    same(_threads(copy, out=out), fresh)


def test_reingest_after_an_interrupted_run_never_mixes_batches(files, tmp_path, monkeypatch):
    store, out = tmp_path / "s.zarr", tmp_path / "sv.zarr"
    a = spatialscale.ingest(files / "a.h5ad", store)
    monkeypatch.setattr(fam, "_sv_task", _fail_from(4))
    with pytest.raises(RuntimeError, match="node lost"):
        _threads(a, out=out, batch_size=1)
    monkeypatch.undo()
    assert len(list((out / "_batches").iterdir())) >= 1  # batches of A recorded
    b = spatialscale.ingest(files / "b.h5ad", store, overwrite=True)
    with pytest.raises(InputError, match="other data"):
        _threads(b, out=out, batch_size=1)
    ds = _threads(b, out=out, batch_size=1, overwrite=True)
    same(ds, _threads(spatialscale.open_store(store)))


def test_ingest_waits_for_nobody_while_a_run_reads_the_store(files, tmp_path):
    store = tmp_path / "s.zarr"
    a = spatialscale.ingest(files / "a.h5ad", store)
    with lock_held_elsewhere(store, shared=True):
        r = cli("ingest", str(files / "b.h5ad"), str(store), "--overwrite")
        assert r.returncode == 2 and "being read by a spatialscale run (pid" in r.stderr, r.stderr
        assert spatialscale.open_store(store).content_token == a.content_token
        # readers share the store
        with FileLock(store, shared=True):
            same(_threads(a), _threads(store))
    spatialscale.ingest(files / "b.h5ad", store, overwrite=True)  # free again once the reader is gone
    assert not list(tmp_path.glob(".s.zarr.*"))  # no temporaries; the lock file left by the killed reader removed


def test_a_store_replaced_under_a_running_task_stops_the_run(files, tmp_path, monkeypatch):
    store, other, out = tmp_path / "s.zarr", tmp_path / "o.zarr", tmp_path / "sv.zarr"
    a = spatialscale.ingest(files / "a.h5ad", store, block_bytes=4800)
    spatialscale.ingest(files / "b.h5ad", other)
    real, swapped = fam._sv_task, []

    def swapping(*args):  # another machine re-ingests the store (no lock reaches it): the files change under us
        if not swapped:
            swapped.append(1)
            os.rename(store, tmp_path / "aside.zarr")
            time.sleep(0.05)  # a window with no store at the path: other tasks must say "changed", not "missing"
            os.rename(other, store)
        return real(*args)

    monkeypatch.setattr(fam, "_sv_task", swapping)
    with pytest.raises(StoreChangedError, match="changed while this run was reading it"):
        spatialscale.sv_test(a, out=out, scheduler="threads", progress=False, batch_size=2)
    monkeypatch.undo()
    assert not spatialscale.output.group_attributes(out).get("spatialscale_results")  # nothing final


def test_a_task_that_finds_its_store_gone_or_half_replaced_says_it_changed(files, tmp_path):
    """The window of a replacement: a pinned task sees the store missing, then another store's files."""
    from spatialscale.checksums import pinned, verify_prefix

    store = spatialscale.ingest(files / "a.h5ad", tmp_path / "s.zarr")
    spatialscale.ingest(files / "b.h5ad", tmp_path / "o.zarr")
    os.rename(store.path, tmp_path / "aside.zarr")
    with pinned(store.path, store.content_token):
        with pytest.raises(StoreChangedError, match="gone or was rewritten"):
            spatialscale.open_store(store.path)
        with pytest.raises(StoreChangedError, match="gone or was rewritten"):
            verify_prefix(store.path, "var")
    with pytest.raises(InputError, match="no isoform store") as err:  # outside a run: plainly missing
        spatialscale.open_store(store.path)
    assert not isinstance(err.value, StoreChangedError)
    os.rename(tmp_path / "o.zarr", store.path)
    with pinned(store.path, store.content_token), pytest.raises(StoreChangedError):
        spatialscale.open_store(store.path)
    shutil.rmtree(store.path / "var")  # the pinned content itself damaged: that is damage, not a change
    os.rename(store.path, tmp_path / "b.zarr")
    os.rename(tmp_path / "aside.zarr", store.path)
    shutil.rmtree(store.path / "var")
    with pinned(store.path, store.content_token), pytest.raises(StoreDamagedError) as err:
        verify_prefix(store.path, "var")
    assert not isinstance(err.value, StoreChangedError)


def test_moved_batches_are_rejected_and_recomputed(files, tmp_path, monkeypatch, caplog):
    import logging

    store, out = spatialscale.ingest(files / "a.h5ad", tmp_path / "s.zarr"), tmp_path / "sv.zarr"
    monkeypatch.setattr(fam, "_sv_task", _fail_from(3))
    with pytest.raises(RuntimeError):
        spatialscale.sv_test(store, out=out, scheduler="threads", progress=False, batch_size=1)
    monkeypatch.undo()
    b = out / "_batches"
    first, second = sorted(b.iterdir())[:2]
    os.rename(first, b / "swap")
    os.rename(second, first)
    os.rename(b / "swap", second)
    with caplog.at_level(logging.WARNING, logger="spatialscale"):
        ds = _threads(store, out=out, batch_size=1)
    same(ds, _threads(store))
    assert sum("(moved)" in r.getMessage() for r in caplog.records) == 2


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_a_damaged_store_chunk_is_a_named_error(files, tmp_path, damage, client):
    store = spatialscale.ingest(files / "a.h5ad", tmp_path / "s.zarr", block_bytes=4800)
    chunks = sorted((store.path / "layers" / "counts" / "c" / "0").iterdir(), key=lambda p: int(p.name))
    assert len(chunks) > 3
    victim = chunks[2]
    if damage == "delete":  # zarr alone would read the chunk as zeros: every statistic 0, p = 1
        victim.unlink()
        match = r"layers/counts/c/0/2 is missing; re-ingest it"
    else:
        blob = bytearray(victim.read_bytes())
        blob[len(blob) // 2] ^= 0x01
        victim.write_bytes(bytes(blob))
        match = r"layers/counts/c/0/2 does not match its checksum"
    with pytest.raises(StoreDamagedError, match=match):  # on the LocalCluster's workers
        spatialscale.sv_test(store, client=client, progress=False)
    out = tmp_path / "sv.zarr"
    r = cli("sv", str(store.path), "--out", str(out), "--scheduler", "threads", "--no-progress")
    assert r.returncode == 2 and match.split(";")[0].replace("\\", "") in r.stderr, r.stderr
    assert "re-ingest" in r.stderr and "Traceback" not in r.stderr
    assert not spatialscale.output.group_attributes(out).get("spatialscale_results")
    np.testing.assert_array_equal(store.read_counts(0, 8), ad.read_h5ad(files / "a.h5ad")[
        :, store.isoforms["source_index"].to_numpy()[:8]].layers["counts"].toarray())  # other chunks read


def test_damaged_store_metadata_is_a_named_error(files, tmp_path):
    store = spatialscale.ingest(files / "a.h5ad", tmp_path / "s.zarr")
    var = store.path / "var" / "gene" / "codes" / "c" / "0"
    var.write_bytes(var.read_bytes()[:-1])
    with pytest.raises(StoreDamagedError, match="var/gene/codes/c/0 does not match"):
        _ = spatialscale.open_store(store.path).genes
    (store.path / "uns" / "spatialscale" / "spatialscale_checksums.json").unlink()
    with pytest.raises(StoreDamagedError, match="checksums .* are missing"):
        spatialscale.open_store(store.path)


def test_open_results_verifies_data_and_attributes(files, tmp_path):
    store = spatialscale.ingest(files / "a.h5ad", tmp_path / "s.zarr")
    out = tmp_path / "sv.zarr"
    ref = _threads(store, out=out)
    same(spatialscale.open_results(out), ref)
    pristine = tmp_path / "pristine.zarr"
    shutil.copytree(out, pristine)

    def damaged(edit, match):
        shutil.rmtree(out)
        shutil.copytree(pristine, out)
        edit()
        with pytest.raises(ResultsDamagedError, match=match):
            spatialscale.open_results(out)
        assert spatialscale.open_results(out, verify=False).sizes["gene"] == store.n_genes
        # a rerun finds them damaged and recomputes: results equal the fresh ones
        same(_threads(store, out=out), ref)
        same(spatialscale.open_results(out), ref)

    def delete_chunk():
        (out / "sv_pvalue" / "c" / "0").unlink()

    def big_endian():
        meta = json.loads((out / "sv_pvalue" / "zarr.json").read_text())
        meta["codecs"][0]["configuration"]["endian"] = "big"
        (out / "sv_pvalue" / "zarr.json").write_text(json.dumps(meta))
        root = json.loads((out / "zarr.json").read_text())  # the consolidated copy too
        root["consolidated_metadata"]["metadata"]["sv_pvalue"]["codecs"][0]["configuration"]["endian"] = "big"
        (out / "zarr.json").write_text(json.dumps(root))

    def edit_attribute():
        root = json.loads((out / "zarr.json").read_text())
        root["attributes"]["null"] = "perm"
        (out / "zarr.json").write_text(json.dumps(root))

    damaged(delete_chunk, "sv_pvalue")
    damaged(big_endian, "sv_pvalue")
    damaged(edit_attribute, "attributes")


def test_options_are_validated_before_the_output_is_claimed(files, tmp_path):
    store = spatialscale.ingest(files / "a.h5ad", tmp_path / "s.zarr")
    out = tmp_path / "sv.zarr"
    for bad, words in ((["--method", "glmm-llr", "--glmm", "tol=abc"], "tol='abc' must be a finite number"),
                       (["--null", "perm", "--perm-seed", "-1"], "perm_seed must be >= 0"),
                       (["--null", "perm", "--n-perms", "0"], "n_perms must be >= 1"),
                       (["--method", "glmm-llr", "--glmm", "max_epochs=1.5"], "max_epochs=1.5 must be a whole")):
        r = cli("sv", str(store.path), "--out", str(out), "--scheduler", "threads", "--no-progress", *bad)
        assert r.returncode == 2 and words in r.stderr and "internal error" not in r.stderr, r.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == ["s.zarr"]  # no output, partial or lock left
    r = cli("sv", str(store.path), "--out", str(out), "--scheduler", "threads", "--no-progress", "--null", "perm",
            "--perm-seed", "1", "--n-perms", "50")
    assert r.returncode == 0, r.stderr


class _Listener:
    """A TCP listener on 127.0.0.1 that never speaks (``http``: a web server instead)."""

    def __init__(self, http: bool = False) -> None:
        if http:
            from http.server import HTTPServer, SimpleHTTPRequestHandler

            self.server = HTTPServer(("127.0.0.1", 0), SimpleHTTPRequestHandler)
            self.port = self.server.server_address[1]
            threading.Thread(target=self.server.serve_forever, daemon=True).start()
        else:
            self.server = None
            self.sock = socket.socket()
            self.sock.bind(("127.0.0.1", 0))
            self.sock.listen(8)
            self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
        else:
            self.sock.close()


def test_a_listener_that_is_no_scheduler_fails_in_seconds(files, tmp_path, monkeypatch):
    import spatialscale.options as options

    store = spatialscale.ingest(files / "a.h5ad", tmp_path / "s.zarr")
    silent = _Listener()
    try:
        t0 = time.monotonic()
        r = cli("sv", str(store.path), "--out", str(tmp_path / "sv.zarr"), "--scheduler",
                f"tcp://127.0.0.1:{silent.port}")
        assert r.returncode == 2 and "did not answer as a Dask scheduler within 5 s" in r.stderr, r.stderr
        assert time.monotonic() - t0 < 60 and not (tmp_path / "sv.zarr").exists()
    finally:
        silent.close()
    monkeypatch.setattr(options, "HANDSHAKE_TIMEOUT_S", 1.0)
    web = _Listener(http=True)
    try:
        with pytest.raises(InputError, match="as a Dask scheduler"):
            spatialscale.sv_test(store, scheduler=f"tcp://127.0.0.1:{web.port}")
    finally:
        web.close()
    with pytest.raises(InputError, match="uses TLS: give the client its certificates"):
        spatialscale.sv_test(store, scheduler=f"tls://127.0.0.1:{web.port}")
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(InputError, match="is not a Dask scheduler file"):
        spatialscale.sv_test(store, scheduler=str(tmp_path / "junk.json"))


def test_anndata_out_annotates_only_the_file_the_store_came_from(files, tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    here.mkdir()
    there.mkdir()
    shutil.copy(files / "a.h5ad", here / "sample.h5ad")
    shutil.copy(files / "b.h5ad", there / "sample.h5ad")  # same name, other data
    assert cli("ingest", "sample.h5ad", "s.zarr", cwd=here).returncode == 0  # a relative source
    meta = spatialscale.open_store(here / "s.zarr").meta
    assert meta["source"] == str(here / "sample.h5ad") and meta["source_size"] > 0
    r = cli("sv", str(here / "s.zarr"), "--out", "sv.zarr", "--anndata-out", "annotated.h5ad", "--scheduler",
            "threads", "--no-progress", cwd=there)
    assert r.returncode == 0, r.stderr
    annotated = ad.read_h5ad(there / "annotated.h5ad")
    assert list(annotated.var_names) == list(ad.read_h5ad(here / "sample.h5ad").var_names)
    assert spatialscale.open_results(there / "sv.zarr").attrs["store"] == str(here / "s.zarr")
    # the source replaced by another file: refused, nothing written
    shutil.copy(files / "b.h5ad", here / "sample.h5ad")
    r = cli("sv", str(here / "s.zarr"), "--out", "sv2.zarr", "--anndata-out", "again.h5ad", "--scheduler",
            "threads", "--no-progress", cwd=there)
    assert r.returncode == 2 and "changed since" in r.stderr, r.stderr
    assert not (there / "again.h5ad").exists() and not (there / "sv2.zarr").exists()


def test_temporary_stores_of_killed_runs_are_removed_at_the_next_start(files, tmp_path, monkeypatch):
    import tempfile

    import psutil

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(dead.pid).create_time()
    dead.wait()
    orphan, alive, foreign = (tmp_path / f"spatialscale-store-{k}" for k in ("orphan", "alive", "foreign"))
    for path, pid, when in ((orphan, dead.pid, started), (alive, os.getpid(), psutil.Process().create_time())):
        (path / "store.zarr").mkdir(parents=True)
        (path / ".spatialscale-owner").write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                             "started": when}))
    (foreign / "mine").mkdir(parents=True)  # no owner file: never touched
    ds = spatialscale.sv_test(files / "a.h5ad", scheduler="threads", progress=False)
    assert ds.sizes["gene"] > 0
    assert not orphan.exists() and alive.exists() and (foreign / "mine").exists()
    from spatialscale.families.common import INGEST_CACHE

    left = sorted(p.name for p in tmp_path.glob("spatialscale-store-*") if not INGEST_CACHE.holds(p / "x"))
    assert left == ["spatialscale-store-alive", "spatialscale-store-foreign"]  # and this process's ingest cache


def test_cohort_ingest_is_serialised_and_lists_every_store(files, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"section,path\nA,{files / 'a.h5ad'}\nB,{files / 'b.h5ad'}\n")
    co = tmp_path / "co"
    spatialscale.ingest_cohort(manifest, co, scheduler="threads", progress=False)
    with FileLock(co):  # another cohort ingest holds the folder
        assert main(["cohort", "ingest", str(manifest), str(co), "--scheduler", "threads"]) == 2
        assert "being written by another spatialscale run" in capsys.readouterr().err
    listed = [s["section"] for s in json.loads((co / "cohort.json").read_text())["sections"]]
    assert listed == ["A", "B"] and sorted(p.name for p in (co / "sections").iterdir()) == ["A.zarr", "B.zarr"]
    out = tmp_path / "sv.zarr"
    first = spatialscale.sv_test(co, out=out, scheduler="threads", progress=False)
    calls = []
    real = fam._sv_task
    fam._sv_task = lambda *a: calls.append(1) or real(*a)
    try:  # finished cohort results (text coordinates included) verify and are reused as they are
        again = spatialscale.sv_test(co, out=out, scheduler="threads", progress=False)
    finally:
        fam._sv_task = real
    assert calls == []
    np.testing.assert_array_equal(again["combined_pvalue"].values, first["combined_pvalue"].values)
    # a section dropped from the manifest: its store goes with it
    manifest.write_text(f"section,path\nA,{files / 'a.h5ad'}\n")
    spatialscale.ingest_cohort(manifest, co, scheduler="threads", progress=False)
    assert sorted(p.name for p in (co / "sections").iterdir()) == ["A.zarr"]
    # a section store replaced by hand is not the one the cohort recorded
    spatialscale.ingest(files / "b.h5ad", co / "sections" / "A.zarr", overwrite=True)
    with pytest.raises(InputError, match="its store was replaced since the cohort was ingested"):
        spatialscale.sv_test(co, scheduler="threads", progress=False)


def test_ingest_removes_what_a_killed_ingest_of_the_same_path_left(files, tmp_path):
    store = tmp_path / "s.zarr"
    spatialscale.ingest(files / "a.h5ad", tmp_path / "x.zarr")
    killed = tmp_path / ".s.zarr.tmp-0badf00d"  # an ingest killed while writing: marked, not complete
    shutil.copytree(tmp_path / "x.zarr", killed)
    root = json.loads((killed / "zarr.json").read_text())
    root["attributes"]["spatialscale"] = {"complete": False, "format": 2}
    (killed / "zarr.json").write_text(json.dumps(root))
    users = tmp_path / ".s.zarr.tmp-notes"  # same pattern, not spatialscale's: kept
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    spatialscale.ingest(files / "b.h5ad", store)
    assert not killed.exists() and (users / "notes.txt").read_text() == "mine"
    assert spatialscale.open_store(store).n_genes > 0
