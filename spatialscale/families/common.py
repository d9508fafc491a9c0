"""What every test family shares: running its batches on the engine, provenance, batch inputs."""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from spatialscale._version import __version__
from spatialscale.checksums import StoreChangedError, pinned
from spatialscale.engine import (
    Batch,
    Work,
    check_worker_paths,
    execution,
    fingerprint,
    load_recorded,
    plan_batches,
    run_work,
)
from spatialscale.errors import InputError
from spatialscale.families.base import MIN_BATCHES, MIN_BATCHES_GLMM  # noqa: F401 - re-exported
from spatialscale.options import ExecutionOptions
from spatialscale.output import SECTIONS, FileLock, TemporaryFolder, claim_output
from spatialscale.remote import is_url, join
from spatialscale.store import IsoformStore, ingest, is_store, open_store, read_count_columns

#: tasks submitted at a time when several runs (a cohort's sections) share one graph
MAX_IN_FLIGHT = 64
#: batches of one section run in one task when several runs share one graph (each recorded on its own)
COHORT_BUNDLE = 8


def parse_bytes(value: int | float | str) -> int:
    """``"512MB"`` / ``"2GiB"`` / ``1e9`` -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    from dask.utils import parse_bytes as _pb

    return int(_pb(value))


@dataclass
class _Run:
    """A finished run: per-batch results in batch order, how they ran, the options' fingerprint."""

    parts: list[dict[str, np.ndarray]]
    kind: str
    fp: str


def provenance(store: IsoformStore) -> dict[str, Any]:
    """Attributes every results Dataset carries."""
    kernel = store.kernel_attrs
    # a store of the ingest cache is temporary: the results name the input it was ingested from instead
    temporary = INGEST_CACHE.holds(store.path)
    url = getattr(store, "url", None)  # a store at a URL: named by its URL, not this machine's replica
    return {
        "n_spots": store.n_spots, "n_genes": store.n_genes,
        "store": url or ("" if temporary else str(store.path)),
        "input": str(store.meta.get("source", "")),
        "gene_key": str(store.meta.get("gene_key", "gene_symbol")),
        "spatialscale_version": __version__, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **{f"kernel_{k}": v for k, v in kernel.items() if k != "power_sums"},
        "kernel_power_sums": list(kernel["power_sums"]),
    }


@dataclass
class RunSpec:
    """One section's part of a run: its store, the family's prepared run, the task as sent, its fingerprint."""

    store: IsoformStore
    prep: Any
    task: Any
    fp: str


def run_spec(store: IsoformStore, prep: Any, with_summary: bool = False) -> RunSpec:
    """The task and fingerprint of a prepared run on one store.

    With ``with_summary`` every task also returns the gene-level feature
    summaries of its genes (see :func:`summary_variables`).
    """
    store_path = str(store.path.resolve())
    task, params = prep.task, prep.params
    if with_summary:  # the gene-level feature summaries ride along with each batch's test
        task = functools.partial(_summarised, task, store_path)
        params = {**params, "with_summary": True}
    # every read of the store inside the task must find the content the client planned on
    task = functools.partial(_pinned, task, store_path, store.content_token)
    url = getattr(store, "url", None)
    if url:  # a store at a URL: each worker first makes its own verified replica (at the client's replica path)
        task = functools.partial(_replicated, task, url, store_path, store.content_token)
    # the store's content token (counts, spots, isoforms, kernel, ingest options), never its path: results
    # are reused only for the same data
    fp = fingerprint(kind=prep.kind, content=store.content_token, extra=prep.fingerprint_extra, **params)
    return RunSpec(store, prep, task, fp)


def _pinned(task: Any, store_path: str, token: str, batch: Batch, *extra: Any) -> dict[str, np.ndarray]:
    """Run ``task`` with the store pinned to ``token`` (a store re-ingested under the run stops it)."""
    with pinned(store_path, token):
        return task(batch, *extra)


