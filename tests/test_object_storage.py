"""Object storage: stores, cohorts and results at s3:// URLs, against a real S3-compatible server on 127.0.0.1.

The server is moto's (server mode, started here on a free loopback port); credentials and the endpoint
reach spatialscale through the environment only (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL), as they would for any S3-compatible store.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import numpy as np
import pytest
import xarray as xr

pytest.importorskip("s3fs")
pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")

import spatialscale  # noqa: E402
import spatialscale.families.sv_hsic as sv_module  # noqa: E402
from spatialscale import InputError  # noqa: E402
from spatialscale.cli import main  # noqa: E402

BUCKET = "spatialscale-test"
ROOT = f"s3://{BUCKET}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1, the environment pointing at it, and an empty bucket; yields a boto3 client."""
    import boto3

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's request log
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        mp.delenv(name, raising=False)
    mp.setenv("SPATIALSCALE_CACHE", str(tmp_path_factory.mktemp("cache")))
    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield client
    finally:
        mp.undo()
        server.stop()


def keys(client, prefix: str) -> list[str]:
    """Every object key below ``prefix`` in the test bucket."""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        out += [o["Key"] for o in page.get("Contents", [])]
    return sorted(out)


@pytest.fixture(scope="module")
def section():
    from spatialscale.simulate import simulate_section

    return simulate_section(300, 20, n_sv=5, seed=3)


@pytest.fixture(scope="module")
def local_store(section, tmp_path_factory):
    return spatialscale.ingest(section, tmp_path_factory.mktemp("local") / "s.zarr")


@pytest.fixture(scope="module")
def remote_store(s3, section):
    return spatialscale.ingest(section, f"{ROOT}/stores/s.zarr")


@pytest.fixture(scope="module")
def reference(local_store):
    return spatialscale.sv_test(local_store, scheduler="threads", progress=False)


def same(a: xr.Dataset, b: xr.Dataset, prefix: str = "sv") -> None:
    assert list(a["gene"].values) == list(b["gene"].values)
    for v in (f"{prefix}_statistic", f"{prefix}_pvalue", f"{prefix}_pvalue_adj"):
        np.testing.assert_array_equal(a[v].values, b[v].values)


def test_ingest_to_s3_has_the_local_content_token(s3, section, local_store, remote_store):
    assert remote_store.url == f"{ROOT}/stores/s.zarr"
    assert remote_store.content_token == local_store.content_token
    assert spatialscale.open_store(f"{ROOT}/stores/s.zarr").content_token == local_store.content_token
    assert "stores/s.zarr/zarr.json" in keys(s3, "stores/s.zarr/")
    # nothing left beside it (no temporary prefix, no lock object)
    assert {k.split("/")[1] for k in keys(s3, "stores/")} == {"s.zarr"}
    # the same input again: reused, not uploaded again
    before = s3.head_object(Bucket=BUCKET, Key="stores/s.zarr/zarr.json")["LastModified"]
    again = spatialscale.ingest(section, f"{ROOT}/stores/s.zarr")
    assert again.content_token == local_store.content_token
    assert s3.head_object(Bucket=BUCKET, Key="stores/s.zarr/zarr.json")["LastModified"] == before


def test_sv_from_s3_store_to_s3_output_equals_local(s3, remote_store, reference):
    out = f"{ROOT}/results/sv.zarr"
    ds = spatialscale.sv_test(f"{ROOT}/stores/s.zarr", out=out, scheduler="threads", progress=False)
    same(ds, reference)
    same(spatialscale.open_results(out), reference)
    assert ds.attrs["store"] == f"{ROOT}/stores/s.zarr"
    # the finished run again: nothing recomputed, the results read back from the object store
    ds2 = spatialscale.sv_test(f"{ROOT}/stores/s.zarr", out=out, scheduler="threads", progress=False)
    same(ds2, reference)
    assert {k.split("/")[1] for k in keys(s3, "results/")} == {"sv.zarr"}


def _fail_last(n_genes: int):
    real = sv_module._sv_task

    def flaky(*args):
        if args[-1].gene_stop == n_genes:
            raise RuntimeError("worker lost power")
        return real(*args)

    return flaky


