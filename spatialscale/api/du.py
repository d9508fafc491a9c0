"""Differential usage: every gene x covariate pair."""

from __future__ import annotations

import functools
import hashlib
import os
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.api._common import (
    MIN_BATCHES,
    MIN_BATCHES_GLMM,
    as_store,
    batch_counts,
    check_choice,
    execute,
    finish,
    provenance,
)
from spatialscale.api.fit import fit_batch, glmm_options
from spatialscale.engine import Batch
from spatialscale.results import make_dataset
from spatialscale.stats.multitest import bh_adjust
from spatialscale.store import IsoformStore

__all__ = ["du_test"]


DU_METHODS = ("glmm-score", "glmm-wald")
DU_MODELS = ("glm", "glmm-full", "glmm-null")


def _du_task(store_path: str, token: str, method: str, model: str, glmm: dict[str, Any], device: str,
             batch: Batch, z: np.ndarray) -> dict[str, np.ndarray]:
    """One Dask task: score test (fit without covariates) or Wald test (fit with them) of every covariate."""
    from spatialscale.glmm import score_test, wald_test

    counts = batch_counts(store_path, batch)
    if method == "glmm-score":
        fit = fit_batch(store_path, token, model, glmm, device, counts)
        stat, pval = score_test(counts, fit["probs"], z)
    else:
        fit = fit_batch(store_path, token, model, glmm, device, counts, design=z)
        stat, pval = wald_test(counts, fit["probs"], z, fit["beta"])
    return {"statistic": stat, "pvalue": pval}


def du_test(
    store: IsoformStore | str | os.PathLike,
    covariates: Any,
    *,
    method: str = "glmm-score",
    model: str = "glm",
    glmm: dict[str, Any] | None = None,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    device: str = "cpu",
    batch_memory: int | str = "256MB",
    batch_size: int | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> xr.Dataset:
    """Test every gene x covariate pair for differential isoform usage.

    Parameters
    ----------
    store
        An opened store or its path.
    covariates
        obs column name(s) (a list, or ``"a,b"``; categorical columns are
        one-hot with every level kept), or an array / DataFrame with one row
        per spot.
    method
        ``glmm-score``: score test of each covariate against the multinomial
        model fitted without covariates, ``stat = s' I^-1 s ~ chi2(p - 1)``;
        ``glmm-wald``: Wald test ``beta' I beta ~ chi2(p - 1)`` of each
        covariate in the model fitted with all of them.
    model
        The null model the score test reads: ``glm`` (multinomial GLM,
        fitted exactly by IWLS), ``glmm-full`` (spatial random effect) or
        ``glmm-null`` (white-noise random effect), both by ``joint_gd``.
    glmm
        GLMM options: those of :class:`spatialscale.glmm.glmm.GLMMConfig`
        (``share_variance``, ``var_fix_sigma``, ``var_prior``, ``init_ratio``,
        ``lr``, ``tol``, ``patience``, ``max_epochs``, ``dtype``) and ``rank``
        (kernel eigenpairs kept; default all up to 5,000 spots, else
        ``ceil(4 sqrt(n))`` with the isotropic remainder).
    client, scheduler, workers, device, batch_memory, batch_size, out, overwrite, progress
        As in :func:`sv_test`.

    Returns
    -------
    xarray.Dataset
        ``du_statistic``, ``du_pvalue``, ``du_pvalue_adj`` (BH over genes,
        per covariate) over ``(gene, covariate)``, and ``n_isoforms``.
    """
    from spatialscale.covariates import resolve_covariates

    check_choice("method", method, DU_METHODS)
    check_choice("model", model, DU_MODELS)
    store = as_store(store)
    names, z = resolve_covariates(store.obs(), covariates)
    glmm = glmm_options(store, model, glmm)
    n = store.n_spots
    params = {"method": method, "model": model, "glmm": glmm}
    task = functools.partial(_du_task, str(store.path.resolve()), store.kernel_token, method, model, glmm, device)
    f = z.shape[1]
    run = execute(store, kind="du", params=params, task=task,
                   bytes_per_gene=lambda p: 8.0 * n * (12 * p + p * p + f),
                   batch_memory=batch_memory, batch_size=batch_size, client=client, scheduler=scheduler,
                   workers=workers, device=device, out=out, overwrite=overwrite, progress=progress,
                   label=f"du {method}", shared=z, min_batches=MIN_BATCHES if model == "glm" else MIN_BATCHES_GLMM,
                   fingerprint_extra={"covariates": names, "design": hashlib.sha256(z.tobytes()).hexdigest()})
    if run.existing is not None:
        return run.existing
    stat = np.concatenate([r["statistic"] for r in run.parts])
    pval = np.concatenate([r["pvalue"] for r in run.parts])
    ds = make_dataset(
        store.genes.index.to_numpy(),
        {"du_statistic": stat, "du_pvalue": pval, "du_pvalue_adj": bh_adjust(pval, axis=0),
         "n_isoforms": store.genes["n_isoforms"].to_numpy()},
        {"test": "differential_usage", "method": method, "model": model,
         **{f"glmm_{k}": v for k, v in glmm.items() if v is not None}, **provenance(store),
         "execution": run.kind},
        covariates=names,
    )
    return finish(ds, out, run.fp)


