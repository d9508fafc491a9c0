"""Differential usage by kernel and t-tests (hsic, hsic-gp, t-fisher, t-tippett): every gene x covariate pair."""

from __future__ import annotations

import functools
import hashlib
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.covariates import CovariateDesign, encode_covariates
from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import Family, Option, Prepared, check_setting_types
from spatialscale.families.common import batch_counts, check_choice, provenance, summary_variables
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
from spatialscale.worker import coordinates_token

__all__ = ["EFFECT_METHODS", "FAMILY", "JOINT_METHODS", "PER_LEVEL", "design_fingerprint", "du_dataset",
           "per_level_option", "refuse_joint"]


RESIDUALIZE = ("cov_only", "both")
#: the DU families' option: one test per level of a categorical instead of one per covariate
PER_LEVEL = Option("per_level", False, "categorical covariates: test each level against the rest (one test per "
                   "level, SPLISOSM's layout) instead of one test per covariate (two levels: one indicator, the "
                   "first level the reference; more: all levels jointly)", kind="bool")
GP_BACKENDS = ("auto", "exact", "lowrank", "sod", "fft")


def _du_np_task(store_path: str, xy_token: str, method: str, transformation: str, nan_filling: str,
                gp: dict[str, Any] | None, device: str, raster: bool,
                groups: tuple[tuple[int, ...], ...] | None, batch: Batch,
                z: np.ndarray | GPNull) -> dict[str, np.ndarray]:
    """One Dask task: kernel or t-tests of every gene of the batch against every (residualised) covariate.

    ``groups`` are the columns of ``z`` each HSIC test takes jointly (``None``:
    one test per column).  On a raster store the genes are tested on its
    observed bins (the rows of its obs).
    """
    counts = batch_counts(store_path, batch, grid=not raster)
    y, used = du_responses(counts, transformation, nan_filling)
    if gp is not None and gp.get("backend") == "fft":  # residualize="both" with the raster's grid GP
        y = _residualize_responses_grid(store_path, counts, transformation, gp)
    elif gp is not None:  # residualize="both": the isoform ratios lose their spatial trend too
        y = _residualize_responses(store_path, xy_token, counts, transformation, gp, device)
    if isinstance(z, GPNull):
        stat, pval, effect = hsic_du_gp_null(y, used, z, effect=True)
    elif method in ("hsic", "hsic-gp"):
        stat, pval, effect = hsic_du(y, used, z, groups, effect=True)
    else:
        stat, pval = ttest_du(y, used, z, combine=method.removeprefix("t-"))
        return {"statistic": stat, "pvalue": pval, "n_spots_used": used.sum(1)}
    return {"statistic": stat, "pvalue": pval, "effect": effect, "n_spots_used": used.sum(1)}


def _residualize_responses(store_path: str, xy_token: str, counts: np.ndarray, transformation: str,
                           gp: dict[str, Any],
                           device: str) -> np.ndarray:
    """Spatial-GP residuals of every gene's (mean-filled, uncentred) ratios, centred: one GP per gene."""
    from spatialscale.stats.gp import residualize_genes
    from spatialscale.stats.responses import ratio_response
    from spatialscale.worker import gp_basis, resolve_device

    y_raw, _ = ratio_response(counts, transformation, centre=False)
    basis = gp_basis(store_path, xy_token, tuple(sorted(gp.items())), resolve_device(device))
    res, _ = residualize_genes(basis, y_raw, **gp)
    return res - res.mean(1, keepdims=True)


def _residualize_responses_grid(store_path: str, counts: np.ndarray, transformation: str,
                                gp: dict[str, Any]) -> np.ndarray:
    """Raster store: each gene's (mean-filled) ratios minus their grid-GP fit, one GP per gene, observed bins."""
    from spatialscale.stats.gp_grid import residualize_observed
    from spatialscale.stats.responses import ratio_response
    from spatialscale.store import open_store

    store = open_store(store_path)
    index, shape = store.grid_index(), tuple(store.kernel_attrs["shape"])
    y_raw, _ = ratio_response(counts, transformation, centre=False)
    out = np.empty_like(y_raw)
    opts = _grid_fit_options(gp)  # the ratios enter as they are (no standardisation)
    for g in range(y_raw.shape[0]):  # one fit per gene: its own (a, eps)
        out[g], _ = residualize_observed(y_raw[g], index, shape, joint=True, **opts)
    return out


