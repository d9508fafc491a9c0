"""Cohorts: many tissue sections, each its own isoform store, ingested in parallel from a manifest.

A cohort folder holds ``cohort.json`` (spatialscale's marker, the sections
and their metadata) and ``sections/<section>.zarr``, one isoform store (with
its own kernel) per section.  :func:`ingest_cohort` reads a manifest (CSV or
TSV with a ``section`` id column, a ``path`` column and any further columns
as section metadata), ingests every section as its own task (local threads,
a LocalCluster or an existing Dask cluster), keeps the sections that
succeed, names the ones that fail, and on a re-run ingests only what is
missing or changed.  :func:`open_cohort` opens the folder again.

``ingest_cohort(adata, out_dir, library_key="library_id")`` takes one
AnnData holding several sections instead (as squidpy keeps them): each value
of that ``obs`` column is a section, ``obs`` columns constant within every
section are its metadata, and each section's rows are ingested as its own
store through the same machinery (docs/cohorts.md).

This module is the cohort's data: manifests, section stores, :func:`is_cohort`
and :func:`section_stores`.  It sits below the test families and does not
import them; running a family over a cohort's sections (one plan per section,
results combined per gene) is :mod:`spatialscale.designs.cohort_run`'s.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import inspect
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spatialscale._version import __version__
from spatialscale.errors import InputError
from spatialscale.store import IsoformStore, check_ingest_options, check_raster_options, ingest, open_store

__all__ = ["Cohort", "ingest_cohort", "open_cohort", "read_manifest"]

COHORT_FILE = "cohort.json"
COHORT_MARK = "spatialscale_cohort"
COHORT_FORMAT = 1
#: ingest options a manifest column may set per section
PER_SECTION = ("spatial_key", "layer", "gene_key", "table")
_SECTION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def read_manifest(manifest: str | os.PathLike | pd.DataFrame) -> pd.DataFrame:
    """The sections of a manifest: index ``section``, column ``path`` (absolute), metadata columns.

    Relative paths are relative to the manifest's folder.  A missing
    ``section`` or ``path`` column, an empty manifest, a duplicated or
    unusable section id is an :class:`InputError` (nothing is ingested).
    """
    if isinstance(manifest, pd.DataFrame):
        table, base = manifest.copy(), Path.cwd()
    else:
        from spatialscale.locations import is_url

        if is_url(manifest):
            raise InputError(f"the manifest {manifest} is a URL; a manifest and its sections' inputs are local files "
                             "(the cohort folder may be a URL).")
        path = Path(manifest)
        if not path.is_file():
            raise InputError(f"manifest {path} does not exist.")
        sep = "\t" if path.suffix.lower() in (".tsv", ".tab") else None
        try:
            table = pd.read_csv(path, sep=sep, engine="python", dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError) as exc:
            raise InputError(f"manifest {path} is not a CSV / TSV table ({exc}).") from None
        base = path.resolve().parent
    missing = [c for c in ("section", "path") if c not in table.columns]
    if missing:
        raise InputError(f"manifest has no column(s) {missing} (columns: {list(table.columns)}).")
    if table.empty:
        raise InputError("manifest lists no sections.")
    ids = table["section"].astype(str).str.strip()
    bad = [s for s in ids if not _SECTION_ID.match(s)]
    if bad:
        raise InputError(f"section id {bad[0]!r} is empty or has characters other than letters, digits, '.', '_', '-'.")
    dup = sorted(set(ids[ids.duplicated()]))
    if dup:
        raise InputError(f"section id(s) {dup} appear more than once in the manifest.")
    table["section"] = ids
    table["path"] = [str((base / p.strip()).resolve()) if p.strip() else "" for p in table["path"].astype(str)]
    for col in table.columns.drop(["section", "path"]):  # numeric metadata (depth, age...) as numbers
        try:
            table[col] = pd.to_numeric(table[col])
        except (ValueError, TypeError):
            pass
    return table.set_index("section")


@dataclass
class Cohort:
    """An opened cohort folder: its sections (with metadata) and their isoform stores.

    A cohort at a URL (:attr:`url`) has a local :attr:`path` holding a copy of
    its ``cohort.json``; its sections are stores at URLs, read through
    verified local replicas.
    """

    path: Path
    sections: pd.DataFrame
    _opened: dict = field(default_factory=dict, repr=False, compare=False)
    url: str | None = None

    @property
    def location(self) -> str:
        """Where the cohort is: its URL, or its folder."""
        return self.url or str(self.path)

    @property
    def section_ids(self) -> list[str]:
        return list(self.sections.index)

    def store(self, section: str) -> IsoformStore:
        """The isoform store of one section (opened once, again if it was rewritten since)."""
        if section not in self.sections.index:
            raise InputError(f"cohort {self.location} has no section {section!r} (sections: {self.section_ids}).")
        if self.url is not None:
            return self._remote_store(section)
        path = self.path / "sections" / f"{section}.zarr"
        try:
            stamp = (path / "zarr.json").stat().st_mtime_ns
        except OSError:
            stamp = None
        cached = self._opened.get(section)
        if cached is None or cached[0] != stamp or stamp is None:
            store = open_store(path)
            recorded = self.sections.loc[section].get("content_token") if "content_token" in self.sections else None
            if isinstance(recorded, str) and recorded != store.content_token:
                raise InputError(f"section {section!r} of cohort {self.path}: its store was replaced since the cohort "
                                 "was ingested (other content); re-run `spatialscale cohort ingest` to record it.")
            cached = self._opened[section] = (stamp, store)
        return cached[1]

    def _remote_store(self, section: str) -> IsoformStore:
        """A section of a cohort at a URL (its replica opened once per content token)."""
        from spatialscale.locations import url_handler

        url = f"{self.url}/sections/{section}.zarr"
        token = url_handler("store_token")(url)
        cached = self._opened.get(section)
        if cached is None or cached[0] != token:
            store = url_handler("open_store")(url)
            recorded = self.sections.loc[section].get("content_token") if "content_token" in self.sections else None
            if isinstance(recorded, str) and recorded != store.content_token:
                raise InputError(f"section {section!r} of cohort {self.url}: its store was replaced since the cohort "
                                 "was ingested (other content); re-run `spatialscale cohort ingest` to record it.")
            cached = self._opened[section] = (token, store)
        return cached[1]

    def __repr__(self) -> str:
        return f"Cohort({self.location!r}, sections={self.section_ids})"


def open_cohort(path: str | os.PathLike) -> Cohort:
    """Open a cohort folder written by :func:`ingest_cohort` (a local folder or a URL)."""
    from spatialscale.locations import is_url, url_handler

    if is_url(path):
        return url_handler("open_cohort")(str(path))
    path = Path(os.path.abspath(path))
    meta = _read_meta(path)
    if meta is None:
        raise InputError(f"{path} is not a cohort folder (no {COHORT_FILE}); create one with `spatialscale cohort "
                         "ingest`.")
    if not meta.get("sections"):
        raise InputError(f"cohort {path} has no ingested sections yet; run `spatialscale cohort ingest` (again).")
    sections = pd.DataFrame(meta["sections"]).set_index("section")
    for sid in sections.index:
        if not (path / "sections" / f"{sid}.zarr").exists():
            raise InputError(f"section {sid!r} of cohort {path} has no store; re-run `spatialscale cohort ingest`.")
    return Cohort(path, sections)


def _read_meta(path: Path) -> dict | None:
    """``cohort.json`` of a cohort folder (``None`` if there is none); a cohort of another format is refused."""
    try:
        meta = json.loads((path / COHORT_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not meta.get(COHORT_MARK):
        return None
    if meta.get("format") != COHORT_FORMAT:
        raise InputError(f"cohort {path} has format {meta.get('format')!r} (this version {__version__} reads format "
                         f"{COHORT_FORMAT}); use the spatialscale that wrote it, or ingest the cohort anew.")
    return meta


def _source_token(source: str, options: dict[str, Any]) -> str:
    """What a section's store was made from: the input file (path, size, time) and the ingest options."""
    st = Path(source).stat()
    blob = json.dumps({"source": source, "size": st.st_size, "mtime": st.st_mtime_ns, "options": options},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _ingest_section(source: Any, store: str, options: dict[str, Any]) -> dict[str, Any]:
    """One task: ingest one section (replacing only an isoform store of an earlier attempt)."""
    st = ingest(source, store, overwrite=True, **options)
    return {"n_spots": st.n_spots, "n_genes": st.n_genes, "content_token": st.content_token}


def _ingest_rows(adata: Any, rows: np.ndarray, store: str, options: dict[str, Any]) -> dict[str, Any]:
    """One task in local threads: ingest the rows of one section of a multi-section AnnData."""
    return _ingest_section(_section_adata(adata, rows, options), store, options)


@dataclass
class _Section:
    """One section to ingest: its metadata, what names it in errors, and where its data are.

    ``source`` is the path of a manifest section's input; ``rows`` the spots of
    a section of a multi-section AnnData; ``problem`` a failure known before
    ingest (the input does not exist).
    """

    sid: str
    meta: dict[str, Any]
    label: str
    options: dict[str, Any] = field(default_factory=dict)
    token: str | None = None
    source: str | None = None
    rows: np.ndarray | None = None
    problem: str | None = None


def _manifest_sections(table: pd.DataFrame, options: dict[str, Any]) -> list[_Section]:
    """The sections of a manifest, with their own options and source tokens."""
    out = []
    for sid, row in table.iterrows():
        src = row["path"]
        meta = dict(row.items())
        if not src or not Path(src).exists():
            out.append(_Section(sid, meta, src or "(no path)", problem="input does not exist"))
            continue
        own = {**options, **{k: row[k] for k in PER_SECTION if k in row.index and str(row[k]).strip()}}
        out.append(_Section(sid, meta, src, own, _source_token(src, own), source=src))
    return out


#: the record fields of an ingested section (the rest of a record is the section's metadata)
_RECORD = ("token", "n_spots", "n_genes", "content_token")


def ingest_cohort(
    manifest: str | os.PathLike | pd.DataFrame | Any,
    out_dir: str | os.PathLike,
    *,
    library_key: str | None = None,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    **options: Any,
) -> Cohort:
    """Ingest every section of a manifest, or of one multi-section AnnData, into its own isoform store.

    Parameters
    ----------
    manifest
        CSV / TSV path (or a DataFrame): ``section`` ids, ``path`` of each
        section's AnnData (``.h5ad`` or ``.zarr``), further columns kept as
        section metadata (e.g. donor, condition).  Columns named
        ``spatial_key``, ``layer``, ``gene_key`` or ``table`` set that option for
        their section (an empty cell: the option given here), for sections whose
        AnnData differ in where they keep coordinates, counts or gene names.
        With ``library_key``: one AnnData holding every section instead (an
        ``AnnData``, an ``.h5ad`` or AnnData ``.zarr`` path, or a SpatialData
        object or store with ``table``), as squidpy keeps them.
    out_dir
        The cohort folder (created; an existing one is completed, never
        emptied), or a URL (``s3://bucket/cohort``): the sections are ingested
        locally (on this machine's threads or a LocalCluster; those already
        there are fetched first) and published (docs/object-storage.md).
    library_key
        The ``obs`` column naming each spot's section (squidpy's
        ``library_key``, e.g. ``"library_id"``).  Its values become the
        section ids, in category order (sorted when the column is not
        categorical; categories without spots are left out); a value that is
        not a usable folder name is made one (characters other than letters,
        digits, ``.``, ``_``, ``-`` become ``_``), and the original stays in the
        metadata column ``library_key``.  ``obs`` columns constant within every
        section become section metadata (``cohort.sections``, ``group_by``);
        columns named like a record field (``section``, ``path``, ``n_spots``,
        ``n_genes``, ``token``, ``content_token``) are kept as ``obs_<name>``.
        Each section has its own coordinate system (its ``spatial_key`` rows)
        and its own kernel; ``**options`` apply to every section.  A section
        with fewer spots than a section needs is refused before anything is
        written.  See ``docs/cohorts.md`` for the memory this takes.
    client, scheduler, workers
        Where the ingest tasks run (as in :func:`spatialscale.sv_test`).
    progress
        Show a progress bar of sections.
    **options
        Options of :func:`spatialscale.ingest` (``layer``, ``gene_key``,
        ``spatial_key``, filters, kernel parameters), the same for every
        section unless the manifest sets one per section.

    Returns
    -------
    Cohort
        When every section is ingested.

    Raises
    ------
    InputError
        For a bad manifest, AnnData or option (before anything is written),
        or, after the good sections are kept, naming every section that
        failed (id, input and problem).  Re-running after a fix ingests only
        what is missing or changed.
    """

    from spatialscale.options import ExecutionOptions

    allowed = set(inspect.signature(ingest).parameters) - {"source", "store_path", "overwrite", "progress"}
    library = None
    if library_key is None:
        _refuse_anndata_as_manifest(manifest)
        table = read_manifest(manifest)
        inputs = dict(table["path"].items())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"unknown ingest option(s) {unknown}; choose from {sorted(allowed)}.")
    for check in (check_ingest_options, check_raster_options):  # each takes the options it validates
        check(**{k: v for k, v in options.items() if k in inspect.signature(check).parameters})
    if library_key is not None:
        library = _Library.open(manifest, library_key, options)
        inputs = {sid: library.path for sid in library.sections} if library.path else {}
    run = ExecutionOptions(client=client, scheduler=scheduler, workers=workers, progress=progress).validated()
    from spatialscale.locations import is_url, url_handler

    if is_url(out_dir):  # ingested into a local folder (the sections already there fetched), then published
        return url_handler("ingest_cohort")(manifest, str(out_dir), ingest_cohort, library_key=library_key,
                                            client=client, scheduler=scheduler, workers=workers, progress=progress,
                                            **options)
    out = Path(os.path.abspath(out_dir))
    if out.exists() and _read_meta(out) is None and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a cohort folder; choose another OUT_DIR (spatialscale never "
                         "replaces what it did not write).")
    for sid, src in inputs.items():
        if src and (Path(src) == out or out in Path(src).parents):
            raise InputError(f"section {sid!r}: its input {src} lies inside the cohort folder {out}.")

    from spatialscale.output import FileLock

    if _read_meta(out) is None:  # mark the folder as a cohort before anything goes into it, so that an
        out.mkdir(parents=True, exist_ok=True)  # interrupted ingest leaves a folder a re-run recognises
        if _read_meta(out) is None:
            _write_meta(out, [])
    # one cohort ingest at a time, and none while a run reads the cohort
    with FileLock(out, hint="wait for it to finish"):
        if library is None:
            return _ingest_sections(_manifest_sections(table, options), out, run, progress)
        return _ingest_sections(library.plan(), out, run, progress, load=library.load)


