"""User-facing tests: store in, xarray Dataset out."""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from spatialscale._version import __version__
from spatialscale.engine import Batch, execution, fingerprint, plan_batches, run_batches
from spatialscale.errors import InputError
from spatialscale.results import make_dataset, prepare_output, write_dataset
from spatialscale.stats.multitest import bh_adjust
from spatialscale.stats.nulls import NULLS
from spatialscale.stats.responses import TRANSFORMS, response_width
from spatialscale.stats.sv import NAN_FILLINGS, SV_METHODS, sv_batch
from spatialscale.store import IsoformStore, open_store, read_count_columns
from spatialscale.worker import kernel_operator

__all__ = ["sv_test", "du_test", "glmm_fit", "fitted_ratios", "parse_bytes"]

#: Genes are split into at least this many batches (when there are enough) so
#: that every worker gets work.  A constant, not the cluster size, so that a
#: resumed run on a different cluster finds the same batches.
MIN_BATCHES = 16
#: GLMM fits gain most from large batches (one vectorised optimiser run per worker)
MIN_BATCHES_GLMM = 2


def parse_bytes(value: int | float | str) -> int:
    """``"512MB"`` / ``"2GiB"`` / ``1e9`` -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    from dask.utils import parse_bytes as _pb

    return int(_pb(value))


@dataclass
class _Run:
    parts: list[dict[str, np.ndarray]]
    kind: str
    fp: str
    existing: xr.Dataset | None = None


def _provenance(store: IsoformStore) -> dict[str, Any]:
    """Attributes every results Dataset carries."""
    kernel = store.kernel_attrs
    return {
        "n_spots": store.n_spots, "n_genes": store.n_genes, "store": str(store.path),
        "spatialscale_version": __version__, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **{f"kernel_{k}": v for k, v in kernel.items() if k != "power_sums"},
        "kernel_power_sums": list(kernel["power_sums"]),
    }


def _execute(store: IsoformStore, *, kind: str, params: dict[str, Any], task: Any, bytes_per_gene: Any,
             batch_memory: int | str, batch_size: int | None, client: Any, scheduler: str | None,
             workers: int | None, device: str, out: str | os.PathLike | None, overwrite: bool, progress: bool,
             label: str, shared: Any = None, fingerprint_extra: Any = None,
             min_batches: int = MIN_BATCHES) -> _Run:
    """Plan batches, run them where asked (resuming from ``out``), return the per-batch results."""
    fp = fingerprint(kind=kind, store=str(store.path.resolve()), kernel=store.kernel_token,
                     genes=list(store.genes.index), extra=fingerprint_extra, **params)
    partial = None
    if out is not None:
        partial, existing = prepare_output(out, fp, overwrite=overwrite)
        if existing is not None:
            return _Run([], "existing", fp, existing)
    with execution(client, scheduler=scheduler, workers=workers, device=device) as runner:
        budget = _batch_budget(batch_memory, runner, device)
        batches = plan_batches(store.genes, store.n_spots, bytes_per_gene=bytes_per_gene, memory_bytes=budget,
                               batch_size=batch_size, min_batches=min_batches)
        extra = () if shared is None else (runner.share(shared),)
        parts = run_batches(task, batches, runner, partial=partial, progress=progress, label=label, extra=extra)
    return _Run(parts, runner.kind, fp)


def _batch_budget(batch_memory: int | str, runner: Any, device: str) -> int:
    """Bytes of working memory per task; ``"auto"`` takes half the free GPU memory on GPU workers."""
    if batch_memory == "auto":
        free = runner.device_memory(device) if device != "cpu" else None
        return int(free * 0.5) if free else parse_bytes("256MB")
    return parse_bytes(batch_memory)


def _finish(ds: xr.Dataset, out: str | os.PathLike | None, fp: str) -> xr.Dataset:
    if out is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_dataset(ds, out, fp)
    return ds


def _batch_counts(store_path: str, batch: Batch) -> np.ndarray:
    """Counts of a batch as ``(n_genes, n_spots, n_isoforms)``."""
    flat = read_count_columns(store_path, batch.col_start, batch.col_stop)
    return flat.reshape(flat.shape[0], batch.n_genes, batch.n_isoforms).transpose(1, 0, 2)


def _sv_task(store_path: str, token: str, device: str, params: dict[str, Any], batch: Batch) -> dict[str, np.ndarray]:
    """One Dask task: test the genes of ``batch`` (runs on a worker)."""
    op, sums = kernel_operator(store_path, token, device)
    counts = _batch_counts(store_path, batch)
    return sv_batch(counts, op, sums, **params)


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def sv_test(
    store: IsoformStore | str | os.PathLike,
    *,
    method: str = "hsic-ir",
    null: str = "liu",
    transformation: str = "none",
    nan_filling: str = "mean",
    n_perms: int = 1000,
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
) -> xr.Dataset:
    """Test every gene of a section for spatial variability (HSIC or GLMM likelihood ratio).

    Parameters
    ----------
    store
        An opened store or its path.
    method
        ``hsic-ir`` (isoform ratios), ``hsic-ic`` (isoform counts),
        ``hsic-gc`` (gene counts), or ``glmm-llr``: ``2 (l_full - l_null)``
        of the Laplace marginal likelihoods of glmm-full and glmm-null
        (``~ chi2(1)``, or ``chi2(p-1)`` without shared variance; dense in
        ``n q``, so for sections of a few thousand spots).
    null
        ``liu`` (default), ``welch`` or ``perm``.
    transformation
        Ratio transformation for ``hsic-ir``: none, clr, ilr, alr, radial.
    nan_filling
        ``mean`` or ``none`` for spots where a gene has no counts.
    n_perms, perm_seed
        Permutations for ``null="perm"`` (one seeded set shared by all genes).
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

    Returns
    -------
    xarray.Dataset
        ``sv_statistic``, ``sv_pvalue``, ``sv_pvalue_adj``, ``n_isoforms`` and
        ``n_spots_used`` over ``gene``, with provenance attributes.
    """
    _check_choice("method", method, SV_METHODS + ("glmm-llr",))
    if method == "glmm-llr":
        return _sv_llr(store, glmm=glmm, client=client, scheduler=scheduler, workers=workers, device=device,
                       batch_memory=batch_memory, batch_size=batch_size, out=out, overwrite=overwrite,
                       progress=progress)
    _check_choice("null", null, NULLS)
    _check_choice("transformation", transformation, TRANSFORMS)
    _check_choice("nan_filling", nan_filling, NAN_FILLINGS)
    if device not in ("cpu", "cuda", "auto"):
        raise InputError(f"unknown device {device!r}; choose cpu, cuda or auto.")
    if null == "perm" and int(n_perms) < 1:
        raise InputError("n_perms must be >= 1 for null='perm'.")
    if not isinstance(store, IsoformStore):
        store = open_store(store)
    n = store.n_spots
    params = {"method": method, "transformation": transformation, "nan_filling": nan_filling, "null": null,
              "n_perms": int(n_perms), "perm_seed": int(perm_seed)}
    attrs = {
        "test": "spatial_variability", "method": method, "null": null, "transformation": transformation,
        "nan_filling": nan_filling,
        **({"n_perms": int(n_perms), "perm_seed": int(perm_seed)} if null == "perm" else {}),
        **_provenance(store),
    }

    def bytes_per_gene(p: int) -> float:
        d = response_width(method, p, transformation)
        perm = 2 * 32 * d if null == "perm" else 0
        return 8.0 * n * (p + 5 * d + perm)

    task = functools.partial(_sv_task, str(store.path.resolve()), store.kernel_token, device, params)
    run = _execute(store, kind="sv", params=params, task=task, bytes_per_gene=bytes_per_gene,
                   batch_memory=batch_memory, batch_size=batch_size, client=client, scheduler=scheduler,
                   workers=workers, device=device, out=out, overwrite=overwrite, progress=progress,
                   label=f"sv {method}")
    if run.existing is not None:
        return run.existing
    data = {k: np.concatenate([r[k] for r in run.parts]) for k in ("statistic", "pvalue", "n_spots_used")}
    ds = make_dataset(
        store.genes.index.to_numpy(),
        {
            "sv_statistic": data["statistic"],
            "sv_pvalue": data["pvalue"],
            "sv_pvalue_adj": bh_adjust(data["pvalue"]),
            "n_isoforms": store.genes["n_isoforms"].to_numpy(),
            "n_spots_used": data["n_spots_used"],
        },
        {**attrs, "execution": run.kind},
    )
    return _finish(ds, out, run.fp)


DU_METHODS = ("glmm-score", "glmm-wald")
DU_MODELS = ("glm", "glmm-full", "glmm-null")


def _fit_batch(store_path: str, token: str, model: str, glmm: dict[str, Any], device: str, counts: np.ndarray,
               design: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fit the batch's genes with the GLM or GLMM."""
    from spatialscale.glmm import fit_glm
    from spatialscale.glmm.glmm import GLMMConfig, fit_glmm
    from spatialscale.worker import kernel_eigenpairs, resolve_device, tune_allocator

    if model == "glm" and glmm.get("fit", "iwls") != "gd":
        return fit_glm(counts, design)
    tune_allocator()
    lam = vec = None
    if model == "glmm-full":
        lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank"))
    cfg = GLMMConfig(model=model, **{k: v for k, v in glmm.items() if k not in ("rank", "fit")})
    return fit_glmm(counts, lam, vec, design=design, config=cfg, device=resolve_device(device))


