"""The engine: gene batches as Dask tasks, with resumable partial results.

The engine knows Dask and zarr but not the statistics: it plans batches of
genes with equal isoform count, runs one task per batch through a *runner*
(a distributed ``Client``, or local threads), lets each task record its
result under ``<out>/_batches/`` and marks the batch done, and gathers
everything in gene order.  A re-run with the same fingerprint finds the
batches already done and computes only the missing ones.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spatialscale.output import PartialStore

log = logging.getLogger("spatialscale")

__all__ = [
    "Work",
    "load_recorded",
    "run_work",
    "Batch",
    "check_worker_paths",
    "local_cluster",
    "plan_batches",
    "execution",
    "run_batches",
    "fingerprint",
    "PartialStore",
    "run_splitting",
    "split_batch",
]

#: shared task inputs (e.g. DU covariates) up to this size travel inside each task instead of as one future
SHARE_INLINE_BYTES = 1 << 20


# --------------------------------------------------------------------------- planning
@dataclass(frozen=True)
class Batch:
    """A contiguous range of genes that all have ``n_isoforms`` isoforms."""

    gene_start: int
    gene_stop: int
    col_start: int
    col_stop: int
    n_isoforms: int

    @property
    def n_genes(self) -> int:
        return self.gene_stop - self.gene_start

    @property
    def name(self) -> str:
        return f"g{self.gene_start:08d}-{self.gene_stop:08d}"


def plan_batches(
    genes: pd.DataFrame,
    n_spots: int,
    *,
    bytes_per_gene: Callable[[int], float],
    memory_bytes: float = 256 << 20,
    batch_size: int | None = None,
    min_batches: int = 1,
) -> list[Batch]:
    """Split genes (in store order) into batches of equal isoform count.

    Parameters
    ----------
    genes
        Gene table with ``n_isoforms``, ``start``, ``stop`` in store order
        (genes with equal isoform count are contiguous).
    n_spots
        Spots of the section (for messages only; the cost is in
        ``bytes_per_gene``).
    bytes_per_gene
        Working memory of one gene with ``p`` isoforms in a task.
    memory_bytes
        Budget of one task; a batch holds as many genes as fit.
    batch_size
        Upper bound on genes per batch (``None``: only the budget).
    min_batches
        Split into at least this many batches when there are enough genes,
        so that every worker gets work.

    Returns
    -------
    list of Batch
    """
    p = genes["n_isoforms"].to_numpy()
    starts = genes["start"].to_numpy()
    stops = genes["stop"].to_numpy()
    out: list[Batch] = []
    bounds = np.flatnonzero(np.r_[True, p[1:] != p[:-1], True])
    balance = max(1, int(np.ceil(len(p) / max(int(min_batches), 1))))
    for a, b in zip(bounds[:-1], bounds[1:]):
        size = max(1, int(memory_bytes // max(bytes_per_gene(int(p[a])), 1.0)))
        size = min(size, balance)
        if batch_size is not None:
            size = max(1, min(size, int(batch_size)))
        for s in range(a, b, size):
            e = min(s + size, b)
            out.append(Batch(int(s), int(e), int(starts[s]), int(stops[e - 1]), int(p[a])))
    return out


def fingerprint(**fields: Any) -> str:
    """Stable hash of the options that determine a run's numbers."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- runners
def free_device_memory(device: str) -> int | None:
    """Free memory (bytes) of this process's CUDA device, or None on CPU. Runs on workers."""
    from spatialscale.options import cuda_available

    if device == "cpu" or not cuda_available():
        return None
    try:
        import torch

        free, _ = torch.cuda.mem_get_info()
        return int(free)
    except Exception:  # noqa: BLE001 - no usable device: fall back to the CPU budget
        return None