def _counting(calls: list[int]):
    real = sv_module._sv_task
    return lambda *a: calls.append(a[-1].gene_start) or real(*a)


_KILLED_RUN = """
import sys, time
import spatialscale
import spatialscale.families.sv_hsic as m

real = m._sv_task


def slow(*a):
    if a[-1].gene_stop == int(sys.argv[3]):
        print("last batch started", flush=True)
        time.sleep(300)
    return real(*a)


m._sv_task = slow
spatialscale.sv_test(sys.argv[1], out=sys.argv[2], batch_size=3, scheduler="threads", progress=False)
"""


def test_a_killed_run_resumes_from_s3_with_an_empty_cache(s3, remote_store, reference, monkeypatch, tmp_path, caplog):
    import subprocess
    import sys

    out = f"{ROOT}/killed/sv.zarr"
    run = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, remote_store.url, out, str(remote_store.n_genes)],
                           stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "last batch started"
        seen, since, deadline = None, time.time(), time.time() + 60
        while time.time() < deadline:  # until the other batches are all recorded (no new object for 3 s)
            now = keys(s3, "killed/sv.zarr/_batches/")
            if now != seen:
                seen, since = now, time.time()
            elif time.time() - since > 3.0:
                break
            time.sleep(0.5)
    finally:
        run.kill()  # SIGKILL: no cleanup at all, its lock object stays behind
        run.wait()
    recorded = sorted({k.split("/")[3] for k in keys(s3, "killed/sv.zarr/_batches/")})
    assert len(recorded) > 1 and "killed/.sv.zarr.spatialscale-lock" in keys(s3, "killed/")
    # damage one recorded batch in the object store: it is named and recomputed
    victim = recorded[0]
    chunk = next(k for k in keys(s3, f"killed/sv.zarr/_batches/{victim}/statistic/") if not k.endswith("zarr.json"))
    s3.put_object(Bucket=BUCKET, Key=chunk, Body=b"garbage")
    # the rerun on another machine: nothing cached locally
    monkeypatch.setenv("SPATIALSCALE_CACHE", str(tmp_path / "empty-cache"))
    calls: list[int] = []
    monkeypatch.setattr(sv_module, "_sv_task", _counting(calls))
    with caplog.at_level(logging.WARNING, logger="spatialscale"):
        ds = spatialscale.sv_test(remote_store.url, out=out, batch_size=3, scheduler="threads", progress=False)
    same(ds, reference)
    same(spatialscale.open_results(out), reference)
    messages = [r.getMessage() for r in caplog.records]
    assert any("taking over the lock" in m for m in messages)  # its process is gone
    assert any(victim in m and "recomputing" in m for m in messages)
    assert int(victim[1:9]) in calls  # the damaged batch ran again, every other recorded one was reused
    assert {int(name[1:9]) for name in recorded[1:]}.isdisjoint(calls)
    assert (tmp_path / "empty-cache" / "stores" / remote_store.content_token / "zarr.json").is_file()
    assert {k.split("/")[1] for k in keys(s3, "killed/")} == {"sv.zarr"}  # no staging, lock or temporary left


def test_foreign_objects_are_refused_and_left_alone(s3, remote_store):
    s3.put_object(Bucket=BUCKET, Key="foreign/notes.txt", Body=b"mine")
    s3.put_object(Bucket=BUCKET, Key="file.zarr", Body=b"one object")
    for out, match in ((f"{ROOT}/foreign", "not written by spatialscale"),
                       (f"{ROOT}/file.zarr", "not a spatialscale results folder"),
                       (remote_store.url, "overlaps the input"),
                       (f"{ROOT}/stores", "overlaps the input")):
        with pytest.raises(InputError, match=match):
            spatialscale.sv_test(remote_store.url, out=out, scheduler="threads", progress=False)
    assert s3.get_object(Bucket=BUCKET, Key="foreign/notes.txt")["Body"].read() == b"mine"
    assert s3.get_object(Bucket=BUCKET, Key="file.zarr")["Body"].read() == b"one object"
    assert keys(s3, "foreign") == ["foreign/notes.txt"]
    # results written into a prefix that then gains a foreign object: never replaced
    out = f"{ROOT}/mixed/sv.zarr"
    spatialscale.sv_test(remote_store.url, out=out, scheduler="threads", progress=False)
    s3.put_object(Bucket=BUCKET, Key="mixed/sv.zarr/notes.txt", Body=b"mine")
    with pytest.raises(InputError, match="did not write"):
        spatialscale.sv_test(remote_store.url, out=out, method="hsic-ic", overwrite=True, scheduler="threads",
                             progress=False)
    assert s3.get_object(Bucket=BUCKET, Key="mixed/sv.zarr/notes.txt")["Body"].read() == b"mine"
    # an ingest onto something that is not a store: refused before anything is uploaded
    with pytest.raises(InputError, match="not written by spatialscale"):
        spatialscale.ingest(remote_store.path, f"{ROOT}/foreign", overwrite=True)
    assert keys(s3, "foreign") == ["foreign/notes.txt"]