def _du_task(store_path: str, token: str, method: str, model: str, glmm: dict[str, Any], device: str,
             batch: Batch, z: np.ndarray) -> dict[str, np.ndarray]:
    """One Dask task: score test (fit without covariates) or Wald test (fit with them) of every covariate."""
    from spatialscale.glmm import score_test, wald_test

    counts = _batch_counts(store_path, batch)
    if method == "glmm-score":
        fit = _fit_batch(store_path, token, model, glmm, device, counts)
        stat, pval = score_test(counts, fit["probs"], z)
    else:
        fit = _fit_batch(store_path, token, model, glmm, device, counts, design=z)
        stat, pval = wald_test(counts, fit["probs"], z, fit["beta"])
    return {"statistic": stat, "pvalue": pval}


def _sv_llr_task(store_path: str, token: str, glmm: dict[str, Any], device: str,
                 batch: Batch) -> dict[str, np.ndarray]:
    """One Dask task: fit glmm-null and glmm-full, compare their Laplace marginal likelihoods."""
    from spatialscale.glmm import llr_test
    from spatialscale.glmm.glmm import GLMMConfig, laplace_log_marginal
    from spatialscale.worker import kernel_eigenpairs

    counts = _batch_counts(store_path, batch)
    lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank"))
    opts = {k: v for k, v in glmm.items() if k != "rank"}
    marg = {}
    for model in ("glmm-null", "glmm-full"):
        fit = _fit_batch(store_path, token, model, glmm, device, counts)
        marg[model] = laplace_log_marginal(fit, counts, lam, vec, config=GLMMConfig(model=model, **opts))
    df = 1 if opts.get("share_variance", True) else batch.n_isoforms - 1
    stat, pval = llr_test(marg["glmm-full"], marg["glmm-null"], df)
    return {"statistic": stat, "pvalue": pval, "n_spots_used": np.full(batch.n_genes, counts.shape[1])}


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

    _check_choice("method", method, DU_METHODS)
    _check_choice("model", model, DU_MODELS)
    if not isinstance(store, IsoformStore):
        store = open_store(store)
    names, z = resolve_covariates(store.obs(), covariates)
    glmm = _glmm_options(store, model, glmm)
    n = store.n_spots
    params = {"method": method, "model": model, "glmm": glmm}
    task = functools.partial(_du_task, str(store.path.resolve()), store.kernel_token, method, model, glmm, device)
    f = z.shape[1]
    run = _execute(store, kind="du", params=params, task=task,
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
         **{f"glmm_{k}": v for k, v in glmm.items() if v is not None}, **_provenance(store),
         "execution": run.kind},
        covariates=names,
    )
    return _finish(ds, out, run.fp)