class _ThreadCompletion:
    """``distributed.as_completed`` for ``concurrent.futures``: ``(future, result, error)`` as they finish.

    ``add`` more futures while iterating; ``error`` is the task's exception
    (``result`` is then ``None``).
    """

    def __init__(self, futures: Sequence[Any]) -> None:
        self._pending = list(futures)

    def add(self, future: Any) -> None:
        self._pending.append(future)

    def __iter__(self) -> Iterator[Any]:
        from concurrent.futures import FIRST_COMPLETED, wait

        while self._pending:
            done, _ = wait(self._pending, return_when=FIRST_COMPLETED)
            for fut in [f for f in self._pending if f in done]:
                self._pending.remove(fut)
                try:
                    yield fut, fut.result(), None
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    yield fut, None, exc


class _ThreadRunner:
    """Runs tasks in local threads (no cluster)."""

    kind = "threads"

    def __init__(self, n_threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, n_threads))

    def submit(self, fn: Callable, *args: Any, key: str, affinity: str | None = None) -> Any:
        return self._pool.submit(fn, *args)

    def share(self, value: Any) -> Any:
        """Make a value available to tasks (in-process: the value itself)."""
        return value

    def device_memory(self, device: str) -> int | None:
        """Free device memory where tasks run (None on CPU)."""
        return free_device_memory(device)

    def completion(self, futures: Sequence[Any]) -> _ThreadCompletion:
        """``(future, result, error)`` as futures complete; more can be added while iterating."""
        return _ThreadCompletion(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _DaskCompletion:
    """``distributed.as_completed`` with results, as ``(future, result, error)``."""

    def __init__(self, futures: Sequence[Any], client: Any) -> None:
        from distributed import as_completed

        # this client's loop, not the default client's
        self._flow = as_completed(futures, with_results=True, raise_errors=False, loop=client.loop)

    def add(self, future: Any) -> None:
        self._flow.add(future)

    def __iter__(self) -> Iterator[Any]:
        for fut, value in self._flow:
            if fut.status == "error":
                _, exc, tb = value
                yield fut, None, exc.with_traceback(tb)
            elif isinstance(value, BaseException):  # cancelled
                yield fut, None, value
            else:
                yield fut, value, None


class _DaskRunner:
    """Runs tasks on a ``distributed.Client`` (with retries on lost workers)."""

    kind = "distributed"

    def __init__(self, client: Any, retries: int = 2) -> None:
        self.client = client
        self.retries = retries
        self._homes: dict[str, str] = {}
        self._workers: list[str] | None = None

    def submit(self, fn: Callable, *args: Any, key: str, affinity: str | None = None) -> Any:
        """Submit a task; tasks of one ``affinity`` (a cohort's section) prefer one worker.

        Affinities are spread over the workers in turn and the preference is
        loose (``allow_other_workers``: an idle worker still takes the task), so
        a section's kernel is loaded by about one worker instead of every one.
        """
        where: dict[str, Any] = {}
        if affinity is not None:
            if affinity not in self._homes:
                if not self._workers:  # the workers at the first affinity (a lost one: allow_other_workers)
                    self._workers = sorted(self.client.scheduler_info()["workers"])
                if self._workers:
                    self._homes[affinity] = self._workers[len(self._homes) % len(self._workers)]
            if affinity in self._homes:
                where = {"workers": [self._homes[affinity]], "allow_other_workers": True}
        return self.client.submit(fn, *args, key=key, retries=self.retries, pure=False, **where)

    def share(self, value: Any) -> Any:
        """``value`` itself when small (it travels inside each task), else one plain future of it.

        A future lives on one worker, and the scheduler first queues every task that needs it
        there, so the other workers wait until they steal work (measured: the second of two GLMM
        tasks started 0.4-1.2 s late).  A future is never broadcast: that conflicts with the
        Active Memory Manager.
        """
        from dask.sizeof import sizeof

        if sizeof(value) <= SHARE_INLINE_BYTES:
            return value
        return self.client.scatter(value, hash=False)

    def device_memory(self, device: str) -> int | None:
        """Smallest free device memory over the workers (None on CPU workers)."""
        found = [v for v in self.client.run(free_device_memory, device).values() if v]
        return min(found) if found else None

    def completion(self, futures: Sequence[Any]) -> _DaskCompletion:
        """``(future, result, error)`` as futures complete; more can be added while iterating.

        Results are fetched by ``distributed.as_completed`` in the background
        as tasks finish, not one round trip per ``result()`` call.
        """
        return _DaskCompletion(futures, self.client)

    def close(self) -> None:
        pass


def _cuda_requested(device: str) -> bool:
    if device == "cuda":
        return True
    if device == "auto":
        from spatialscale.options import cuda_available

        with contextlib.suppress(Exception):
            return cuda_available()
    return False


@contextlib.contextmanager
def execution(
    client: Any = None,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "cpu",
    retries: int = 2,
) -> Iterator[Any]:
    """Resolve where tasks run, and clean up what was started.

    Order: an explicit ``client``; a ``scheduler`` address or scheduler file
    (or ``"threads"`` for local threads even when a Dask client is active); a
    new ``LocalCluster`` (or dask-cuda ``LocalCUDACluster`` for ``device``
    ``cuda``) with ``workers`` processes, bound to 127.0.0.1; the active Dask
    client if there is one; else local threads.

    Yields
    ------
    runner
        An object with ``submit``, ``completion``, ``share`` and ``kind``.
    """
    if client is not None:
        yield _DaskRunner(client, retries)
        return
    from distributed import Client

    if scheduler == "threads":
        runner = _ThreadRunner(threads or os.cpu_count() or 1)
        try:
            yield runner
        finally:
            runner.close()
        return
    if scheduler:
        with _connect(scheduler) as c:
            yield _DaskRunner(c, retries)
        return
    if workers:
        cluster = local_cluster(int(workers), device)
        try:
            with Client(cluster) as c:
                print(f"spatialscale: started a local Dask cluster of {workers} worker(s); dashboard: "
                      f"{c.dashboard_link}", file=sys.stderr, flush=True)
                yield _DaskRunner(c, retries)
        finally:
            cluster.close()
        return
    from distributed import get_client

    try:
        active = get_client()
    except ValueError:
        active = None
    if active is not None:
        yield _DaskRunner(active, retries)
        return
    runner = _ThreadRunner(threads or os.cpu_count() or 1)
    try:
        yield runner
    finally:
        runner.close()


def _connect(scheduler: str) -> Any:
    """A client of an existing scheduler (address or scheduler file), failing within seconds."""
    from distributed import Client

    from spatialscale.errors import InputError
    from spatialscale.options import CONNECT_TIMEOUT_S, is_scheduler_file

    try:
        if is_scheduler_file(scheduler):
            return Client(scheduler_file=scheduler, timeout=CONNECT_TIMEOUT_S)
        return Client(scheduler, timeout=CONNECT_TIMEOUT_S)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"could not connect to the Dask scheduler {scheduler} within {CONNECT_TIMEOUT_S:g} s "
                         f"({type(exc).__name__}: {exc}).") from exc


