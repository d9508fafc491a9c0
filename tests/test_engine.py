"""Engine: identical results in every execution mode, resume, failures."""

from __future__ import annotations

import os

import numpy as np
import pytest
import xarray as xr

import spatialscale
import spatialscale.families.sv_hsic as api
from spatialscale import InputError
from spatialscale.engine import Batch, PartialStore, execution, plan_batches, run_batches


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from conftest import make_adata

    adata = make_adata(n=400, n_genes=40, seed=7)
    return spatialscale.ingest(adata, tmp_path_factory.mktemp("eng") / "s.zarr")


@pytest.fixture(scope="module")
def reference(store):
    return spatialscale.sv_test(store, scheduler="threads", progress=False)


def assert_same(a: xr.Dataset, b: xr.Dataset) -> None:
    assert list(a["gene"].values) == list(b["gene"].values)
    for v in ("sv_statistic", "sv_pvalue", "sv_pvalue_adj"):
        np.testing.assert_allclose(a[v].values, b[v].values, rtol=1e-12, atol=0)


def test_plan_groups_equal_isoform_counts_within_budget(store):
    def cost(p: int) -> float:
        return 100.0 * p

    batches = plan_batches(store.genes, store.n_spots, bytes_per_gene=cost, memory_bytes=700)
    assert sum(b.n_genes for b in batches) == store.n_genes
    for b in batches:
        sizes = store.genes["n_isoforms"].iloc[b.gene_start : b.gene_stop]
        assert (sizes == b.n_isoforms).all()
        assert b.n_genes * cost(b.n_isoforms) <= 700 or b.n_genes == 1
        assert b.col_stop - b.col_start == b.n_genes * b.n_isoforms
    capped = plan_batches(store.genes, store.n_spots, bytes_per_gene=cost, memory_bytes=1e9, batch_size=3)
    assert max(b.n_genes for b in capped) == 3


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_batch_size_does_not_change_results(store, reference, batch_size):
    ds = spatialscale.sv_test(store, batch_size=batch_size, scheduler="threads", progress=False)
    assert ds.attrs["execution"] == "threads"
    assert_same(ds, reference)


@pytest.mark.parametrize("batch_size", [1, 7, None])
def test_distributed_client_matches_threads(store, reference, client, batch_size):
    ds = spatialscale.sv_test(store, client=client, batch_size=batch_size, progress=False)
    assert ds.attrs["execution"] == "distributed"
    assert_same(ds, reference)


def test_scheduler_address_and_active_client(store, reference, client):
    ds = spatialscale.sv_test(store, scheduler=client.scheduler.address, batch_size=5, progress=False)
    assert_same(ds, reference)
    with client.as_current():
        ds = spatialscale.sv_test(store, batch_size=5, progress=False)
    assert ds.attrs["execution"] == "distributed"
    assert_same(ds, reference)


@pytest.mark.parametrize("workers", [1, 2])
def test_own_local_cluster(store, reference, workers):
    ds = spatialscale.sv_test(store, workers=workers, batch_size=7, progress=False)
    assert ds.attrs["execution"] == "distributed"
    assert_same(ds, reference)


def test_permutation_null_is_seeded_and_batch_invariant(store):
    a = spatialscale.sv_test(store, null="perm", n_perms=99, batch_size=1, progress=False)
    b = spatialscale.sv_test(store, null="perm", n_perms=99, progress=False)
    assert_same(a, b)
    p = a["sv_pvalue"].values
    assert np.all((p >= 0.01) & (p <= 1.0))
    np.testing.assert_allclose(p * 100, np.round(p * 100))  # multiples of 1/(B+1)
    c = spatialscale.sv_test(store, null="perm", n_perms=99, perm_seed=1, progress=False)
    assert not np.array_equal(a["sv_pvalue"].values, c["sv_pvalue"].values)