def _glmm_options(store: IsoformStore, model: str, glmm: dict[str, Any] | None) -> dict[str, Any]:
    """Validate GLMM options and make sure the eigenpairs a GLMM needs are in the store."""
    from spatialscale.glmm.glmm import GLMMConfig

    opts = dict(glmm or {})
    if model == "glm":
        if opts:
            raise InputError(f"model='glm' takes no GLMM options (got {sorted(opts)}).")
        return opts
    rank = opts.pop("rank", None)
    try:
        GLMMConfig(model=model, **opts)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid GLMM options: {exc}") from exc
    if model == "glmm-full":
        from spatialscale.kernel import default_rank

        rank = default_rank(store.n_spots) if rank is None else min(int(rank), store.n_spots)
        store.eigenpairs(rank)  # computed once, on the client, before any task needs them
    return {**opts, "rank": rank}


def _sv_llr(store: IsoformStore | str | os.PathLike, *, glmm: dict[str, Any] | None, client: Any,
            scheduler: str | None, workers: int | None, device: str, batch_memory: int | str,
            batch_size: int | None, out: str | os.PathLike | None, overwrite: bool, progress: bool) -> xr.Dataset:
    if not isinstance(store, IsoformStore):
        store = open_store(store)
    glmm = _glmm_options(store, "glmm-full", glmm)
    n = store.n_spots
    task = functools.partial(_sv_llr_task, str(store.path.resolve()), store.kernel_token, glmm, device)
    run = _execute(store, kind="sv", params={"method": "glmm-llr", "glmm": glmm}, task=task,
                   bytes_per_gene=lambda p: 8.0 * (n * (p - 1)) ** 2 * 3, batch_memory=batch_memory,
                   batch_size=batch_size, client=client, scheduler=scheduler, workers=workers, device=device,
                   out=out, overwrite=overwrite, progress=progress, label="sv glmm-llr",
                   min_batches=MIN_BATCHES_GLMM)
    if run.existing is not None:
        return run.existing
    data = {k: np.concatenate([r[k] for r in run.parts]) for k in ("statistic", "pvalue", "n_spots_used")}
    ds = make_dataset(
        store.genes.index.to_numpy(),
        {"sv_statistic": data["statistic"], "sv_pvalue": data["pvalue"], "sv_pvalue_adj": bh_adjust(data["pvalue"]),
         "n_isoforms": store.genes["n_isoforms"].to_numpy(), "n_spots_used": data["n_spots_used"]},
        {"test": "spatial_variability", "method": "glmm-llr", **{f"glmm_{k}": v for k, v in glmm.items()
                                                                  if v is not None},
         **_provenance(store), "execution": run.kind},
    )
    return _finish(ds, out, run.fp)