def _ingest_sections(sections: list[_Section], out: Path, run: Any, progress: bool,
                     load: Any = None) -> Cohort:
    """Ingest what is missing or changed (under the cohort's lock), record the sections, name the failures.

    ``load`` gives the multi-section AnnData that sections with ``rows`` come
    from; it is called once, and only when one of them is ingested.
    """
    from tqdm import tqdm

    from spatialscale.engine import execution
    from spatialscale.store import is_store

    done = {s["section"]: s for s in (_read_meta(out) or {}).get("sections", [])}
    failures: dict[str, str] = {}
    todo: list[_Section] = []
    kept: dict[str, dict] = {}
    for sec in sections:
        if sec.problem is not None:
            failures[sec.sid] = f"{sec.label}: {sec.problem}"
            continue
        prev = done.get(sec.sid)
        store = out / "sections" / f"{sec.sid}.zarr"
        if prev is not None and prev.get("token") == sec.token and _store_matches(store, prev.get("content_token")):
            kept[sec.sid] = {k: prev[k] for k in _RECORD if k in prev}
            continue
        todo.append(sec)
    (out / "sections").mkdir(exist_ok=True)
    adata = load() if load is not None and any(s.rows is not None for s in todo) else None
    with execution(run.client, scheduler=run.scheduler, workers=run.workers) as runner:

        def submit(sec: _Section) -> Any:
            store, key = str(out / "sections" / f"{sec.sid}.zarr"), f"ingest-{sec.sid}-{uuid.uuid4().hex[:6]}"
            if sec.rows is None:
                return runner.submit(_ingest_section, sec.source, store, sec.options, key=key)
            if runner.kind == "threads":  # the task copies its section's rows itself
                return runner.submit(_ingest_rows, adata, sec.rows, store, sec.options, key=key)
            # a worker process gets a copy of the section's rows only (made here, one in flight per worker thread)
            return runner.submit(_ingest_section, runner.share(_section_adata(adata, sec.rows, sec.options)),
                                 store, sec.options, key=key)

        queue = list(todo)
        window = len(queue) if adata is None else _slots(runner)
        futures = {submit(sec): sec for sec in queue[:window]}
        del queue[:window]
        with tqdm(total=len(sections), initial=len(kept), desc="cohort ingest", unit="section",
                  disable=not progress) as bar:
            flow = runner.completion(list(futures))
            for fut, info, exc in flow:
                sec = futures.pop(fut)
                if exc is not None:  # each section's failure is reported by id
                    failures[sec.sid] = f"{sec.label}: {' '.join(str(exc).split())}"
                    if "obsm has no coordinates" in failures[sec.sid] and sec.rows is None:
                        failures[sec.sid] += " A spatial_key column in the manifest sets the key per section."
                else:
                    kept[sec.sid] = {"token": sec.token, **info}
                bar.update(1)
                if queue:
                    nxt = queue.pop(0)
                    fut = submit(nxt)
                    futures[fut] = nxt
                    flow.add(fut)
    rows = [{**sec.meta, **kept[sec.sid], "section": sec.sid} for sec in sections if sec.sid in kept]
    _write_meta(out, rows)
    # cohort.json lists every section store in the folder: stores of sections no longer in the manifest, or
    # whose new input failed, are removed (only isoform stores that spatialscale wrote)
    for path in (out / "sections").glob("*.zarr"):
        if path.name[: -len(".zarr")] not in kept and is_store(path):
            shutil.rmtree(path, ignore_errors=True)
    if failures:
        listed = "; ".join(f"section {sid!r} ({msg})" for sid, msg in sorted(failures.items()))
        raise InputError(f"{len(failures)} of {len(sections)} section(s) failed: {listed}. The other sections are "
                         f"in {out}; fix these and re-run to ingest only what is missing.")
    return open_cohort(out)


