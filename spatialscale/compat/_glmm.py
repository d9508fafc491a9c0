"""``SplisosmGLMM`` on the engine: the multinomial GLM / GLMM, its likelihood-ratio SV and DU score / Wald tests."""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import pandas as pd

from spatialscale.compat._base import (
    CompatModel,
    anndata_from_tensors,
    check_choice,
    resolve_design,
    spot_mask,
    unsupported,
)
from spatialscale.errors import InputError

__all__ = ["SplisosmGLMM"]

MODEL_TYPES = ("glmm-full", "glmm-null", "glm")
FITTING_METHODS = ("joint_gd", "joint_newton", "marginal_gd", "marginal_newton")
FITTING_CONFIG_KEYS = ("lr", "optim", "tol", "max_epochs", "patience", "update_nu_every_k")
#: SPLISOSM's per-method fitting defaults (on top of lr 1e-2, tol 1e-5, patience 5, and max_epochs 500)
_FIT_RECORD_KEYS = ("with_design_mtx", "from_null", "refit_null", "batch_size")
_METHOD_DEFAULTS = {"marginal_gd": {"lr": 0.1}, "marginal_newton": {"lr": 0.1, "patience": 10, "update_nu_every_k": 3}}


class _AutoRank:
    """``approx_rank`` left out: full rank up to 5,000 spots, else ``ceil(4 sqrt(n))`` (SPLISOSM's rule)."""

    def __repr__(self) -> str:
        return "<auto>"


_AUTO_RANK = _AutoRank()