def _grid_fit_options(gp: dict[str, Any]) -> dict[str, Any]:
    """The grid GP's settings as :func:`~spatialscale.stats.gp_grid.residualize_observed` takes them."""
    return {k: v for k, v in gp.items() if k not in ("backend", "standardize")}


def _check_binary(z: np.ndarray, names: list[str]) -> None:
    try:
        binary_levels(z, names)
    except ValueError as exc:
        raise InputError(f"{exc} Use hsic / hsic-gp for continuous covariates (a two-level categorical obs "
                         "column is one 0/1 indicator).") from None


#: DU methods whose results carry du_effect (the RV coefficient of ratios and covariate)
EFFECT_METHODS = ("hsic", "hsic-gp")
#: DU methods that test the levels of a categorical jointly
JOINT_METHODS = ("hsic", "hsic-gp", "glmm-score", "glmm-wald")


def per_level_option(opts: dict[str, Any]) -> bool:
    """The validated ``per_level`` option (true or false)."""
    value = opts.get("per_level", False)
    if not isinstance(value, bool | np.bool_):
        raise InputError(f"per_level must be True or False, got {value!r}.")
    return bool(value)


def refuse_joint(what: str, design: CovariateDesign, instead: str) -> None:
    """A one-line InputError when ``what`` cannot test a categorical's levels jointly; ``instead``: the way out
    besides ``per_level=True``."""
    joint = [(t, len(g)) for t, g in zip(design.tests, design.groups) if len(g) > 1]
    if joint:
        which = (f"covariate {joint[0][0]!r} has {joint[0][1]} levels" if len(joint) == 1 else
                 f"covariates {', '.join(f'{t!r} ({k} levels)' for t, k in joint)} have more than two levels")
        raise InputError(f"{what}; {which}: pass per_level=True (--per-level) to test each level against the rest, "
                         f"or {instead}.")


def _prepare(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str) -> Prepared:
    transformation, nan_filling = opts["transformation"], opts["nan_filling"]
    residualize, null, gp = opts.get("residualize", "cov_only"), opts.get("null", "liu"), opts.get("gp")
    if residualize == "both" and nan_filling != "mean":
        raise InputError("residualize='both' needs nan_filling='mean' (one GP basis shared by all genes).")
    raster = store.kernel_kind == "fft"
    design = encode_covariates(store.obs(), covariates, per_level=per_level_option(opts))
    names, z = design.tests, design.z
    if method.startswith("t-"):
        refuse_joint(f"{method} compares two groups", design,
                     f"use {', '.join(JOINT_METHODS)}, which test all levels of a covariate jointly")
        _check_binary(z, names)
    if method == "hsic-gp" and null == "gp":
        refuse_joint("hsic-gp's null='gp' models one covariate column at a time", design,
                     "null='liu', which tests all levels of a covariate jointly")
    gp_opts = _gp_options(gp, store) if method == "hsic-gp" else None
    grid_gp = gp_opts is not None and gp_opts.get("backend") == "fft"
    if grid_gp and null == "gp":
        raise InputError("null='gp' needs the coordinate GP (gp backend exact or lowrank, which run on a raster "
                         "store's observed bins too); the raster's grid GP (backend fft) has only null='liu'.")
    n, f = store.n_observed, z.shape[1]
    params = {"method": method, "transformation": transformation, "nan_filling": nan_filling,
              **({"residualize": residualize, "gp": gp_opts} if method == "hsic-gp" else {}),
              **({"null": null} if null != "liu" else {})}
    xy_token = coordinates_token(store.coords()) if method == "hsic-gp" and not grid_gp else ""
    task = functools.partial(_du_np_task, str(store.path.resolve()), xy_token, method, transformation, nan_filling,
                             gp_opts if residualize == "both" else None, device, raster, design.column_groups)

    def shared() -> np.ndarray | GPNull:
        if method != "hsic-gp":
            return z
        if grid_gp:
            return _residualize_covariates_grid(store, z, gp_opts)
        return _residualize_covariates(store, xy_token, z, gp_opts, device, null)

    attrs = {"test": "differential_usage", "method": method, "transformation": transformation,
             "nan_filling": nan_filling}
    if method == "hsic-gp":
        attrs.update({"residualize": residualize, "null": null,
                      **{f"gp_{k}": v for k, v in gp_opts.items() if v is not None}})

    def assemble(run: Any) -> xr.Dataset:
        return du_dataset(store, run, design, {**attrs, **provenance(store)}, per_gene=("n_spots_used",))

    grid_n = store.n_spots if grid_gp and residualize == "both" else 0

    return Prepared(kind="du", params=params, task=task,
                    bytes_per_gene=lambda p: 8.0 * (n * (3 * p + 4 * p * (residualize == "both")) + 8 * p * f
                                                    + 4 * grid_n * p),
                    label=f"du {method}", assemble=assemble, shared=shared,
                    fingerprint_extra=design_fingerprint(design))


