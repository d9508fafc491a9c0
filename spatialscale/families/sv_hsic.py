"""Spatial variability by HSIC (hsic-ir, hsic-ic, hsic-gc): every gene of a section against the spatial kernel."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.covariates import CovariateDesign, encode_covariates
from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import Family, Option, Prepared
from spatialscale.families.common import batch_counts, provenance, summary_variables
from spatialscale.families.du_kernel import design_fingerprint
from spatialscale.results import make_dataset
from spatialscale.stats.adjust import covariate_basis, projected_kernel_sums
from spatialscale.stats.multitest import bh_adjust
from spatialscale.stats.nulls import NULLS
from spatialscale.stats.responses import TRANSFORMS, response_width
from spatialscale.stats.sv import NAN_FILLINGS, SV_METHODS, sv_batch, sv_batch_sparse_ratios
from spatialscale.store import IsoformStore
from spatialscale.worker import kernel_diag_sq, kernel_operator

__all__ = ["FAMILY"]


def _sv_task(store_path: str, token: str, device: str, params: dict[str, Any], batch: Batch,
             adjust: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One Dask task: test the genes of ``batch`` (runs on a worker).

    ``adjust`` (covariate-adjusted runs, computed once on the client): the
    covariates' orthonormal ``basis`` and the projected kernel's power ``sums``.
    """
    op, sums = kernel_operator(store_path, token, device)
    if adjust is not None:
        counts = batch_counts(store_path, batch)
        return sv_batch(counts, op, adjust["sums"], covariate_basis=adjust["basis"], **params)
    if _sparse_ratios(op, params, batch):
        from spatialscale.store import _grid_index, read_sparse_columns

        data, rows, ptr = read_sparse_columns(store_path, batch.col_start, batch.col_stop)
        return sv_batch_sparse_ratios(data, rows, ptr, _grid_index(store_path), batch.n_genes, batch.n_isoforms,
                                      op, sums, null=params["null"])
    counts = batch_counts(store_path, batch)
    if params["null"] == "liu-perm":
        params = {**params, "kernel_diag_sq": kernel_diag_sq(store_path, token)}
    return sv_batch(counts, op, sums, **params)


def _sparse_options(params: dict[str, Any]) -> bool:
    """Whether the options allow the raster fast path (hsic-ir ratios built from the stored non-zero counts)."""
    return (params["method"] == "hsic-ir" and params["transformation"] == "none"
            and params["nan_filling"] == "mean" and params["null"] in ("liu", "welch"))


def _sparse_ratios(op: Any, params: dict[str, Any], batch: Batch) -> bool:
    """Whether a batch runs on the raster fast path: the options, an FFT kernel, >= 2 isoforms, numba."""
    from spatialscale.raster import FFTKernelOperator
    from spatialscale.stats._numba import compiled_available

    return (isinstance(op, FFTKernelOperator) and batch.n_isoforms >= 2 and _sparse_options(params)
            and compiled_available())