def _slots(runner: Any) -> int:
    """How many tasks the runner works on at once (threads of a cluster's workers, or local threads)."""
    client = getattr(runner, "client", None)
    if client is not None:
        try:
            return max(1, sum(client.nthreads().values()))
        except Exception:  # noqa: BLE001 - a scheduler that does not answer: a small window still works
            return 2
    return os.cpu_count() or 1


# --------------------------------------------------------------------------- one AnnData of many sections
#: metadata columns a cohort's section records own; obs columns of these names become ``obs_<name>``
_RESERVED = ("section", "path", *_RECORD)
_ANNDATA_SUFFIXES = (".h5ad", ".zarr")


def _refuse_anndata_as_manifest(manifest: Any) -> None:
    """An AnnData where a manifest was expected: say that it needs ``library_key``."""
    if isinstance(manifest, pd.DataFrame):
        return
    if isinstance(manifest, str | os.PathLike):
        path = Path(manifest)
        if not (path.suffix.lower() in _ANNDATA_SUFFIXES or path.is_dir()):
            return
    what = f"{manifest}" if isinstance(manifest, str | os.PathLike) else "an AnnData"
    raise InputError(f"{what} is not a manifest (CSV / TSV of sections); for one AnnData holding several sections, "
                     "name the obs column of each spot's section with library_key= (--library-key), e.g. library_id.")


