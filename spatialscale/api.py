"""The Python API: a store in, an xarray Dataset out.

Each test function is a thin front over :func:`spatialscale.designs.run_design`
(one store through :func:`spatialscale.families.run_store`, or a cohort's
sections through :func:`spatialscale.designs.cohort_run.run_cohort`):
its keywords are the family options (:mod:`spatialscale.families`, the same
names as the CLI's flags) and the execution options
(:class:`~spatialscale.options.ExecutionOptions`).  Options left at ``None``
take the chosen method's default; an option that does not apply to the
chosen method is an :class:`~spatialscale.errors.InputError`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Callable
from dataclasses import fields
from typing import Any

import xarray as xr

from spatialscale.cohort import is_cohort, section_stores
from spatialscale.designs import run_design
from spatialscale.errors import InputError
from spatialscale.families.base import MIN_BATCHES, MIN_BATCHES_GLMM
from spatialscale.families.common import ingest_option_names, input_store, parse_bytes
from spatialscale.families.fit import fitted_ratios
from spatialscale.families.summary import merge_summary
from spatialscale.options import ExecutionOptions
from spatialscale.store import IsoformStore
from spatialscale.store import ingest as ingest_function

__all__ = ["MIN_BATCHES", "MIN_BATCHES_GLMM", "deconvolve", "du_test", "feature_summary", "fitted_ratios",
           "glmm_fit", "latent_factors", "merge_summary", "parse_bytes", "sv_test"]

_EXECUTION_DOC = """client, scheduler, workers
        Where to run: a ``distributed.Client``; a scheduler address
        (``tcp://host:8786``, ``tls://...``), a scheduler file (``.json``) or
        ``"threads"`` for local threads; or a new LocalCluster (127.0.0.1)
        with ``workers`` processes.  With none of them, the active Dask
        client if any, else local threads.
    device
        ``cpu``, ``cuda`` or ``auto`` (resolved on each worker).
    batch_memory
        Working-memory budget of one task (bytes or ``"256MB"``); ``"auto"``
        takes half the free memory of the GPU workers (256MB on CPU).  A
        batch that still runs out of memory is split and retried.
    batch_size
        Cap on genes per batch.
    out
        Results zarr path, or a URL (``s3://bucket/sv.zarr`` or any fsspec
        URL; ``docs/object-storage.md``); batches are recorded (with
        checksums) as they finish, so an interrupted run resumes.  ``None``
        keeps results in memory only.  Only results spatialscale wrote are
        ever replaced.  ``store`` may be a URL too (read through a verified
        local replica).
    overwrite
        Replace results of other options at ``out`` (at the end of the run).
    progress
        Show a progress bar of batches.
    options
        An :class:`~spatialscale.options.ExecutionOptions` instead of the
        keywords above (give one or the other).
    layer, gene_key, spatial_key, ..., ingest, ingest_to
        When ``store`` is an AnnData (object, ``.h5ad`` or AnnData zarr) or a
        SpatialData input, it is ingested once with the
        :func:`~spatialscale.store.ingest` options given as keywords
        (``layer="X"``, ``spatial_key=("x", "y")``, ``gene_key=``,
        ``k_neighbors=``..., the names of the CLI's flags) or as a dict
        ``ingest={"layer": "X", ...}``.  The store goes to ``ingest_to``, or
        to this process's ingest cache (a temporary folder removed at exit);
        later calls on the same unchanged input with the same options reuse
        it (keyed by the input's content, never by its path or name).
        Workers must see it: local clusters do; name a path on shared storage
        for a remote one.
    **extra
        Options of test families not listed above (see
        :data:`spatialscale.families.FAMILIES`); unknown ones are an error."""


def _with_execution(fn: Callable) -> Callable:
    """Give an entry point the execution keywords (the fields of :class:`ExecutionOptions`, or ``options=``).

    The wrapped function receives them as one validated-later
    ``ExecutionOptions`` (``execution=``); its signature and docstring show
    them, defined once here.
    """
    names = [f.name for f in fields(ExecutionOptions)]
    sig = inspect.signature(fn)
    own = [p for p in sig.parameters.values() if p.name != "execution" and p.kind != p.VAR_KEYWORD]
    rest = [p for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD]
    added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=f.type)
             for f in fields(ExecutionOptions)]
    added.append(inspect.Parameter("options", inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation="ExecutionOptions | None"))
    added += [inspect.Parameter("ingest", inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation="dict[str, Any] | None"),
              inspect.Parameter("ingest_to", inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation="str | os.PathLike | None")]
    ingest_names = ingest_option_names()
    ingest_defaults = inspect.signature(ingest_function).parameters
    added += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=None,
                                annotation=f"{ingest_defaults[k].annotation} | None") for k in ingest_names]

    @functools.wraps(fn)
    def entry(store: Any, *args: Any, options: ExecutionOptions | None = None, ingest: dict[str, Any] | None = None,
              ingest_to: str | os.PathLike | None = None, **kwargs: Any) -> xr.Dataset:
        given = {k: kwargs.pop(k) for k in names if k in kwargs}
        if options is not None and given:
            raise InputError(f"give execution settings either as options= or as keywords, not both "
                             f"({', '.join(sorted(given))}).")
        execution = (options if options is not None else ExecutionOptions(**given)).validated()
        top = {k: v for k in ingest_names if (v := kwargs.pop(k, None)) is not None}
        if top:
            if ingest is not None and not isinstance(ingest, dict):
                raise InputError(f"ingest must be a dict of ingest options ({{'layer': 'X', ...}}), got "
                                 f"{type(ingest).__name__}.")
            twice = sorted(set(top) & set(ingest or {}))
            if twice:
                raise InputError(f"ingest option(s) {', '.join(twice)} given both as keywords and in ingest=; "
                                 "give each once.")
            ingest = {**(ingest or {}), **top}
        with input_store(store, ingest, ingest_to, cohort=is_cohort(store)) as opened:
            return fn(opened, *args, execution=execution, **kwargs)

    entry.__signature__ = sig.replace(parameters=own + added + rest)  # type: ignore[attr-defined]
    entry.__doc__ = (fn.__doc__ or "").replace("{execution}", _EXECUTION_DOC)
    return entry


@_with_execution
def sv_test(
    store: IsoformStore | str | os.PathLike,
    *,
    method: str = "hsic-ir",
    null: str | None = None,
    transformation: str | None = None,
    nan_filling: str | None = None,
    n_perms: int | None = None,
    perm_seed: int | None = None,
    fit: str | None = None,
    glmm: dict[str, Any] | None = None,
    response: str | None = None,
    weighting: str | None = None,
    kernels: list[str | dict[str, Any]] | None = None,
    covariates: Any = None,
    with_summary: bool = False,
    combine: str | None = None,
    group_by: str | None = None,
    compare: str | None = None,
    compare_levels: list[str] | None = None,
    block: str | None = None,
    min_sections: int | None = None,
    execution: ExecutionOptions,
    **extra: Any,
) -> xr.Dataset:
    """Test every gene of a section for spatial variability (HSIC or GLMM likelihood ratio).

    Parameters
    ----------
    store
        An opened store or its path, an AnnData input (ingested first, see
        ``ingest``), or a cohort (:func:`spatialscale.open_cohort`
        or a cohort folder): then every section is tested in one set of
        tasks and the results gain a ``section`` dimension and per-gene
        combined p-values (see :func:`spatialscale.designs.cohort_run.run_cohort`).
    method
        ``hsic-ir`` (isoform ratios), ``hsic-ic`` (isoform counts),
        ``hsic-gc`` (gene counts), or ``glmm-llr``: ``2 (l_full - l_null)``
        of the Laplace marginal likelihoods of glmm-full and glmm-null,
        fitted each from the other as SPLISOSM's ``fit(from_null=True)``
        (see :mod:`spatialscale.glmm.llr`; dense in ``n q``, so for sections
        of a few thousand spots).  ``moran`` / ``geary``: Moran's I /
        Geary's C of each gene's responses on the store's spot graph (as
        squidpy's ``spatial_autocorr``; multivariate for several isoforms),
        one-sided normal-approximation p-values
        (:mod:`spatialscale.stats.autocorr`; no covariates; a raster
        store's graph joins its observed bins to their grid neighbours).
    null
        HSIC: ``liu`` (default, SPLISOSM's), ``welch``, ``perm``, or
        ``liu-perm``: Liu's approximation with the exact permutation mean
        and variance of the statistic, which also account for the data's
        fourth moments (:func:`spatialscale.stats.nulls.permutation_moments`).
        The chi-square mixture of ``liu`` / ``welch`` overstates the null
        variance for discrete responses such as isoform ratios at low depth,
        so their p-values run conservative (about 0.04 of null p-values
        below 0.05, and fewer near 0 and 1); ``liu-perm`` corrects that,
        which matters most when sections are combined (a cohort's Stouffer
        or Fisher combination keeps each section's under-dispersion).  ``glmm-llr``:
        ``chi2`` (default): ``chi2(1)`` (``chi2(p-1)`` without shared
        variance), without boundary correction, so conservative; ``perm``:
        the null/full pair is refitted on ``n_perms`` spot permutations and
        each gene's statistic is compared with those of all genes of its
        isoform count; ``perm-gene``: with its own ``n_perms`` only (as
        SPLISOSM's ``use_perm_null``; p >= ``1 / (n_perms + 1)``).
    transformation
        hsic-ir: ratio transformation none (default), clr, ilr, alr, radial.
    nan_filling
        HSIC: ``mean`` (default) or ``none`` for spots where a gene has no counts.
    n_perms, perm_seed
        Permutations for the ``perm`` nulls (one seeded set shared by all
        genes); default 1000 for HSIC, 20 for ``glmm-llr`` (each one a refit
        of the pair); seed 0.
    fit
        glmm-llr: the GLMM fitting method (``joint_newton`` default, or
        ``joint_gd`` (SPLISOSM's; the default on a low-rank kernel),
        ``marginal_gd``, ``marginal_newton``).
    glmm
        glmm-llr: GLMM settings (see :func:`du_test`).
    response
        moran / geary: ``isoform-ratios`` (default; mean-filled at spots
        without counts, as hsic-ir), ``isoform-counts`` or ``gene-counts``.
    weighting
        moran / geary: ``row`` (default; the graph row-standardised, as
        squidpy's ``transformation=True``) or ``binary`` (1 per edge).
    kernels
        HSIC: a kernel ensemble (at least 2): each gene's responses are
        tested against every kernel (each with its own Liu / Welch null) and
        the p-values Cauchy-combined into ``sv_pvalue``.  Each kernel is
        ``"store"`` (the store's own), a compact string
        ``"PRIOR:KEY=VALUE,..."`` (``"splisosm:rho=0.5"``, ``"sar:rho=0.2"``)
        or a dict (``{"prior": "icar", "rho": 0.9}``) over the store's graph
        (keys ``rho``, ``k_neighbors``, ``weights``, ``radius``,
        ``bandwidth``, ``scale_coords``, ``row_scale``, ``standardize_cov``;
        the rest from the store's kernel).  Adds ``kernel_statistic``,
        ``kernel_pvalue``, ``kernel_effect`` over a ``kernel`` dimension and
        ``sv_kernel``; ``sv_statistic`` / ``sv_effect`` are the smallest
        p-value's kernel's.  Null ``liu`` / ``welch``, ``nan_filling="mean"``,
        CAR stores; with ``covariates`` every kernel's test is adjusted
        (docs/statistics.md).
    covariates
        Adjust the test for covariates (obs column names, a list or
        ``"a,b"``, covariate sets such as ``"latent"``, an array or a
        DataFrame; categorical columns one-hot encoded): spatial variability
        of usage beyond what they explain.  HSIC: each gene's centred
        response is projected off the covariates (with an intercept) and the
        null uses the power sums of the projected kernel ``M K_c M``
        (``nan_filling="mean"``; null ``liu``, ``welch`` or ``perm``; CAR
        stores); ``glmm-llr``: fixed effects of both models.  Results record
        the design columns in ``attrs["covariates"]``.
    with_summary
        Also return the gene-level feature summaries (``gene_perplexity``,
        ``gene_count_avg``...; see :func:`feature_summary`), computed by the
        same tasks from the counts they read.
    combine
        Cohorts: how each gene's section p-values are combined, ``cauchy``
        (default; valid under dependence), ``fisher`` or ``stouffer``
        (weights ``sqrt(n_spots)``), or ``pooled`` (HSIC SV tests with the
        Liu null: statistics summed over independent sections and tested
        against their summed null mixtures).
    group_by
        Cohorts: a column of the manifest (e.g. ``condition``); the sections
        are also combined within each of its groups, as ``group_combined_pvalue``
        (and ``group_combined_pvalue_adj``, ``group_n_sections_tested``,
        ``group_n_sections_significant``) over a ``group`` dimension.
    compare
        Cohorts: a column of the manifest (e.g. ``condition``); per gene, does
        the spatial variability differ between its levels?  Each section's
        ``sv_effect`` is one replicate; an F test of the levels in a linear
        model over sections gives ``compare_statistic``, ``compare_pvalue``,
        ``compare_pvalue_adj`` (BH over genes) and ``compare_effect`` (the
        levels' mean effects over a ``level`` dimension); attributes
        ``compare``, ``compare_test``, ``compare_block``.  HSIC methods and
        ``glmm-llr``; at least 2 residual degrees of freedom (e.g. 2 levels
        x 2 sections).  See docs/statistics.md.
    compare_levels
        The levels of ``compare`` in the order wanted (every level of the
        cohort, each with sections); default sorted.
    block
        A manifest column of donors (e.g. ``donor``) whose sections are not
        independent: crossed with the levels (a donor in several levels),
        donor enters the model as a block (``compare_test="blocked"``);
        nested (each donor in one level), each donor's sections are averaged
        and the donors compared (``"donor-means"``).
    min_sections
        Cohorts: ``r`` adds ``replicated_pvalue`` / ``replicated_pvalue_adj``,
        the partial-conjunction test that the gene is SV in at least ``r``
        of the ``k`` sections that tested it (the ``k - r + 1`` largest
        section p-values combined by ``combine``; NaN where ``k < r``).
    {execution}

    Returns
    -------
    xarray.Dataset
        ``sv_statistic``, ``sv_pvalue``, ``sv_pvalue_adj``, ``n_isoforms`` and
        ``n_spots_used`` over ``gene``, with provenance attributes.
    """
    given = {"null": null, "transformation": transformation, "nan_filling": nan_filling, "n_perms": n_perms,
             "perm_seed": perm_seed, "fit": fit, "glmm": glmm, "response": response, "weighting": weighting,
             "kernels": kernels, **extra}
    return run_design("sv", store, method=method, options=given, execution=execution, covariates=covariates,
                      with_summary=with_summary, combine=combine, group_by=group_by, compare=compare,
                      compare_levels=compare_levels, block=block, min_sections=min_sections)


@_with_execution
def du_test(
    store: IsoformStore | str | os.PathLike,
    covariates: Any,
    *,
    method: str = "hsic-gp",
    transformation: str | None = None,
    nan_filling: str | None = None,
    residualize: str | None = None,
    null: str | None = None,
    gp: dict[str, Any] | None = None,
    model: str | None = None,
    fit: str | None = None,
    glmm: dict[str, Any] | None = None,
    per_level: bool | None = None,
    with_summary: bool = False,
    combine: str | None = None,
    group_by: str | None = None,
    compare: str | None = None,
    compare_levels: list[str] | None = None,
    block: str | None = None,
    min_sections: int | None = None,
    execution: ExecutionOptions,
    **extra: Any,
) -> xr.Dataset:
    """Test every gene x covariate pair for differential isoform usage.

    Parameters
    ----------
    store
        An opened store or its path, or an AnnData input (ingested first, see
        ``ingest``).
    covariates
        obs column name(s) (a list, or ``"a,b"``), or an array / DataFrame
        with one row per spot (a DataFrame indexed by spot names is aligned
        to the store; one test per column). A binary or boolean obs column is
        one test (one indicator; the first level, or ``False``, is the
        reference); a categorical of ``k >= 3`` levels is one joint test of
        its levels, or ``k`` tests of each level against the rest with
        ``per_level=True``. NaN values are an error (drop or impute those
        spots first).
    method
        Kernel and t-tests on the isoform ratios:

        * ``hsic-gp`` (default): linear HSIC between the ratios and each
          covariate after removing the covariate's spatial trend with a
          Gaussian process (RBF on z-scored coordinates + white noise,
          hyper-parameters by maximum likelihood), so that a covariate and
          isoform usage that merely share a spatial pattern are not called.
          Each covariate is residualised once, then tested against every gene.
        * ``hsic``: unconditional linear HSIC (multivariate Pearson / RV test).
        * ``t-fisher`` / ``t-tippett``: binary covariates only; a two-sample
          t-test per isoform ratio, combined per gene by Fisher / Tippett.

        Parametric tests on the multinomial GLM / GLMM:

        * ``glmm-score``: score test of each covariate against the model
          fitted without covariates, ``stat = s' I^-1 s ~ chi2(p - 1)``;
        * ``glmm-wald``: Wald test ``beta' I beta ~ chi2(p - 1)`` of each
          covariate in the model fitted with all of them.
    transformation
        Kernel / t-tests: ratio transformation none (default), clr, ilr, alr, radial.
    nan_filling
        Kernel / t-tests: ``mean`` (default; spots where a gene has no counts
        take its mean ratio) or ``none`` (those spots leave that gene's tests).
    residualize
        hsic-gp: ``cov_only`` (default) or ``both`` (also remove each gene's
        own spatial trend from its ratios, one GP per gene).
    null
        hsic-gp's null distribution: ``liu`` (default, SPLISOSM's: the
        residual covariate taken as white noise) or ``gp`` (the residual's
        covariance under the covariate's fitted GP, ``eps (I - U diag(shrink)
        U')``, with Liu's approximation on ``eig(eps Y' S Y)``).  When isoform
        usage has a spatial pattern of its own, ``liu`` is conservative and
        ``gp`` is calibrated.
    gp
        hsic-gp: spatial GP settings (see :func:`spatialscale.stats.gp.residualize`),
        e.g. ``{"backend": "exact"}``; default backend ``auto`` (exact on
        small sections, inducing points on large ones).
    model
        GLMM tests: the fitted model, ``glm`` (default; multinomial GLM
        fitted exactly by IWLS), ``glmm-full`` (spatial random effect) or
        ``glmm-null`` (white-noise random effect).
    fit
        GLMM tests: the fitting method (GLMMs ``joint_newton`` (default),
        ``joint_gd`` (SPLISOSM's; the default for glmm-full on a low-rank
        kernel), ``marginal_gd``, ``marginal_newton``; GLM ``iwls``
        (default, = ``newton``) or ``gd``).
    glmm
        GLMM tests: settings of :class:`spatialscale.glmm.glmm.GLMMConfig`
        (``share_variance``, ``var_fix_sigma``, ``var_prior``, ``init_ratio``,
        ``lr``, ``tol``, ``patience``, ``max_epochs``, ``dtype``,
        ``update_nu_every_k``, ``optim``), ``rank`` (kernel eigenpairs kept;
        default all up to 5,000 spots, else ``ceil(4 sqrt(n))`` with the
        isotropic remainder) and, for ``glmm-score``, ``information``:
        ``unadjusted`` (default, SPLISOSM's, which ignores the random effect
        and is conservative for GLMM fits) or ``adjusted`` (``Var(s) = Z' P Z``
        of the linearised GLMM with the intercepts and the random effect
        accounted for, GMMAT-style).
    per_level
        Categorical covariates (two-level ones included): test each level
        against the rest, one test per level named ``<column>_<level>``
        (SPLISOSM's one-hot layout), instead of one test per covariate; the
        two-group t-tests need it for ``k >= 3`` levels.
    with_summary, combine, group_by, compare_levels, block, min_sections
        As in :func:`sv_test` (``store`` may be a cohort too).
    compare
        As in :func:`sv_test`, per gene x covariate on the sections'
        ``du_effect`` (the RV coefficient of the ratios and the covariate;
        methods ``hsic`` and ``hsic-gp``).
    {execution}

    Returns
    -------
    xarray.Dataset
        ``du_statistic``, ``du_pvalue``, ``du_pvalue_adj`` (BH over genes,
        per covariate) over ``(gene, covariate)``, ``n_isoforms`` (and
        ``n_spots_used`` for the kernel / t-tests).
    """
    given = {"transformation": transformation, "nan_filling": nan_filling, "residualize": residualize, "null": null,
             "gp": gp, "model": model, "fit": fit, "glmm": glmm, "per_level": per_level, **extra}
    return run_design("du", store, method=method, options=given, execution=execution, covariates=covariates,
                      with_summary=with_summary, combine=combine, group_by=group_by, compare=compare,
                      compare_levels=compare_levels, block=block, min_sections=min_sections)


@_with_execution
def glmm_fit(
    store: IsoformStore | str | os.PathLike,
    *,
    model: str | None = None,
    fit: str | None = None,
    covariates: Any = None,
    glmm: dict[str, Any] | None = None,
    return_nu: bool | None = None,
    execution: ExecutionOptions,
    **extra: Any,
) -> xr.Dataset:
    """Fit the multinomial GLM / GLMM of every gene and return the fitted parameters.

    Parameters
    ----------
    store
        An opened store or its path, or an AnnData input (ingested first, see
        ``ingest``).
    model
        ``glmm-full`` (default; spatial random effect), ``glmm-null`` (white
        noise) or ``glm``.
    fit
        GLMMs: ``joint_newton`` (default), ``joint_gd`` (SPLISOSM's; the
        default for glmm-full on a low-rank kernel), ``marginal_gd``,
        ``marginal_newton``; GLM: ``iwls`` (default, = ``newton``) or ``gd``.
    covariates
        Optional fixed effects (as in :func:`du_test`).
    glmm
        GLMM settings (see :func:`du_test`).
    return_nu
        Also return the random effect ``nu`` (``gene x spot x contrast``).
    {execution}

    Returns
    -------
    xarray.Dataset
        ``intercept``, ``beta``, ``sigma``, ``theta``, ``converged``, ``loss``,
        ``epochs``, ``n_isoforms`` (and ``nu``); logits are against each gene's
        last isoform, padded with NaN past its own isoforms.  See
        :func:`fitted_ratios` to recompute a gene's fitted isoform ratios.
    """
    given = {"model": model, "fit": fit, "glmm": glmm, "return_nu": return_nu, **extra}
    return run_design("glmm", store, method=None, options=given, execution=execution, covariates=covariates)


@_with_execution
def feature_summary(
    store: IsoformStore | str | os.PathLike,
    *,
    execution: ExecutionOptions,
    **extra: Any,
) -> xr.Dataset:
    """Gene- and isoform-level feature summaries of every gene of a section.

    The summaries of SPLISOSM's ``extract_feature_summary`` (expression
    level, coverage and isoform usage; definitions in
    :mod:`spatialscale.stats.summary`), computed batch by batch on the
    engine like the tests: one task per batch of genes, resumable from
    ``out``.  They run on CPU (``device`` other than ``cpu`` is an error).

    Parameters
    ----------
    store
        An opened store or its path, or an AnnData input (ingested first, see
        ``ingest``).
    {execution}

    Returns
    -------
    xarray.Dataset
        ``gene_*`` variables over ``gene`` and ``iso_*`` variables over
        ``isoform`` (coordinates ``isoform`` = isoform names and
        ``isoform_gene``; see :mod:`spatialscale.families.summary`), with
        provenance attributes.
    """
    if execution.batch_memory == "auto":  # CPU-only work: the CPU default budget
        execution = dataclasses.replace(execution, batch_memory="256MB")
    return run_design("summary", store, method=None, options=dict(extra), execution=execution)




# --------------------------------------------------------------------------- covariates from expression
_SPATIAL_DOC = """spatial_loss
        Add a spatial loss on the spots' outputs (:mod:`spatialscale.losses`),
        built on the store's own spot graph (a cohort: block diagonal, no
        edges across sections): a prior name (``icar``, ``car``, ``sar``,
        ``isar``, ``sma``, ``splisosm``), ``kl`` or ``contrastive``; ``None``
        (default) adds none.
    lambda_spatial
        Its weight in the loss (default 1; SpatialPCA and VAE 0.1).
    spatial_rho, spatial_standardize
        The prior's ``rho`` (default: the loss's own) and whether its
        covariance is standardised to unit variance (default ``False``).
    seed
        Seed of the initialisation and of everything random in training: the
        same seed reproduces the result."""

_MODEL_EXECUTION_NOTE = """Training is one Dask task (a section, or a cohort with the sections as
    batches), run where the execution keywords say (a GPU worker's device
    with ``device="cuda"`` / ``"auto"``); the worker reads the store's
    counts itself.  ``out``, ``batch_memory`` and ``batch_size`` do not
    apply: the result is written into the store(s) as covariate set
    ``key_added`` (its name then stands for its columns wherever
    covariates are taken, e.g. ``du_test(store, "latent")``), with
    provenance; a set of that name from the same data, options and seed
    is reused, and another one is replaced only with ``overwrite``."""


def _model_execution(execution: ExecutionOptions) -> ExecutionOptions:
    if execution.out is not None:
        raise InputError("out does not apply here: the covariates are written into the store (key_added); read "
                         "them back with store.covariate_set(key) or use the returned Dataset.")
    return execution


@_with_execution
def deconvolve(
    store: IsoformStore | str | os.PathLike,
    reference: Any,
    *,
    method: str = "nnls",
    celltype_key: str | None = None,
    key_added: str = "props",
    genes: Any = None,
    spatial_loss: str | None = None,
    lambda_spatial: float | None = None,
    spatial_rho: float | None = None,
    spatial_standardize: bool | None = None,
    max_epochs: int | None = None,
    lr: float | None = None,
    seed: int | None = None,
    execution: ExecutionOptions,
) -> xr.Dataset:
    """Cell-type proportions of every spot from a reference, optionally spatially regularised.

    Non-negative least squares of each spot's gene expression (the sum of
    each gene's isoform counts) on the reference's cell-type signatures,
    plus ``lambda_spatial`` times a spatial loss on the spots' coefficients;
    the proportions are the coefficients scaled to sum to 1 per spot.  See
    ``docs/latent.md``.

    Parameters
    ----------
    store
        An isoform store, a cohort (each section deconvolved, in one task),
        or an AnnData input (ingested first, see ``ingest``).
    reference
        Cell types x genes signatures: an AnnData (obs = cell types), a
        DataFrame, or a path to an ``.h5ad`` / AnnData ``.zarr``; or single
        cells x genes with ``celltype_key``.  Genes are matched to the
        store's by name.
    method
        ``nnls``.
    celltype_key
        The reference is single cells: ``obs`` column of their cell type
        (each type's signature is its cells' mean).
    key_added
        Name of the covariate set written into the store (columns
        ``<key_added>_<cell type>``).
    genes
        Genes to use (default: those shared by the store and the reference).
    {spatial}
    max_epochs, lr
        With a spatial loss: the iterations of the projected-gradient solver
        (default 2000) and its step (default: from a backtracking line
        search).  Without one, each spot is solved exactly.
    {execution}

    Returns
    -------
    xarray.Dataset
        ``<key_added>`` (spot x column), the unnormalised ``coefficients``,
        provenance in ``attrs``.
    """
    from spatialscale.families.models import fit_model

    if method != "nnls":
        raise InputError(f"unknown deconvolution method {method!r}; choose nnls.")
    options = {"spatial_loss": spatial_loss, "lambda_spatial": lambda_spatial, "spatial_rho": spatial_rho,
               "spatial_standardize": spatial_standardize, "max_epochs": max_epochs, "lr": lr, "seed": seed}
    execution = _model_execution(execution)
    return fit_model(*section_stores(store), "nnls", options, execution, key_added=key_added, reference=reference,
                     celltype_key=celltype_key, genes=genes)


@_with_execution
def latent_factors(
    store: IsoformStore | str | os.PathLike,
    *,
    model: str = "vae",
    n_latent: int | None = None,
    key_added: str = "latent",
    genes: Any = None,
    batch_key: str | None = None,
    labels_key: str | None = None,
    gene_likelihood: str | None = None,
    dispersion: str | None = None,
    latent_distribution: str | None = None,
    n_hidden: int | None = None,
    n_layers: int | None = None,
    dropout_rate: float | None = None,
    use_observed_lib_size: bool | None = None,
    spatial_loss: str | None = None,
    lambda_spatial: float | None = None,
    spatial_rho: float | None = None,
    spatial_standardize: bool | None = None,
    sp_loss_as_kl: bool | None = None,
    max_epochs: int | None = None,
    lr: float | None = None,
    minibatch_size: int | None = None,
    validation_fraction: float | None = None,
    early_stopping: bool | None = None,
    kl_warmup_epochs: int | None = None,
    seed: int | None = None,
    execution: ExecutionOptions,
) -> xr.Dataset:
    """Latent factors of every spot's expression: SpatialPCA, an scVI-style VAE or an LDVAE.

    Parameters
    ----------
    store
        An isoform store; a cohort (one model over all sections, the section
        as the batch, latents written back into each section's store, so
        they mean the same thing in every section); or an AnnData input.
    model
        ``vae`` (default), ``ldvae`` (linear decoder: ``loadings`` kept) or
        ``pca`` (SpatialPCA of log-normalised expression).
    n_latent
        Number of factors (default 10).
    key_added
        Name of the covariate set written into the store (columns
        ``<key_added>_1``...).
    genes
        Genes to use (default: every gene of the store; a cohort's shared genes).
    batch_key
        ``obs`` column of batches (injected into the VAE's encoder and
        decoder); a cohort's sections are the batches by default.
    labels_key
        ``obs`` column of spot labels (e.g. an annotation) for
        ``dispersion="gene-label"``.
    gene_likelihood, dispersion, latent_distribution
        VAE / LDVAE: ``nb`` (default), ``zinb`` or ``poisson``; ``gene``
        (default), ``gene-batch``, ``gene-label`` or ``gene-cell``; ``normal`` (default) or
        ``ln`` (logistic normal).
    n_hidden, n_layers, dropout_rate, use_observed_lib_size
        VAE / LDVAE network: 128 hidden units, 1 layer, dropout 0.1, the
        observed library size (else a learnt one).
    {spatial}
    sp_loss_as_kl
        VAE / LDVAE: the spatial loss as the KL of the posterior against the
        spatial prior, instead of a penalty on the posterior means.
    max_epochs, lr, minibatch_size, validation_fraction, early_stopping, kl_warmup_epochs
        Training: epochs (VAE: scVI's rule, ``min(400, 400 * 20000 / n)``
        rounded; PCA 1000), Adam step size (VAE 1e-3; PCA: a line search),
        spots per minibatch (``None``: full batch, what a spatial loss
        coupling all spots needs; without a spatial loss, above 50,000 spots,
        minibatches of 1,024; minibatches use each batch's conditional
        precision, which is weak for small batches), held-out fraction of
        spots for early stopping (0.1), whether to stop early, KL warm-up
        epochs (default ``min(400, max_epochs)``).
    {execution}

    Returns
    -------
    xarray.Dataset
        ``<key_added>`` (the latent means, spot x column) and the model's
        other outputs (``latent_var``, ``library``, ``dispersion``,
        ``loadings``), provenance in ``attrs``.
    """
    from spatialscale.families.models import MODELS, fit_model

    if model not in MODELS or model == "nnls":
        raise InputError(f"unknown latent model {model!r}; choose pca, vae or ldvae.")
    given = {"n_latent": n_latent, "gene_likelihood": gene_likelihood, "dispersion": dispersion,
             "latent_distribution": latent_distribution, "n_hidden": n_hidden, "n_layers": n_layers,
             "dropout_rate": dropout_rate, "use_observed_lib_size": use_observed_lib_size,
             "spatial_loss": spatial_loss, "lambda_spatial": lambda_spatial, "spatial_rho": spatial_rho,
             "spatial_standardize": spatial_standardize, "sp_loss_as_kl": sp_loss_as_kl, "max_epochs": max_epochs,
             "lr": lr, "minibatch_size": minibatch_size, "validation_fraction": validation_fraction,
             "early_stopping": early_stopping, "kl_warmup_epochs": kl_warmup_epochs, "seed": seed}
    given = {k: v for k, v in given.items() if v is not None}
    execution = _model_execution(execution)
    return fit_model(*section_stores(store), model, given, execution, key_added=key_added, genes=genes,
                     batch_key=batch_key, labels_key=labels_key)


deconvolve.__doc__ = (deconvolve.__doc__ or "").replace("{spatial}", _SPATIAL_DOC)
latent_factors.__doc__ = (latent_factors.__doc__ or "").replace("{spatial}", _SPATIAL_DOC)