GLMM_MODELS = ("glmm-full", "glmm-null", "glm")
FIT_METHODS = {"glm": ("iwls", "newton", "gd"), "glmm-full": ("joint_gd",), "glmm-null": ("joint_gd",)}


def _pad(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(np.asarray(a, dtype=np.float64), widths, constant_values=np.nan)


def _fit_task(store_path: str, token: str, model: str, glmm: dict[str, Any], device: str, q_max: int,
              with_nu: bool, batch: Batch, z: np.ndarray | None) -> dict[str, np.ndarray]:
    """One Dask task: fit the batch's genes and return parameters padded to ``q_max`` logits."""
    counts = _batch_counts(store_path, batch)
    fit = _fit_batch(store_path, token, model, glmm, device, counts, design=z)
    b = batch.n_genes
    if model == "glm":
        if "loglik" in fit:  # Newton / IWLS
            fit = {**fit, "loss": -fit["loglik"], "epochs": fit["iterations"]}
        fit = {**fit, "sigma": np.full((b, 1), np.nan), "theta": np.full((b, 1), np.nan)}
    v_max = 1 if glmm.get("share_variance", True) else q_max
    out = {
        "intercept": _pad(fit["intercept"], 1, q_max),
        "beta": _pad(fit["beta"], 2, q_max),
        "sigma": _pad(fit["sigma"], 1, v_max),
        "theta": _pad(fit["theta"], 1, v_max),
        "converged": np.asarray(fit["converged"], dtype=bool),
        "loss": np.asarray(fit["loss"], dtype=np.float64),
        "epochs": np.asarray(fit["epochs"], dtype=np.int64),
    }
    if with_nu and model != "glm":
        out["nu"] = _pad(fit["nu"], 2, q_max)
    return out


def glmm_fit(
    store: IsoformStore | str | os.PathLike,
    *,
    model: str = "glmm-full",
    fit: str | None = None,
    covariates: Any = None,
    glmm: dict[str, Any] | None = None,
    return_nu: bool = False,
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
    """Fit the multinomial GLM / GLMM of every gene and return the fitted parameters.

    Parameters
    ----------
    store
        An opened store or its path.
    model
        ``glmm-full`` (spatial random effect), ``glmm-null`` (white noise) or ``glm``.
    fit
        ``joint_gd`` for the GLMMs; ``iwls`` (= ``newton``) for the GLM.
    covariates
        Optional fixed effects (as in :func:`du_test`).
    glmm
        GLMM options (see :func:`du_test`).
    return_nu
        Also return the random effect ``nu`` (``gene x spot x contrast``).
    client, scheduler, workers, device, batch_memory, batch_size, out, overwrite, progress
        As in :func:`sv_test`.

    Returns
    -------
    xarray.Dataset
        ``intercept``, ``beta``, ``sigma``, ``theta``, ``converged``, ``loss``,
        ``epochs``, ``n_isoforms`` (and ``nu``); logits are against each gene's
        last isoform, padded with NaN past its own isoforms.  See
        :func:`fitted_ratios` to recompute a gene's fitted isoform ratios.
    """
    from spatialscale.covariates import resolve_covariates

    _check_choice("model", model, GLMM_MODELS)
    fit = fit or FIT_METHODS[model][0]
    _check_choice(f"fit method for {model}", fit, FIT_METHODS[model])
    if not isinstance(store, IsoformStore):
        store = open_store(store)
    names, z = ([], None) if covariates is None else resolve_covariates(store.obs(), covariates)
    glmm = _glmm_options(store, model, glmm)
    if model == "glm" and fit == "gd":
        glmm = {"fit": "gd"}
    q_max = int(store.genes["n_isoforms"].max()) - 1
    n = store.n_spots
    task = functools.partial(_fit_task, str(store.path.resolve()), store.kernel_token, model, glmm, device, q_max,
                             bool(return_nu))
    run = _execute(store, kind="fit", params={"model": model, "fit": fit, "glmm": glmm, "nu": bool(return_nu)},
                   task=task, bytes_per_gene=lambda p: 8.0 * n * (12 * p + p * p + len(names)),
                   batch_memory=batch_memory, batch_size=batch_size, client=client, scheduler=scheduler,
                   workers=workers, device=device, out=out, overwrite=overwrite, progress=progress,
                   label=f"fit {model}", shared=z if z is not None else np.zeros((n, 0)),
                   min_batches=MIN_BATCHES if model == "glm" else MIN_BATCHES_GLMM,
                   fingerprint_extra={"covariates": names,
                                      "design": None if z is None else hashlib.sha256(z.tobytes()).hexdigest()})
    if run.existing is not None:
        return run.existing
    keys = ["intercept", "beta", "sigma", "theta", "converged", "loss", "epochs"] + (["nu"] if "nu" in run.parts[0]
                                                                                        else [])
    data = {k: np.concatenate([r[k] for r in run.parts]) for k in keys}
    data["n_isoforms"] = store.genes["n_isoforms"].to_numpy()
    if not names:
        data.pop("beta")
    obs_names = store.obs().index.to_numpy(dtype=str)
    ds = make_dataset(store.genes.index.to_numpy(), data,
                      {"model": model, "fit": fit, **{f"glmm_{k}": v for k, v in glmm.items() if v is not None},
                       "design": names, **_provenance(store), "execution": run.kind},
                      covariates=names or None,
                      extra_coords={"contrast": np.arange(q_max), **({"spot": obs_names} if "nu" in data else {})})
    return _finish(ds, out, run.fp)


def fitted_ratios(fit: xr.Dataset, gene: str, covariates: np.ndarray | None = None) -> np.ndarray:
    """Fitted isoform ratios ``(n_spots, p)`` of one gene from a :func:`glmm_fit` Dataset.

    GLMM fits need ``nu`` (``return_nu=True``); fits with covariates need the
    same design matrix (``covariates``, ``n_spots x F``).
    """
    from spatialscale.glmm.likelihood import probabilities

    g = fit.sel(gene=gene)
    q = int(g["n_isoforms"]) - 1
    eta = np.asarray(g["intercept"].values[:q], dtype=np.float64)[None, :]
    if "nu" in fit:
        eta = eta + np.asarray(g["nu"].values[:, :q], dtype=np.float64)
    elif fit.attrs.get("model") != "glm":
        raise InputError("this GLMM fit has no nu: refit with return_nu=True to recompute its ratios.")
    if "beta" in fit:
        if covariates is None:
            raise InputError(f"this fit has covariates {list(fit['covariate'].values)}: pass the design matrix.")
        eta = eta + np.asarray(covariates, dtype=np.float64) @ np.asarray(g["beta"].values[:, :q])
    n = eta.shape[0] if eta.shape[0] > 1 else (covariates.shape[0] if covariates is not None else 1)
    return probabilities(np.broadcast_to(eta, (n, q))[None])[0]