def _option(options: dict[str, Any], name: str) -> Any:
    """An ingest option as given, else ingest's default."""
    if name in options:
        return options[name]
    return inspect.signature(ingest).parameters[name].default


def _folder_name(value: Any) -> str:
    """A section id from a library value: runs of characters a folder name should not have become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", str(value).strip())
    return re.sub(r"^[._-]+", "", name)


def _plain_value(value: Any) -> Any:
    """A metadata value as JSON keeps it (numpy scalars as Python ones, missing values as ``None``)."""
    if isinstance(value, np.generic):
        value = value.item()
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):  # an array-like value: not a missing scalar
        pass
    return value


@contextlib.contextmanager
def _anndata_group(path: Path) -> Any:
    """The root group of an ``.h5ad`` file (h5py) or AnnData zarr store, opened read-only."""
    if path.is_file():
        import h5py

        try:
            handle = h5py.File(path, "r")
        except OSError as exc:
            raise InputError(f"{path} is not a readable .h5ad (HDF5) file ({exc}).") from None
        with handle:
            yield handle
        return
    import zarr

    try:
        root = zarr.open_group(str(path), mode="r")
    except Exception as exc:  # noqa: BLE001 - zarr raises many kinds
        raise InputError(f"{path} is neither an .h5ad file nor an AnnData zarr store ({exc}).") from None
    yield root


def _section_adata(adata: Any, rows: np.ndarray, options: dict[str, Any]) -> Any:
    """One section of a multi-section AnnData, with only what ingest reads (its rows copied once).

    ``obs`` and the counts layer's rows, ``var``, the coordinates
    (``obsm[spatial_key]``) and ``obsp[adj_key]``; not ``X`` unless it holds the
    counts, nor other layers.
    """
    import anndata as ad

    from spatialscale.sources import spatial_columns

    layer = _option(options, "layer")
    kw: dict[str, Any] = {}
    if layer in adata.layers:
        kw["layers"] = {layer: adata.layers[layer][rows]}
    else:  # layer "X" (checked when the AnnData was opened)
        kw["X"] = adata.X[rows]
    key = _option(options, "spatial_key")
    if isinstance(key, str) and spatial_columns(key) is None and key in adata.obsm:
        value = adata.obsm[key]
        kw["obsm"] = {key: value.iloc[rows] if isinstance(value, pd.DataFrame) else np.asarray(value)[rows]}
    adj = _option(options, "adj_key")
    if adj is not None and adj in adata.obsp:
        kw["obsp"] = {adj: adata.obsp[adj][rows][:, rows]}
    return ad.AnnData(obs=adata.obs.iloc[rows].copy(), var=adata.var.copy(), **kw)


def _hash_into(h: Any, value: Any) -> None:
    """Add a table or (sparse) matrix to a running hash: its shape, type and values."""
    import scipy.sparse

    if isinstance(value, pd.DataFrame):
        h.update(json.dumps([[str(c) for c in value.columns], [str(t) for t in value.dtypes]]).encode())
        try:
            hashed = pd.util.hash_pandas_object(value, index=True)
        except TypeError:  # unhashable cells (lists...): their text
            hashed = pd.util.hash_pandas_object(value.astype(str), index=True)
        h.update(hashed.to_numpy().tobytes())
        return
    if scipy.sparse.issparse(value):
        m = scipy.sparse.csr_matrix(value, copy=True)
        m.sum_duplicates()
        m.sort_indices()
        h.update(f"csr{m.shape}{m.dtype}".encode())
        for part in (m.data, m.indices, m.indptr):
            h.update(np.ascontiguousarray(part).tobytes())
        return
    arr = np.ascontiguousarray(np.asarray(value))
    h.update(f"dense{arr.shape}{arr.dtype}".encode())
    h.update(arr.tobytes() if arr.dtype != object else repr(arr.tolist()).encode())


def _content_token(sub: Any, options: dict[str, Any]) -> str:
    """What an in-memory section's store is made from: every value ingest reads, and the ingest options."""
    h = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode())
    _hash_into(h, sub.obs)
    _hash_into(h, sub.var)
    for where, elems in (("layers", sub.layers), ("obsm", sub.obsm), ("obsp", sub.obsp)):
        for name in sorted(elems):
            h.update(f"{where}/{name}".encode())
            _hash_into(h, elems[name])
    if sub.X is not None:
        h.update(b"X")
        _hash_into(h, sub.X)
    return h.hexdigest()[:16]


