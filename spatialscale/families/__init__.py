"""Test families and the one engine entry they share.

Every kind of per-gene work is a :class:`~spatialscale.families.base.Family`
in :data:`FAMILIES`; :func:`run_family` validates the execution options and
the family's options, lets the family prepare its run and hands it to the
engine.  The public API (:mod:`spatialscale.api`) and the CLI
(:mod:`spatialscale.cli`) are generic over this registry: adding a family
is one module here plus its line in :data:`FAMILIES`.
"""

from __future__ import annotations

import os
from typing import Any

import xarray as xr

from spatialscale.cohort import is_cohort, run_cohort
from spatialscale.errors import InputError
from spatialscale.families import du_glmm, du_kernel, fit, summary, sv_hsic, sv_llr
from spatialscale.families.base import Family, Option, Prepared, resolve_options
from spatialscale.families.common import as_store, execute, run_spec
from spatialscale.options import ExecutionOptions
from spatialscale.store import IsoformStore

__all__ = ["FAMILIES", "Family", "Option", "Prepared", "family_for", "methods_of", "run_family"]

#: every test family, by name
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (sv_hsic, sv_llr, du_kernel, du_glmm, fit, summary)}


def methods_of(command: str) -> tuple[str, ...]:
    """The methods of a command, over all its families, in registry order."""
    return tuple(m for f in FAMILIES.values() if f.command == command for m in f.methods)


def family_for(command: str, method: str | None) -> Family:
    """The family that runs ``method`` of ``command`` (families without methods: the command's only one)."""
    found = [f for f in FAMILIES.values() if f.command == command and (method in f.methods or not f.methods)]
    if not found:
        known = methods_of(command)
        raise InputError(f"unknown method {method!r}; choose one of {', '.join(known)}.")
    return found[0]


def run_family(command: str, store: IsoformStore | str | os.PathLike, *, method: str | None,
               options: dict[str, Any], execution: ExecutionOptions, covariates: Any = None,
               with_summary: bool = False, combine: str | None = None,
               group_by: str | None = None) -> xr.Dataset:
    """Validate everything, then run a family's batches on the engine and return its Dataset.

    Parameters
    ----------
    command, method
        Select the family (``"sv", "hsic-ir"``; ``"glmm", None``...).
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
    """
    execution = execution.validated()
    family = family_for(command, method)
    elsewhere: dict[str, tuple[str, ...]] = {}  # option -> every method of the command that takes it
    for f in FAMILIES.values():
        if f.command == command:
            for o in f.options:
                elsewhere[o.name] = tuple(dict.fromkeys(elsewhere.get(o.name, ()) + (o.methods or f.methods)))
    opts = resolve_options(family, method, options, elsewhere)
    if family.covariates == "required" and covariates is None:
        raise InputError(f"{command} needs covariates.")
    if family.covariates == "none" and covariates is not None:
        raise InputError(f"{command} {method or ''} takes no covariates.".replace("  ", " "))
    if with_summary and not family.summaries:
        raise InputError(f"with_summary does not apply to {command}.")
    if is_cohort(store):
        return run_cohort(family, store, method=method, opts=opts, execution=execution, covariates=covariates,
                          with_summary=with_summary, combine=combine or "cauchy", group_by=group_by)
    if combine is not None or group_by is not None:
        raise InputError(f"{'combine' if combine is not None else 'group_by'} applies to cohorts (a Cohort or a "
                         "cohort folder), not to one store.")
    store = as_store(store)
    prep = family.prepare_for(store, method, opts, covariates, execution.device)
    spec = run_spec(store, prep, with_summary)
    return execute({"": spec}, execution, finalize=lambda ds, parts: ds[""], protect=[store.path], label=prep.label)