def test_results_zarr_roundtrip_and_attrs(store, reference, tmp_path):
    ds = spatialscale.sv_test(store, out=tmp_path / "sv.zarr", progress=False)
    back = xr.open_zarr(tmp_path / "sv.zarr")
    assert_same(back.load(), reference)
    for key in ("method", "null", "kernel_rho", "kernel_k_neighbors", "n_spots", "spatialscale_version"):
        assert key in back.attrs
    assert back.attrs["n_spots"] == store.n_spots
    assert back["n_isoforms"].dtype.kind == "i"
    assert ds.attrs["method"] == "hsic-ir"
    # same command again: nothing recomputed, same numbers
    assert_same(spatialscale.sv_test(store, out=tmp_path / "sv.zarr", progress=False), reference)
    with pytest.raises(InputError, match="overwrite"):
        spatialscale.sv_test(store, method="hsic-ic", out=tmp_path / "sv.zarr", progress=False)


def test_interrupted_run_resumes_only_missing_batches(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "sv.zarr"
    real = api._sv_task
    calls: list[int] = []

    def flaky(*args):
        batch = args[-1]
        if batch.gene_stop == store.n_genes:  # the last batch fails
            raise RuntimeError("worker lost power")
        return real(*args)

    monkeypatch.setattr(api, "_sv_task", flaky)
    with pytest.raises(RuntimeError, match="lost power"):
        spatialscale.sv_test(store, out=out, batch_size=7, scheduler="threads", progress=False)
    done = sorted(p.name for p in (out / "_batches").iterdir())
    assert len(done) > 0

    def counting(*args):
        calls.append(args[-1].gene_start)
        return real(*args)

    monkeypatch.setattr(api, "_sv_task", counting)
    ds = spatialscale.sv_test(store, out=out, batch_size=7, scheduler="threads", progress=False)
    plan = plan_batches(store.genes, store.n_spots, bytes_per_gene=lambda p: 1.0, batch_size=7,
                        min_batches=spatialscale.api.MIN_BATCHES)
    assert len(done) < len(plan)
    assert len(calls) == len(plan) - len(done)
    assert max(calls) == plan[-1].gene_start  # the batch that failed was recomputed
    assert_same(ds, reference)
    assert not (out / "_batches").exists()


def test_full_disk_at_the_end_keeps_finished_batches(store, reference, tmp_path, monkeypatch):
    out = tmp_path / "sv.zarr"

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(xr.Dataset, "to_zarr", full)
    with pytest.raises(OSError, match="re-running the same command resumes"):
        spatialscale.sv_test(store, out=out, batch_size=10, scheduler="threads", progress=False)
    n_batches = len(plan_batches(store.genes, store.n_spots, bytes_per_gene=lambda p: 1.0, batch_size=10,
                                   min_batches=spatialscale.api.MIN_BATCHES))
    assert len(list((out / "_batches").iterdir())) == n_batches
    monkeypatch.undo()
    calls: list[int] = []
    real = api._sv_task
    monkeypatch.setattr(api, "_sv_task", lambda *a: calls.append(1) or real(*a))
    assert_same(spatialscale.sv_test(store, out=out, batch_size=10, scheduler="threads", progress=False), reference)
    assert calls == []


def _die_once(marker: str, batch: Batch) -> dict:
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(1)  # the worker process dies mid-task
    return {"value": np.arange(batch.gene_start, batch.gene_stop, dtype=float)}


def test_dead_worker_is_retried(tmp_path):
    from distributed import Client, LocalCluster

    batches = [Batch(0, 3, 0, 6, 2), Batch(3, 5, 6, 10, 2)]
    task = __import__("functools").partial(_die_once, str(tmp_path / "died"))
    with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=":0") as cluster, Client(cluster) as c:
        with execution(c) as runner:
            out = run_batches(task, batches, runner, progress=False)
    assert (tmp_path / "died").exists()
    np.testing.assert_array_equal(np.concatenate([o["value"] for o in out]), np.arange(5.0))


def test_partial_store_ignores_other_runs(tmp_path):
    b = Batch(0, 2, 0, 4, 2)
    PartialStore(tmp_path, "fp-a").write(b, {"x": np.ones(2)})
    assert PartialStore(tmp_path, "fp-a").is_done(b)
    assert not PartialStore(tmp_path, "fp-b").is_done(b)


