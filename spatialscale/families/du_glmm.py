"""Differential usage by the multinomial GLM / GLMM (glmm-score, glmm-wald): every gene x covariate pair."""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import MIN_BATCHES, MIN_BATCHES_GLMM, Family, Option, Prepared
from spatialscale.families.common import batch_counts, provenance
from spatialscale.families.du_kernel import du_dataset
from spatialscale.families.fit import ALL_FITS, fit_batch, glmm_config, glmm_settings
from spatialscale.glmm.inference import SCORE_VARIANCES
from spatialscale.store import IsoformStore

__all__ = ["FAMILY"]

GLMM_DU_METHODS = ("glmm-score", "glmm-wald")
DU_MODELS = ("glm", "glmm-full", "glmm-null")
INFORMATION = ("unadjusted", "adjusted")


def _du_task(store_path: str, token: str, method: str, model: str, glmm: dict[str, Any], device: str,
             batch: Batch, z: np.ndarray) -> dict[str, np.ndarray]:
    """One Dask task: score test (fit without covariates) or Wald test (fit with them) of every covariate.

    Genes with one isoform have no usage to model: NaN.
    """
    from spatialscale.glmm import score_test, wald_test

    if batch.n_isoforms < 2:
        return {"statistic": np.full((batch.n_genes, z.shape[1]), np.nan),
                "pvalue": np.full((batch.n_genes, z.shape[1]), np.nan)}
    counts = batch_counts(store_path, batch)
    if method == "glmm-score":
        info = glmm.get("information", "unadjusted")
        fit_opts = {k: v for k, v in glmm.items() if k not in ("information", "score_variance")}
        fit = fit_batch(store_path, token, model, fit_opts, device, counts)
        kw = {}
        if info == "adjusted" and model != "glm":
            from spatialscale.worker import kernel_eigenpairs

            lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank")) if model == "glmm-full" else (None, None)
            kw = {"fit": fit, "eigvals": lam, "eigvecs": vec, "config": glmm_config(model, fit_opts)}
        stat, pval = score_test(counts, fit["probs"], z, information=info,
                                variance=glmm.get("score_variance", "model"), **kw)
    else:
        fit = fit_batch(store_path, token, model, glmm, device, counts, design=z)
        stat, pval = wald_test(counts, fit["probs"], z, fit["beta"])
    return {"statistic": stat, "pvalue": pval}


def _prepare(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str) -> Prepared:
    from spatialscale.covariates import resolve_covariates

    model = opts["model"]
    names, z = resolve_covariates(store.obs(), covariates)
    information = (opts["glmm"] or {}).get("information", "unadjusted")
    if information not in INFORMATION:
        raise InputError(f"unknown score information {information!r}; choose one of {', '.join(INFORMATION)}.")
    if "information" in (opts["glmm"] or {}) and method != "glmm-score":
        raise InputError("glmm setting 'information' applies to method='glmm-score' only.")
    variance = (opts["glmm"] or {}).get("score_variance", "model")
    if variance not in SCORE_VARIANCES:
        raise InputError(f"unknown score_variance {variance!r}; choose one of {', '.join(SCORE_VARIANCES)}.")
    if variance != "model" and (method != "glmm-score" or model != "glm"):
        raise InputError(f"glmm setting score_variance={variance!r} applies to method='glmm-score' with model='glm'.")
    glmm = glmm_settings(store, model, opts["fit"], opts["glmm"], extra=("information", "score_variance"))
    if information == "unadjusted":
        glmm.pop("information", None)
    if variance == "model":
        glmm.pop("score_variance", None)
    n, f = store.n_spots, z.shape[1]

    def assemble(run: Any) -> xr.Dataset:
        return du_dataset(store, run, names, {"test": "differential_usage", "method": method, "model": model,
                                              **{f"glmm_{k}": v for k, v in glmm.items() if v is not None},
                                              **provenance(store)})

    task = functools.partial(_du_task, str(store.path.resolve()), store.kernel_token, method, model, glmm, device)
    return Prepared(kind="du", params={"method": method, "model": model, "glmm": glmm}, task=task,
                    bytes_per_gene=lambda p: 8.0 * n * (12 * p + p * p + f), label=f"du {method}",
                    assemble=assemble, shared=z, min_batches=MIN_BATCHES if model == "glm" else MIN_BATCHES_GLMM,
                    fingerprint_extra={"covariates": names, "design": hashlib.sha256(z.tobytes()).hexdigest()})


FAMILY = Family(
    name="du-glmm",
    command="du",
    methods=GLMM_DU_METHODS,
    description="score and Wald tests of differential usage on the multinomial GLM / GLMM",
    options=(
        Option("model", "glm", "the fitted model: glm (exact IWLS), glmm-full (spatial random effect) or glmm-null",
               choices=DU_MODELS),
        Option("fit", None, "fitting method (GLMM: joint_gd; GLM: iwls)", choices=ALL_FITS),
        Option("glmm", None, "GLMM settings (key=value): share_variance, var_fix_sigma, var_prior, init_ratio, lr, "
               "tol, patience, max_epochs, dtype, update_nu_every_k, optim, rank, and for glmm-score information="
               "unadjusted|adjusted and (model glm) score_variance=model|pearson|robust (robust: calibrated under "
               "overdispersion)", kind="dict"),
    ),
    prepare=_prepare,
    variables=("du_statistic", "du_pvalue", "du_pvalue_adj", "n_isoforms"),
    covariates="required",
)