def _replicated(task: Any, url: str, store_path: str, token: str, batch: Batch, *extra: Any) -> dict[str, np.ndarray]:
    """Run ``task`` once this machine holds a verified replica of the store at ``url``.

    The replica goes where the client keeps its own (``store_path``, the path
    the task reads); a machine where that folder cannot be made (another home
    folder) keeps it in its own cache, and the task reads it there.
    """
    from spatialscale.remote import ReplicaPathError, cache_dir, ensure_replica, rebind

    try:
        ensure_replica(url, token, Path(store_path))
    except ReplicaPathError:
        local = ensure_replica(url, token, cache_dir() / "stores" / token)
        task = rebind(task, store_path, str(local))
    return task(batch, *extra)


def execute(specs: dict[str, RunSpec], options: ExecutionOptions, *,
            finalize: Callable[[dict[str, xr.Dataset], dict[str, list]], xr.Dataset], protect: list, label: str,
            fp: str | None = None, base: str | None = None) -> xr.Dataset:
    """Plan the batches of one or several runs, run them as one set of tasks, assemble, write the results.

    ``options`` must already be validated (:meth:`ExecutionOptions.validated`)
    and every other input checked: from here on the output is claimed
    (locked; see :mod:`spatialscale.output`) and written.  Each run's
    ``prep.assemble`` turns its per-batch results into a Dataset and
    ``finalize`` turns those (and the per-batch results, by key) into the
    result.  A run's ``shared``
    value (sent to the workers once) may be a callable, evaluated only if
    some of its batches are left to run.  With several runs (a cohort), their
    batches are submitted run after run, at most :data:`MAX_IN_FLIGHT` at a
    time, so consecutive runs overlap; each run's finished batches are recorded under
    ``_sections/<key>`` of the output and kept there with the results; an
    output holding results of the same ``base`` fingerprint (the same runs
    apart from which keys they cover) is then updated without ``overwrite``,
    its recorded batches reused where a key's fingerprint is unchanged.
    """
    single = len(specs) == 1
    fp = fp or (next(iter(specs.values())).fp if single else fingerprint(runs={k: v.fp for k, v in specs.items()}))
    with contextlib.ExitStack() as held:
        # readers' locks: no ingest replaces a store (or cohort) while this run reads it
        for path in dict.fromkeys([*protect, *(v.store.path for v in specs.values())]):
            if is_url(path):
                continue
            held.enter_context(FileLock(Path(path), shared=True, hint="wait for it to finish"))
        return _execute(specs, options, finalize=finalize, protect=protect, label=label, fp=fp, base=base,
                        single=single)


def check_unchanged(specs: dict[str, RunSpec]) -> None:
    """Every store still holds the content the run was planned on (else nothing final is written)."""
    from spatialscale.remote import store_token

    for key, spec in specs.items():
        url = getattr(spec.store, "url", None)
        now = store_token(url) if url else open_store(spec.store.path).content_token
        if now != spec.store.content_token:
            where = f"section {key!r}: " if key else ""
            raise StoreChangedError(f"{where}isoform store {url or spec.store.path} changed while this run was "
                                    "reading it (re-ingested); no results were written; run it again.")