@dataclass
class _Library:
    """One AnnData holding several sections: which spots are which section, and how to read them.

    ``path`` is the input file ("" for an in-memory AnnData); ``sections``
    maps each section id to (original value, rows); ``meta`` holds each
    section's metadata; ``obs`` and ``var`` those of a file, read when it was
    opened.
    """

    adata: Any
    obs: pd.DataFrame
    var: pd.DataFrame
    path: str
    key: str
    options: dict[str, Any]
    sections: dict[str, tuple[Any, np.ndarray]]
    meta: dict[str, dict[str, Any]]

    @classmethod
    def open(cls, source: Any, key: str, options: dict[str, Any]) -> _Library:
        """Validate the input, the key and the options against it, reading only ``obs`` and ``var`` of a file."""
        import anndata as ad

        from spatialscale.sources import resolve_table

        if not isinstance(key, str) or not key:
            raise InputError(f"library_key must name an obs column (got {key!r}).")
        if isinstance(source, pd.DataFrame) or (isinstance(source, str | os.PathLike)
                                                and Path(source).suffix.lower() in (".csv", ".tsv", ".tab", ".txt")):
            raise InputError("library_key applies to one AnnData holding several sections (an AnnData, .h5ad or "
                             ".zarr), not to a manifest, which lists its sections itself.")
        source = resolve_table(source, options.get("table"), format=options.get("format"),
                               reader=options.get("reader"))
        # every option with its value (defaults filled in): the same ingest from the CLI or Python has one token
        # (an instrument reader's options shaped the AnnData read above, not the sections' ingest)
        names = set(inspect.signature(ingest).parameters) - {"source", "store_path", "overwrite", "progress", "table",
                                                              "format", "reader"}
        options = {name: _option(options, name) for name in sorted(names)}
        if isinstance(source, ad.AnnData):
            adata, path = source, ""
            obs, var = adata.obs, adata.var
            layers, has_x = list(adata.layers), adata.X is not None
            obsm, obsp = list(adata.obsm), list(adata.obsp)
        elif isinstance(source, str | os.PathLike):
            adata, path = None, os.path.abspath(source)
            if not Path(path).exists():
                raise InputError(f"input {path} does not exist.")
            from anndata.io import read_elem

            with _anndata_group(Path(path)) as root:
                if "obs" not in root or "var" not in root:
                    raise InputError(f"{path} has no obs / var: not an AnnData file.")
                try:
                    obs, var = read_elem(root["obs"]), read_elem(root["var"])
                except Exception as exc:  # noqa: BLE001 - a damaged file fails in h5py / zarr / anndata in many ways
                    raise InputError(f"could not read obs / var of {path} ({type(exc).__name__}: {exc}).") from None
                layers = list(root["layers"]) if "layers" in root else []
                has_x = "X" in root
                obsm = list(root["obsm"]) if "obsm" in root else []
                obsp = list(root["obsp"]) if "obsp" in root else []
        else:
            raise InputError(f"library_key needs an AnnData, an .h5ad or an AnnData .zarr (got "
                             f"{type(source).__name__}).")
        where = path or "the AnnData"
        _check_keys(where, options, obs, var, layers, has_x, obsm, obsp)
        sections, meta = _split(where, obs, key, options)
        if adata is not None and adata.is_view:  # a view subsets its parent at every access: what ingest reads, once
            adata = _section_adata(adata, np.arange(adata.n_obs), options)
        return cls(adata, obs, var, path, key, options, sections, meta)

    def plan(self) -> list[_Section]:
        """The sections with their tokens (for a file: its path, size and time; in memory: a hash of the data)."""
        out = []
        for sid, (value, rows) in self.sections.items():
            label = f"{self.path or '<AnnData>'}[{self.key}={_plain_value(value)!r}]"
            if self.path:
                token = _source_token(self.path, {**self.options, "library_key": self.key,
                                                  "library": repr(_plain_value(value))})
            else:
                token = _content_token(_section_adata(self.adata, rows, self.options), self.options)
            out.append(_Section(sid, {"path": self.path, **self.meta[sid]}, label, self.options, token, rows=rows))
        return out

    def load(self) -> Any:
        """The AnnData: itself in memory; from a file, what ingest reads of it (read once, the rest is not read).

        ``obs`` and ``var`` (read when opened), the counts layer (or ``X``
        when it holds the counts), ``obsm[spatial_key]`` and ``obsp[adj_key]``:
        other layers, ``X`` beside a counts layer, ``uns`` and other ``obsm``
        entries are never read.
        """
        if self.adata is not None:
            return self.adata
        import anndata as ad
        from anndata.io import read_elem

        from spatialscale.sources import spatial_columns

        layer, key, adj = (_option(self.options, k) for k in ("layer", "spatial_key", "adj_key"))
        with _anndata_group(Path(self.path)) as root:
            try:
                kw: dict[str, Any] = {"obs": self.obs, "var": self.var}
                if "layers" in root and layer in root["layers"]:
                    kw["layers"] = {layer: read_elem(root["layers"][layer])}
                else:
                    kw["X"] = read_elem(root["X"])
                if isinstance(key, str) and spatial_columns(key) is None and "obsm" in root and key in root["obsm"]:
                    kw["obsm"] = {key: read_elem(root["obsm"][key])}
                if adj is not None and "obsp" in root and adj in root["obsp"]:
                    kw["obsp"] = {adj: read_elem(root["obsp"][adj])}
            except Exception as exc:  # noqa: BLE001 - a damaged file fails in h5py / zarr / anndata in many ways
                raise InputError(f"could not read the AnnData in {self.path} ({type(exc).__name__}: {exc}).") from None
        self.adata = ad.AnnData(**kw)
        return self.adata


