"""Differential usage by the multinomial GLM / GLMM (glmm-score, glmm-wald): every gene x covariate pair."""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.covariates import encode_covariates
from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import MIN_BATCHES, MIN_BATCHES_GLMM, Family, Option, Prepared
from spatialscale.families.common import batch_counts, provenance
from spatialscale.families.du_kernel import PER_LEVEL, design_fingerprint, du_dataset, per_level_option
from spatialscale.families.fit import ALL_FITS, fit_batch, glmm_config, glmm_settings
from spatialscale.store import IsoformStore

__all__ = ["FAMILY"]

GLMM_DU_METHODS = ("glmm-score", "glmm-wald")
DU_MODELS = ("glm", "glmm-full", "glmm-null")
INFORMATION = ("unadjusted", "adjusted")


#: ``variance`` settings of each method (the first is the default)
VARIANCES = {"glmm-score": ("robust", "model", "pearson"), "glmm-wald": ("robust", "model")}
#: settings of the tests, not of the fit
_TEST_SETTINGS = ("information", "variance")


def _du_task(store_path: str, token: str, method: str, model: str, glmm: dict[str, Any], device: str,
             groups: tuple[tuple[int, ...], ...] | None, batch: Batch, z: np.ndarray) -> dict[str, np.ndarray]:
    """One Dask task: score test (fit without covariates) or Wald test (fit with them) of every covariate.

    ``groups`` are the columns of ``z`` each test takes jointly (a
    categorical's indicators but the reference's; ``None``: one test per
    column).  Genes with one isoform have no usage to model: NaN.
    """
    from spatialscale.glmm import score_test, wald_test
    from spatialscale.worker import kernel_eigenpairs, log_timing, resolve_device

    if batch.n_isoforms < 2:
        n_tests = z.shape[1] if groups is None else len(groups)
        return {"statistic": np.full((batch.n_genes, n_tests), np.nan),
                "pvalue": np.full((batch.n_genes, n_tests), np.nan)}
    t0 = time.perf_counter()
    counts = batch_counts(store_path, batch)
    t1 = time.perf_counter()
    fit_opts = {k: v for k, v in glmm.items() if k not in _TEST_SETTINGS}
    variance = glmm.get("variance", VARIANCES[method][0])
    information = glmm.get("information", "unadjusted")
    lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank")) if model == "glmm-full" else (None, None)
    t2 = time.perf_counter()
    fit = fit_batch(store_path, token, model, fit_opts, device, counts, design=z if method == "glmm-wald" else None)
    t3 = time.perf_counter()
    kw = {}
    if (variance == "robust" or information == "adjusted") and model != "glm":
        kw = {"fit": fit, "eigvals": lam, "eigvecs": vec, "config": glmm_config(model, fit_opts),
              "device": resolve_device(device)}
    if method == "glmm-score":
        stat, pval = score_test(counts, fit["probs"], z, variance=variance, information=information, groups=groups,
                                **kw)
    else:
        stat, pval = wald_test(counts, fit["probs"], z, fit["beta"], variance=variance, groups=groups, **kw)
    log_timing(task="du-glmm", read=t1 - t0, eigenpairs=t2 - t1, fit=t3 - t2, test=time.perf_counter() - t3,
               genes=batch.n_genes, epochs=int(np.sum(fit.get("epochs", fit.get("iterations", 0)))))
    return {"statistic": stat, "pvalue": pval}


def _test_settings(method: str, model: str, glmm: dict[str, Any]) -> dict[str, str]:
    """Validated ``variance`` and ``information`` settings (defaults dropped)."""
    out = {}
    variance = glmm.get("variance", VARIANCES[method][0])
    if variance not in VARIANCES[method]:
        raise InputError(f"unknown variance {variance!r} for method={method!r}; choose one of "
                         f"{', '.join(VARIANCES[method])}.")
    if variance == "pearson" and model != "glm":
        raise InputError("glmm setting variance='pearson' applies to model='glm' only.")
    if variance != VARIANCES[method][0]:
        out["variance"] = variance
    information = glmm.get("information", "unadjusted")
    if information not in INFORMATION:
        raise InputError(f"unknown score information {information!r}; choose one of {', '.join(INFORMATION)}.")
    if "information" in glmm and method != "glmm-score":
        raise InputError("glmm setting 'information' applies to method='glmm-score' only.")
    if information != "unadjusted":
        if variance == "robust":
            raise InputError("glmm setting information='adjusted' applies to variance='model' or 'pearson'.")
        out["information"] = information
    return out


def _prepare(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str) -> Prepared:
    model = opts["model"]
    # a categorical's k levels: k - 1 indicators beside the intercepts, tested jointly
    design = encode_covariates(store.obs(), covariates, per_level=per_level_option(opts), drop_reference=True)
    z = design.z
    given = dict(opts["glmm"] or {})
    tests = _test_settings(method, model, given)
    glmm = glmm_settings(store, model, opts["fit"], {k: v for k, v in given.items() if k not in _TEST_SETTINGS},
                         design=method == "glmm-wald")
    glmm = {**glmm, **tests}
    n, f = store.n_spots, z.shape[1]
    variance = tests.get("variance", VARIANCES[method][0])

    def assemble(run: Any) -> xr.Dataset:
        settings = {f"glmm_{k}": v for k, v in glmm.items() if v is not None and k != "variance"}
        return du_dataset(store, run, design, {"test": "differential_usage", "method": method, "model": model,
                                               "variance": variance, **settings, **provenance(store)})

    task = functools.partial(_du_task, str(store.path.resolve()), store.kernel_token, method, model, glmm, device,
                             design.column_groups)
    return Prepared(kind="du", params={"method": method, "model": model, "glmm": glmm}, task=task,
                    bytes_per_gene=lambda p: 8.0 * n * (12 * p + p * p + f), label=f"du {method}",
                    assemble=assemble, shared=z, min_batches=MIN_BATCHES if model == "glm" else MIN_BATCHES_GLMM,
                    fingerprint_extra=design_fingerprint(design))


FAMILY = Family(
    name="du-glmm",
    command="du",
    methods=GLMM_DU_METHODS,
    description="score and Wald tests of differential usage on the multinomial GLM / GLMM",
    options=(
        PER_LEVEL,
        Option("model", "glm", "the fitted model: glm (exact IWLS), glmm-full (spatial random effect) or glmm-null",
               choices=DU_MODELS),
        Option("fit", None, "fitting method (GLMM: joint_newton, joint_gd on a low-rank kernel; GLM: iwls)",
               choices=ALL_FITS),
        Option("glmm", None, "GLMM settings (key=value): share_variance, var_fix_sigma, var_prior, init_ratio, lr, "
               "tol, patience, max_epochs, dtype, update_nu_every_k, optim, rank; the tests' variance=robust (default: "
               "the sandwich, calibrated under overdispersion) | model (SPLISOSM's) | pearson (glm score), and for "
               "glmm-score with variance=model information=unadjusted|adjusted", kind="dict"),
    ),
    prepare=_prepare,
    variables=("du_statistic", "du_pvalue", "du_pvalue_adj", "n_isoforms"),
    covariates="required",
)
