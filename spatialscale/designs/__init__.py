"""Designs: runs made of single-store runs, one layer above the test families.

A family (:mod:`spatialscale.families`) runs on one isoform store and knows
nothing of cohorts.  A design is a plan of such single-store plans and how
their results are put together; today a cohort, every section planned as its
own run and the sections' evidence combined per gene
(:mod:`spatialscale.designs.cohort_run`).  :func:`run_design` is what the
entry points (:mod:`spatialscale.api`) call: it validates the execution
options, resolves the family and its options once, and runs one store or a
cohort.

Layers, each importing only those below it::

    api, cli            entry points
    designs             cohort runs (plans of single-store plans), combination
    families            one family on one store; the engine entry (execute)
    cohort, store, ...  data: stores, cohorts' manifests and section stores
"""

from __future__ import annotations

import os
from typing import Any

import xarray as xr

from spatialscale.cohort import Cohort, is_cohort
from spatialscale.designs.cohort_run import run_cohort
from spatialscale.errors import InputError
from spatialscale.families import resolve_family, run_store
from spatialscale.options import ExecutionOptions
from spatialscale.store import IsoformStore

__all__ = ["run_cohort", "run_design"]


def run_design(command: str, target: IsoformStore | Cohort | str | os.PathLike, *, method: str | None,
               options: dict[str, Any], execution: ExecutionOptions, covariates: Any = None,
               with_summary: bool = False, combine: str | None = None, group_by: str | None = None,
               compare: str | None = None, compare_levels: Any = None, block: str | None = None,
               min_sections: int | None = None) -> xr.Dataset:
    """Validate everything, then run a family on one store or on every section of a cohort.

    Parameters
    ----------
    command, method
        Select the family (``"sv", "hsic-ir"``; ``"glmm", None``...).
    target
        An isoform store (opened or its path), or a cohort (a
        :class:`~spatialscale.cohort.Cohort` or a cohort folder).
    options
        The family's options as given (``None``: not given).
    execution
        Where and how to run (validated here, before anything else).
    covariates
        Covariates of DU tests and GLMM fits.
    with_summary
        Add the gene-level feature summaries (computed by the same tasks).
    combine
        Cohorts: how sections' p-values are combined per gene (cauchy by default).
    group_by
        Cohorts: a metadata column; sections are also combined within each of its groups.
    compare, compare_levels, block
        Cohorts: compare the sections' effect sizes between the levels of a
        metadata column (in the order of ``compare_levels``), with donors
        (``block``) as blocks or replicates (see
        :func:`~spatialscale.designs.cohort_run.run_cohort`).
    min_sections
        Cohorts: add the partial-conjunction p-values of "the gene has the
        effect in at least this many of its sections".
    """
    execution = execution.validated()
    family, opts = resolve_family(command, method, options, covariates=covariates, with_summary=with_summary)
    if is_cohort(target):
        return run_cohort(family, target, method=method, opts=opts, execution=execution, covariates=covariates,
                          with_summary=with_summary, combine=combine or "cauchy", group_by=group_by,
                          compare=compare, compare_levels=compare_levels, block=block, min_sections=min_sections)
    cohort_only = {"combine": combine, "group_by": group_by, "compare": compare, "compare_levels": compare_levels,
                   "block": block, "min_sections": min_sections}
    given = [k for k, v in cohort_only.items() if v is not None]
    if given:
        raise InputError(f"{given[0]} applies to cohorts (a Cohort or a cohort folder), not to one store.")
    return run_store(family, target, method=method, opts=opts, execution=execution, covariates=covariates,
                     with_summary=with_summary)