#: local clusters listen on the loopback interface only: a reachable scheduler runs arbitrary code
LOOPBACK = "127.0.0.1"


def local_cluster(n_workers: int, device: str = "cpu") -> Any:
    """A LocalCluster of single-threaded worker processes on 127.0.0.1 (dask-cuda's for ``device`` cuda)."""
    if _cuda_requested(device):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            from spatialscale.errors import InputError

            raise InputError(
                "device='cuda' with --workers needs dask-cuda: pip install -e '.[cuda]'."
            ) from exc
        return LocalCUDACluster(n_workers=n_workers, threads_per_worker=1, host=LOOPBACK,
                                dashboard_address=f"{LOOPBACK}:0")
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host=LOOPBACK,
                        dashboard_address=f"{LOOPBACK}:0")


def check_worker_paths(runner: Any, paths: dict[str, str]) -> None:
    """Fail at once, naming the worker and the path, if a worker cannot see a path the run needs.

    ``paths`` maps a description (``"store"``) to an absolute path that must
    exist on every worker.  Local threads share the client's view and are
    not checked.
    """
    if runner.kind != "distributed":
        return
    from spatialscale.errors import InputError

    seen = runner.client.run(_missing_paths, list(paths.values()))
    for worker, missing in sorted(seen.items()):
        if missing:
            what = next(k for k, v in paths.items() if v == missing[0])
            raise InputError(f"worker {worker} cannot see the {what} {missing[0]}; remote workers need the same "
                             "shared filesystem path as the client.")


