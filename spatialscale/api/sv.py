"""Spatial variability: HSIC tests and the GLMM likelihood ratio, every gene of a section."""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.api._common import (
    MIN_BATCHES_GLMM,
    as_store,
    batch_counts,
    check_choice,
    execute,
    execution_options,
    provenance,
    summary_variables,
)
from spatialscale.api.fit import glmm_config, glmm_options
from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.options import ExecutionOptions
from spatialscale.results import make_dataset
from spatialscale.stats.multitest import bh_adjust
from spatialscale.stats.nulls import NULLS
from spatialscale.stats.responses import TRANSFORMS, response_width
from spatialscale.stats.sv import NAN_FILLINGS, SV_METHODS, sv_batch
from spatialscale.store import IsoformStore
from spatialscale.worker import kernel_operator

__all__ = ["LLR_NULLS", "llr_permutation_pvalues", "sv_test"]

#: nulls of glmm-llr: chi2, or spot permutations pooled over genes of equal isoform count, or per gene
LLR_NULLS = ("chi2", "perm", "perm-gene")


def _sv_task(store_path: str, token: str, device: str, params: dict[str, Any], batch: Batch) -> dict[str, np.ndarray]:
    """One Dask task: test the genes of ``batch`` (runs on a worker)."""
    op, sums = kernel_operator(store_path, token, device)
    counts = batch_counts(store_path, batch)
    return sv_batch(counts, op, sums, **params)


