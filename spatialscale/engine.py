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
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "Batch",
    "plan_batches",
    "execution",
    "run_batches",
    "fingerprint",
    "PartialStore",
    "run_splitting",
    "split_batch",
]


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


# --------------------------------------------------------------------------- partial results
class PartialStore:
    """Per-batch results of one run, under ``<out>/_batches/<batch>``.

    Each batch is written by its own task as whole zarr arrays, then marked
    done in the batch group's attributes, so concurrent tasks never touch
    the same chunk and a crash leaves no batch half-marked.
    """

    def __init__(self, root: str | os.PathLike, fp: str) -> None:
        self.root = Path(root)
        self.fp = fp

    def _path(self, batch: Batch) -> Path:
        return self.root / "_batches" / batch.name

    def is_done(self, batch: Batch) -> bool:
        meta = self._path(batch) / "zarr.json"
        if not meta.exists():
            return False
        try:
            attrs = json.loads(meta.read_text()).get("attributes", {})
        except (OSError, ValueError):
            return False
        return bool(attrs.get("done")) and attrs.get("fingerprint") == self.fp

    def write(self, batch: Batch, result: dict[str, np.ndarray]) -> None:
        import zarr

        path = self._path(batch)
        if path.exists():
            shutil.rmtree(path)
        g = zarr.open_group(str(path), mode="w", zarr_format=3)
        for k, v in result.items():
            v = np.asarray(v)
            g.create_array(k, shape=v.shape, dtype=v.dtype, chunks=v.shape or None)[...] = v
        g.attrs.update({"done": True, "fingerprint": self.fp})

    def read(self, batch: Batch) -> dict[str, np.ndarray]:
        import zarr

        g = zarr.open_group(str(self._path(batch)), mode="r")
        return {k: np.asarray(g[k][...]) for k in g.array_keys()}


# --------------------------------------------------------------------------- runners
def free_device_memory(device: str) -> int | None:
    """Free memory (bytes) of this process's CUDA device, or None on CPU. Runs on workers."""
    if device == "cpu":
        return None
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info()
        return int(free)
    except Exception:  # noqa: BLE001 - no usable device: fall back to the CPU budget
        return None


class _ThreadRunner:
    """Runs tasks in local threads (no cluster)."""

    kind = "threads"

    def __init__(self, n_threads: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=max(1, n_threads))

    def submit(self, fn: Callable, *args: Any, key: str) -> Any:
        return self._pool.submit(fn, *args)

    def share(self, value: Any) -> Any:
        """Make a value available to tasks (in-process: the value itself)."""
        return value

    def device_memory(self, device: str) -> int | None:
        """Free device memory where tasks run (None on CPU)."""
        return free_device_memory(device)

    def as_completed(self, futures: Sequence[Any]) -> Iterator[Any]:
        from concurrent.futures import as_completed

        return as_completed(futures)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _DaskRunner:
    """Runs tasks on a ``distributed.Client`` (with retries on lost workers)."""

    kind = "distributed"

    def __init__(self, client: Any, retries: int = 2) -> None:
        self.client = client
        self.retries = retries

    def submit(self, fn: Callable, *args: Any, key: str) -> Any:
        return self.client.submit(fn, *args, key=key, retries=self.retries, pure=False)

    def share(self, value: Any) -> Any:
        """One plain future of ``value`` (no broadcast: see DESIGN.md's traps)."""
        return self.client.scatter(value, hash=False)

    def device_memory(self, device: str) -> int | None:
        """Smallest free device memory over the workers (None on CPU workers)."""
        found = [v for v in self.client.run(free_device_memory, device).values() if v]
        return min(found) if found else None

    def as_completed(self, futures: Sequence[Any]) -> Iterator[Any]:
        from distributed import as_completed

        return as_completed(futures)

    def close(self) -> None:
        pass


def _cuda_requested(device: str) -> bool:
    if device == "cuda":
        return True
    if device == "auto":
        with contextlib.suppress(Exception):
            import torch

            return bool(torch.cuda.is_available())
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

    Order: an explicit ``client``; a ``scheduler`` address (or
    ``"threads"`` for local threads even when a Dask client is active); a new
    ``LocalCluster`` (or dask-cuda ``LocalCUDACluster`` for ``device``
    ``cuda``) with ``workers`` processes; the active Dask client if there is
    one; else local threads.

    Yields
    ------
    runner
        An object with ``submit``, ``as_completed`` and ``kind``.
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
        with Client(scheduler) as c:
            yield _DaskRunner(c, retries)
        return
    if workers:
        cluster = _local_cluster(int(workers), device)
        try:
            with Client(cluster) as c:
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


def _local_cluster(n_workers: int, device: str) -> Any:
    if _cuda_requested(device):
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError as exc:
            raise RuntimeError(
                "device='cuda' with --workers needs dask-cuda: pip install 'spatialscale[cuda]'."
            ) from exc
        return LocalCUDACluster(n_workers=n_workers, threads_per_worker=1, dashboard_address=":0")
    from distributed import LocalCluster

    return LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0")


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
    with contextlib.suppress(Exception):
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    halves = [run_splitting(task, half, *extra) for half in split_batch(batch)]
    return {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}


def _run_one(task: Callable, batch: Batch, partial: PartialStore | None, *extra: Any) -> dict[str, np.ndarray]:
    result = run_splitting(task, batch, *extra)
    if partial is not None:
        partial.write(batch, result)
    return result


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
    from tqdm import tqdm

    results: dict[int, dict[str, np.ndarray]] = {}
    todo = []
    for i, b in enumerate(batches):
        if partial is not None and partial.is_done(b):
            results[i] = partial.read(b)
        else:
            todo.append(i)
    tag = uuid.uuid4().hex[:8]
    futures = {}
    for i in todo:
        fut = runner.submit(_run_one, task, batches[i], partial, *extra, key=f"{label}-{tag}-{batches[i].name}")
        futures[fut] = i
    with tqdm(total=len(batches), initial=len(batches) - len(todo), desc=label, unit="batch",
              disable=not progress) as bar:
        try:
            for fut in runner.as_completed(list(futures)):
                results[futures[fut]] = fut.result()
                bar.update(1)
        except BaseException:
            for fut in futures:  # batches already recorded stay; the rest are dropped
                fut.cancel()
            raise
    return [results[i] for i in range(len(batches))]