class SplisosmGLMM(CompatModel):
    """SPLISOSM 1.2.0's ``SplisosmGLMM`` on the spatialscale engine.

    The model is fitted by :func:`spatialscale.glmm_fit` and tested by
    :func:`spatialscale.du_test` (``glmm-score`` / ``glmm-wald`` with
    SPLISOSM's model-based variance) and :func:`spatialscale.sv_test`
    (``glmm-llr``), with SPLISOSM's settings mapped onto the native ones
    (``glmm={...}``).  The native tests fit within their own tasks (a fit and
    its test per batch of genes), so :meth:`fit` records the settings and the
    fitted parameters are computed when first needed (the tests,
    :meth:`get_training_summary`, :attr:`fit_results`); every fit of a gene
    is deterministic and independent of its batch-mates, so they agree.

    Parameters
    ----------
    model_type
        ``glmm-full`` (spatial random effect), ``glmm-null`` or ``glm``.
    share_variance, var_fix_sigma, var_prior_model, var_prior_model_params, init_ratio
        As SPLISOSM's (``glmm={"share_variance": ..., "var_fix_sigma": ...,
        "var_prior": ..., "prior_params": ..., "init_ratio": ...}`` natively).
    fitting_method
        ``joint_gd`` (default, SPLISOSM's Adam), ``joint_newton``,
        ``marginal_gd`` or ``marginal_newton`` (``fit=`` natively).  Ignored
        for ``glm`` (fitted exactly by IWLS, as SPLISOSM's GLM).
    fitting_configs
        ``lr``, ``optim`` (``adam`` or ``sgd``), ``tol``, ``max_epochs``
        (default 500), ``patience``, ``update_nu_every_k``.
    k_neighbors, rho
        The CAR kernel (always standardised, as SPLISOSM's GLMM).
    approx_rank
        Kernel eigenpairs kept (``glmm={"rank": ...}`` natively); left out:
        all up to 5,000 spots, else ``ceil(4 sqrt(n))``; ``None``: all.
    device
        ``cpu`` or ``cuda`` (``mps`` is not offered).
    client, scheduler, store, batch_size, batch_memory
        Where and how the native API runs (see
        :class:`~spatialscale.compat._base.CompatModel`); keyword only.
    """

    _class_name = "SplisosmGLMM"

    def __init__(
        self,
        model_type: Literal["glmm-full", "glmm-null", "glm"] = "glmm-full",
        share_variance: bool = True,
        var_fix_sigma: bool = True,
        var_prior_model: str = "none",
        var_prior_model_params: dict | None = None,
        init_ratio: str = "uniform",
        fitting_method: str = "joint_gd",
        fitting_configs: dict | None = None,
        k_neighbors: int = 4,
        rho: float = 0.99,
        approx_rank: Any = _AUTO_RANK,
        device: Literal["cpu", "cuda", "mps"] = "cpu",
        *,
        client: Any = None,
        scheduler: str | None = None,
        store: str | os.PathLike | None = None,
        batch_size: int | None = None,
        batch_memory: int | str = "256MB",
    ) -> None:
        super().__init__(client=client, scheduler=scheduler, store=store, batch_size=batch_size,
                         batch_memory=batch_memory)
        check_choice("model type", model_type, MODEL_TYPES)
        check_choice("fitting method", fitting_method, FITTING_METHODS)
        check_choice("variance prior model", var_prior_model, ("none", "gamma", "inv_gamma"))
        check_choice("init_ratio", init_ratio, ("observed", "uniform"))
        if device == "mps":
            raise unsupported("device='mps'", "use device='cpu', or 'cuda' on NVIDIA GPU workers.")
        check_choice("device", device, ("cpu", "cuda"))
        # SPLISOSM records fit()'s arguments in this dict: they are fit()'s business here
        configs = {k: v for k, v in (fitting_configs or {}).items() if k not in _FIT_RECORD_KEYS}
        extra = sorted(set(configs) - set(FITTING_CONFIG_KEYS))
        if extra:
            raise InputError(f"unknown fitting_configs key(s) {extra}; choose from {list(FITTING_CONFIG_KEYS)}.")
        if configs.get("optim", "adam") == "lbfgs":
            raise unsupported("fitting_configs['optim']='lbfgs'", "use 'adam' (default) or 'sgd', or the native "
                              "Newton fit: fitting_method='joint_newton' (fit='joint_newton' natively).")
        check_choice("optimizer", configs.get("optim", "adam"), ("adam", "sgd"))
        self._model_type = model_type
        self._model_configs = {"share_variance": share_variance, "var_fix_sigma": var_fix_sigma,
                               "var_prior_model": var_prior_model, "var_prior_model_params": var_prior_model_params,
                               "init_ratio": init_ratio, "fitting_method": fitting_method,
                               "fitting_configs": {"max_epochs": 500, **configs}}
        self._kernel_k_neighbors = k_neighbors
        self._kernel_rho = rho
        self._approx_rank = approx_rank
        self._device = device
        self._is_trained = False
        self._fit_options: dict[str, Any] = {}
        self._fit_results = None

    # ------------------------------------------------------------------ data
    def setup_data(
        self,
        adata: Any,
        *,
        spatial_key: str = "spatial",
        adj_key: str | None = None,
        layer: str = "counts",
        group_iso_by: str = "gene_symbol",
        gene_names: str | list[str] | None = None,
        group_gene_by_n_iso: bool = False,
        design_mtx: Any = None,
        covariate_names: list[str] | None = None,
        min_counts: int = 10,
        min_bin_pct: float = 0.0,
        min_component_size: int = 1,
        coordinates: Any = None,
        client: Any = None,
    ) -> None:
        """Ingest the data into an isoform store (genes with one isoform dropped) and resolve the design.

        Parameters
        ----------
        adata
            An ``AnnData``, or a list of per-gene count matrices with
            ``coordinates`` (see :meth:`spatialscale.compat.SplisosmNP.setup_data`).
        spatial_key, adj_key, layer, group_iso_by, gene_names, design_mtx, covariate_names
            As :meth:`spatialscale.compat.SplisosmNP.setup_data`.
        group_gene_by_n_iso
            Accepted and ignored: the engine always batches genes of equal
            isoform count, and a gene's fit does not depend on its batch.
        min_counts, min_bin_pct, min_component_size
            Isoform and spot filters.
        coordinates, client
            As :meth:`spatialscale.compat.SplisosmNP.setup_data`.
        """
        import anndata as ad

        self._set_execution(client)
        if not isinstance(adata, ad.AnnData):
            if not isinstance(adata, list | tuple):
                raise InputError("`adata` must be an AnnData object (or a list of per-gene count matrices with "
                                 "coordinates=).")
            if gene_names is not None and isinstance(gene_names, str):
                raise InputError("with per-gene count matrices, gene_names is a list of names (one per gene).")
            adata = anndata_from_tensors(adata, coordinates, gene_names)
            layer, group_iso_by, gene_names, spatial_key = "counts", "gene_symbol", None, "spatial"
        elif coordinates is not None:
            raise InputError("coordinates= applies to per-gene count matrices; an AnnData keeps them in "
                             "obsm[spatial_key].")
        if gene_names is not None and not isinstance(gene_names, str):
            raise InputError("gene_names must name an adata.var column.")
        if layer not in adata.layers:
            raise InputError(f"Layer `{layer}` was not found in `adata.layers` (available: {list(adata.layers)}).")
        design, names = resolve_design(adata.obs, design_mtx, covariate_names)
        self._counts_layer = layer
        self._ingest(adata, layer=layer, gene_key=group_iso_by, spatial_key=spatial_key, adj_key=adj_key,
                     min_counts=min_counts, min_bin_pct=min_bin_pct, filter_single_iso_genes=True,
                     min_component_size=min_component_size, k_neighbors=self._kernel_k_neighbors,
                     rho=self._kernel_rho, standardize_cov=True)
        self.adata = adata
        self._spot_mask = spot_mask(adata, self.store)
        self.n_spots = int(self._spot_mask.sum())
        self._set_genes(adata, group_iso_by, gene_names)
        if design is not None:
            design = design[self._spot_mask]
        self._set_design(design, names, self.store.obs().index)
        self._is_trained, self._fit_options, self._fit_results = False, {}, None

    # ------------------------------------------------------------------ settings
    def _rank(self) -> int | None:
        if self._approx_rank is _AUTO_RANK:
            return None
        if self._approx_rank is None:
            return int(self.n_spots)
        rank = int(self._approx_rank)
        if rank < 1:
            raise InputError(f"approx_rank must be a positive number of eigenpairs, got {self._approx_rank!r}.")
        return min(rank, int(self.n_spots))

    def _native(self, model: str | None = None) -> tuple[str | None, dict[str, Any]]:
        """The native ``fit`` and ``glmm`` settings of ``model`` (default: this model's) from SPLISOSM's settings."""
        model = model or self._model_type
        if model == "glm":
            return None, {}
        cfg = self._model_configs
        method = cfg["fitting_method"]
        fitting = {**_METHOD_DEFAULTS.get(method, {}), **cfg["fitting_configs"]}
        glmm: dict[str, Any] = {"share_variance": bool(cfg["share_variance"]),
                                "var_fix_sigma": bool(cfg["var_fix_sigma"]), "var_prior": cfg["var_prior_model"],
                                "init_ratio": cfg["init_ratio"]}
        if cfg["var_prior_model"] != "none" and cfg["var_prior_model_params"]:
            glmm["prior_params"] = dict(cfg["var_prior_model_params"])
        for key in FITTING_CONFIG_KEYS:
            if key in fitting:
                glmm[key] = fitting[key]
        rank = self._rank()
        if rank is not None and model == "glmm-full":
            glmm["rank"] = rank
        return method, glmm

    def _exec(self, print_progress: bool) -> dict[str, Any]:
        return {**self._execution(print_progress), "device": self._device}

    # ------------------------------------------------------------------ fitting
    def fit(
        self,
        n_jobs: int = 1,
        batch_size: int = 1,
        quiet: bool = True,
        print_progress: bool = True,
        with_design_mtx: bool = False,
        from_null: bool = False,
        refit_null: bool = True,
        random_seed: int | None = None,
    ) -> None:
        """Record the fitting settings; the fits run on the engine when first needed.

        Parameters
        ----------
        n_jobs, batch_size, quiet, random_seed
            Accepted and ignored: the engine batches genes itself (a gene's
            fit does not depend on its batch-mates) and its fits are
            deterministic.
        print_progress
            Show the engine's progress bars in later calls.
        with_design_mtx
            Fit the covariates as fixed effects (then the DU test is
            ``method="wald"``; without, ``"score"``).
        from_null
            Prepare the likelihood-ratio SV test: glmm-null and glmm-full are
            fitted each from the other (:func:`spatialscale.sv_test` with
            ``method="glmm-llr"``).
        refit_null
            Must stay ``True`` with ``from_null`` (the native LLR fits always
            refit the null from the full model and keep each gene's better fit).
        """
        self._require_setup()
        if from_null and not refit_null:
            raise unsupported("fit(from_null=True, refit_null=False)", "the native likelihood-ratio test fits "
                              "glmm-null and glmm-full each from the other and keeps each gene's better fits "
                              "(spatialscale.sv_test(store, method='glmm-llr')); use refit_null=True.")
        if from_null and with_design_mtx:
            raise unsupported("fit(from_null=True, with_design_mtx=True)", "the native likelihood-ratio test "
                              "fits no covariates (spatialscale.sv_test(store, method='glmm-llr')).")
        if with_design_mtx and self._design is None:
            raise InputError("with_design_mtx=True needs a design matrix: pass design_mtx= to setup_data().")
        self._native()  # settings checked now, not at the first test
        self._fit_options = {"with_design_mtx": bool(with_design_mtx), "from_null": bool(from_null),
                             "refit_null": bool(refit_null), "print_progress": bool(print_progress)}
        self._model_configs["fitting_configs"].update({k: v for k, v in self._fit_options.items()
                                                       if k != "print_progress"} | {"batch_size": batch_size})
        self._fit_results = None
        self._is_trained = True

    def _require_trained(self) -> None:
        if not self._is_trained:
            raise RuntimeError("Call fit() first.")

    @property
    def fit_results(self) -> Any:
        """The fitted parameters, an :func:`spatialscale.glmm_fit` Dataset (genes in store order).

        Computed on first access (with the random effect ``nu``) and kept.
        """
        from spatialscale.api import glmm_fit

        self._require_trained()
        if self._fit_results is None:
            fit, glmm = self._native()
            cov = self._covariates() if self._fit_options["with_design_mtx"] else None
            self._fit_results = glmm_fit(self.store, model=self._model_type, fit=fit, glmm=glmm or None,
                                         covariates=cov, return_nu=True,
                                         **self._exec(self._fit_options["print_progress"]))
        return self._fit_results

    def get_training_summary(self) -> pd.DataFrame:
        """Per-gene fitting summary (SPLISOSM's columns; indexed by gene).

        ``best_loss`` is the fit's negative log joint likelihood (GLM: log
        likelihood), ``best_epoch`` the epochs (GLM: Newton iterations) the
        gene used; ``fitting_time_s`` is not recorded per gene (NaN).
        """
        ds = self.fit_results
        return pd.DataFrame({"model_type": self._model_type,
                             "converged": self._in_order(ds, "converged").astype(bool),
                             "best_loss": self._in_order(ds, "loss").astype(np.float64),
                             "best_epoch": self._in_order(ds, "epochs").astype(np.int64),
                             "fitting_time_s": np.nan},
                            index=pd.Index(self.gene_names, name="gene", dtype=object))

    def get_fitted_ratios_anndata(self, layer_name: str = "fitted_ratios") -> Any:
        """A copy of :attr:`filtered_adata` with the fitted isoform ratios as layer ``layer_name``."""
        from spatialscale.api import fitted_ratios

        ds = self.fit_results
        out = self.filtered_adata.copy()
        ratios = np.full(out.shape, np.nan, dtype=np.float32)
        col = {name: i for i, name in enumerate(out.var_names.astype(str))}
        iso = self.store.isoforms
        source = (iso["source_name"] if "source_name" in iso.columns else iso.index.to_series()).astype(str)
        design = self._design if self._fit_options["with_design_mtx"] else None
        for key in self._keys:
            cols = [col[s] for s in source[iso["gene"].astype(str) == key]]
            ratios[:, cols] = fitted_ratios(ds, key, design)
        out.layers[layer_name] = ratios
        return out

    def get_fitted_models(self) -> list[Any]:
        """Not offered: the fits are kept as arrays, not torch modules."""
        raise unsupported("get_fitted_models() (torch model objects)", "the fitted parameters are the Dataset "
                          "model.fit_results (spatialscale.glmm_fit(store, return_nu=True)); a gene's fitted "
                          "ratios are spatialscale.fitted_ratios(model.fit_results, gene).")

    def get_gene_model(self, gene_name: str) -> Any:
        """Not offered (see :meth:`get_fitted_models`)."""
        return self.get_fitted_models()

    def __getitem__(self, gene_name: str) -> Any:
        return self.get_fitted_models()

    def save(self, path: str) -> None:
        """Not offered: keep ``model.fit_results`` (an xarray Dataset) with ``.to_zarr(path)``."""
        raise unsupported("save()", "write the fitted parameters with model.fit_results.to_zarr(path), or run "
                          "spatialscale.glmm_fit(store, out=path); read them back with spatialscale.open_results.")

    @staticmethod
    def load(path: str, map_location: str | None = None) -> SplisosmGLMM:
        """Not offered (see :meth:`save`)."""
        raise unsupported("SplisosmGLMM.load()", "read saved fits with spatialscale.open_results(path).")

    # ------------------------------------------------------------------ tests
    def test_spatial_variability(
        self,
        method: str = "llr",
        use_perm_null: bool = False,
        return_results: bool = False,
        print_progress: bool = True,
        n_perms_per_gene: int | None = None,
        **kwargs: Any,
    ) -> dict[str, Any] | None:
        """The likelihood-ratio SV test (:func:`spatialscale.sv_test`, ``method="glmm-llr"``).

        Parameters
        ----------
        method
            ``llr``.
        use_perm_null
            Per-gene permutation null (native ``null="perm-gene"``) instead of
            ``chi2``.
        n_perms_per_gene
            Permutations (default 20; ``n_perms=`` natively).
        return_results, print_progress
            As SPLISOSM's.
        **kwargs
            ``n_jobs`` and ``random_seed`` are accepted and ignored (the
            permutations are seeded); others are an error.

        Returns
        -------
        dict or None
            ``statistic`` (float32), ``pvalue``, ``df``, ``method``,
            ``use_perm_null``, ``pvalue_adj``.
        """
        from spatialscale.api import sv_test
        from spatialscale.stats.multitest import bh_adjust

        check_choice("method", method, ("llr",))
        extra = sorted(set(kwargs) - {"n_jobs", "random_seed", "print_progress"})
        if extra:
            raise InputError(f"unknown argument(s) {extra} of test_spatial_variability.")
        self._require_setup()
        if not self._fit_options.get("from_null"):
            raise InputError("Null models not found. Please run fit() with from_null = True first.")
        fit, glmm = self._native("glmm-full")  # the LLR compares glmm-full with glmm-null whatever model_type is
        kw: dict[str, Any] = {"null": "chi2"}
        if use_perm_null:
            kw = {"null": "perm-gene", "n_perms": 20 if n_perms_per_gene is None else int(n_perms_per_gene)}
        ds = sv_test(self.store, method="glmm-llr", fit=fit, glmm=glmm or None, **kw, **self._exec(print_progress))
        stat = self._in_order(ds, "sv_statistic")
        pval = self._in_order(ds, "sv_pvalue").astype(np.float64)
        df = np.ones(self.n_genes, dtype=np.int64) if glmm.get("share_variance", True) \
            else np.asarray(self.n_isos_per_gene, dtype=np.int64) - 1
        self._sv_test_results = {"statistic": stat.astype(np.float32), "pvalue": pval, "df": df, "method": method,
                                 "use_perm_null": bool(use_perm_null), "pvalue_adj": bh_adjust(pval)}
        return self._sv_test_results if return_results else None

    def test_differential_usage(
        self,
        method: Literal["score", "wald"] = "score",
        print_progress: bool = True,
        return_results: bool = False,
    ) -> dict[str, Any] | None:
        """Score or Wald DU tests (:func:`spatialscale.du_test`, ``glmm-score`` / ``glmm-wald``).

        With SPLISOSM's model-based variance (native ``glmm={"variance": "model"}``;
        the native default ``robust`` is calibrated under overdispersion).

        Parameters
        ----------
        method
            ``score`` (models fitted without the design) or ``wald`` (with it).
        print_progress, return_results
            As SPLISOSM's.

        Returns
        -------
        dict or None
            ``statistic`` (torch float32, ``(n_genes, n_factors)``),
            ``pvalue`` (torch float64), ``method``, ``pvalue_adj`` (numpy).
        """
        import torch

        from spatialscale.api import du_test
        from spatialscale.stats.multitest import bh_adjust

        if self._design is None:
            raise InputError("No design matrix is provided. Run setup_data() first.")
        check_choice("method", method, ("wald", "score"))
        if not self._is_trained:
            raise InputError("Fitted full models not found. Run fit() first.")
        with_design = self._fit_options.get("with_design_mtx", False)
        if method == "score" and with_design:
            raise InputError("Design matrix is included in the fitted models. Perhaps you want to use the wald "
                             "test. Otherwise please run fit() with with_design_mtx = False.")
        if method == "wald" and not with_design:
            raise InputError("Design matrix is not included in the fitted models. Perhaps you want to use the "
                             "score test. Otherwise please run fit() with with_design_mtx = True.")
        fit, glmm = self._native()
        ds = du_test(self.store, self._covariates(), method=f"glmm-{method}", model=self._model_type, fit=fit,
                     glmm={**glmm, "variance": "model"}, **self._exec(print_progress))
        stat = np.nan_to_num(self._in_order(ds, "du_statistic"), nan=0.0)
        pval = self._in_order(ds, "du_pvalue")
        pval = np.where(np.isfinite(pval), pval, 1.0)
        self._du_test_results = {"statistic": torch.from_numpy(stat.astype(np.float32)),
                                 "pvalue": torch.from_numpy(pval.astype(np.float64)), "method": method,
                                 "pvalue_adj": bh_adjust(pval, axis=0)}
        return self._du_test_results if return_results else None

    def _summary_lines(self) -> list[str]:
        cfg = self._model_configs
        return super()._summary_lines() + [
            "=== Model configurations", f"- Model type: {self._model_type}",
            f"- Mutual neighbors K: {self._kernel_k_neighbors}", f"- Spatial autocorrelation rho: {self._kernel_rho}",
            f"- Learnable variance: {not cfg['var_fix_sigma']}", f"- Same variance across classes: "
            f"{cfg['share_variance']}", f"- Prior on total variance: {cfg['var_prior_model']}",
            f"- Initialization method: {cfg['init_ratio']}", "=== Fitting configurations",
            f"- Trained: {self._is_trained}", f"- Fitting method: {cfg['fitting_method']}",
            f"- Parameters: {cfg['fitting_configs']}"]