def design_fingerprint(design: CovariateDesign) -> dict[str, Any]:
    """What the covariates add to a DU run's fingerprint: the column names, the values' hash and, when levels
    were encoded, the tests' grouping, references and encodings (numeric designs keep their earlier fingerprint)."""
    out: dict[str, Any] = {"covariates": design.columns, "design": hashlib.sha256(design.z.tobytes()).hexdigest()}
    if not design.numeric:
        out["encoding"] = design.describe()
    return out


def du_dataset(store: IsoformStore, run: Any, design: CovariateDesign, attrs: dict[str, Any],
                per_gene: tuple[str, ...] = ()) -> xr.Dataset:
    """DU results from a run's batches: statistics, p-values, BH over genes per covariate test, per-gene extras.

    ``du_effect`` is added when every batch carries an ``effect`` (the
    kernel tests, :data:`EFFECT_METHODS`).

    The ``covariate`` coordinate names the tests; ``covariate_reference``
    (the reference level of a categorical's test, ``""`` for numeric and
    per-level tests) and ``covariate_encoding`` (one of
    :data:`~spatialscale.covariates.ENCODINGS`) lie along it.
    """
    stat = np.concatenate([r["statistic"] for r in run.parts])
    pval = np.concatenate([r["pvalue"] for r in run.parts])
    # the kernel tests' effect sizes (du_effect, the RV coefficient); the t-tests and GLMM tests have none
    effect = ({"du_effect": np.concatenate([r["effect"] for r in run.parts])}
              if run.parts and all("effect" in r for r in run.parts) else {})
    data = {"du_statistic": stat, "du_pvalue": pval, "du_pvalue_adj": bh_adjust(pval, axis=0), **effect,
            "n_isoforms": store.genes["n_isoforms"].to_numpy(),
            **{k: np.concatenate([r[k] for r in run.parts]) for k in per_gene}, **summary_variables(run.parts)}
    coords = {"covariate_reference": ("covariate", np.asarray(design.reference, dtype=str)),
              "covariate_encoding": ("covariate", np.asarray(design.encoding, dtype=str))}
    return make_dataset(store.genes.index.to_numpy(), data, {**attrs, "execution": run.kind},
                        covariates=design.tests, extra_coords=coords)


def _gp_options(gp: dict[str, Any] | None, store: IsoformStore) -> dict[str, Any]:
    """Validate the spatial-GP options (unknown keys are an error, not ignored).

    On a raster store the default backend is ``fft``, the periodic grid GP
    (SplisosmFFT's): it takes the length scale (in the store's grid-spacing
    units), the bounds and ``standardize``, and gets the store's spacing.  The
    coordinate GP's backends run on a raster store's observed bins as on any
    store.
    """
    import inspect

    from spatialscale.stats.gp import residualize

    opts = dict(gp or {})
    raster = store.kernel_kind == "fft"
    backend = opts.get("backend", "fft" if raster else "auto")
    check_choice("gp backend", backend, GP_BACKENDS)
    if backend == "fft":
        from spatialscale.stats.gp_grid import GRID_GP_OPTIONS

        if not raster:
            raise InputError(f"gp backend 'fft' (the periodic grid GP) needs a raster store (kernel='fft'); "
                             f"{store.path} has a {store.kernel_kind} kernel.")
        unknown = sorted(set(opts) - {"backend", *GRID_GP_OPTIONS})
        if unknown:
            raise InputError(f"gp option(s) {unknown} do not apply to the grid GP (backend fft); choose from "
                             f"{list(GRID_GP_OPTIONS)}, or a coordinate-GP backend (exact, lowrank).")
        _check_grid_gp_values(opts)
        return {**opts, "backend": "fft", "spacing": tuple(float(v) for v in store.kernel_attrs["spacing"])}
    allowed = [k for k, v in inspect.signature(residualize).parameters.items()
               if v.kind == inspect.Parameter.KEYWORD_ONLY and k != "device"]
    unknown = sorted(set(opts) - set(allowed))
    if unknown:
        raise InputError(f"unknown gp option(s) {unknown}; choose from {allowed}.")
    params = inspect.signature(residualize).parameters
    check_setting_types("gp", opts, {k: params[k].default for k in allowed})
    return opts