def _execute(specs: dict[str, RunSpec], options: ExecutionOptions, *, finalize: Callable, protect: list, label: str,
             fp: str, base: str | None, single: bool) -> xr.Dataset:
    claim = None
    if options.out is not None:
        urls = [u for v in specs.values() if (u := getattr(v.store, "url", None))]
        claim = claim_output(options.out, fp, overwrite=options.overwrite, protect=[*protect, *urls], base=base,
                             keep=() if single else (SECTIONS,), content=content_of(specs))
        if claim.existing is not None:
            claim.release()
            return claim.existing
    try:
        with execution(options.client, scheduler=options.scheduler, workers=options.workers,
                       device=options.device) as runner:
            # stores at URLs and outputs at URLs are fetched / written by every worker itself
            needed = {f"store {k}".strip(): str(v.store.path.resolve()) for k, v in specs.items()
                      if not getattr(v.store, "url", None)}
            if claim is not None and not is_url(claim.out):
                needed["output folder"] = str(claim.out.parent)
            check_worker_paths(runner, needed)
            check_worker_device(runner, options.device)
            budget = batch_budget(options.batch_memory, runner, options.device)
            root = claim.start() if claim is not None else None
            lanes = []
            # section after section, largest first (the small ones then even out the workers at the end):
            # with a bounded number in flight, the tasks running at any time span few sections, so each
            # worker loads a section's kernel about once (its cache holds a few)
            size = {k: v.store.n_spots * int(v.store.genes["n_isoforms"].sum()) for k, v in specs.items()}
            for key in sorted(specs, key=size.__getitem__, reverse=True):
                spec = specs[key]
                batches = run_plan(spec, budget, options.batch_size, len(specs))
                partial = root
                if root is not None and not single:
                    partial = root.section(key, spec.fp)
                    if claim.previous is not None:  # results of other sections: reuse this section's batches
                        partial.adopt(join(claim.previous, SECTIONS, key))
                recorded = [load_recorded(Work(spec.task, b, partial)) for b in batches]
                shared = spec.prep.shared
                if callable(shared):  # computed only when some of the run's batches are left to run
                    shared = None if all(r is not None for r in recorded) else shared()
                extra = () if shared is None else (runner.share(shared),)
                tag = f"-{key}" if key else ""
                lanes.append([(key, Work(spec.task, b, partial, extra, tag=tag), r) for b, r in zip(batches, recorded)])
            items = [item for lane in lanes for item in lane]
            parts = run_work([w for _, w, _ in items], runner, progress=options.progress, label=label,
                             max_in_flight=None if single else MAX_IN_FLIGHT, recorded=[r for _, _, r in items],
                             bundle=1 if single else COHORT_BUNDLE)
        by_key: dict[str, list] = {k: [] for k in specs}
        for (key, _, _), part in zip(items, parts):
            by_key[key].append(part)
        datasets = {k: specs[k].prep.assemble(_Run(by_key[k], runner.kind, specs[k].fp)) for k in specs}
        ds = finalize(datasets, by_key)
        check_unchanged(specs)
        if claim is not None:
            claim.commit(ds)
        return ds
    finally:
        if claim is not None:
            claim.release()


def content_of(specs: dict[str, RunSpec]) -> str:
    """The content token of what a run reads: its store's, or, for a cohort, a hash of its sections' tokens."""
    if len(specs) == 1:
        return next(iter(specs.values())).store.content_token
    return fingerprint(sections={k: v.store.content_token for k, v in specs.items()})


def run_plan(spec: RunSpec, budget: int, batch_size: int | None = None, n_runs: int = 1) -> list[Batch]:
    """The batches of one run that is one of ``n_runs`` run together (a cohort's sections).

    A run alone is split into at least the family's ``min_batches`` so that
    every worker has work.  Runs together (a cohort's sections) keep the
    workers busy between them, so each is planned by the memory budget alone:
    fewer, larger batches (fewer tasks, less scheduling per gene), and a
    section's plan does not depend on how many sections there are, so its
    recorded batches stay valid when sections are added.
    """
    return plan_batches(spec.store.genes, spec.store.n_spots, bytes_per_gene=spec.prep.bytes_per_gene,
                        memory_bytes=budget, batch_size=batch_size,
                        min_batches=spec.prep.min_batches if n_runs == 1 else 1)


def check_worker_device(runner: Any, device: str) -> None:
    """``device='cuda'`` on an existing cluster: every worker must see a CUDA device (named error otherwise)."""
    if device != "cuda" or runner.kind != "distributed":
        return
    from spatialscale.options import cuda_available

    seen = runner.client.run(cuda_available)
    missing = sorted(w for w, ok in seen.items() if not ok)
    if missing:
        raise InputError(f"device 'cuda' was requested but worker {missing[0]} sees no CUDA device "
                         f"({len(missing)} of {len(seen)} workers); use --device cpu or auto.")


def execution_options(**kwargs: Any) -> ExecutionOptions:
    """Validated :class:`ExecutionOptions` from an entry point's keyword arguments."""
    return ExecutionOptions(**kwargs).validated()


