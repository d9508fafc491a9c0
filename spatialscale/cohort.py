"""Cohorts: many tissue sections, each its own isoform store, ingested in parallel from a manifest.

A cohort folder holds ``cohort.json`` (spatialscale's marker, the sections
and their metadata) and ``sections/<section>.zarr``, one isoform store (with
its own kernel) per section.  :func:`ingest_cohort` reads a manifest (CSV or
TSV with a ``section`` id column, a ``path`` column and any further columns
as section metadata), ingests every section as its own task (local threads,
a LocalCluster or an existing Dask cluster), keeps the sections that
succeed, names the ones that fail, and on a re-run ingests only what is
missing or changed.  :func:`open_cohort` opens the folder again.
"""

from __future__ import annotations

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
    """An opened cohort folder: its sections (with metadata) and their isoform stores."""

    path: Path
    sections: pd.DataFrame
    _opened: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def section_ids(self) -> list[str]:
        return list(self.sections.index)

    def store(self, section: str) -> IsoformStore:
        """The isoform store of one section (opened once, again if it was rewritten since)."""
        if section not in self.sections.index:
            raise InputError(f"cohort {self.path} has no section {section!r} (sections: {self.section_ids}).")
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

    def __repr__(self) -> str:
        return f"Cohort({str(self.path)!r}, sections={self.section_ids})"


def open_cohort(path: str | os.PathLike) -> Cohort:
    """Open a cohort folder written by :func:`ingest_cohort`."""
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


def _ingest_section(source: str, store: str, options: dict[str, Any]) -> dict[str, Any]:
    """One task: ingest one section (replacing only an isoform store of an earlier attempt)."""
    st = ingest(source, store, overwrite=True, **options)
    return {"n_spots": st.n_spots, "n_genes": st.n_genes, "content_token": st.content_token}