def sv_test(
    store: IsoformStore | str | os.PathLike,
    *,
    method: str = "hsic-ir",
    null: str | None = None,
    transformation: str = "none",
    nan_filling: str = "mean",
    n_perms: int | None = None,
    perm_seed: int = 0,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    device: str = "cpu",
    batch_memory: int | str = "256MB",
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
    glmm: dict[str, Any] | None = None,
    with_summary: bool = False,
) -> xr.Dataset:
    """Test every gene of a section for spatial variability (HSIC or GLMM likelihood ratio).

    Parameters
    ----------
    store
        An opened store or its path.
    method
        ``hsic-ir`` (isoform ratios), ``hsic-ic`` (isoform counts),
        ``hsic-gc`` (gene counts), or ``glmm-llr``: ``2 (l_full - l_null)``
        of the Laplace marginal likelihoods of glmm-full and glmm-null,
        fitted each from the other as SPLISOSM's ``fit(from_null=True)``
        (see :mod:`spatialscale.glmm.llr`; dense in ``n q``, so for sections
        of a few thousand spots).
    null
        HSIC: ``liu`` (default), ``welch`` or ``perm``.  ``glmm-llr``:
        ``chi2`` (default): ``chi2(1)`` (``chi2(p-1)`` without shared
        variance), without boundary correction, so conservative; ``perm``:
        the null/full pair is refitted on ``n_perms`` spot permutations and
        each gene's statistic is compared with those of all genes of its
        isoform count; ``perm-gene``: with its own ``n_perms`` only (as
        SPLISOSM's ``use_perm_null``; p >= ``1 / (n_perms + 1)``).
    transformation
        Ratio transformation for ``hsic-ir``: none, clr, ilr, alr, radial.
    nan_filling
        ``mean`` or ``none`` for spots where a gene has no counts.
    n_perms, perm_seed
        Permutations for the ``perm`` nulls (one seeded set shared by all
        genes); default 1000 for HSIC, 20 for ``glmm-llr`` (each one a refit
        of glmm-full).
    client, scheduler, workers
        Where to run: a ``distributed.Client``; a scheduler address (or
        ``"threads"`` for local threads); or a new LocalCluster with
        ``workers`` processes.  With none of them, the active Dask client if
        any, else local threads.
    device
        ``cpu``, ``cuda`` or ``auto`` (resolved on each worker).
    batch_memory
        Working-memory budget of one task (bytes or ``"256MB"``); ``"auto"``
        takes half the free memory of the GPU workers (256MB on CPU).  A
        batch that still runs out of memory is split and retried.
    batch_size
        Cap on genes per batch (results do not depend on it).
    out
        Results zarr path; batches are recorded as they finish, so an
        interrupted run resumes.  ``None`` keeps results in memory only.
    overwrite
        Replace ``out`` if it holds other results.
    progress
        Show a progress bar of batches.
    glmm
        GLMM options for ``glmm-llr`` (see :func:`du_test`).
    with_summary
        Also return the gene-level feature summaries (``gene_perplexity``,
        ``gene_count_avg``...; see :func:`spatialscale.feature_summary`),
        computed by the same tasks from the counts they read.

    Returns
    -------
    xarray.Dataset
        ``sv_statistic``, ``sv_pvalue``, ``sv_pvalue_adj``, ``n_isoforms`` and
        ``n_spots_used`` over ``gene``, with provenance attributes.
    """
    opts = execution_options(client=client, scheduler=scheduler, workers=workers, device=device,
                             batch_memory=batch_memory, batch_size=batch_size, out=out, overwrite=overwrite,
                             progress=progress)
    check_choice("method", method, SV_METHODS + ("glmm-llr",))
    if method == "glmm-llr":
        null = "chi2" if null is None else null
        check_choice("null", null, LLR_NULLS)
        n_perms = 20 if n_perms is None else int(n_perms)
        if null != "chi2" and n_perms < 1:
            raise InputError(f"n_perms must be >= 1 for null={null!r}.")
        return _sv_llr(store, glmm=glmm, null=null, n_perms=n_perms, perm_seed=int(perm_seed), options=opts,
                       with_summary=with_summary)
    null = "liu" if null is None else null
    n_perms = 1000 if n_perms is None else n_perms
    check_choice("null", null, NULLS)
    check_choice("transformation", transformation, TRANSFORMS)
    check_choice("nan_filling", nan_filling, NAN_FILLINGS)
    if null == "perm" and int(n_perms) < 1:
        raise InputError("n_perms must be >= 1 for null='perm'.")
    store = as_store(store)
    n = store.n_spots
    params = {"method": method, "transformation": transformation, "nan_filling": nan_filling, "null": null,
              "n_perms": int(n_perms), "perm_seed": int(perm_seed)}
    attrs = {
        "test": "spatial_variability", "method": method, "null": null, "transformation": transformation,
        "nan_filling": nan_filling,
        **({"n_perms": int(n_perms), "perm_seed": int(perm_seed)} if null == "perm" else {}),
        **provenance(store),
    }

    def bytes_per_gene(p: int) -> float:
        d = response_width(method, p, transformation)
        perm = 2 * 32 * d if null == "perm" else 0
        return 8.0 * n * (p + 5 * d + perm)

    task = functools.partial(_sv_task, str(store.path.resolve()), store.kernel_token, device, params)

    def assemble(run: Any) -> xr.Dataset:
        data = {k: np.concatenate([r[k] for r in run.parts]) for k in ("statistic", "pvalue", "n_spots_used")}
        return make_dataset(
            store.genes.index.to_numpy(),
            {
                "sv_statistic": data["statistic"],
                "sv_pvalue": data["pvalue"],
                "sv_pvalue_adj": bh_adjust(data["pvalue"]),
                "n_isoforms": store.genes["n_isoforms"].to_numpy(),
                "n_spots_used": data["n_spots_used"],
                **summary_variables(run.parts),
            },
            {**attrs, "execution": run.kind},
        )

    return execute(store, kind="sv", params=params, task=task, bytes_per_gene=bytes_per_gene, options=opts,
                   label=f"sv {method}", assemble=assemble, with_summary=with_summary)


def _sv_llr_task(store_path: str, token: str, glmm: dict[str, Any], device: str, n_perms: int, perm_seed: int,
                 batch: Batch) -> dict[str, np.ndarray]:
    """One Dask task: fit glmm-null and glmm-full, compare their Laplace marginal likelihoods.

    The pair is fitted each from the other (:func:`spatialscale.glmm.llr.fit_sv_pair`).
    With ``n_perms > 0`` the pair is refitted on the counts with their spots
    permuted (permutation ``k`` is drawn from ``perm_seed + k``: the same for
    every gene and every batch).
    """
    from spatialscale.glmm import llr_test
    from spatialscale.glmm.llr import sv_log_marginals
    from spatialscale.worker import kernel_eigenpairs, resolve_device, tune_allocator

    if batch.n_isoforms < 2:  # one isoform: no usage to model
        nan = np.full(batch.n_genes, np.nan)
        out = {"statistic": nan, "pvalue": nan, "n_spots_used": np.zeros(batch.n_genes, np.int64)}
        return {**out, "perm_statistic": np.full((batch.n_genes, n_perms), np.nan)} if n_perms else out
    tune_allocator()
    counts = batch_counts(store_path, batch)
    lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank"))
    cfg = glmm_config("glmm-full", glmm)  # fit_sv_pair sets the model of each fit
    dev = resolve_device(device)
    df = 1 if cfg.share_variance else batch.n_isoforms - 1
    null, full = sv_log_marginals(counts, lam, vec, cfg, device=dev)
    stat, pval = llr_test(full, null, df)
    out = {"statistic": stat, "pvalue": pval, "n_spots_used": np.full(batch.n_genes, counts.shape[1])}
    if n_perms:
        perm_stats = np.empty((batch.n_genes, n_perms))
        for k in range(n_perms):
            order = np.random.default_rng(perm_seed + k).permutation(counts.shape[1])
            null_k, full_k = sv_log_marginals(counts[:, order], lam, vec, cfg, device=dev)
            perm_stats[:, k] = 2.0 * (full_k - null_k)
        out["perm_statistic"] = perm_stats
    return out