def _summarised(task: Any, store_path: str, batch: Batch, *extra: Any) -> dict[str, np.ndarray]:
    """Run ``task`` on a batch and add the batch's gene-level feature summaries (``gene_*``)."""
    from spatialscale.stats.summary import summary_batch

    out = task(batch, *extra)
    gene, _ = summary_batch(batch_counts(store_path, batch))
    return {**out, **{f"gene_{k}": v for k, v in gene.items()}}


def summary_variables(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The ``gene_*`` summaries gathered from a run's batches (empty without ``with_summary``)."""
    if not parts:
        return {}
    return {k: np.concatenate([r[k] for r in parts]) for k in parts[0] if k.startswith("gene_")}


def batch_budget(batch_memory: int | str, runner: Any, device: str) -> int:
    """Bytes of working memory per task; ``"auto"`` takes half the free GPU memory on GPU workers."""
    if batch_memory == "auto":
        free = runner.device_memory(device) if device != "cpu" else None
        return int(free * 0.5) if free else parse_bytes("256MB")
    return parse_bytes(batch_memory)


def batch_counts(store_path: str, batch: Batch, *, grid: bool = True) -> np.ndarray:
    """Counts of a batch as ``(n_genes, n_spots, n_isoforms)``; ``grid=False``: a raster's observed bins only."""
    flat = read_count_columns(store_path, batch.col_start, batch.col_stop, grid=grid)
    return flat.reshape(flat.shape[0], batch.n_genes, batch.n_isoforms).transpose(1, 0, 2)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def as_store(store: IsoformStore | str | os.PathLike) -> IsoformStore:
    """An opened store from a store or its path."""
    return store if isinstance(store, IsoformStore) else open_store(store)


def is_anndata_input(source: Any) -> bool:
    """Whether ``source`` is something :func:`~spatialscale.store.ingest` reads rather than an isoform store.

    An ``AnnData`` or ``SpatialData`` object, or the path of an ``.h5ad``
    file, an AnnData zarr or a SpatialData zarr that is not an isoform store,
    or an instrument output folder (:func:`spatialscale.readers.detect_format`).
    """
    import anndata as ad

    if isinstance(source, ad.AnnData) or hasattr(source, "tables"):
        return True
    if not isinstance(source, str | os.PathLike):
        return False
    if is_url(source):  # an AnnData at a URL (downloaded when ingested); else a store or cohort there
        from spatialscale.remote import is_anndata_url

        return is_anndata_url(str(source))
    path = Path(source)
    if path.is_file():
        return True
    if path.is_dir() and not is_store(path) and any((path / key).is_dir() for key in ("obs", "tables")):
        return True
    from spatialscale.readers import detect_format

    return path.is_dir() and not is_store(path) and detect_format(path) is not None  # an instrument output folder


#: ingest keywords that are not ingest options of a run (the run's own overwrite / progress apply)
_NOT_INGEST_OPTIONS = ("source", "store_path", "overwrite", "progress", "_fingerprint")


def ingest_option_names() -> list[str]:
    """The ingest options a run that takes an AnnData accepts (``layer``, ``spatial_key``, ``gene_key``...)."""
    return [k for k in inspect.signature(ingest).parameters if k not in _NOT_INGEST_OPTIONS]


class IngestCache:
    """Stores ingested from AnnData inputs in this process, keyed by the input's content and the ingest options.

    A run given an AnnData (object, ``.h5ad`` or zarr) without ``ingest_to``
    ingests it into a temporary folder of this process (removed at exit, or
    at the next start after a crash); later runs on the same unchanged input
    with the same options find that store by its input fingerprint
    (:func:`~spatialscale.store.ingest_fingerprint`) and reuse it: a changed
    matrix, coordinates, annotation or option is another fingerprint, hence a
    new store.  At most :attr:`max_stores` are kept; the least recently used
    one not being read by a run is removed first.
    """

    max_stores = 4

    def __init__(self) -> None:
        self._folder: TemporaryFolder | None = None
        self._used: list[Path] = []  # least recently used first
        self._lock = threading.Lock()

    def path_for(self, fingerprint: str) -> Path:
        """Where the store of an input with this fingerprint lives (made or found)."""
        import atexit
        import tempfile

        with self._lock:
            folder = self._folder
            if folder is None or not folder.path.is_dir() or folder.path.parent != Path(tempfile.gettempdir()):
                self._folder = TemporaryFolder("store")
                atexit.register(self._folder.cleanup)
            path = self._folder.path / f"{fingerprint[:32]}.zarr"
            if path in self._used:
                self._used.remove(path)
            self._used.append(path)
            self._evict()
            return path

    def holds(self, path: str | os.PathLike) -> bool:
        """Whether ``path`` is a store of this cache (temporary)."""
        folder = self._folder
        return folder is not None and Path(path).parent == folder.path

    def _evict(self) -> None:
        """Remove least recently used stores beyond ``max_stores`` (those not read by a run now)."""
        import shutil

        for old in list(self._used[: -self.max_stores]):
            try:
                lock = FileLock(old, hint="").acquire()
            except InputError:
                continue  # a run is reading it: kept for now
            try:
                shutil.rmtree(old, ignore_errors=True)
                self._used.remove(old)
            finally:
                lock.release()


INGEST_CACHE = IngestCache()


@contextlib.contextmanager
def input_store(source: Any, ingest_options: dict[str, Any] | None = None,
                ingest_to: str | os.PathLike | None = None, *, cohort: bool = False) -> Iterator[IsoformStore]:
    """The isoform store a run reads: ``source`` itself, or an AnnData input ingested once.

    Parameters
    ----------
    source
        An isoform store (opened or its path), a cohort (passed through), or
        an AnnData / SpatialData input (object or path; see
        :func:`is_anndata_input`).
    cohort
        The caller found ``source`` to be a cohort
        (:func:`spatialscale.cohort.is_cohort`; the families do not know
        cohorts): it is passed through as it is.
    ingest_options
        Keywords of :func:`~spatialscale.store.ingest` for an AnnData input
        (``layer``, ``gene_key``, ``spatial_key``, ``k_neighbors``...).
    ingest_to
        Where to keep the ingested store: reused by later runs while it holds
        the same input content ingested with the same options, else an error
        (it is never replaced without ``overwrite`` in ``ingest_options``).
        ``None``: this process's ingest cache (:class:`IngestCache`; workers
        must see it: local clusters do; give a path on shared storage for a
        remote cluster).

    Raises
    ------
    InputError
        Ingest options for an input that is already a store, unknown ingest
        options, or anything :func:`~spatialscale.store.ingest` refuses.
    """
    from spatialscale.store import ingest_fingerprint

    if ingest_options is not None and not isinstance(ingest_options, dict):
        raise InputError(f"ingest must be a dict of ingest options ({{'layer': 'X', ...}}), got "
                         f"{type(ingest_options).__name__}.")
    options = dict(ingest_options or {})
    if not is_anndata_input(source):
        if options or ingest_to is not None:
            what = "a cohort" if cohort else "an isoform store"
            given = ", ".join(sorted(options)) + (" and " if options and ingest_to is not None else "") + (
                "ingest_to" if ingest_to is not None else "")
            raise InputError(f"ingest options ({given}) apply to AnnData inputs; {source} is {what} "
                             "(already ingested).")
        yield source if cohort else as_store(source)
        return
    allowed = set(ingest_option_names()) | {"overwrite"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"unknown ingest option(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(sorted(allowed))}.")
    if is_url(source):  # an AnnData file at a URL: downloaded, then as a local input
        from spatialscale.remote import _local_input

        with _local_input(source) as local_source, input_store(local_source, options, ingest_to) as opened:
            yield opened
        return
    if ingest_to is not None:
        yield ingest(source, ingest_to, **options)
        return
    options.pop("overwrite", None)
    fp = ingest_fingerprint(source, **options)
    yield ingest(source, INGEST_CACHE.path_for(fp), _fingerprint=fp, **options)