def test_overwrite_replaces_results_only_when_the_new_ones_are_complete(s3, remote_store, reference, monkeypatch):
    url, out = remote_store.url, f"{ROOT}/over/sv.zarr"
    spatialscale.sv_test(url, out=out, scheduler="threads", progress=False)
    with pytest.raises(InputError, match="other options"):
        spatialscale.sv_test(url, out=out, method="hsic-ic", scheduler="threads", progress=False)
    monkeypatch.setattr(sv_module, "_sv_task", _fail_last(remote_store.n_genes))
    with pytest.raises(RuntimeError, match="lost power"):
        spatialscale.sv_test(url, out=out, method="hsic-ic", overwrite=True, batch_size=5, scheduler="threads",
                             progress=False)
    monkeypatch.undo()
    same(spatialscale.open_results(out), reference)  # the old results are untouched
    assert any(".sv.zarr.partial-" in k for k in keys(s3, "over/"))  # the new batches wait beside them
    ic = spatialscale.sv_test(url, out=out, method="hsic-ic", overwrite=True, batch_size=5, scheduler="threads",
                              progress=False)
    back = spatialscale.open_results(out)
    assert back.attrs["method"] == "hsic-ic"
    np.testing.assert_array_equal(back["sv_pvalue"].values, ic["sv_pvalue"].values)
    assert {k.split("/")[1] for k in keys(s3, "over/")} == {"sv.zarr"}


def test_a_held_lock_object_refuses_a_second_run(s3, remote_store):
    from spatialscale.remote import RemoteLock

    out = f"{ROOT}/locked/sv.zarr"
    lock_key = "locked/.sv.zarr.spatialscale-lock"
    other = RemoteLock(out)
    body = other._content().replace(socket.gethostname().encode(), b"elsewhere")
    s3.put_object(Bucket=BUCKET, Key=lock_key, Body=body)
    with pytest.raises(InputError, match="being written by another spatialscale run"):
        spatialscale.sv_test(remote_store.url, out=out, scheduler="threads", progress=False)
    assert s3.get_object(Bucket=BUCKET, Key=lock_key)["Body"].read() == body  # left as it was
    assert keys(s3, "locked/") == [lock_key]
    # a lock not refreshed for longer than its time to live belongs to a run that is gone: taken over
    head, info = body.split(b"\n", 1)
    stale = head + b"\n" + json.dumps({**json.loads(info), "refreshed": 0}).encode() + b"\n"
    s3.put_object(Bucket=BUCKET, Key=lock_key, Body=stale)
    spatialscale.sv_test(remote_store.url, out=out, scheduler="threads", progress=False)
    assert keys(s3, "locked/") == [k for k in keys(s3, "locked/") if k.startswith("locked/sv.zarr/")]
    # an object of that name that is not spatialscale's lock is never used or removed
    s3.put_object(Bucket=BUCKET, Key=lock_key, Body=b"someone else's")
    with pytest.raises(InputError, match="not a spatialscale lock"):
        spatialscale.sv_test(remote_store.url, out=out, method="hsic-ic", overwrite=True, scheduler="threads",
                             progress=False)
    assert s3.get_object(Bucket=BUCKET, Key=lock_key)["Body"].read() == b"someone else's"
    s3.delete_object(Bucket=BUCKET, Key=lock_key)
    # two runs in this process: the second is refused; the lock object is created exclusively (If-None-Match)
    first = RemoteLock(out).acquire()
    with pytest.raises(InputError, match="being written by another spatialscale run"):
        RemoteLock(out).acquire()
    assert RemoteLock(out)._create(b"pid 1 on elsewhere") is False  # a lock that appeared meanwhile is kept
    first.release()
    assert keys(s3, "locked/") == [k for k in keys(s3, "locked/") if k.startswith("locked/sv.zarr/")]