def _check_keys(where: str, options: dict[str, Any], obs: pd.DataFrame, var: pd.DataFrame, layers: list[str],
                has_x: bool, obsm: list[str], obsp: list[str]) -> None:
    """The counts layer, gene names and coordinates every section is read from (one message for all sections)."""
    from spatialscale.sources import spatial_columns

    layer, gene_key = _option(options, "layer"), _option(options, "gene_key")
    if layer not in layers and not (layer == "X" and has_x):
        hint = " Counts in X: layer='X' (--layer X)." if has_x and layer != "X" else ""
        raise InputError(f"layer {layer!r} not found in the layers of {where} (available: {sorted(layers)}).{hint}")
    if gene_key not in var.columns:
        raise InputError(f"var of {where} has no column {gene_key!r} naming each isoform's gene (columns: "
                         f"{list(var.columns)}).")
    adj = _option(options, "adj_key")
    if adj is not None and adj not in obsp:
        raise InputError(f"obsp of {where} has no adjacency {adj!r} (available: {sorted(obsp)}).")
    if _option(options, "kernel") == "fft":
        missing = [k for k in _option(options, "grid_keys") if k not in obs.columns]
        if missing:
            raise InputError(f"obs of {where} has no grid column {missing[0]!r} (columns: {list(obs.columns)}).")
        return
    key = _option(options, "spatial_key")
    cols = spatial_columns(key)
    if cols is not None:
        missing = [c for c in cols if c not in obs.columns]
        if missing:
            raise InputError(f"obs of {where} has no column {missing[0]!r} for the coordinates (columns: "
                             f"{list(obs.columns)}).")
    elif key not in obsm and adj is None:
        raise InputError(f"obsm of {where} has no coordinates {key!r} (available: {sorted(obsm)}).")


