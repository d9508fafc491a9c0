"""Fitting the multinomial GLM / GLMM of every gene (``spatialscale glmm``), and what reads the fits."""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import MIN_BATCHES, MIN_BATCHES_GLMM, Family, Option, Prepared, check_setting_types
from spatialscale.families.common import batch_counts, provenance
from spatialscale.glmm.glmm import FIT_METHODS as GLMM_FITS
from spatialscale.results import make_dataset
from spatialscale.store import IsoformStore

__all__ = ["FAMILY", "fitted_ratios", "fit_batch", "glmm_options", "glmm_settings"]


def fit_batch(store_path: str, token: str, model: str, glmm: dict[str, Any], device: str, counts: np.ndarray,
               design: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Fit the batch's genes with the GLM or GLMM."""
    from spatialscale.glmm import fit_glm
    from spatialscale.glmm.glmm import fit_glmm
    from spatialscale.worker import kernel_eigenpairs, resolve_device

    if model == "glm" and glmm.get("fit", "iwls") != "gd":
        return fit_glm(counts, design)
    lam = vec = None
    if model == "glmm-full":
        lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank"))
    return fit_glmm(counts, lam, vec, design=design, config=glmm_config(model, glmm), device=resolve_device(device))


def n_spots_of(store_path: str) -> int:
    """Spots of a store (its counts' first dimension)."""
    import zarr

    return int(zarr.open_array(f"{store_path}/layers/counts", mode="r").shape[0])


def glmm_config(model: str, glmm: dict[str, Any]):
    """The :class:`~spatialscale.glmm.glmm.GLMMConfig` of validated GLMM options (``rank`` and ``fit`` left out)."""
    from spatialscale.glmm.glmm import GLMMConfig

    return GLMMConfig(model=model, **{k: v for k, v in glmm.items() if k not in ("rank", "fit")})


def glmm_defaults() -> dict[str, Any]:
    """Each GLMM setting's default (what its given value is type-checked against)."""
    import dataclasses

    from spatialscale.glmm.glmm import GLMMConfig

    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING else f.default)
            for f in dataclasses.fields(GLMMConfig)}


def glmm_options(store: IsoformStore, model: str, glmm: dict[str, Any] | None) -> dict[str, Any]:
    """Validate GLMM options and make sure the eigenpairs a GLMM needs are in the store."""
    from spatialscale.glmm.glmm import GLMMConfig

    opts = dict(glmm or {})
    if model == "glm":
        if opts:
            raise InputError(f"model='glm' takes no GLMM options (got {sorted(opts)}).")
        return opts
    rank = opts.pop("rank", None)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"GLMM setting rank={rank!r} must be a whole number >= 1.")
    check_setting_types("GLMM", opts, glmm_defaults())
    try:
        GLMMConfig(model=model, **opts)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid GLMM options: {exc}") from exc
    if model == "glmm-full":
        from spatialscale.kernel import glmm_rank

        rank = glmm_rank(store.n_spots, rank)
        if not store.has_eigenpairs(rank):  # computed once, on the client, before any task needs them
            store.ensure_eigenpairs(rank)
    return {**opts, "rank": rank}


GLMM_MODELS = ("glmm-full", "glmm-null", "glm")
#: the fitting methods of each model; the first is the default (``joint_newton``: 10-15 epochs per gene where
#: SPLISOSM's ``joint_gd`` takes 300-500, to a better optimum; docs/statistics.md), but see :func:`default_fit`
FIT_METHODS = {"glm": ("iwls", "newton", "gd"),
               "glmm-full": ("joint_newton", *(m for m in GLMM_FITS if m != "joint_newton"))}
FIT_METHODS["glmm-null"] = FIT_METHODS["glmm-full"]
ALL_FITS = FIT_METHODS["glmm-full"] + FIT_METHODS["glm"]


#: the dtype of ``joint_newton`` GLMM fits with covariates unless one is given: with spatially smooth covariates
#: the fixed effects are nearly confounded with the random effect, and float32 PCG solves stall there (measured:
#: 1,000 genes x 300 spots with 3 covariates, 124 s in float32, ~10 s in float64)
DESIGN_DTYPE = "float64"


def default_fit(store: IsoformStore, model: str, rank: int | None) -> str:
    """The default fitting method: ``joint_newton``, except ``joint_gd`` for glmm-full on a low-rank kernel.

    With a truncated kernel basis (sections above 5,000 spots, or a ``rank`` below the spots) the joint
    likelihood decreases without bound as ``theta -> 1`` (the isotropic remainder's variance vanishes).
    Newton steps follow it to the ``theta_logit`` bound, where the PCG systems are so ill-conditioned
    that float32 solves run to their iteration cap (measured: 6 genes at 10^5 spots, rank 100, 301 s and
    theta = 0.99995 for every gene); SPLISOSM's slow Adam steps stay away from that region.
    """
    if model == "glmm-full":
        from spatialscale.kernel import glmm_rank

        if glmm_rank(store.n_spots, rank) < store.n_spots:
            return "joint_gd"
    return FIT_METHODS[model][0]