@pytest.mark.parametrize(("kw", "msg"), [({"method": "hsic-xx"}, "unknown method"),
                                         ({"null": "exact"}, "unknown null"),
                                         ({"transformation": "log"}, "unknown transformation"),
                                         ({"device": "tpu"}, "unknown device")])
def test_unknown_options_fail_before_writing(store, tmp_path, kw, msg):
    with pytest.raises(InputError, match=msg):
        spatialscale.sv_test(store, out=tmp_path / "sv.zarr", **kw)
    assert not (tmp_path / "sv.zarr").exists()


def test_device_auto_falls_back_to_cpu_without_cuda(store, reference):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_same(spatialscale.sv_test(store, device="auto", scheduler="threads", progress=False), reference)
    with pytest.raises(InputError, match="no CUDA device"):
        spatialscale.sv_test(store, device="cuda", scheduler="threads", progress=False)


def test_out_of_memory_batches_are_split_and_retried():
    from spatialscale.engine import run_splitting, split_batch

    calls: list[int] = []

    class OutOfMemoryError(RuntimeError):  # the name torch.cuda uses
        pass

    def task(batch: Batch) -> dict:
        calls.append(batch.n_genes)
        if batch.n_genes > 3:
            raise OutOfMemoryError("CUDA out of memory")
        return {"g": np.arange(batch.gene_start, batch.gene_stop), "c": np.arange(batch.col_start, batch.col_stop,
                                                                                    batch.n_isoforms)}

    out = run_splitting(task, Batch(10, 20, 100, 130, 3))
    np.testing.assert_array_equal(out["g"], np.arange(10, 20))
    np.testing.assert_array_equal(out["c"], np.arange(100, 130, 3))
    assert calls[0] == 10 and max(calls[1:]) <= 5
    a, b = split_batch(Batch(0, 5, 0, 10, 2))
    assert (a.gene_stop, a.col_stop, b.col_start) == (2, 4, 4)

    def always(batch: Batch) -> dict:
        raise OutOfMemoryError("even one gene")

    with pytest.raises(OutOfMemoryError):
        run_splitting(always, Batch(0, 4, 0, 8, 2))

    def other(batch: Batch) -> dict:
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        run_splitting(other, Batch(0, 4, 0, 8, 2))


def test_batch_memory_sizes_the_batches(store, reference, monkeypatch):
    """The budget decides how many genes a batch holds ("auto" on CPU: 256MB); results stay the same."""
    import spatialscale.families.common as common

    plans: list[tuple[float, list]] = []
    real = common.plan_batches

    def recording(*a, **k):
        plan = real(*a, **k)
        plans.append((k["memory_bytes"], plan))
        return plan

    monkeypatch.setattr(common, "plan_batches", recording)
    per_gene = 8.0 * store.n_spots * (3 + 5 * 3)  # sv hsic-ir's estimate for a gene of 3 isoforms
    for budget in ("auto", int(2.5 * per_gene), int(1.5 * per_gene)):
        ds = spatialscale.sv_test(store, batch_memory=budget, device="auto", scheduler="threads", progress=False)
        assert_same(ds, reference)
    assert plans[0][0] == 256_000_000  # "256MB"
    three = [[b.n_genes for b in plan if b.n_isoforms == 3] for _, plan in plans]
    assert max(three[1]) == 2 and max(three[2]) == 1  # 2.5 and 1.5 genes' worth of memory
    assert len(three[2]) > len(three[1]) > 1


def test_run_work_bounds_tasks_in_flight_and_keeps_order():
    import threading
    import time

    from spatialscale.engine import Work, run_work

    state = {"now": 0, "max": 0}
    lock = threading.Lock()

    def task(batch: Batch) -> dict:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.01)
        with lock:
            state["now"] -= 1
        return {"g": np.arange(batch.gene_start, batch.gene_stop)}

    items = [Work(task, Batch(2 * i, 2 * i + 2, 4 * i, 4 * i + 4, 2)) for i in range(20)]
    with execution(scheduler="threads", threads=8) as runner:
        out = run_work(items, runner, progress=False, max_in_flight=3)
    np.testing.assert_array_equal(np.concatenate([o["g"] for o in out]), np.arange(40))
    assert 1 <= state["max"] <= 3