def _split(where: str, obs: pd.DataFrame, key: str, options: dict[str, Any]
           ) -> tuple[dict[str, tuple[Any, np.ndarray]], dict[str, dict[str, Any]]]:
    """Each section's id, original value and rows, and its metadata (the obs columns constant within sections)."""
    from spatialscale.sources import MIN_SPOTS

    if key not in obs.columns:
        raise InputError(f"obs of {where} has no column {key!r} (library_key) naming each spot's section (columns: "
                         f"{list(obs.columns)}).")
    col = obs[key]
    if col.isna().any():
        raise InputError(f"obs[{key!r}] of {where} has no section for {int(col.isna().sum())} spot(s) (e.g. "
                         f"{str(obs.index[col.isna().to_numpy()][0])!r}); drop or label them first.")
    groups = obs.groupby(key, observed=True, sort=False)
    indices = groups.indices
    if isinstance(col.dtype, pd.CategoricalDtype):
        values = [v for v in col.cat.categories if v in indices]
    else:
        try:
            values = sorted(indices)
        except TypeError:  # mixed kinds of values: in the order of their text
            values = sorted(indices, key=str)
    names: dict[str, Any] = {}
    for value in values:
        sid = _folder_name(value)
        if not _SECTION_ID.match(sid):
            raise InputError(f"obs[{key!r}] value {str(value)!r} gives no usable section id (it needs letters or "
                             "digits); rename it first.")
        if sid in names:
            raise InputError(f"obs[{key!r}] values {str(names[sid])!r} and {str(value)!r} both give the section id "
                             f"{sid!r}; rename one first.")
        names[sid] = value
    need = max(MIN_SPOTS, int(_option(options, "k_neighbors")) + 1)
    small = {sid: len(indices[value]) for sid, value in names.items() if len(indices[value]) < need}
    if small:
        listed = ", ".join(f"section {sid!r} ({key}={_plain_value(names[sid])!r}) has {n} spot(s)"
                           for sid, n in small.items())
        raise InputError(f"{listed}; a section needs at least {need} (k_neighbors + 1, and at least {MIN_SPOTS}) "
                         f"for a meaningful spatial test. Leave such sections out first, e.g. "
                         f"adata[~adata.obs[{key!r}].isin({[_plain_value(names[s]) for s in small]!r})].")
    sections = {sid: (value, np.sort(np.asarray(indices[value], dtype=np.int64))) for sid, value in names.items()}
    constant = []
    for name in obs.columns:
        try:
            if (groups[name].nunique(dropna=False) <= 1).all():
                constant.append(name)
        except TypeError:  # unhashable cells: not metadata
            continue
    first = np.array([rows[0] for _, rows in sections.values()], dtype=np.int64)
    meta: dict[str, dict[str, Any]] = {sid: {} for sid in sections}
    for name in constant:
        label = f"obs_{name}" if name in _RESERVED else str(name)
        if label in obs.columns and label != name:  # obs has both 'section' and 'obs_section': the latter wins
            continue
        for sid, value in zip(sections, obs[name].iloc[first].tolist()):
            meta[sid][label] = _plain_value(value)
    return sections, meta