def _prepare(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str) -> Prepared:
    null, n_perms = opts["null"], 1000 if opts["n_perms"] is None else opts["n_perms"]
    if null == "perm" and n_perms < 1:
        raise InputError("n_perms must be >= 1 for null='perm'.")
    if null != "perm" and opts["n_perms"] is not None:
        raise InputError("n_perms applies to null='perm' only.")
    if null == "liu-perm" and opts["nan_filling"] != "mean":
        raise InputError("null='liu-perm' needs nan_filling='mean' (every spot in the test).")
    n = store.n_spots
    transformation = opts.get("transformation", "none")
    params = {"method": method, "transformation": transformation, "nan_filling": opts["nan_filling"],
              "null": null, "n_perms": int(n_perms), "perm_seed": int(opts["perm_seed"])}
    attrs = {"test": "spatial_variability", "method": method, "null": null, "transformation": transformation,
             "nan_filling": opts["nan_filling"],
             **({"n_perms": int(n_perms), "perm_seed": int(opts["perm_seed"])} if null == "perm" else {})}

    adjust, fingerprint_extra = None, None
    if covariates is not None:
        adjust, design = _covariate_adjustment(store, covariates, opts, null)
        attrs["covariates"] = design.columns
        fingerprint_extra = design_fingerprint(design)
    sparse = store.kernel_kind == "fft" and _sparse_options(params) and adjust is None

    def bytes_per_gene(p: int) -> float:
        if sparse and p >= 2:  # the raster fast path: p - 1 grid columns and their half spectra
            return 8.0 * n * (2 * (p - 1) + 1)
        d = response_width(method, p, transformation)
        perm = 2 * 32 * d if null == "perm" else 0
        return 8.0 * n * (p + 5 * d + perm + (d if adjust is not None else 0))

    def assemble(run: Any) -> xr.Dataset:
        data = {k: np.concatenate([r[k] for r in run.parts])
                for k in ("statistic", "pvalue", "n_spots_used", "effect")}
        return make_dataset(
            store.genes.index.to_numpy(),
            {"sv_statistic": data["statistic"], "sv_pvalue": data["pvalue"],
             "sv_pvalue_adj": bh_adjust(data["pvalue"]), "sv_effect": data["effect"],
             "n_isoforms": store.genes["n_isoforms"].to_numpy(), "n_spots_used": data["n_spots_used"],
             **summary_variables(run.parts)},
            {**attrs, **provenance(store), "execution": run.kind},
        )

    task = functools.partial(_sv_task, str(store.path.resolve()), store.kernel_token, device, params)
    return Prepared(kind="sv", params=params, task=task, bytes_per_gene=bytes_per_gene, label=f"sv {method}",
                    assemble=assemble, shared=adjust, fingerprint_extra=fingerprint_extra)


def _covariate_adjustment(store: IsoformStore, covariates: Any, opts: dict[str, Any],
                          null: str) -> tuple[Callable[[], dict[str, np.ndarray]], CovariateDesign]:
    """Validate the covariates of an adjusted HSIC run; the (lazy) basis and projected power sums, and the design.

    The power sums of ``M K_c M`` are computed once, on the client, from
    ``2u`` products with the section's kernel operator
    (:func:`spatialscale.stats.adjust.projected_kernel_sums`), only when some
    batch is left to run.
    """
    if store.kernel_kind == "fft":
        raise InputError("covariate-adjusted sv does not run on raster (fft) stores yet; use a store ingested with "
                         "kernel='car'.")
    if opts["nan_filling"] != "mean":
        raise InputError("covariate-adjusted sv needs nan_filling='mean' (every spot in the projection).")
    if null == "liu-perm":
        raise InputError("covariate-adjusted sv takes null='liu', 'welch' or 'perm', not 'liu-perm'.")
    design = encode_covariates(store.obs(), covariates, drop_reference=True)
    basis = covariate_basis(design.z)
    n = store.n_spots
    if basis.shape[1] == 0:
        raise InputError(f"covariates {design.columns} are constant across spots: nothing to adjust for.")
    if basis.shape[1] > n - 4:
        raise InputError(f"covariates {design.columns} span {basis.shape[1]} directions on {n} spots: too few "
                         "spots left for the test.")
    store_path, token = str(store.path.resolve()), store.kernel_token

    def compute() -> dict[str, np.ndarray]:
        op, sums = kernel_operator(store_path, token, "cpu")
        return {"basis": basis, "sums": projected_kernel_sums(op, sums, basis)}

    return compute, design


FAMILY = Family(
    name="sv-hsic",
    command="sv",
    methods=SV_METHODS,
    description="HSIC spatial-variability tests: isoform ratios (hsic-ir), isoform counts (hsic-ic) or gene "
                "counts (hsic-gc) against the section's CAR kernel",
    options=(
        Option("null", "liu", "null distribution of the HSIC statistic", choices=NULLS),
        Option("transformation", "none", "transformation of the isoform ratios", choices=TRANSFORMS,
               methods=("hsic-ir",)),
        Option("nan_filling", "mean", "spots where a gene has no counts: mean ratio, or left out",
               choices=NAN_FILLINGS),
        Option("n_perms", None, "permutations for null='perm' (1000)", kind="int", low=1),
        Option("perm_seed", 0, "seed of the permutations (one set shared by all genes)", kind="int", low=0),
    ),
    prepare=_prepare,
    variables=("sv_statistic", "sv_pvalue", "sv_pvalue_adj", "sv_effect", "n_isoforms", "n_spots_used"),
    covariates="optional",
    kernels=("car", "fft"),
)