def _missing_paths(paths: list[str]) -> list[str]:
    """Runs on a worker: which of ``paths`` do not exist there."""
    return [p for p in paths if not os.path.exists(p)]


# --------------------------------------------------------------------------- running
def _is_out_of_memory(exc: BaseException) -> bool:
    """A device or host out-of-memory error (torch's CUDA OOM included, without importing torch)."""
    return isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"


def split_batch(batch: Batch) -> tuple[Batch, Batch]:
    """Two halves of a batch (by genes), each one contiguous column range."""
    mid = batch.gene_start + batch.n_genes // 2
    col_mid = batch.col_start + (mid - batch.gene_start) * batch.n_isoforms
    return (Batch(batch.gene_start, mid, batch.col_start, col_mid, batch.n_isoforms),
            Batch(mid, batch.gene_stop, col_mid, batch.col_stop, batch.n_isoforms))


def run_splitting(task: Callable, batch: Batch, *extra: Any) -> dict[str, np.ndarray]:
    """Run ``task`` on ``batch``; if it runs out of memory, split the batch and retry the halves.

    Results are per gene and independent of batching, so the halves'
    results, concatenated, are the batch's.  A single gene that does not fit
    re-raises the error.
    """
    try:
        return task(batch, *extra)
    except Exception as exc:
        if not _is_out_of_memory(exc) or batch.n_genes < 2:
            raise
    from spatialscale.options import cuda_available

    if cuda_available():
        with contextlib.suppress(Exception):
            import torch

            torch.cuda.empty_cache()
    halves = [run_splitting(task, half, *extra) for half in split_batch(batch)]
    return {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}


def _run_one(task: Callable, batch: Batch, partial: PartialStore | None, *extra: Any) -> dict[str, np.ndarray]:
    from spatialscale.worker import tune_allocator

    tune_allocator()  # once per process: large temporaries stay in the heap instead of fresh mmaps
    result = run_splitting(task, batch, *extra)
    if partial is not None:
        partial.write(batch, result)
    return result


@dataclass(frozen=True)
class Work:
    """One batch of one section's run: the task, its batch, where it is recorded, and extra task arguments."""

    task: Callable
    batch: Batch
    partial: PartialStore | None = None
    extra: tuple = ()
    tag: str = ""


def load_recorded(work: Work) -> dict[str, np.ndarray] | None:
    """The verified recorded result of a work item, or ``None`` if it has to run."""
    return work.partial.load(work.batch) if work.partial is not None else None


def run_batches(
    task: Callable[[Batch], dict[str, np.ndarray]],
    batches: Sequence[Batch],
    runner: Any,
    *,
    partial: PartialStore | None = None,
    progress: bool = True,
    label: str = "batches",
    extra: tuple = (),
) -> list[dict[str, np.ndarray]]:
    """Run ``task`` on every batch not already done; return results in batch order.

    Parameters
    ----------
    task
        Picklable callable ``Batch -> dict of (n_genes_in_batch,) arrays``;
        it must be idempotent (a retried batch gives identical numbers).
    batches
        The plan.
    runner
        From :func:`execution`.
    partial
        Where finished batches are recorded; ``None`` keeps results in memory.
    progress
        Show a progress bar of batches done.
    label
        Progress bar label.
    extra
        More arguments of ``task`` after the batch (e.g. a scattered
        design matrix: futures given here are resolved on the worker).
    """
    return run_work([Work(task, b, partial, extra) for b in batches], runner, progress=progress, label=label)