def llr_permutation_pvalues(stat: np.ndarray, perm_stats: np.ndarray, groups: np.ndarray,
                            pool: bool) -> np.ndarray:
    """Permutation p-values ``(1 + #{null >= observed}) / (1 + #null)`` of the LLR.

    Parameters
    ----------
    stat
        ``(G,)`` observed statistics.
    perm_stats
        ``(G, K)`` statistics of the same genes on ``K`` spot permutations.
    groups
        ``(G,)`` pooling groups (isoform counts): with ``pool`` each gene is
        compared with the permutation statistics of every gene of its group,
        else only with its own ``K``.
    pool
        Pool within groups (resolution ``1 / (K n_group)``) or not (``1 / K``).
    """
    stat = np.asarray(stat, dtype=np.float64)
    perm_stats = np.asarray(perm_stats, dtype=np.float64)
    if not pool:
        finite = np.isfinite(perm_stats)
        pvals = (1.0 + (finite & (perm_stats >= stat[:, None])).sum(1)) / (1.0 + finite.sum(1))
    else:
        pvals = np.empty_like(stat)
        for g in np.unique(groups):
            sel = groups == g
            pooled = perm_stats[sel].ravel()
            pooled = np.sort(pooled[np.isfinite(pooled)])
            exceed = pooled.size - np.searchsorted(pooled, stat[sel], side="left")
            pvals[sel] = (1.0 + exceed) / (1.0 + pooled.size)
    return np.where(np.isfinite(stat), pvals, np.nan)


def _sv_llr(store: IsoformStore | str | os.PathLike, *, glmm: dict[str, Any] | None, null: str, n_perms: int,
            perm_seed: int, options: ExecutionOptions, with_summary: bool) -> xr.Dataset:
    store = as_store(store)
    glmm = glmm_options(store, "glmm-full", glmm)
    n = store.n_spots
    k = 0 if null == "chi2" else n_perms
    task = functools.partial(_sv_llr_task, str(store.path.resolve()), store.kernel_token, glmm, options.device, k,
                             perm_seed)
    params = {"method": "glmm-llr", "glmm": glmm, "null": null,
              **({"n_perms": k, "perm_seed": perm_seed} if k else {})}
    n_iso = store.genes["n_isoforms"].to_numpy()

    def assemble(run: Any) -> xr.Dataset:
        data = {k: np.concatenate([r[k] for r in run.parts]) for k in ("statistic", "pvalue", "n_spots_used")}
        if k:
            perm_stats = np.concatenate([r["perm_statistic"] for r in run.parts])
            data["pvalue"] = llr_permutation_pvalues(data["statistic"], perm_stats, n_iso, pool=null == "perm")
        return make_dataset(
            store.genes.index.to_numpy(),
            {"sv_statistic": data["statistic"], "sv_pvalue": data["pvalue"],
             "sv_pvalue_adj": bh_adjust(data["pvalue"]), "n_isoforms": n_iso, "n_spots_used": data["n_spots_used"],
             **summary_variables(run.parts)},
            {"test": "spatial_variability", "method": "glmm-llr", "null": null,
             **({"n_perms": k, "perm_seed": perm_seed} if k else {}),
             **{f"glmm_{key}": v for key, v in glmm.items() if v is not None},
             **provenance(store), "execution": run.kind},
        )

    return execute(store, kind="sv", params=params, task=task,
                   bytes_per_gene=lambda p: 8.0 * (n * (p - 1)) ** 2 * 3, options=options, label="sv glmm-llr",
                   assemble=assemble, min_batches=MIN_BATCHES_GLMM, with_summary=with_summary)