def test_cli_one_line_for_a_bad_url(s3, section, remote_store, reference, tmp_path, capsys):
    out = f"{ROOT}/cli/sv.zarr"
    assert main(["sv", remote_store.url, "--out", out, "--scheduler", "threads", "--no-progress"]) == 0
    same(spatialscale.open_results(out), reference)
    # an input at a URL: downloaded, then ingested (the same counts, hence the same results)
    section.write_h5ad(tmp_path / "sample.h5ad")
    s3.upload_file(str(tmp_path / "sample.h5ad"), BUCKET, "inputs/sample.h5ad")
    assert main(["ingest", f"{ROOT}/inputs/sample.h5ad", f"{ROOT}/cli/s.zarr", "--no-progress"]) == 0
    same(spatialscale.sv_test(f"{ROOT}/cli/s.zarr", scheduler="threads", progress=False), reference)
    capsys.readouterr()
    for argv in (["sv", "s3://no-such-bucket-here/s.zarr", "--out", str(tmp_path / "o.zarr"), "--no-progress"],
                 ["sv", remote_store.url, "--out", "s3://no-such-bucket-here/o.zarr", "--no-progress"],
                 ["ingest", str(tmp_path / "missing.h5ad"), "s3://no-such-bucket-here/x.zarr"],
                 ["sv", f"{ROOT}/inputs/sample.h5ad", "--out", str(tmp_path / "o.zarr"), "--anndata-out",
                  str(tmp_path / "copy.h5ad")]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "error:" in err and "Traceback" not in err, err
    assert not (tmp_path / "o.zarr").exists() and not (tmp_path / "copy.h5ad").exists()


def test_cohort_at_s3_equals_the_local_cohort_and_grows(s3, tmp_path, monkeypatch, capsys):
    import pandas as pd

    from spatialscale.simulate import simulate_section

    for i in range(3):
        simulate_section(150, 12, n_sv=3, seed=i + 1).write_h5ad(tmp_path / f"s{i}.h5ad")

    def manifest(k: int) -> str:
        path = tmp_path / f"manifest{k}.csv"
        pd.DataFrame({"section": [f"s{i}" for i in range(k)], "path": [f"s{i}.h5ad" for i in range(k)],
                      "condition": ["a", "b", "a"][:k]}).to_csv(path, index=False)
        return str(path)

    def cli_ingest(k: int) -> None:
        assert main(["cohort", "ingest", manifest(k), f"{ROOT}/co", "--scheduler", "threads", "--no-progress"]) == 0
        assert f"{ROOT}/co" in capsys.readouterr().out

    cli_ingest(2)
    assert main(["sv", f"{ROOT}/co", "--out", f"{ROOT}/co-sv.zarr", "--scheduler", "threads", "--no-progress"]) == 0
    assert any(k.startswith("co-sv.zarr/_sections/s1/") for k in keys(s3, "co-sv.zarr/"))  # kept to extend later
    # a third section: only it is ingested and uploaded, and only its batches are computed
    stamp = s3.head_object(Bucket=BUCKET, Key="co/sections/s0.zarr/zarr.json")["LastModified"]
    cli_ingest(3)
    assert s3.head_object(Bucket=BUCKET, Key="co/sections/s0.zarr/zarr.json")["LastModified"] == stamp
    cohort = spatialscale.open_cohort(f"{ROOT}/co")
    local = spatialscale.ingest_cohort(manifest(3), tmp_path / "co", scheduler="threads", progress=False)
    assert cohort.url == f"{ROOT}/co" and cohort.section_ids == local.section_ids == ["s0", "s1", "s2"]
    for sid in cohort.section_ids:
        assert cohort.store(sid).content_token == local.store(sid).content_token
    calls: list[str] = []
    real = sv_module._sv_task
    monkeypatch.setattr(sv_module, "_sv_task", lambda *a: calls.append(a[0]) or real(*a))
    ds = spatialscale.sv_test(f"{ROOT}/co", out=f"{ROOT}/co-sv.zarr", scheduler="threads", progress=False)
    monkeypatch.undo()
    assert calls and set(calls) == {str(cohort.store("s2").path)}
    expected = spatialscale.sv_test(local, scheduler="threads", progress=False)
    back = spatialscale.open_results(f"{ROOT}/co-sv.zarr")
    for v in ("sv_statistic", "sv_pvalue", "combined_pvalue", "combined_pvalue_adj"):
        np.testing.assert_array_equal(ds[v].values, expected[v].values)
        np.testing.assert_array_equal(back[v].values, expected[v].values)
    assert back.attrs["cohort"] == f"{ROOT}/co"


@pytest.fixture(scope="module")
def cluster(s3):
    """A two-worker LocalCluster started with the object store's environment (as remote workers would have it)."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as c, Client(c, set_as_default=False) as client:
        yield client


def test_sv_and_du_from_s3_on_a_local_cluster(s3, cluster, remote_store, local_store, reference, tmp_path):
    from spatialscale.remote import ensure_replica

    url = remote_store.url
    ds = spatialscale.sv_test(url, out=f"{ROOT}/cluster/sv.zarr", client=cluster, progress=False)
    same(ds, reference)
    same(spatialscale.open_results(f"{ROOT}/cluster/sv.zarr"), reference)
    expected = spatialscale.du_test(local_store, "region", method="hsic", scheduler="threads", progress=False)
    same(spatialscale.du_test(url, "region", method="hsic", scheduler="threads", progress=False), expected, "du")
    # the CLI's du on the cluster (its scheduler's address), results to the object store
    address = cluster.scheduler_info()["address"]
    assert main(["du", url, "--covariates", "region", "--method", "hsic", "--out", f"{ROOT}/cluster/du.zarr",
                 "--scheduler", address, "--no-progress"]) == 0
    same(spatialscale.open_results(f"{ROOT}/cluster/du.zarr"), expected, "du")
    # a worker without the replica (another machine) fetches and verifies its own
    target = tmp_path / "worker-cache" / remote_store.content_token
    made = cluster.submit(ensure_replica, url, remote_store.content_token, target, pure=False).result()
    assert made == target and spatialscale.open_store(target).content_token == remote_store.content_token


def test_clear_replicas_keeps_those_being_read(s3, remote_store, tmp_path, monkeypatch):
    from spatialscale.output import FileLock
    from spatialscale.remote import clear_replicas

    monkeypatch.setenv("SPATIALSCALE_CACHE", str(tmp_path / "cache"))
    replica = spatialscale.open_store(remote_store.url).path
    (tmp_path / "cache" / "stores" / "notes").mkdir()  # not a replica: never removed
    with FileLock(replica, shared=True):  # a run reading it (flock: another open file, as another process)
        assert clear_replicas() == []
    assert clear_replicas() == [replica] and not replica.exists()
    assert (tmp_path / "cache" / "stores" / "notes").is_dir()
    assert spatialscale.open_store(remote_store.url).path == replica  # fetched again when needed


def test_a_worker_that_cannot_use_the_clients_cache_path_reads_its_own(s3, remote_store, tmp_path, monkeypatch):
    import functools

    from spatialscale.engine import Batch
    from spatialscale.families.common import _replicated

    (tmp_path / "not-a-folder").write_text("")
    client_path = str(tmp_path / "not-a-folder" / "stores" / remote_store.content_token)  # cannot be made here
    monkeypatch.setenv("SPATIALSCALE_CACHE", str(tmp_path / "worker-cache"))

    def task(path: str, batch: Batch) -> dict:
        return {"path": path, "token": spatialscale.open_store(path).content_token}

    got = _replicated(functools.partial(task, client_path), remote_store.url, client_path,
                      remote_store.content_token, Batch(0, 1, 0, 2, 2))
    assert got == {"path": str(tmp_path / "worker-cache" / "stores" / remote_store.content_token),
                   "token": remote_store.content_token}


def test_remote_batch_records_verify_adopt_and_refuse_stale_runs(s3):
    from spatialscale.engine import Batch
    from spatialscale.output import StaleRunError
    from spatialscale.remote import RemotePartialStore, _zarr_json, write_bytes

    root = f"{ROOT}/unit/a.zarr"
    write_bytes(f"{root}/zarr.json", _zarr_json({"spatialscale_partial": True, "fingerprint": "fp", "run_id": "r1"}))
    record = RemotePartialStore(root, "fp", "r1")
    first, second = Batch(0, 2, 0, 4, 2), Batch(2, 4, 4, 8, 2)
    record.write(first, {"x": np.arange(2.0), "n": np.array([3, 4])})
    np.testing.assert_array_equal(RemotePartialStore(root, "fp").read(first)["x"], [0.0, 1.0])
    assert RemotePartialStore(root, "another fingerprint").load(first) is None  # other options: not reused
    copy = RemotePartialStore(f"{ROOT}/unit/b.zarr", "fp")
    assert copy.adopt(root) == 1 and copy.load(first) is not None
    assert RemotePartialStore(f"{ROOT}/unit/c.zarr", "other").adopt(root) == 0
    # another run took the output over: this run's late batch is refused, nothing is written
    write_bytes(f"{root}/zarr.json", _zarr_json({"spatialscale_partial": True, "fingerprint": "fp", "run_id": "r2"}))
    with pytest.raises(StaleRunError):
        record.write(second, {"x": np.arange(2.0), "n": np.array([3, 4])})
    assert {k.split("/")[3] for k in keys(s3, "unit/a.zarr/_batches/")} == {first.name}


def test_an_interrupted_swap_is_finished_by_rerunning(s3, remote_store, reference, monkeypatch):
    import spatialscale.remote as remote

    url, out = remote_store.url, f"{ROOT}/swap/sv.zarr"
    real = remote.upload

    def cut(local, target, **kw):  # the connection drops when the new results go into the output
        if kw.get("root", True) is False:
            raise OSError("connection reset by peer")
        return real(local, target, **kw)

    # a first run: the output is its own staging, its batches under <out>/_batches until the swap is over
    monkeypatch.setattr(remote, "upload", cut)
    with pytest.raises(OSError, match="connection reset"):
        spatialscale.sv_test(url, out=out, scheduler="threads", progress=False)
    monkeypatch.undo()
    with pytest.raises(InputError, match="unfinished run"):
        spatialscale.open_results(out)  # the placeholder: spatialscale's, never taken for results
    assert any("/_batches/" in k for k in keys(s3, "swap/"))
    calls: list[int] = []
    monkeypatch.setattr(sv_module, "_sv_task", _counting(calls))
    ds = spatialscale.sv_test(url, out=out, scheduler="threads", progress=False)
    monkeypatch.undo()
    assert calls == []  # every batch was still recorded
    same(ds, reference)
    same(spatialscale.open_results(out), reference)
    assert {k.split("/")[1] for k in keys(s3, "swap/")} == {"sv.zarr"}
    assert not any("/_batches/" in k for k in keys(s3, "swap/"))


@pytest.mark.parametrize("call", ["moran", "du-t-fisher", "summary"])
def test_other_families_from_s3_equal_local(s3, remote_store, local_store, call):
    """Every family runs through the same URL plumbing: Moran's I, a DU t-test and the feature summary from the
    store at s3 to results at s3 equal their local runs exactly."""
    run = {"moran": lambda store, **kw: spatialscale.sv_test(store, method="moran", **kw),
           "du-t-fisher": lambda store, **kw: spatialscale.du_test(store, covariates="region", method="t-fisher",
                                                                   **kw),
           "summary": lambda store, **kw: spatialscale.feature_summary(store, **kw)}[call]
    local = run(local_store, scheduler="threads", progress=False)
    out = f"{ROOT}/families/{call}.zarr"
    remote = run(f"{ROOT}/stores/s.zarr", out=out, scheduler="threads", progress=False)
    again = spatialscale.open_results(out)
    floats = [v for v in local.data_vars if local[v].dtype.kind == "f"]
    assert floats
    for v in floats:
        np.testing.assert_array_equal(remote[v].values, local[v].values)
        np.testing.assert_array_equal(again[v].values, local[v].values)
