"""A cohort's run: one plan per section, run as one set of tasks, the sections' results combined per gene.

Each section is planned as its own single-store run would be
(:func:`spatialscale.families.plan_store`); the plans go to the engine
together (:func:`spatialscale.families.common.execute`, which interleaves
their batches and records each section's under ``_sections/<id>``), and
:func:`run_cohort`'s ``finalize`` stacks the sections' Datasets over
``section`` and adds the per-gene combined evidence
(:mod:`spatialscale.stats.combine`), overall and per ``group_by`` group.
The cohort's data (manifest, section stores) is :mod:`spatialscale.cohort`'s.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from spatialscale.cohort import Cohort, open_cohort
from spatialscale.engine import fingerprint
from spatialscale.errors import InputError
from spatialscale.families import Family, plan_store
from spatialscale.families.common import execute
from spatialscale.options import ExecutionOptions
from spatialscale.results import VARIABLES
from spatialscale.stats.combine import COMBINATIONS, combine_pvalues, pooled_liu
from spatialscale.stats.multitest import bh_adjust

__all__ = ["run_cohort"]


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


def run_cohort(family: Family, cohort: Cohort | str | os.PathLike, *, method: str | None, opts: dict[str, Any],
               execution: ExecutionOptions, covariates: Any = None, with_summary: bool = False,
               combine: str = "cauchy", group_by: str | None = None) -> xr.Dataset:
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

    ``opts`` are the family's resolved options and ``execution`` is validated
    (:func:`spatialscale.designs.run_design` does both).
    """
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
        try:  # each section's plan is the one its own single-store run makes
            specs[sid] = plan_store(family, store, method=method, opts=opts, covariates=covariates,
                                    with_summary=with_summary, device=execution.device)
        except InputError as exc:
            raise InputError(f"section {sid!r}: {exc}") from None
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
                if not k.startswith("kernel_") and k not in ("store", "input", "n_spots", "n_genes", "created")}
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
