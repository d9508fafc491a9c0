"""``SplisosmNP`` on the engine: HSIC spatial-variability and differential-usage tests with the CAR kernel."""

from __future__ import annotations

import os
import warnings
from typing import Any, Literal

import numpy as np

from spatialscale.compat._base import (
    CompatModel,
    anndata_from_tensors,
    check_choice,
    component_spots,
    power_sums_for,
    resolve_design,
    spot_mask,
    unsupported,
)
from spatialscale.errors import InputError

__all__ = ["SplisosmNP", "gp_options"]

SV_METHODS = ("hsic-ir", "hsic-ic", "hsic-gc", "spark-x")
DU_METHODS = ("hsic", "hsic-gp", "t-fisher", "t-tippett")
TRANSFORMATIONS = ("none", "clr", "ilr", "alr", "radial")
NAN_FILLINGS = ("mean", "none")
RESIDUALIZE = ("cov_only", "both")
GPR_BACKENDS = ("sklearn", "gpytorch", "nufft", "finufft")
#: SPLISOSM's GP settings (gpr_configs) and their defaults
_GPR_DEFAULTS = {"constant_value": 1.0, "constant_value_bounds": (1e-3, 1e3), "length_scale": 1.0,
                 "length_scale_bounds": "fixed", "n_inducing": 5000}
#: the other gpr_configs keys SPLISOSM knows; its sklearn and FFT backends ignore them, and so does the compat
_GPR_IGNORED = {"n_iter", "lr", "device", "epsilon_bounds", "workers", "n_modes", "max_auto_modes", "nufft_eps",
                "nufft_opts", "lml_approx_rank", "lml_exact_max_n", "eigsh_tol", "period_margin", "cg_rtol",
                "cg_maxiter"}
_NULL_ALIASES = {"eig": "liu", "clt": "welch", "trace": "welch"}


def normalise_null(null_method: str) -> str:
    """SPLISOSM's null names: ``eig`` is ``liu``, ``clt`` / ``trace`` are ``welch`` (deprecated aliases)."""
    if null_method in _NULL_ALIASES:
        new = _NULL_ALIASES[null_method]
        warnings.warn(f"null_method={null_method!r} is deprecated; using {new!r} instead.", DeprecationWarning,
                      stacklevel=3)
        return new
    check_choice("null method", null_method, ("liu", "welch", "perm"))
    return null_method


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(float(x) == float(y) for x, y in zip(a, b))
    return a == b


def gp_options(gpr_configs: dict[str, Any] | None, *, n_spots: int | None, residualize: str,
               grid: bool = False) -> dict[str, Any]:
    """The native ``gp`` settings equivalent to SPLISOSM's ``gpr_configs`` (an ``InputError`` for the rest).

    ``length_scale`` stays, ``constant_value_bounds`` become ``amplitude_bounds``;
    keys SPLISOSM's sklearn / FFT backends ignore are ignored.  Without
    ``grid`` (SplisosmNP's sklearn backend) sections of up to ``n_inducing``
    spots get the exact GP (``backend="exact"``) and larger ones a fit on a
    random subset of ``n_inducing`` spots (``backend="sod"``), as SPLISOSM.
    """
    configs = gpr_configs or {}
    if set(configs) - {"covariate", "isoform"}:
        raise InputError("gpr_configs must have a nested structure. Use keys 'covariate' and/or 'isoform' for the "
                         "respective GPR configurations.")
    for part in configs.values():
        unknown = sorted(set(part) - set(_GPR_DEFAULTS) - _GPR_IGNORED)
        if unknown:
            raise InputError(f"Unsupported GPR configuration key(s): {', '.join(unknown)}.")
    used = [k for k in _GPR_DEFAULTS if not (grid and k == "n_inducing")]
    cov = {k: configs.get("covariate", {}).get(k, v) for k, v in _GPR_DEFAULTS.items()}
    iso = {k: configs.get("isoform", {}).get(k, v) for k, v in _GPR_DEFAULTS.items()}
    if residualize == "both" and any(not _same(cov[k], iso[k]) for k in used):
        raise unsupported("different 'covariate' and 'isoform' GP settings", "the native hsic-gp fits covariates "
                          "and isoform ratios with the same settings: spatialscale.du_test(..., method='hsic-gp', "
                          "residualize='both', gp={...}).")
    if not _same(cov["length_scale_bounds"], "fixed"):
        raise unsupported(f"length_scale_bounds={cov['length_scale_bounds']!r}", "the native GP keeps the length "
                          "scale fixed: give gpr_configs={'covariate': {'length_scale': ...}} (gp={'length_scale': "
                          "...} natively).")
    if not _same(cov["constant_value"], 1.0):
        raise unsupported(f"constant_value={cov['constant_value']!r} (the GP amplitude's starting value)",
                          "the amplitude is fitted within constant_value_bounds (gp={'amplitude_bounds': ...} "
                          "natively).")
    gp: dict[str, Any] = {}
    if not _same(cov["length_scale"], 1.0):
        gp["length_scale"] = float(cov["length_scale"])
    if not _same(cov["constant_value_bounds"], _GPR_DEFAULTS["constant_value_bounds"]):
        gp["amplitude_bounds"] = tuple(float(v) for v in cov["constant_value_bounds"])
    if grid:
        return gp
    n_inducing = cov["n_inducing"]
    if n_inducing is None or n_spots is None or n_spots <= int(n_inducing):
        gp["backend"] = "exact"
    else:
        gp.update(backend="sod", sod_size=int(n_inducing))
    return gp


