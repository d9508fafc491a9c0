"""Spatial variability by the GLMM likelihood ratio (glmm-llr): glmm-full against glmm-null, every gene."""

from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.covariates import encode_covariates
from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import MIN_BATCHES_GLMM, Family, Option, Prepared
from spatialscale.families.common import batch_counts, provenance, summary_variables
from spatialscale.families.du_kernel import design_fingerprint
from spatialscale.families.fit import FIT_METHODS, glmm_config, glmm_settings
from spatialscale.glmm.llr import llr_permutation_pvalues
from spatialscale.results import make_dataset
from spatialscale.stats.adjust import covariate_basis
from spatialscale.stats.multitest import bh_adjust
from spatialscale.store import IsoformStore

__all__ = ["FAMILY", "LLR_NULLS"]

#: nulls of glmm-llr: chi2, or spot permutations pooled over genes of equal isoform count, or per gene
LLR_NULLS = ("chi2", "perm", "perm-gene")


def _sv_llr_task(store_path: str, token: str, glmm: dict[str, Any], device: str, n_perms: int, perm_seed: int,
                 batch: Batch, design: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """One Dask task: fit glmm-null and glmm-full, compare their Laplace marginal likelihoods.

    The pair is fitted each from the other (:func:`spatialscale.glmm.llr.fit_sv_pair`).
    With ``n_perms > 0`` the pair is refitted on the counts with their spots
    permuted (permutation ``k`` is drawn from ``perm_seed + k``: the same for
    every gene and every batch).  ``design``: covariates, fixed effects of both
    models (with ``null="chi2"`` only: permuting the counts would break their dependence on the covariates).
    """
    from spatialscale.glmm import llr_test
    from spatialscale.glmm.llr import sv_log_marginals
    from spatialscale.worker import kernel_eigenpairs, log_timing, resolve_device

    if batch.n_isoforms < 2:  # one isoform: no usage to model
        nan = np.full(batch.n_genes, np.nan)
        out = {"statistic": nan, "pvalue": nan, "n_spots_used": np.zeros(batch.n_genes, np.int64)}
        return {**out, "perm_statistic": np.full((batch.n_genes, n_perms), np.nan)} if n_perms else out
    t0 = time.perf_counter()
    counts = batch_counts(store_path, batch)
    t1 = time.perf_counter()
    lam, vec = kernel_eigenpairs(store_path, token, glmm.get("rank"))
    t2 = time.perf_counter()
    cfg = glmm_config("glmm-full", glmm)  # fit_sv_pair sets the model of each fit
    dev = resolve_device(device)
    df = 1 if cfg.share_variance else batch.n_isoforms - 1
    work: dict[str, float] = {}
    null, full = sv_log_marginals(counts, lam, vec, cfg, device=dev, work=work, design=design)
    stat, pval = llr_test(full, null, df)
    out = {"statistic": stat, "pvalue": pval, "n_spots_used": np.full(batch.n_genes, counts.shape[1])}
    if n_perms:
        perm_stats = np.empty((batch.n_genes, n_perms))
        for k in range(n_perms):
            order = np.random.default_rng(perm_seed + k).permutation(counts.shape[1])
            null_k, full_k = sv_log_marginals(counts[:, order], lam, vec, cfg, device=dev, work=work, design=design)
            perm_stats[:, k] = 2.0 * (full_k - null_k)
        out["perm_statistic"] = perm_stats
    laplace = work.get("laplace_s", 0.0)  # the test: Laplace log-determinants; the fits: every pair, permuted too
    log_timing(task="sv-llr", read=t1 - t0, eigenpairs=t2 - t1, fit=time.perf_counter() - t2 - laplace,
               test=laplace, genes=batch.n_genes, epochs=work.get("epochs", 0))
    return out


def _prepare(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str) -> Prepared:
    null = opts["null"]
    n_perms = 20 if opts["n_perms"] is None else int(opts["n_perms"])
    if null != "chi2" and n_perms < 1:
        raise InputError(f"n_perms must be >= 1 for null={null!r}.")
    if null == "chi2" and opts["n_perms"] is not None:
        raise InputError("n_perms applies to null='perm' or 'perm-gene' only.")
    design = None
    if covariates is not None and null != "chi2":
        raise InputError(f"glmm-llr with covariates takes null='chi2' only: null={null!r} permutes the counts, which "
                         "breaks their dependence on the covariates (the permuted pairs are no null for the "
                         "adjusted test).")
    if covariates is not None:
        design = encode_covariates(store.obs(), covariates, drop_reference=True)
        if covariate_basis(design.z).shape[1] == 0:
            raise InputError(f"covariates {design.columns} are constant across spots: nothing to adjust for.")
    glmm = glmm_settings(store, "glmm-full", opts["fit"], opts["glmm"], design=design is not None)
    n = store.n_spots
    k = 0 if null == "chi2" else n_perms
    perm_seed = int(opts["perm_seed"])
    n_iso = store.genes["n_isoforms"].to_numpy()

    def assemble(run: Any) -> xr.Dataset:
        data = {key: np.concatenate([r[key] for r in run.parts]) for key in ("statistic", "pvalue", "n_spots_used")}
        if k:
            perm_stats = np.concatenate([r["perm_statistic"] for r in run.parts])
            data["pvalue"] = llr_permutation_pvalues(data["statistic"], perm_stats, n_iso, pool=null == "perm")
        return make_dataset(
            store.genes.index.to_numpy(),
            {"sv_statistic": data["statistic"], "sv_pvalue": data["pvalue"],
             "sv_pvalue_adj": bh_adjust(data["pvalue"]),
             # likelihood-ratio R^2 (Cox-Snell): the share of the null model's deviance the spatial term removes
             "sv_effect": -np.expm1(-np.clip(data["statistic"], 0.0, None) / data["n_spots_used"]),
             "n_isoforms": n_iso, "n_spots_used": data["n_spots_used"],
             **summary_variables(run.parts)},
            {"test": "spatial_variability", "method": "glmm-llr", "null": null,
             **({"n_perms": k, "perm_seed": perm_seed} if k else {}),
             **({"covariates": design.columns} if design is not None else {}),
             **{f"glmm_{key}": v for key, v in glmm.items() if v is not None},
             **provenance(store), "execution": run.kind},
        )

    task = functools.partial(_sv_llr_task, str(store.path.resolve()), store.kernel_token, glmm, device, k, perm_seed)
    params = {"method": "glmm-llr", "glmm": glmm, "null": null, **({"n_perms": k, "perm_seed": perm_seed} if k else {})}
    return Prepared(kind="sv", params=params, task=task, bytes_per_gene=lambda p: 8.0 * (n * (p - 1)) ** 2 * 3,
                    label="sv glmm-llr", assemble=assemble, min_batches=MIN_BATCHES_GLMM,
                    shared=None if design is None else design.z,
                    fingerprint_extra=None if design is None else design_fingerprint(design))


FAMILY = Family(
    name="sv-llr",
    command="sv",
    methods=("glmm-llr",),
    description="GLMM likelihood-ratio spatial-variability test: Laplace marginal likelihoods of glmm-full and "
                "glmm-null, fitted each from the other",
    options=(
        Option("null", "chi2", "null of the LLR: chi2, or spot permutations pooled over genes of equal isoform "
               "count (perm) or per gene (perm-gene)", choices=LLR_NULLS),
        Option("n_perms", None, "permutations for the perm nulls (20; each one a refit)", kind="int", low=1),
        Option("perm_seed", 0, "seed of the permutations (one set shared by all genes)", kind="int", low=0),
        Option("fit", None, "GLMM fitting method (joint_newton; joint_gd above 5,000 spots and SPLISOSM's)",
               choices=FIT_METHODS["glmm-full"]),
        Option("glmm", None, "GLMM settings (key=value): share_variance, var_fix_sigma, var_prior, init_ratio, lr, "
               "tol, patience, max_epochs, dtype, update_nu_every_k, optim, rank", kind="dict"),
    ),
    prepare=_prepare,
    variables=("sv_statistic", "sv_pvalue", "sv_pvalue_adj", "sv_effect", "n_isoforms", "n_spots_used"),
    covariates="optional",
)
