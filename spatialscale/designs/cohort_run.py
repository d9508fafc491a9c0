"""A cohort's run: one plan per section, run as one set of tasks, the sections' results combined per gene.

Each section is planned as its own single-store run would be
(:func:`spatialscale.families.plan_store`); the plans go to the engine
together (:func:`spatialscale.families.common.execute`, which interleaves
their batches and records each section's under ``_sections/<id>``), and
:func:`run_cohort`'s ``finalize`` stacks the sections' Datasets over
``section`` and adds the per-gene combined evidence
(:mod:`spatialscale.stats.combine`), overall and per ``group_by`` group;
with ``min_sections`` the partial-conjunction (replicability) p-values, with
``compare`` the comparison of the sections' effect sizes between the levels
of a manifest column (:mod:`spatialscale.stats.compare`; every check made
before anything runs).  The cohort's data (manifest, section stores) is :mod:`spatialscale.cohort`'s.
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
from spatialscale.stats.combine import COMBINATIONS, combine_pvalues, partial_conjunction, pooled_liu
from spatialscale.stats.compare import CompareDesign, compare_design, compare_effects, level_codes
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


def _effect_methods(command: str) -> list[str]:
    """The methods of ``command`` whose results carry a per-section effect size (what ``compare`` compares)."""
    from spatialscale.families import FAMILIES
    from spatialscale.families.du_kernel import EFFECT_METHODS

    out = []
    for fam in FAMILIES.values():
        if fam.command == command and f"{command}_effect" in fam.variables:
            out += [m for m in fam.methods if command != "du" or m in EFFECT_METHODS]
    return out


def _check_min_sections(min_sections: Any, n_sections: int, combine: str) -> None:
    """``min_sections`` is a whole number in ``[1, n_sections]`` and the combination works on p-values."""
    if min_sections is None:
        return
    if isinstance(min_sections, bool) or not isinstance(min_sections, int | np.integer):
        raise InputError(f"min_sections must be a whole number, got {min_sections!r}.")
    if not 1 <= min_sections <= n_sections:
        raise InputError(f"min_sections must be between 1 and the cohort's {n_sections} sections, got {min_sections}.")
    if combine == "pooled":
        raise InputError("min_sections combines the largest section p-values; choose combine cauchy, fisher or "
                         "stouffer (pooled sums statistics, not p-values).")


def _compare_design(family: Family, method: str | None, meta: pd.DataFrame, ids: list[str], compare: str | None,
                    compare_levels: Any, block: str | None) -> tuple[CompareDesign, list[str]] | None:
    """Check ``compare`` / ``compare_levels`` / ``block`` against the family and the manifest; the model.

    Returns ``None`` without ``compare``, else the design and the level names.
    """
    if compare is None:
        if block is not None or compare_levels is not None:
            raise InputError(f"{'block' if block is not None else 'compare_levels'} applies with compare= (a "
                             "manifest column whose levels are compared).")
        return None
    methods = _effect_methods(family.command)
    if method not in methods:
        raise InputError(f"compare needs per-section effect sizes, which {family.command} {method} does not give; "
                         f"methods that give them: {', '.join(methods)}.")
    columns = [c for c in meta.columns if c != "path"]
    for what, col in (("compare", compare), ("block", block)):
        if col is not None and col not in meta.columns:
            raise InputError(f"{what} {col!r} is not a column of the cohort's manifest (columns: {columns}).")
    if block is not None and block == compare:
        raise InputError(f"block {block!r} is the compare column itself; block by another column (e.g. donor).")
    for col in (compare, block):
        if col is not None and meta.loc[ids, col].isna().any():
            missing = [s for s in ids if pd.isna(meta.loc[s, col])]
            raise InputError(f"{col!r} is missing for sections {missing}; every section needs a value to compare.")
    values = [str(v) for v in meta.loc[ids, compare]]
    order = None
    if compare_levels is not None:
        order = [compare_levels] if isinstance(compare_levels, str) else [str(v) for v in compare_levels]
        absent = [lv for lv in order if lv not in set(values)]
        if absent:
            raise InputError(f"compare_levels {absent} have no sections: {compare!r} has levels "
                             f"{sorted(set(values))}.")
        other = sorted(set(values) - set(order))
        if other:
            raise InputError(f"sections with {compare!r} = {other} are not among compare_levels {order}; list every "
                             "level (the order sets the order of compare_effect's level).")
        if len(set(order)) != len(order):
            raise InputError(f"compare_levels {order} repeat a level.")
    codes, names = level_codes(values, order)
    if len(names) < 2:
        raise InputError(f"compare {compare!r} has one level ({names[0]!r}) over the cohort's sections; comparing "
                         "needs two or more.")
    donors, n_donors = None, 0
    if block is not None:
        donors, donor_names = level_codes([str(v) for v in meta.loc[ids, block]])
        n_donors = len(donor_names)
    design = compare_design(codes, len(names), donors, n_donors)
    unit = "donors" if design.test == "donor-means" else "sections"
    n_units = n_donors if design.test == "donor-means" else len(ids)
    if design.df1 < 1:
        raise InputError(f"the levels of {compare!r} cannot be told apart from {block!r} in this cohort's sections "
                         "(no level contrast left); check the manifest.")
    if design.df2 < 2:
        raise InputError(f"comparing {compare!r} ({design.test}) leaves {design.df2} residual degrees of freedom "
                         f"({len(names)} levels, {n_units} {unit}); it needs at least 2: add "
                         f"{unit}" + (" or drop block" if block is not None else "") + ".")
    return design, names


def run_cohort(family: Family, cohort: Cohort | str | os.PathLike, *, method: str | None, opts: dict[str, Any],
               execution: ExecutionOptions, covariates: Any = None, with_summary: bool = False,
               combine: str = "cauchy", group_by: str | None = None, compare: str | None = None,
               compare_levels: Any = None, block: str | None = None, min_sections: int | None = None) -> xr.Dataset:
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

    ``min_sections = r`` adds ``replicated_pvalue`` (and its BH adjustment):
    the partial-conjunction test that the gene has the effect in at least
    ``r`` of the ``k`` sections that tested it, the ``k - r + 1`` largest
    section p-values combined by ``combine``
    (:func:`~spatialscale.stats.combine.partial_conjunction`).

    ``compare`` (a manifest column) compares each gene's per-section effect
    sizes (``sv_effect`` / ``du_effect``) between the column's levels
    (ordered by ``compare_levels``, default sorted), the sections being the
    replicates: a one-way ANOVA F test (``compare_test = "anova"``), or with
    ``block`` (a donor column) the additive model with donor as a blocking
    factor when donors are crossed with the levels (``"blocked"``), or the
    ANOVA of the donors' mean effects when donors are nested in the levels
    (``"donor-means"``); see :mod:`spatialscale.stats.compare`.  Adds
    ``compare_statistic``, ``compare_pvalue``, ``compare_pvalue_adj`` and
    ``compare_effect`` (over ``level``).

    Results written to an output keep each section's batches, so re-running
    after sections were added to (or removed from) the cohort computes only
    the new sections' batches.

    ``opts`` are the family's resolved options and ``execution`` is validated
    (:func:`spatialscale.designs.run_design` does both).
    """
    if combine not in COMBINATIONS + ("pooled",):
        raise InputError(f"unknown combination {combine!r}; choose one of {', '.join(COMBINATIONS + ('pooled',))}.")
    if combine == "pooled" and opts.get("kernels") is not None:
        raise InputError("combine='pooled' sums one kernel's HSIC statistics; a kernel ensemble combines p-values "
                         "(use cauchy, fisher or stouffer).")
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
    _check_min_sections(min_sections, len(cohort.section_ids), combine)
    comparison = _compare_design(family, method, meta, list(cohort.section_ids), compare, compare_levels, block)
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
    base = fingerprint(kind="cohort", cohort=cohort.location, family=family.name, method=method, options=opts,
                       covariates=_covariates_token(covariates), with_summary=with_summary, combine=combine,
                       group_by=group_by,
                       # only when asked for, so that results of runs without them keep their fingerprints
                       **({"min_sections": int(min_sections)} if min_sections is not None else {}),
                       **({"compare": compare, "compare_levels": comparison[1], "block": block}
                          if comparison is not None else {}))
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
        if min_sections is not None:
            rep = partial_conjunction(p, int(min_sections), combine, weights if combine == "stouffer" else None)
            for name, value in (("replicated_pvalue", rep), ("replicated_pvalue_adj", bh_adjust(rep, axis=0))):
                out[name] = xr.Variable(dims, value, attrs={"description": VARIABLES[name][1]})
        if comparison is not None:
            out = _add_comparison(out, prefix, dims, *comparison)
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
        out.attrs.update({**keep, "cohort": cohort.location, "combine": combine,
                          "n_sections": len(ids)})
        if group_by is not None:
            out.attrs["group_by"] = group_by
        if min_sections is not None:
            out.attrs["min_sections"] = int(min_sections)
        if comparison is not None:
            out.attrs.update({"compare": compare, "compare_test": comparison[0].test,
                              "compare_block": block if block is not None else "none"})
        return out

    protect = [cohort.path, *([cohort.url] if cohort.url else [])]
    return execute(specs, execution, finalize=finalize, protect=protect, label=f"cohort {prefix} {method}",
                   fp=fp, base=base)


def _add_comparison(out: xr.Dataset, prefix: str, dims: list[str], design: CompareDesign,
                    names: list[str]) -> xr.Dataset:
    """The ``compare_*`` variables from the stacked sections' effects (sections in the manifest's order)."""
    name = f"{prefix}_effect"
    if name not in out:
        raise InputError(f"the sections' results have no {name} (results recorded by an earlier version?); re-run "
                         "with overwrite=True to compare.")
    res = compare_effects(out[name].transpose(*dims, "section").values, design)
    values = {"compare_statistic": res["statistic"], "compare_pvalue": res["pvalue"],
              "compare_pvalue_adj": bh_adjust(res["pvalue"], axis=0)}
    for key, value in values.items():
        out[key] = xr.Variable(dims, value, attrs={"description": VARIABLES[key][1]})
    out["compare_effect"] = xr.Variable(["level", *dims], res["effect"],
                                        attrs={"description": VARIABLES["compare_effect"][1]})
    return out.assign_coords(level=("level", np.asarray(names, dtype=str)))
