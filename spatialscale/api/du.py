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
    execution_options,
    provenance,
    summary_variables,
)
from spatialscale.api.fit import fit_batch, glmm_config, glmm_options
from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.options import ExecutionOptions
from spatialscale.results import make_dataset
from spatialscale.stats.du import (
    DU_NP_METHODS,
    DU_NULLS,
    GPNull,
    binary_levels,
    du_responses,
    hsic_du,
    hsic_du_gp_null,
    ttest_du,
)
from spatialscale.stats.multitest import bh_adjust
from spatialscale.stats.responses import TRANSFORMS
from spatialscale.stats.sv import NAN_FILLINGS
from spatialscale.store import IsoformStore

__all__ = ["du_test"]


GLMM_DU_METHODS = ("glmm-score", "glmm-wald")
DU_METHODS = DU_NP_METHODS + GLMM_DU_METHODS
DU_MODELS = ("glm", "glmm-full", "glmm-null")
RESIDUALIZE = ("cov_only", "both")
GP_BACKENDS = ("auto", "exact", "lowrank", "sod")


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
        fit_opts = {k: v for k, v in glmm.items() if k != "information"}
        fit = fit_batch(store_path, token, model, fit_opts, device, counts)
        kw = {}
        if info == "adjusted" and model != "glm":
            from spatialscale.worker import kernel_eigenpairs

            lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank")) if model == "glmm-full" else (None, None)
            kw = {"fit": fit, "eigvals": lam, "eigvecs": vec, "config": glmm_config(model, fit_opts)}
        stat, pval = score_test(counts, fit["probs"], z, information=info, **kw)
    else:
        fit = fit_batch(store_path, token, model, glmm, device, counts, design=z)
        stat, pval = wald_test(counts, fit["probs"], z, fit["beta"])
    return {"statistic": stat, "pvalue": pval}


def _du_np_task(store_path: str, method: str, transformation: str, nan_filling: str, gp: dict[str, Any] | None,
                device: str, batch: Batch, z: np.ndarray | GPNull) -> dict[str, np.ndarray]:
    """One Dask task: kernel or t-tests of every gene of the batch against every (residualised) covariate."""
    counts = batch_counts(store_path, batch)
    y, used = du_responses(counts, transformation, nan_filling)
    if gp is not None:  # residualize="both": the isoform ratios lose their spatial trend too
        y = _residualize_responses(store_path, counts, transformation, gp, device)
    if isinstance(z, GPNull):
        stat, pval = hsic_du_gp_null(y, used, z)
    elif method in ("hsic", "hsic-gp"):
        stat, pval = hsic_du(y, used, z)
    else:
        stat, pval = ttest_du(y, used, z, combine=method.removeprefix("t-"))
    return {"statistic": stat, "pvalue": pval, "n_spots_used": used.sum(1)}


def _residualize_responses(store_path: str, counts: np.ndarray, transformation: str, gp: dict[str, Any],
                           device: str) -> np.ndarray:
    """Spatial-GP residuals of every gene's (mean-filled, uncentred) ratios, centred: one GP per gene."""
    from spatialscale.stats.gp import residualize_genes
    from spatialscale.stats.responses import ratio_response
    from spatialscale.worker import gp_basis, resolve_device

    y_raw, _ = ratio_response(counts, transformation, centre=False)
    basis = gp_basis(store_path, tuple(sorted(gp.items())), resolve_device(device))
    res, _ = residualize_genes(basis, y_raw, **gp)
    return res - res.mean(1, keepdims=True)


def _check_binary(z: np.ndarray, names: list[str]) -> None:
    try:
        binary_levels(z, names)
    except ValueError as exc:
        raise InputError(f"{exc} Use hsic / hsic-gp for continuous or multi-level covariates "
                         "(categorical obs columns are one-hot encoded, one binary column per level).") from None