def glmm_settings(store: IsoformStore, model: str, fit: str | None, glmm: dict[str, Any] | None, *,
                  design: bool = False) -> dict[str, Any]:
    """Validated settings of a GLM / GLMM fit: the fitting method and the ``glmm`` dict, as tasks take them.

    ``design``: the fit has covariates (then ``joint_newton`` fits default to :data:`DESIGN_DTYPE`).
    """
    glmm = dict(glmm or {})
    if "method" in glmm:
        raise InputError("give the fitting method as fit=... (--fit), not glmm['method'].")
    fit = fit or default_fit(store, model, glmm.get("rank"))
    if fit not in FIT_METHODS[model]:
        raise InputError(f"unknown fit method for {model} {fit!r}; choose one of {', '.join(FIT_METHODS[model])}.")
    if model == "glm":
        if glmm:
            raise InputError(f"model='glm' takes no GLMM settings (got {sorted(glmm)}).")
        return {"fit": "gd"} if fit == "gd" else {}
    if design and fit == "joint_newton":
        glmm.setdefault("dtype", DESIGN_DTYPE)
    return glmm_options(store, model, {**glmm, "method": fit})


def _pad(a: np.ndarray, axis: int, size: int) -> np.ndarray:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return np.pad(np.asarray(a, dtype=np.float64), widths, constant_values=np.nan)


def _fit_task(store_path: str, token: str, model: str, glmm: dict[str, Any], device: str, q_max: int,
              with_nu: bool, batch: Batch, z: np.ndarray | None) -> dict[str, np.ndarray]:
    """One Dask task: fit the batch's genes and return parameters padded to ``q_max`` logits.

    Genes with one isoform (stores ingested with ``filter_single_iso_genes=False``)
    have no usage model: their parameters are NaN, ``converged`` false.
    """
    b = batch.n_genes
    if batch.n_isoforms < 2:
        v = 1 if glmm.get("share_variance", True) else q_max
        f = 0 if z is None else z.shape[1]
        out = {"intercept": np.full((b, q_max), np.nan), "beta": np.full((b, f, q_max), np.nan),
               "sigma": np.full((b, v), np.nan), "theta": np.full((b, v), np.nan),
               "converged": np.zeros(b, dtype=bool), "loss": np.full(b, np.nan), "epochs": np.zeros(b, np.int64)}
        if with_nu and model != "glm":
            out["nu"] = np.full((b, n_spots_of(store_path), q_max), np.nan)
        return out
    counts = batch_counts(store_path, batch)
    fit = fit_batch(store_path, token, model, glmm, device, counts, design=z)
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


def _prepare(store: IsoformStore, method: str | None, opts: dict[str, Any], covariates: Any,
             device: str) -> Prepared:
    from spatialscale.covariates import resolve_covariates

    model, return_nu = opts["model"], bool(opts["return_nu"])
    names, z = ([], None) if covariates is None else resolve_covariates(store.obs(), covariates)
    glmm = glmm_settings(store, model, opts["fit"], opts["glmm"], design=z is not None)
    fit = glmm.get("method") or opts["fit"] or FIT_METHODS["glm"][0]  # GLMMs: as glmm_settings resolved it
    q_max = int(store.genes["n_isoforms"].max()) - 1
    n = store.n_spots

    def assemble(run: Any) -> xr.Dataset:
        keys = ["intercept", "beta", "sigma", "theta", "converged", "loss", "epochs"]
        keys += ["nu"] if "nu" in run.parts[0] else []
        data = {k: np.concatenate([r[k] for r in run.parts]) for k in keys}
        data["n_isoforms"] = store.genes["n_isoforms"].to_numpy()
        if not names:
            data.pop("beta")
        obs_names = store.obs().index.to_numpy(dtype=str)
        return make_dataset(
            store.genes.index.to_numpy(), data,
            {"model": model, "fit": fit, **{f"glmm_{k}": v for k, v in glmm.items() if v is not None},
             "design": names, **provenance(store), "execution": run.kind},
            covariates=names or None,
            extra_coords={"contrast": np.arange(q_max), **({"spot": obs_names} if "nu" in data else {})})

    task = functools.partial(_fit_task, str(store.path.resolve()), store.kernel_token, model, glmm, device, q_max,
                             return_nu)
    return Prepared(kind="fit", params={"model": model, "fit": fit, "glmm": glmm, "nu": return_nu}, task=task,
                    bytes_per_gene=lambda p: 8.0 * n * (12 * p + p * p + len(names)), label=f"fit {model}",
                    assemble=assemble, shared=z if z is not None else np.zeros((n, 0)),
                    min_batches=MIN_BATCHES if model == "glm" else MIN_BATCHES_GLMM,
                    fingerprint_extra={"covariates": names,
                                       "design": None if z is None else hashlib.sha256(z.tobytes()).hexdigest()})


FAMILY = Family(
    name="glmm-fit",
    command="glmm",
    methods=(),
    description="fit the multinomial GLM or GLMM of every gene and keep the fitted parameters",
    options=(
        Option("model", "glmm-full", "glmm-full (spatial random effect), glmm-null (white noise) or glm",
               choices=GLMM_MODELS),
        Option("fit", None, "fitting method (GLMM: joint_newton, joint_gd on a low-rank kernel; GLM: iwls)",
               choices=ALL_FITS),
        Option("glmm", None, "GLMM settings (key=value): share_variance, var_fix_sigma, var_prior, init_ratio, lr, "
               "tol, patience, max_epochs, dtype, update_nu_every_k, optim, rank", kind="dict"),
        Option("return_nu", False, "also keep the fitted random effect nu (gene x spot x contrast)", kind="bool"),
    ),
    prepare=_prepare,
    variables=("intercept", "beta", "sigma", "theta", "converged", "loss", "epochs", "n_isoforms", "nu"),
    covariates="optional",
    summaries=False,
)


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