def ingest_cohort(
    manifest: str | os.PathLike | pd.DataFrame,
    out_dir: str | os.PathLike,
    *,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    **options: Any,
) -> Cohort:
    """Ingest every section of a manifest into its own isoform store, sections in parallel.

    Parameters
    ----------
    manifest
        CSV / TSV path (or a DataFrame): ``section`` ids, ``path`` of each
        section's AnnData (``.h5ad`` or ``.zarr``), further columns kept as
        section metadata (e.g. donor, condition).  Columns named
        ``spatial_key``, ``layer``, ``gene_key`` or ``table`` set that option for
        their section (an empty cell: the option given here), for sections whose
        AnnData differ in where they keep coordinates, counts or gene names.
    out_dir
        The cohort folder (created; an existing one is completed, never
        emptied).
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
        For a bad manifest or option (before anything is written), or, after
        the good sections are kept, naming every section that failed (id,
        path and problem).  Re-running after a fix ingests only what is
        missing or changed.
    """

    from spatialscale.options import ExecutionOptions

    table = read_manifest(manifest)
    allowed = set(inspect.signature(ingest).parameters) - {"source", "store_path", "overwrite", "progress"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise InputError(f"unknown ingest option(s) {unknown}; choose from {sorted(allowed)}.")
    for check in (check_ingest_options, check_raster_options):  # each takes the options it validates
        check(**{k: v for k, v in options.items() if k in inspect.signature(check).parameters})
    run = ExecutionOptions(client=client, scheduler=scheduler, workers=workers, progress=progress).validated()
    out = Path(os.path.abspath(out_dir))
    if out.exists() and _read_meta(out) is None and any(out.iterdir()):
        raise InputError(f"{out} exists and is not a cohort folder; choose another OUT_DIR (spatialscale never "
                         "replaces what it did not write).")
    for sid, src in table["path"].items():
        if src and (Path(src) == out or out in Path(src).parents):
            raise InputError(f"section {sid!r}: its input {src} lies inside the cohort folder {out}.")

    from spatialscale.output import FileLock

    if _read_meta(out) is None:  # mark the folder as a cohort before anything goes into it, so that an
        out.mkdir(parents=True, exist_ok=True)  # interrupted ingest leaves a folder a re-run recognises
        if _read_meta(out) is None:
            _write_meta(out, [])
    # one cohort ingest at a time, and none while a run reads the cohort
    with FileLock(out, hint="wait for it to finish"):
        return _ingest_cohort_locked(table, out, options, run, progress)


def _ingest_cohort_locked(table: pd.DataFrame, out: Path, options: dict[str, Any], run: Any,
                          progress: bool) -> Cohort:
    from tqdm import tqdm

    from spatialscale.engine import execution
    from spatialscale.store import is_store

    done = {s["section"]: s for s in (_read_meta(out) or {}).get("sections", [])}
    failures: dict[str, str] = {}
    todo: dict[str, tuple[str, str]] = {}
    kept: dict[str, dict] = {}
    for sid, row in table.iterrows():
        src = row["path"]
        if not src or not Path(src).exists():
            failures[sid] = f"{src or '(no path)'}: input does not exist"
            continue
        own = {**options, **{k: row[k] for k in PER_SECTION if k in row.index and str(row[k]).strip()}}
        token = _source_token(src, own)
        store = out / "sections" / f"{sid}.zarr"
        prev = done.get(sid)
        if prev is not None and prev.get("token") == token and _store_matches(store, prev.get("content_token")):
            kept[sid] = prev
            continue
        todo[sid] = (src, token, own)
    (out / "sections").mkdir(exist_ok=True)
    with execution(run.client, scheduler=run.scheduler, workers=run.workers) as runner:
        futures = {runner.submit(_ingest_section, src, str(out / "sections" / f"{sid}.zarr"), own,
                                 key=f"ingest-{sid}-{uuid.uuid4().hex[:6]}"): sid
                   for sid, (src, _, own) in todo.items()}
        with tqdm(total=len(table), initial=len(kept), desc="cohort ingest", unit="section",
                  disable=not progress) as bar:
            for fut, info, exc in runner.completion(list(futures)):
                sid = futures[fut]
                if exc is not None:  # each section's failure is reported by id
                    failures[sid] = f"{todo[sid][0]}: {' '.join(str(exc).split())}"
                    if "obsm has no coordinates" in failures[sid]:
                        failures[sid] += " A spatial_key column in the manifest sets the key per section."
                else:
                    kept[sid] = {"section": sid, "token": todo[sid][1], **info}
                bar.update(1)
    rows = []
    for sid, row in table.iterrows():
        if sid in kept:
            meta = {k: v for k, v in row.items()}
            rows.append({**meta, **kept[sid], "section": sid})
    _write_meta(out, rows)
    # cohort.json lists every section store in the folder: stores of sections no longer in the manifest, or
    # whose new input failed, are removed (only isoform stores that spatialscale wrote)
    for path in (out / "sections").glob("*.zarr"):
        if path.name[: -len(".zarr")] not in kept and is_store(path):
            shutil.rmtree(path, ignore_errors=True)
    if failures:
        listed = "; ".join(f"section {sid!r} ({msg})" for sid, msg in sorted(failures.items()))
        raise InputError(f"{len(failures)} of {len(table)} section(s) failed: {listed}. The other sections are in "
                         f"{out}; fix these and re-run to ingest only what is missing.")
    return open_cohort(out)


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
        return _read_meta(Path(obj)) is not None
    return False


def _covariates_token(covariates: Any) -> Any:
    """What the covariates of a cohort run are, for its fingerprint (names as given; tables hashed)."""
    if covariates is None or isinstance(covariates, str):
        return covariates
    if isinstance(covariates, pd.DataFrame | pd.Series):
        return hashlib.sha256(pd.util.hash_pandas_object(covariates, index=True).values.tobytes()).hexdigest()
    try:
        return [str(c) for c in covariates]
    except TypeError:
        return str(covariates)


def run_cohort(family: Any, cohort: Cohort | str | os.PathLike, *, method: str | None, opts: dict[str, Any],
               execution: Any, covariates: Any = None, with_summary: bool = False,
               combine: str = "cauchy", group_by: str | None = None) -> Any:
    """Run a family over every section of a cohort as one set of tasks; results over ``section`` x ``gene``.

    Each section is prepared as a single-section run would be (so a section's
    variables equal its own run's); the batches of all sections interleave
    on one cluster with a bounded number of tasks in flight, and each
    section's finished batches are recorded (and resumed) on their own.  The
    per-section variables gain a ``section`` dimension (NaN where a gene is
    not tested in a section); section metadata become coordinates on
    ``section``; per gene, ``combined_pvalue`` combines the sections where the
    gene was tested (``combine``: cauchy, fisher or stouffer weighted by
    ``sqrt(n_spots)``, or ``pooled``: the HSIC statistics summed and tested
    against the summed null mixtures), with its BH adjustment, ``n_sections_tested`` and
    ``n_sections_significant`` (section-level adjusted p < 0.05).  With
    ``group_by`` (a metadata column) the same four variables are also
    computed within each group of sections, prefixed ``group_`` and over a
    ``group`` dimension.

    Results written to an output keep each section's batches, so re-running
    after sections were added to (or removed from) the cohort computes only
    the new sections' batches.
    """
    import numpy as np
    import xarray as xr

    from spatialscale.engine import fingerprint
    from spatialscale.families.common import execute, run_spec
    from spatialscale.results import VARIABLES
    from spatialscale.stats.combine import COMBINATIONS, combine_pvalues, pooled_liu
    from spatialscale.stats.multitest import bh_adjust

    if combine not in COMBINATIONS + ("pooled",):
        raise InputError(f"unknown combination {combine!r}; choose one of {', '.join(COMBINATIONS + ('pooled',))}.")
    if combine == "pooled" and (family.name != "sv-hsic" or opts.get("null") not in ("liu", "liu-perm")):
        raise InputError("combine='pooled' (summed HSIC statistics, Liu's p-value) applies to the HSIC SV tests "
                         "with null='liu' or 'liu-perm'.")
    if family.command not in ("sv", "du"):
        raise InputError(f"{family.command} does not run on cohorts yet; run it per section (cohort.store(id)).")
    cohort = cohort if isinstance(cohort, Cohort) else open_cohort(cohort)
    meta = cohort.sections.drop(columns=[c for c in ("token", "content_token") if c in cohort.sections.columns])
    if group_by is not None and group_by not in meta.columns:
        raise InputError(f"group_by {group_by!r} is not a column of the cohort's manifest (columns: "
                         f"{[c for c in meta.columns if c != 'path']}).")
    specs = {}
    for sid in cohort.section_ids:
        store = cohort.store(sid)
        try:
            prep = family.prepare_for(store, method, opts, covariates, execution.device)
        except InputError as exc:
            raise InputError(f"section {sid!r}: {exc}") from None
        specs[sid] = run_spec(store, prep, with_summary)
    prefix = family.command
    ids = cohort.section_ids
    weights = np.sqrt([specs[s].store.n_spots for s in ids], dtype=np.float64)
    # what the run computes apart from which sections it covers: results of the same base may be extended
    base = fingerprint(kind="cohort", cohort=str(cohort.path), family=family.name, method=method, options=opts,
                       covariates=_covariates_token(covariates), with_summary=with_summary, combine=combine,
                       group_by=group_by)
    fp = fingerprint(base=base, runs={k: v.fp for k, v in specs.items()},
                     metadata=meta.loc[ids].astype(str).to_dict(orient="index"))
    groups = [] if group_by is None else sorted({str(v) for v in meta[group_by]})

    def pooled_inputs(parts: dict[str, list], genes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each gene's section statistics and null mixture sums (NaN where a section did not test it)."""
        stat = np.full((len(genes), len(parts)), np.nan)
        cum = np.full((len(genes), len(parts), 4), np.nan)
        for j, sid in enumerate(ids):
            rows = pd.Index(genes).get_indexer(specs[sid].store.genes.index)
            stat[rows, j] = np.concatenate([b["null_statistic"] for b in parts[sid]])
            cum[rows, j] = np.concatenate([b["null_cumulants"] for b in parts[sid]])
        return stat, cum

    def combined(p: np.ndarray, adj: np.ndarray, pool: tuple | None, cols: np.ndarray) -> dict[str, np.ndarray]:
        """The combined variables over the sections ``cols`` (last axis of ``p``)."""
        if pool is not None:
            c = pooled_liu(pool[0][:, cols], pool[1][:, cols])
        else:
            c = combine_pvalues(p[..., cols], combine, weights[cols] if combine == "stouffer" else None)
        return {"combined_pvalue": c, "combined_pvalue_adj": bh_adjust(c, axis=0),
                "n_sections_tested": np.isfinite(p[..., cols]).sum(-1),
                "n_sections_significant": (np.nan_to_num(adj[..., cols], nan=1.0) < 0.05).sum(-1)}

    def finalize(datasets: dict[str, xr.Dataset], parts: dict[str, list]) -> xr.Dataset:
        first = next(iter(datasets.values()))
        keep = {k: v for k, v in first.attrs.items()  # the run's settings, not one section's store and kernel
                if not k.startswith("kernel_") and k not in ("store", "n_spots", "n_genes", "created")}
        per = [datasets[sid].expand_dims(section=[sid]) for sid in ids]
        for d in per:
            d.attrs = {}  # the sections' provenance stays in their stores; variables keep their descriptions
        out = xr.concat(per, dim="section", join="outer", combine_attrs="drop", fill_value=np.nan)
        pv = out[f"{prefix}_pvalue"].transpose(..., "section")
        p, adj = pv.values, out[f"{prefix}_pvalue_adj"].transpose(..., "section").values
        dims = [d for d in pv.dims if d != "section"]
        pool = pooled_inputs(parts, out["gene"].values) if combine == "pooled" else None
        for name, value in combined(p, adj, pool, np.arange(len(ids))).items():
            out[name] = xr.Variable(dims, value, attrs={"description": VARIABLES[name][1]})
        if groups:
            labels = np.array([str(v) for v in meta.loc[ids, group_by]])
            per_group = [combined(p, adj, pool, np.flatnonzero(labels == g)) for g in groups]
            for name in per_group[0]:
                out[f"group_{name}"] = xr.Variable(["group", *dims], np.stack([g[name] for g in per_group]),
                                                   attrs={"description": VARIABLES[f"group_{name}"][1]})
            out = out.assign_coords(group=("group", groups))
        for col in meta.columns:
            out = out.assign_coords({f"section_{col}" if col in out.variables else col:
                                     ("section", meta.loc[ids, col].to_numpy())})
        out.attrs.update({**keep, "cohort": str(cohort.path), "combine": combine,
                          "n_sections": len(ids)})
        if group_by is not None:
            out.attrs["group_by"] = group_by
        return out

    return execute(specs, execution, finalize=finalize, protect=[cohort.path], label=f"cohort {prefix} {method}",
                   fp=fp, base=base)
