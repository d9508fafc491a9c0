"""Test families and the one engine entry they share.

Every kind of per-gene work is a :class:`~spatialscale.families.base.Family`
in :data:`FAMILIES`; :func:`run_family` validates the execution options and
the family's options, lets the family prepare its run and hands it to the
engine.  The public API (:mod:`spatialscale.api`) and the CLI
(:mod:`spatialscale.cli`) are generic over this registry: adding a family
is one module here plus its line in :data:`FAMILIES`.

A family runs on one isoform store and knows nothing of cohorts: runs over
several stores (a cohort's sections, combined per gene) are plans of
single-store plans (:func:`plan_store`) made above, in
:mod:`spatialscale.designs`.
"""

from __future__ import annotations

import os
from typing import Any

import xarray as xr

from spatialscale.errors import InputError
from spatialscale.families import du_glmm, du_kernel, fit, summary, sv_autocorr, sv_hsic, sv_llr
from spatialscale.families.base import Family, Option, Prepared, resolve_options
from spatialscale.families.common import RunSpec, as_store, execute, run_spec
from spatialscale.options import ExecutionOptions
from spatialscale.store import IsoformStore

__all__ = ["FAMILIES", "Family", "Option", "Prepared", "family_for", "methods_of", "plan_store", "resolve_family",
           "run_family", "run_store"]

#: every test family, by name
FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (sv_hsic, sv_llr, sv_autocorr, du_kernel, du_glmm,
                                                                        fit, summary)}


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


def resolve_family(command: str, method: str | None, options: dict[str, Any], *, covariates: Any = None,
                   with_summary: bool = False) -> tuple[Family, dict[str, Any]]:
    """The family that runs ``method`` of ``command`` and its options, after the checks every run makes.

    Options are resolved against the family (choices checked, defaults filled; an option of another
    method of the command is an error naming the methods it applies to); covariates and
    ``with_summary`` are checked against what the family takes.
    """
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
    return family, opts


def plan_store(family: Family, store: IsoformStore, *, method: str | None, opts: dict[str, Any], covariates: Any,
               with_summary: bool, device: str) -> RunSpec:
    """The plan of a family's run on one store: prepared by the family, its task and fingerprint.

    ``opts`` are resolved (:func:`resolve_family`).  A plan is what
    :func:`~spatialscale.families.common.execute` runs, alone or beside
    others (a cohort's sections: :mod:`spatialscale.designs`).
    """
    prep = family.prepare_for(store, method, opts, covariates, device)
    return run_spec(store, prep, with_summary)


def run_family(command: str, store: IsoformStore | str | os.PathLike, *, method: str | None,
               options: dict[str, Any], execution: ExecutionOptions, covariates: Any = None,
               with_summary: bool = False) -> xr.Dataset:
    """Validate everything, then run a family's batches on one store and return its Dataset.

    Parameters
    ----------
    command, method
        Select the family (``"sv", "hsic-ir"``; ``"glmm", None``...).
    store
        An isoform store or its path (runs over several stores, such as a
        cohort's sections, are :mod:`spatialscale.designs`' business).
    options
        The family's options as given (``None``: not given).
    execution
        Where and how to run (validated here, before anything else).
    covariates
        Covariates of DU tests and GLMM fits.
    with_summary
        Add the gene-level feature summaries (computed by the same tasks).
    """
    execution = execution.validated()
    family, opts = resolve_family(command, method, options, covariates=covariates, with_summary=with_summary)
    return run_store(family, store, method=method, opts=opts, execution=execution, covariates=covariates,
                     with_summary=with_summary)


def run_store(family: Family, store: IsoformStore | str | os.PathLike, *, method: str | None, opts: dict[str, Any],
              execution: ExecutionOptions, covariates: Any = None, with_summary: bool = False) -> xr.Dataset:
    """Run a family on one store, its options resolved (:func:`resolve_family`) and ``execution`` validated."""
    store = as_store(store)
    spec = plan_store(family, store, method=method, opts=opts, covariates=covariates, with_summary=with_summary,
                      device=execution.device)
    return execute({"": spec}, execution, finalize=lambda ds, parts: ds[""], protect=[store.path],
                   label=spec.prep.label)