def _check_grid_gp_values(opts: dict[str, Any]) -> None:
    """Named errors for bad values of the grid GP's options (before anything runs)."""
    def positive(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) and v > 0

    if "length_scale" in opts and not positive(opts["length_scale"]):
        raise InputError(f"gp length_scale must be a positive number, got {opts['length_scale']!r}.")
    for key in ("amplitude_bounds", "noise_bounds"):
        v = opts.get(key)
        if v is not None and not (isinstance(v, list | tuple) and len(v) == 2 and all(positive(x) for x in v)
                                  and v[0] < v[1]):
            raise InputError(f"gp {key} must be two positive numbers [low, high] with low < high, got {v!r}.")
    if "standardize" in opts and not isinstance(opts["standardize"], bool):
        raise InputError(f"gp standardize must be true or false, got {opts['standardize']!r}.")


def _residualize_covariates_grid(store: IsoformStore, z: np.ndarray, gp: dict[str, Any]) -> np.ndarray:
    """Raster store, ``backend="fft"``: each covariate minus its grid-GP fit at the observed bins, then
    standardised (ddof 0, as SplisosmFFT reports its statistics).

    As SplisosmFFT, the covariates enter the GP as given (centred), unless
    ``standardize=True``: where a fit reaches a bound (``eps`` at its lower
    bound for a sharp boundary between groups) the residual depends on the
    covariate's scale.
    """
    from spatialscale.stats.gp_grid import residualize_observed

    if gp.get("standardize", False):
        z = (z - z.mean(0)) / z.std(0, ddof=1)
    res, _ = residualize_observed(z, store.grid_index(), tuple(int(v) for v in store.kernel_attrs["shape"]),
                                  **_grid_fit_options(gp))
    return res / res.std(0)


def _residualize_covariates(store: IsoformStore, xy_token: str, z: np.ndarray, gp: dict[str, Any], device: str,
                            null: str) -> np.ndarray | GPNull:
    """Standardise each covariate (ddof 1) and remove its spatial-GP trend: once per covariate, for all genes.

    With ``null="gp"`` also the GP's eigenvectors and each covariate's
    shrinkage, for the GP-conditional null (:func:`hsic_du_gp_null`).
    """
    import torch

    from spatialscale.stats.gp import residualize
    from spatialscale.worker import normalized_coordinates

    zs = (z - z.mean(0)) / z.std(0, ddof=1)
    x = normalized_coordinates(str(store.path.resolve()), xy_token)
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


FAMILY = Family(
    name="du-kernel",
    command="du",
    methods=DU_NP_METHODS,
    description="kernel and t-tests of differential usage: every gene's isoform ratios against every covariate",
    options=(
        PER_LEVEL,
        Option("transformation", "none", "transformation of the isoform ratios", choices=TRANSFORMS),
        Option("nan_filling", "mean", "spots where a gene has no counts: mean ratio, or left out",
               choices=NAN_FILLINGS),
        Option("residualize", "cov_only", "hsic-gp: remove the spatial trend of the covariates only, or of the "
               "isoform ratios too", choices=RESIDUALIZE, methods=("hsic-gp",)),
        Option("null", "liu", "hsic-gp's null: liu (SPLISOSM's) or gp (calibrated under spatial confounding)",
               choices=DU_NULLS, methods=("hsic-gp",)),
        Option("gp", None, "spatial GP settings (key=value), e.g. backend=auto|exact|lowrank|sod|fft (fft: the "
               "raster's periodic grid GP, the default on raster stores)",
               kind="dict", methods=("hsic-gp",)),
    ),
    prepare=_prepare,
    variables=("du_statistic", "du_pvalue", "du_pvalue_adj", "du_effect", "n_isoforms", "n_spots_used"),
    covariates="required",
    kernels=("car", "fft"),
)