class SplisosmNP(CompatModel):
    """SPLISOSM 1.2.0's ``SplisosmNP`` on the spatialscale engine.

    The constructor, ``setup_data``, the test methods, their arguments and
    defaults, ``get_formatted_test_results``, ``extract_feature_summary`` and
    the ``sv_test_results`` / ``du_test_results`` dictionaries are SPLISOSM's;
    the tests run on the native API (:func:`spatialscale.sv_test`,
    :func:`spatialscale.du_test`) over an isoform store that ``setup_data``
    writes. Options the engine does not offer raise
    :class:`~spatialscale.errors.InputError` naming the alternative
    (``docs/migration.md``).

    Parameters
    ----------
    k_neighbors
        Neighbours per spot of the kNN graph of the CAR kernel.
    rho
        CAR spatial autocorrelation, in ``[0, 1)``.
    standardize_cov
        Rescale the spatial covariance to unit diagonal.
    client, scheduler, store, batch_size, batch_memory
        Where and how the native API runs, and where the store goes (see
        :class:`~spatialscale.compat._base.CompatModel`); keyword only.

    Examples
    --------
    >>> from spatialscale.compat import SplisosmNP          # was: from splisosm import SplisosmNP
    >>> model = SplisosmNP()
    >>> model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
    >>> model.test_spatial_variability(method="hsic-ir")
    >>> sv = model.get_formatted_test_results("sv")
    """

    _class_name = "SplisosmNP"

    def __init__(self, k_neighbors: int = 4, rho: float = 0.99, standardize_cov: bool = True, *, client: Any = None,
                 scheduler: str | None = None, store: str | os.PathLike | None = None,
                 batch_size: int | None = None, batch_memory: int | str = "256MB") -> None:
        super().__init__(client=client, scheduler=scheduler, store=store, batch_size=batch_size,
                         batch_memory=batch_memory)
        self._k_neighbors = k_neighbors
        self._rho = rho
        self._standardize_cov = standardize_cov
        self._skip_kernel_construction = False
        self._has_coordinates = True

    def setup_data(
        self,
        adata: Any,
        *,
        spatial_key: str = "spatial",
        adj_key: str | None = None,
        layer: str = "counts",
        group_iso_by: str = "gene_symbol",
        gene_names: str | list[str] | None = None,
        design_mtx: Any = None,
        covariate_names: list[str] | None = None,
        min_counts: int = 10,
        min_bin_pct: float = 0.0,
        filter_single_iso_genes: bool = True,
        min_component_size: int = 1,
        skip_spatial_kernel: bool = False,
        coordinates: Any = None,
        client: Any = None,
    ) -> None:
        """Ingest the data into an isoform store and resolve the design matrix.

        Parameters
        ----------
        adata
            An ``AnnData`` (counts in ``layers[layer]``, isoforms grouped by
            ``var[group_iso_by]``, coordinates in ``obsm[spatial_key]``), or a
            list of per-gene ``(n_spots, n_isoforms)`` count matrices (numpy,
            scipy sparse or torch tensors, the pre-1.0 form) with
            ``coordinates``.
        spatial_key, adj_key, layer, group_iso_by
            As SPLISOSM's (``adj_key``: an ``obsp`` adjacency used instead of
            the kNN graph).
        gene_names
            ``var`` column of display names; with count matrices, one name per
            gene (default ``gene_1``, ``gene_2``...).
        design_mtx, covariate_names
            Covariates for differential usage: obs column name(s)
            (categorical ones one-hot, every level kept), a DataFrame, an
            array, tensor or sparse matrix with one row per spot.
        min_counts, min_bin_pct, filter_single_iso_genes, min_component_size
            Isoform and spot filters (as SPLISOSM's; also applied to count
            matrices).
        skip_spatial_kernel
            As SPLISOSM: spatial-variability tests then raise.  The store
            still holds the kernel (ingest builds it).
        coordinates
            ``(n_spots, 2)`` positions, with per-gene count matrices only.
        client
            A ``distributed.Client`` for this and later calls.
        """
        import anndata as ad

        self._set_execution(client)
        if not isinstance(adata, ad.AnnData):
            if isinstance(adata, list | tuple):
                if gene_names is not None and isinstance(gene_names, str):
                    raise InputError("with per-gene count matrices, gene_names is a list of names (one per gene).")
                adata = anndata_from_tensors(adata, coordinates, gene_names)
                layer, group_iso_by, gene_names, spatial_key = "counts", "gene_symbol", None, "spatial"
            else:
                raise InputError("`adata` must be an AnnData object (or a list of per-gene count matrices with "
                                 "coordinates=).")
        elif coordinates is not None:
            raise InputError("coordinates= applies to per-gene count matrices; an AnnData keeps them in "
                             "obsm[spatial_key].")
        if gene_names is not None and not isinstance(gene_names, str):
            raise InputError("gene_names must name an adata.var column.")
        if layer not in adata.layers:
            raise InputError(f"Layer `{layer}` was not found in `adata.layers` (available: {list(adata.layers)}).")
        design, names = resolve_design(adata.obs, design_mtx, covariate_names)
        n_kept = component_spots(adata, spatial_key, adj_key, self._k_neighbors, min_component_size)
        self._counts_layer = layer
        self._ingest(adata, layer=layer, gene_key=group_iso_by, spatial_key=spatial_key, adj_key=adj_key,
                     min_counts=min_counts, min_bin_pct=min_bin_pct, filter_single_iso_genes=filter_single_iso_genes,
                     min_component_size=min_component_size, k_neighbors=self._k_neighbors, rho=self._rho,
                     standardize_cov=self._standardize_cov, power_sums=power_sums_for(n_kept))
        self.adata = adata
        self._spot_mask = spot_mask(adata, self.store)
        self.n_spots = int(self._spot_mask.sum())
        self._has_coordinates = spatial_key in adata.obsm
        self._kernel_source = f"adj_key='{adj_key}'" if adj_key is not None else f"spatial_key='{spatial_key}'"
        self._skip_kernel_construction = bool(skip_spatial_kernel)
        self._set_genes(adata, group_iso_by, gene_names)
        if design is not None:
            design = design[self._spot_mask]
        self._set_design(design, names, self.store.obs().index)

    # ------------------------------------------------------------------ spatial variability
    def test_spatial_variability(
        self,
        method: Literal["hsic-ir", "hsic-ic", "hsic-gc", "spark-x"] = "hsic-ir",
        ratio_transformation: Literal["none", "clr", "ilr", "alr", "radial"] = "none",
        nan_filling: Literal["mean", "none"] = "mean",
        null_method: Literal["liu", "welch", "perm", "eig", "clt", "trace"] = "liu",
        null_configs: dict[str, Any] | None = None,
        chunk_size: int | Literal["auto"] = "auto",
        n_jobs: int = -1,
        return_results: bool = False,
        print_progress: bool = True,
    ) -> dict[str, Any] | None:
        """Test every gene for spatial variability (:func:`spatialscale.sv_test`).

        Parameters
        ----------
        method
            ``hsic-ir`` (isoform ratios), ``hsic-ic`` (isoform counts) or
            ``hsic-gc`` (gene counts); ``spark-x`` is not offered.
        ratio_transformation, nan_filling
            As SPLISOSM's (``transformation=``, ``nan_filling=`` natively).
        null_method
            ``liu`` (default), ``welch`` or ``perm`` (``eig``, ``clt``,
            ``trace``: deprecated aliases).
        null_configs
            ``n_perms_per_gene`` (``perm``; ``n_perms=`` natively) and
            ``perm_batch_size`` (ignored); ``n_probes`` / ``rng_seed`` only at
            SPLISOSM's values (60, 0); ``approx_rank`` is not offered.
        chunk_size, n_jobs
            Accepted and ignored: the engine batches genes by memory
            (``batch_size=`` / ``batch_memory=`` of the constructor) and runs
            where the client is.
        return_results
            Return the result dictionary too.
        print_progress
            Show the engine's progress bar.

        Returns
        -------
        dict or None
            ``statistic``, ``pvalue`` (float64 arrays over genes),
            ``method``, ``null_method``, ``chunk_size``, ``pvalue_adj``.
        """
        from spatialscale.api import sv_test

        self._require_setup()
        if self._skip_kernel_construction:
            raise RuntimeError("setup_data was called with skip_spatial_kernel=True. Re-run setup_data with "
                               "skip_spatial_kernel=False to enable spatial variability testing.")
        check_choice("method", method, SV_METHODS)
        if method == "spark-x":
            raise unsupported("method='spark-x' (it needs R's SPARK)", "test gene-level counts with "
                              "method='hsic-gc' (spatialscale.sv_test(store, method='hsic-gc')).")
        null_method = normalise_null(null_method)
        check_choice("ratio transformation", ratio_transformation, TRANSFORMATIONS)
        check_choice("NaN filling method", nan_filling, NAN_FILLINGS)
        kw = self._sv_null_options(null_method, null_configs or {})
        if method == "hsic-ir":
            kw["transformation"] = ratio_transformation
        ds = sv_test(self.store, method=method, null=null_method, nan_filling=nan_filling, **kw,
                     **self._execution(print_progress))
        self._sv_test_results = {
            "statistic": self._in_order(ds, "sv_statistic").astype(np.float64),
            "pvalue": self._in_order(ds, "sv_pvalue").astype(np.float64),
            "method": method,
            "null_method": null_method,
            "chunk_size": chunk_size,
            "pvalue_adj": self._in_order(ds, "sv_pvalue_adj").astype(np.float64),
        }
        return self._sv_test_results if return_results else None

    @staticmethod
    def _sv_null_options(null_method: str, configs: dict[str, Any]) -> dict[str, Any]:
        known = {"n_perms_per_gene", "perm_batch_size", "n_probes", "rng_seed", "approx_rank"}
        extra = sorted(set(configs) - known)
        if extra:
            raise InputError(f"unknown null_configs key(s) {extra}; SPLISOSM's are {sorted(known)}.")
        if configs.get("approx_rank") is not None:
            raise unsupported("null_configs['approx_rank'] (a rank-truncated statistic)",
                              "the native Liu null uses the kernel's exact cumulants (or SPLISOSM's Hutchinson "
                              "estimate above 5,000 spots); see ingest(power_sums=...).")
        if int(configs.get("n_probes", 60)) != 60 or int(configs.get("rng_seed", 0)) != 0:
            raise unsupported("null_configs n_probes / rng_seed other than SPLISOSM's 60 / 0",
                              "ingest the store natively with power_sums='selected' (exact k1, k2 and control-"
                              "variate probes) or 'exact': spatialscale.ingest(adata, path, power_sums=...).")
        if null_method != "perm":
            return {}
        n = int(configs.get("n_perms_per_gene", 1000))
        if n < 1:
            raise InputError("`n_perms_per_gene` must be positive.")
        return {"n_perms": n}

    # ------------------------------------------------------------------ differential usage
    def test_differential_usage(
        self,
        method: Literal["hsic", "hsic-gp", "t-fisher", "t-tippett"] = "hsic-gp",
        ratio_transformation: Literal["none", "clr", "ilr", "alr", "radial"] = "none",
        nan_filling: Literal["mean", "none"] = "mean",
        gpr_backend: Literal["sklearn", "gpytorch", "nufft", "finufft"] = "sklearn",
        gpr_configs: dict[str, Any] | None = None,
        residualize: Literal["cov_only", "both"] = "cov_only",
        n_jobs: int = -1,
        print_progress: bool = True,
        return_results: bool = False,
    ) -> dict[str, Any] | None:
        """Test every gene x covariate pair for differential usage (:func:`spatialscale.du_test`).

        Parameters
        ----------
        method
            ``hsic``, ``hsic-gp`` (default), ``t-fisher`` or ``t-tippett``.
        ratio_transformation, nan_filling, residualize
            As SPLISOSM's (the native options of the same names; ``transformation=``).
        gpr_backend
            ``sklearn`` only: exact GP up to ``n_inducing`` spots, SPLISOSM's
            random subset above (native ``gp={"backend": "exact"}`` / ``"sod"``).
            For large sections the native ``gp={"backend": "lowrank"}`` is the
            alternative to ``gpytorch`` / ``nufft``.
        gpr_configs
            ``{"covariate": {...}, "isoform": {...}}``: ``length_scale``,
            ``constant_value_bounds`` and ``n_inducing``, as SPLISOSM's
            sklearn backend (``constant_value`` only at 1, ``length_scale_bounds``
            only ``"fixed"``; keys that backend ignores are ignored).
        n_jobs
            Accepted and ignored (see :meth:`test_spatial_variability`).
        print_progress, return_results
            As SPLISOSM's.

        Returns
        -------
        dict or None
            ``statistic``, ``pvalue`` (``(n_genes, n_factors)``; float32 for
            the HSIC tests, float64 for the t-tests, as SPLISOSM),
            ``method``, ``pvalue_adj`` (Benjamini-Hochberg over genes, per
            covariate).
        """
        from spatialscale.api import du_test

        self._require_setup()
        if self.design_mtx is None:
            raise InputError("Cannot find the design matrix. Perhaps you forgot to set it up using setup_data().")
        check_choice("method", method, DU_METHODS)
        check_choice("transformation", ratio_transformation, TRANSFORMATIONS)
        check_choice("nan_filling", nan_filling, NAN_FILLINGS)
        check_choice("residualize", residualize, RESIDUALIZE)
        kw: dict[str, Any] = {}
        if method == "hsic-gp":
            check_choice("gpr_backend", gpr_backend, GPR_BACKENDS)
            if gpr_backend != "sklearn":
                raise unsupported(f"gpr_backend={gpr_backend!r}", "use the default 'sklearn' (an exact GP; "
                                  "gp={'backend': 'exact'} natively) or, for large sections, the native inducing-"
                                  "point GP: spatialscale.du_test(..., method='hsic-gp', gp={'backend': "
                                  "'lowrank'}).")
            if not self._has_coordinates:
                raise InputError("method='hsic-gp' fits a Gaussian process on the spatial coordinates, but the "
                                 "AnnData has no obsm[spatial_key]; use method='hsic', 't-fisher' or 't-tippett'.")
            kw.update(residualize=residualize,
                      gp=gp_options(gpr_configs, n_spots=self.n_spots, residualize=residualize))
        ds = du_test(self.store, self._covariates(), method=method, transformation=ratio_transformation,
                     nan_filling=nan_filling, **kw, **self._execution(print_progress))
        stat, pval = self._in_order(ds, "du_statistic"), self._in_order(ds, "du_pvalue")
        if method in ("hsic", "hsic-gp"):  # SPLISOSM keeps these in float32
            stat, pval = stat.astype(np.float32), pval.astype(np.float32)
        else:
            stat, pval = stat.astype(np.float64), pval.astype(np.float64)
        from spatialscale.stats.multitest import bh_adjust

        self._du_test_results = {"statistic": stat, "pvalue": pval, "method": method,
                                 "pvalue_adj": bh_adjust(pval, axis=0).astype(pval.dtype)}
        return self._du_test_results if return_results else None

    def _summary_lines(self) -> list[str]:
        return super()._summary_lines() + [
            "=== Model configurations", f"- Spatial kernel source: {getattr(self, '_kernel_source', 'N/A')}",
            f"- k_neighbors: {self._k_neighbors}, rho: {self._rho}",
            f"- Standardize spatial covariance: {self._standardize_cov}"]