def _store_matches(path: Path, content: str | None) -> bool:
    """Whether a section's store is there, complete and (when recorded) holds the recorded content."""
    try:
        store = open_store(path)
    except InputError:
        return False
    return content is None or store.content_token == content


def _write_meta(out: Path, rows: list[dict]) -> None:
    meta = {COHORT_MARK: True, "format": COHORT_FORMAT, "spatialscale_version": __version__,
            "written": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "sections": rows}
    tmp = out / f".{COHORT_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(meta, indent=1, default=str))
    os.replace(tmp, out / COHORT_FILE)


def is_cohort(obj: Any) -> bool:
    """Whether ``obj`` is a :class:`Cohort` or the path of a cohort folder."""
    if isinstance(obj, Cohort):
        return True
    if isinstance(obj, str | os.PathLike):
        from spatialscale.locations import is_url, url_handler

        if is_url(obj):
            return url_handler("is_cohort")(str(obj))
        return _read_meta(Path(obj)) is not None
    return False


def section_stores(target: Any) -> tuple[list[str], list[IsoformStore]]:
    """A cohort's section ids and opened stores; one store (opened or its path) as ``[""]`` and itself."""
    if isinstance(target, Cohort) or (not isinstance(target, IsoformStore) and is_cohort(target)):
        cohort = target if isinstance(target, Cohort) else open_cohort(target)
        ids = cohort.section_ids
        return ids, [cohort.store(s) for s in ids]
    if isinstance(target, IsoformStore):
        return [""], [target]
    return [""], [open_store(target)]