def du_test(
    store: IsoformStore | str | os.PathLike,
    covariates: Any,
    *,
    method: str = "hsic-gp",
    transformation: str = "none",
    nan_filling: str = "mean",
    residualize: str = "cov_only",
    null: str = "liu",
    gp: dict[str, Any] | None = None,
    model: str | None = None,
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
    with_summary: bool = False,
) -> xr.Dataset:
    """Test every gene x covariate pair for differential isoform usage.

    Parameters
    ----------
    store
        An opened store or its path.
    covariates
        obs column name(s) (a list, or ``"a,b"``; categorical columns are
        one-hot with every level kept), or an array / DataFrame with one row
        per spot.  NaN values are an error (drop or impute those spots first).
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
        Ratio transformation for the kernel / t-tests: none, clr, ilr, alr, radial.
    nan_filling
        ``mean`` (spots where a gene has no counts take its mean ratio) or
        ``none`` (those spots are left out of that gene's tests).
    residualize
        ``cov_only`` (default) or ``both`` (hsic-gp: also remove each gene's
        own spatial trend from its ratios, one GP per gene).
    null
        hsic-gp's null distribution: ``liu`` (default, SPLISOSM's: the
        residual covariate taken as white noise) or ``gp`` (the residual's
        covariance under the covariate's fitted GP, ``eps (I - U diag(shrink)
        U')``, with Liu's approximation on ``eig(eps Y' S Y)``).  When isoform
        usage has a spatial pattern of its own, ``liu`` is conservative (about
        1-2% of null p-values below 0.05) and ``gp`` is calibrated; with
        ``residualize="both"`` both are close.
    gp
        Options of the spatial GP (see :func:`spatialscale.stats.gp.residualize`),
        e.g. ``{"backend": "exact"}``; default backend ``auto`` (exact on
        small sections, inducing points on large ones).
    model
        GLMM tests only: the fitted model, ``glm`` (default; multinomial GLM
        fitted exactly by IWLS), ``glmm-full`` (spatial random effect) or
        ``glmm-null`` (white-noise random effect).
    glmm
        GLMM tests only: options of :class:`spatialscale.glmm.glmm.GLMMConfig`
        (``method`` = joint_gd / joint_newton / marginal_gd / marginal_newton,
        ``share_variance``, ``var_fix_sigma``, ``var_prior``, ``init_ratio``,
        ``lr``, ``tol``, ``patience``, ``max_epochs``, ``dtype``,
        ``update_nu_every_k``), ``rank`` (kernel eigenpairs kept; default all up
        to 5,000 spots, else ``ceil(4 sqrt(n))`` with the isotropic remainder)
        and, for ``glmm-score``, ``information``: ``unadjusted`` (default,
        SPLISOSM's ``sum z^2 N (diag p - p p')``, which ignores the random effect
        and is conservative for GLMM fits) or ``adjusted`` (``Var(s) = Z' P Z``
        of the linearised GLMM with the intercepts and the random effect
        accounted for, GMMAT-style; calibrated when sigma is learnt, e.g.
        ``{"method": "marginal_newton", "var_fix_sigma": False}``).
    client, scheduler, workers, device, batch_memory, batch_size, out, overwrite, progress, with_summary
        As in :func:`sv_test`.

    Returns
    -------
    xarray.Dataset
        ``du_statistic``, ``du_pvalue``, ``du_pvalue_adj`` (BH over genes,
        per covariate) over ``(gene, covariate)``, ``n_isoforms`` (and
        ``n_spots_used`` for the kernel / t-tests).
    """
    from spatialscale.covariates import resolve_covariates

    opts = execution_options(client=client, scheduler=scheduler, workers=workers, device=device,
                             batch_memory=batch_memory, batch_size=batch_size, out=out, overwrite=overwrite,
                             progress=progress)
    check_choice("method", method, DU_METHODS)
    store = as_store(store)
    if method in GLMM_DU_METHODS:
        return _du_glmm(store, covariates, method=method, model=model or "glm", glmm=glmm, options=opts,
                        with_summary=with_summary)
    if model is not None or glmm is not None:
        raise InputError(f"model / glmm options apply to the glmm-score / glmm-wald tests, not {method!r}.")
    check_choice("transformation", transformation, TRANSFORMS)
    check_choice("nan_filling", nan_filling, NAN_FILLINGS)
    check_choice("residualize", residualize, RESIDUALIZE)
    check_choice("null", null, DU_NULLS)
    if null != "liu" and method != "hsic-gp":
        raise InputError(f"null={null!r} applies to method='hsic-gp' only.")
    if residualize == "both" and method != "hsic-gp":
        raise InputError("residualize='both' applies to method='hsic-gp' only.")
    if residualize == "both" and nan_filling != "mean":
        raise InputError("residualize='both' needs nan_filling='mean' (one GP basis shared by all genes).")
    if gp is not None and method != "hsic-gp":
        raise InputError(f"gp options apply to method='hsic-gp' only, not {method!r}.")
    names, z = resolve_covariates(store.obs(), covariates)
    if method.startswith("t-"):
        _check_binary(z, names)
    gp_opts = _gp_options(gp) if method == "hsic-gp" else None
    n, f = store.n_spots, z.shape[1]
    params = {"method": method, "transformation": transformation, "nan_filling": nan_filling,
              **({"residualize": residualize, "gp": gp_opts} if method == "hsic-gp" else {}),
              **({"null": null} if null != "liu" else {})}
    store_path = str(store.path.resolve())
    task = functools.partial(_du_np_task, store_path, method, transformation, nan_filling,
                             gp_opts if residualize == "both" else None, device)

    def shared() -> np.ndarray | GPNull:
        if method != "hsic-gp":
            return z
        return _residualize_covariates(store, z, gp_opts, device, null)

    attrs = {"test": "differential_usage", "method": method, "transformation": transformation,
             "nan_filling": nan_filling}
    if method == "hsic-gp":
        attrs.update({"residualize": residualize, "null": null,
                      **{f"gp_{k}": v for k, v in gp_opts.items() if v is not None}})

    def assemble(run: Any) -> xr.Dataset:
        return _du_dataset(store, run, names, {**attrs, **provenance(store)}, per_gene=("n_spots_used",))

    return execute(store, kind="du", params=params, task=task,
                   bytes_per_gene=lambda p: 8.0 * (n * (3 * p + 4 * p * (residualize == "both")) + 8 * p * f),
                   options=opts, label=f"du {method}", assemble=assemble, shared=shared, min_batches=MIN_BATCHES,
                   with_summary=with_summary,
                   fingerprint_extra={"covariates": names, "design": hashlib.sha256(z.tobytes()).hexdigest()})