def _run_bundle(tasks: list, batches: list, partials: list) -> list[dict[str, np.ndarray]]:
    """Several batches of one section in one task, one after another (each recorded as it finishes)."""
    return [_run_one(t, b, p) for t, b, p in zip(tasks, batches, partials)]


def run_work(items: Sequence[Work], runner: Any, *, progress: bool = True, label: str = "batches",
             max_in_flight: int | None = None,
             recorded: Sequence[dict[str, np.ndarray] | None] | None = None,
             bundle: int = 1) -> list[dict[str, np.ndarray]]:
    """Run every item not already recorded; return results in item order.

    Items may come from several sections (different tasks and partial
    stores) and run as one set of tasks on one runner.  At most
    ``max_in_flight`` tasks are submitted at a time (``None``: all), so the
    client's and scheduler's memory stays bounded whatever the number of
    items; recorded items are verified and reused (see
    :meth:`PartialStore.load`); ``recorded`` gives them when the caller
    has loaded them already (one per item, ``None`` for those to run).
    With ``bundle > 1``, up to that many consecutive items of one section
    (same ``tag``, no extra arguments) run as one task, each still recorded
    on its own: fewer tasks, less scheduling per batch, where the sections
    keep the workers busy between them.
    """
    from tqdm import tqdm

    results: dict[int, dict[str, np.ndarray]] = {}
    todo = []
    if recorded is None:
        recorded = [load_recorded(w) for w in items]
    for i, done in enumerate(recorded):
        if done is not None:
            results[i] = done
        else:
            todo.append(i)
    log.info("%s: %d batches, %d already done, %d to run (%s)", label, len(items), len(items) - len(todo),
             len(todo), runner.kind)
    tag = uuid.uuid4().hex[:8]
    limit = len(todo) if max_in_flight is None else max(1, int(max_in_flight))
    groups: list[list[int]] = []
    for i in todo:
        last = groups[-1] if groups else None
        if (last is not None and len(last) < bundle and not items[i].extra and not items[last[0]].extra
                and items[i].tag == items[last[0]].tag):
            last.append(i)
        else:
            groups.append([i])
    queue = list(reversed(groups))
    pending: dict[Any, list[int]] = {}

    def submit_next() -> Any:
        group = queue.pop()
        w = items[group[0]]
        key = f"{label}-{tag}{w.tag}-{w.batch.name}" + (f"+{len(group) - 1}" if len(group) > 1 else "")
        if len(group) == 1:
            fut = runner.submit(_run_one, w.task, w.batch, w.partial, *w.extra, key=key, affinity=w.tag or None)
        else:
            fut = runner.submit(_run_bundle, [items[i].task for i in group], [items[i].batch for i in group],
                                [items[i].partial for i in group], key=key, affinity=w.tag or None)
        pending[fut] = group
        return fut

    with tqdm(total=len(items), initial=len(items) - len(todo), desc=label, unit="batch",
              disable=not progress) as bar:
        try:
            while queue and len(pending) < limit:
                submit_next()
            flow = runner.completion(list(pending))
            for fut, value, error in flow:
                if error is not None:
                    raise error
                group = pending.pop(fut)
                for i, v in zip(group, value if len(group) > 1 else [value]):
                    results[i] = v
                bar.update(len(group))
                if queue:
                    flow.add(submit_next())
        except BaseException:
            for fut in pending:  # batches already recorded stay; the rest are dropped
                fut.cancel()
            raise
    return [results[i] for i in range(len(items))]