def _du_dataset(store: IsoformStore, run: Any, names: list[str], attrs: dict[str, Any],
                per_gene: tuple[str, ...] = ()) -> xr.Dataset:
    """DU results from a run's batches: statistics, p-values, BH per covariate, per-gene extras."""
    stat = np.concatenate([r["statistic"] for r in run.parts])
    pval = np.concatenate([r["pvalue"] for r in run.parts])
    data = {"du_statistic": stat, "du_pvalue": pval, "du_pvalue_adj": bh_adjust(pval, axis=0),
            "n_isoforms": store.genes["n_isoforms"].to_numpy(),
            **{k: np.concatenate([r[k] for r in run.parts]) for k in per_gene}, **summary_variables(run.parts)}
    return make_dataset(store.genes.index.to_numpy(), data, {**attrs, "execution": run.kind}, covariates=names)


def _gp_options(gp: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the spatial-GP options (unknown keys are an error, not ignored)."""
    import inspect

    from spatialscale.stats.gp import residualize

    opts = dict(gp or {})
    allowed = [k for k, v in inspect.signature(residualize).parameters.items()
               if v.kind == inspect.Parameter.KEYWORD_ONLY and k != "device"]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise InputError(f"unknown gp option(s) {unknown}; choose from {allowed}.")
    check_choice("gp backend", opts.get("backend", "auto"), GP_BACKENDS)
    return opts


def _residualize_covariates(store: IsoformStore, z: np.ndarray, gp: dict[str, Any], device: str,
                            null: str) -> np.ndarray | GPNull:
    """Standardise each covariate (ddof 1) and remove its spatial-GP trend: once per covariate, for all genes.

    With ``null="gp"`` also the GP's eigenvectors and each covariate's
    shrinkage, for the GP-conditional null (:func:`hsic_du_gp_null`).
    """
    import torch

    from spatialscale.stats.gp import residualize
    from spatialscale.worker import normalized_coordinates

    zs = (z - z.mean(0)) / z.std(0, ddof=1)
    x = normalized_coordinates(str(store.path.resolve()))
    # this runs in the client process, which need not have the workers' GPU
    dev = "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"
    res, info = residualize(x, zs, device=dev, **gp)
    res = np.asarray(res, dtype=np.float64)
    if null == "liu":
        return res
    if info.get("backend") == "sod":
        raise InputError("null='gp' needs the exact or lowrank GP backend, not 'sod'.")
    basis = info["basis"]
    amp, noise = np.asarray(info["amplitude"], dtype=np.float64), np.asarray(info["noise"], dtype=np.float64)
    s = basis.values.detach().cpu().numpy().astype(np.float64)
    shrink = amp[:, None] * s / (amp[:, None] * s + noise[:, None])
    keep = shrink.max(0) > 1e-12  # directions no covariate's GP touches need not travel
    vectors = basis.vectors.detach().cpu().numpy().astype(np.float64)[:, keep]
    return GPNull(z=res, vectors=np.ascontiguousarray(vectors), shrink=shrink[:, keep], noise=noise)


def _du_glmm(store: IsoformStore, covariates: Any, *, method: str, model: str, glmm: dict[str, Any] | None,
             options: ExecutionOptions, with_summary: bool) -> xr.Dataset:
    from spatialscale.covariates import resolve_covariates

    check_choice("model", model, DU_MODELS)
    names, z = resolve_covariates(store.obs(), covariates)
    opts = dict(glmm or {})
    information = opts.pop("information", "unadjusted")
    check_choice("score information", information, ("unadjusted", "adjusted"))
    if information != "unadjusted" and method != "glmm-score":
        raise InputError("glmm option 'information' applies to method='glmm-score' only.")
    glmm = glmm_options(store, model, opts or None)
    if information != "unadjusted":
        glmm = {**glmm, "information": information}
    n = store.n_spots
    params = {"method": method, "model": model, "glmm": glmm}
    task = functools.partial(_du_task, str(store.path.resolve()), store.kernel_token, method, model, glmm,
                             options.device)
    f = z.shape[1]

    def assemble(run: Any) -> xr.Dataset:
        return _du_dataset(store, run, names, {"test": "differential_usage", "method": method, "model": model,
                                               **{f"glmm_{k}": v for k, v in glmm.items() if v is not None},
                                               **provenance(store)})

    return execute(store, kind="du", params=params, task=task,
                   bytes_per_gene=lambda p: 8.0 * n * (12 * p + p * p + f), options=options, label=f"du {method}",
                   assemble=assemble, shared=z, min_batches=MIN_BATCHES if model == "glm" else MIN_BATCHES_GLMM,
                   with_summary=with_summary,
                   fingerprint_extra={"covariates": names, "design": hashlib.sha256(z.tobytes()).hexdigest()})
