"""``SplisosmFFT`` on the engine: HSIC tests on a raster store (``ingest(kernel="fft")``)."""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import pandas as pd

from spatialscale.compat._base import CompatModel, check_choice, resolve_design
from spatialscale.compat._np import DU_METHODS, RESIDUALIZE, TRANSFORMATIONS, gp_options
from spatialscale.errors import InputError

__all__ = ["SplisosmFFT"]


class SplisosmFFT(CompatModel):
    """SPLISOSM 1.2.0's ``SplisosmFFT`` on the spatialscale engine.

    ``setup_data`` ingests the SpatialData table into a raster store
    (:func:`spatialscale.ingest` with ``kernel="fft"``: the periodic CAR
    kernel of the bins' bounding grid, bins located by ``row_key`` /
    ``col_key``); the tests run on :func:`spatialscale.sv_test` and
    :func:`spatialscale.du_test`.

    Spatial-variability tests run over the whole grid (bins without data as
    zero counts), as SplisosmFFT.  Differential-usage tests run over the
    observed bins (SplisosmFFT's grid fills unobserved bins with the mean):
    on a fully observed grid the two agree; with empty bins the native
    statistics leave the empty bins out.

    Parameters
    ----------
    rho
        CAR spatial autocorrelation, in ``[0, 1)``.
    neighbor_degree
        Rings of neighbours of the CAR graph.
    spacing
        Bin spacing ``(dy, dx)`` in kernel units (``grid_spacing=`` natively).
    workers
        Accepted and ignored (``scipy.fft`` threads: the engine sizes its tasks).
    client, scheduler, store, batch_size, batch_memory
        Where and how the native API runs (see
        :class:`~spatialscale.compat._base.CompatModel`); keyword only.
    """

    _class_name = "SplisosmFFT"

    def __init__(self, rho: float = 0.99, neighbor_degree: int = 1, spacing: tuple[float, float] = (1.0, 1.0),
                 workers: int | None = None, *, client: Any = None, scheduler: str | None = None,
                 store: str | os.PathLike | None = None, batch_size: int | None = None,
                 batch_memory: int | str = "256MB") -> None:
        super().__init__(client=client, scheduler=scheduler, store=store, batch_size=batch_size,
                         batch_memory=batch_memory)
        self._rho = float(rho)
        self._neighbor_degree = int(neighbor_degree)
        self._spacing = tuple(float(v) for v in spacing)
        self._workers = workers
        self.n_grid = 0
        self.sdata = None

    def setup_data(
        self,
        sdata: Any,
        bins: str,
        table_name: str,
        col_key: str,
        row_key: str,
        layer: str = "counts",
        group_iso_by: str = "gene_symbol",
        gene_names: str | None = None,
        min_counts: int = 10,
        min_bin_pct: float = 0.0,
        filter_single_iso_genes: bool = True,
        design_mtx: Any = None,
        covariate_names: list[str] | None = None,
        *,
        client: Any = None,
    ) -> None:
        """Ingest a SpatialData table of binned isoform counts into a raster store.

        Parameters
        ----------
        sdata
            A ``SpatialData`` object (or anything with a ``tables`` mapping).
        bins
            The bins' shapes element (checked when ``sdata`` has shapes; the
            grid comes from ``row_key`` / ``col_key``).
        table_name
            The table in ``sdata.tables``.
        col_key, row_key
            Integer obs columns of each bin's column and row.
        layer, group_iso_by, gene_names, min_counts, min_bin_pct, filter_single_iso_genes
            As SPLISOSM's.
        design_mtx, covariate_names
            Covariates: a table name of ``sdata.tables`` (its ``X``), obs
            column name(s) of the isoform table, or an array / DataFrame with
            one row per bin of the table.
        client
            A ``distributed.Client`` for this and later calls.
        """
        self._set_execution(client)
        tables = getattr(sdata, "tables", None)
        if tables is None:
            raise InputError("`sdata` must provide a `tables` attribute.")
        if table_name not in tables:
            raise InputError(f"Table `{table_name}` was not found in `sdata.tables`.")
        shapes = getattr(sdata, "shapes", None)
        if shapes is not None and len(shapes) and bins not in shapes:
            raise InputError(f"bins {bins!r} was not found in sdata.shapes (available: {list(shapes)}).")
        adata = tables[table_name]
        if layer not in adata.layers:
            raise InputError(f"Layer `{layer}` was not found in the AnnData table.")
        for col in (row_key, col_key):
            if col not in adata.obs.columns:
                raise InputError(f"`{col}` was not found in `adata.obs`.")
        design, names = resolve_design(adata.obs, design_mtx, covariate_names, tables=tables)
        self._counts_layer = layer
        self._ingest(adata, layer=layer, gene_key=group_iso_by, min_counts=min_counts, min_bin_pct=min_bin_pct,
                     filter_single_iso_genes=filter_single_iso_genes, kernel="fft", grid_keys=(row_key, col_key),
                     grid_spacing=self._spacing, rho=self._rho, neighbor_degree=self._neighbor_degree)
        self.sdata, self.adata = sdata, adata
        self._spot_mask = np.ones(adata.n_obs, dtype=bool)
        self.n_spots = int(adata.n_obs)
        self.n_grid = int(self.store.n_spots)
        self._set_genes(adata, group_iso_by, gene_names)
        self._set_design(design, names, self.store.obs().index)

    def test_spatial_variability(
        self,
        method: Literal["hsic-ir", "hsic-ic", "hsic-gc"] = "hsic-ir",
        ratio_transformation: Literal["none", "clr", "ilr", "alr", "radial"] = "none",
        chunk_size: int | Literal["auto"] = "auto",
        n_jobs: int = -1,
        return_results: bool = False,
        print_progress: bool = True,
    ) -> dict[str, Any] | None:
        """Test every gene for spatial variability over the grid (:func:`spatialscale.sv_test`).

        Parameters
        ----------
        method
            ``hsic-ir``, ``hsic-ic`` or ``hsic-gc``.
        ratio_transformation
            As SPLISOSM's (``transformation=`` natively).
        chunk_size, n_jobs
            Accepted and ignored (the engine batches genes by memory).
        return_results, print_progress
            As SPLISOSM's.

        Returns
        -------
        dict or None
            ``statistic``, ``pvalue``, ``pvalue_adj``, ``method``,
            ``null_method`` (``liu``), ``use_perm_null``, ``chunk_size``.
        """
        from spatialscale.api import sv_test

        self._require_setup()
        check_choice("method", method, ("hsic-ir", "hsic-ic", "hsic-gc"))
        check_choice("ratio transformation", ratio_transformation, TRANSFORMATIONS)
        kw = {"transformation": ratio_transformation} if method == "hsic-ir" else {}
        ds = sv_test(self.store, method=method, null="liu", **kw, **self._execution(print_progress))
        self._sv_test_results = {
            "statistic": self._in_order(ds, "sv_statistic").astype(np.float64),
            "pvalue": self._in_order(ds, "sv_pvalue").astype(np.float64),
            "pvalue_adj": self._in_order(ds, "sv_pvalue_adj").astype(np.float64),
            "method": method, "null_method": "liu", "use_perm_null": False, "chunk_size": chunk_size,
        }
        return self._sv_test_results if return_results else None

    def test_differential_usage(
        self,
        method: Literal["hsic", "hsic-gp", "t-fisher", "t-tippett"] = "hsic-gp",
        ratio_transformation: Literal["none", "clr", "ilr", "alr", "radial"] = "none",
        gpr_configs: dict[str, Any] | None = None,
        residualize: Literal["cov_only", "both"] = "cov_only",
        n_jobs: int = -1,
        return_results: bool = False,
        print_progress: bool = True,
    ) -> dict[str, Any] | None:
        """Test every gene x covariate pair for differential usage (:func:`spatialscale.du_test`).

        Parameters
        ----------
        method
            ``hsic-gp`` (default; the grid GP, native ``gp`` backend ``fft``),
            ``hsic``, ``t-fisher`` or ``t-tippett`` (binary covariates).
        ratio_transformation, residualize
            As SPLISOSM's.
        gpr_configs
            ``{"covariate": {...}, "isoform": {...}}``: ``length_scale`` and
            ``constant_value_bounds`` (``constant_value`` only at 1,
            ``length_scale_bounds`` only ``"fixed"``; keys SplisosmFFT
            ignores are ignored).
        n_jobs
            Accepted and ignored.
        return_results, print_progress
            As SPLISOSM's.

        Returns
        -------
        dict or None
            ``statistic``, ``pvalue``, ``pvalue_adj`` (float64,
            ``(n_genes, n_factors)``; ``t-tippett``'s statistic is
            ``-log10`` of the smallest isoform p-value, as SplisosmFFT), ``method``.
        """
        from spatialscale.api import du_test
        from spatialscale.stats.multitest import bh_adjust

        self._require_setup()
        if self._design is None:
            raise RuntimeError("No design matrix found. Pass `design_mtx` to setup_data() before calling "
                               "test_differential_usage().")
        check_choice("method", method, DU_METHODS)
        check_choice("residualize", residualize, RESIDUALIZE)
        check_choice("ratio_transformation", ratio_transformation, TRANSFORMATIONS)
        kw: dict[str, Any] = {"nan_filling": "none" if method.startswith("t-") else "mean"}
        if method == "hsic-gp":
            gp = gp_options(gpr_configs, n_spots=None, residualize=residualize, grid=True)
            kw.update(residualize=residualize, gp={"backend": "fft", **gp})
        ds = du_test(self.store, self._covariates(), method=method, transformation=ratio_transformation, **kw,
                     **self._execution(print_progress))
        stat = self._in_order(ds, "du_statistic").astype(np.float64)
        pval = self._in_order(ds, "du_pvalue").astype(np.float64)
        if method == "t-tippett":
            stat = -np.log10(stat + 1e-300)
        self._du_test_results = {"statistic": stat, "pvalue": pval, "pvalue_adj": bh_adjust(pval, axis=0),
                                 "method": method}
        return self._du_test_results if return_results else None

    def _summary_var(self) -> pd.DataFrame:
        return self.adata.var

    @property
    def filtered_adata(self) -> Any:
        """The isoform table restricted to the kept isoforms (every bin)."""
        self._require_setup()
        if self._filtered_adata is None:
            self._filtered_adata = self.adata[:, self._iso_names]
        return self._filtered_adata

    def _summary_arrays(self, print_progress: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Feature summaries over the observed bins (as SplisosmFFT), computed here batch by batch."""
        from spatialscale.stats.summary import GENE_SUMMARIES, ISOFORM_SUMMARIES, summary_batch
        from spatialscale.store import read_count_columns

        genes = self.store.genes
        gene_out = {k: np.empty(len(genes)) for k in GENE_SUMMARIES}
        iso_out = {k: np.empty(int(genes["n_isoforms"].sum())) for k in ISOFORM_SUMMARIES}
        n_obs = self.store.n_observed
        step = max(1, (1 << 24) // max(n_obs, 1))  # ~128 MB of float64 columns per read
        rows = np.flatnonzero(np.r_[True, np.diff(genes["n_isoforms"].to_numpy()) != 0, True])
        for a, b in zip(rows[:-1], rows[1:]):  # runs of genes of equal isoform count
            p = int(genes["n_isoforms"].iloc[a])
            for s in range(a, b, max(1, step // p)):
                e = min(b, s + max(1, step // p))
                c0, c1 = int(genes["start"].iloc[s]), int(genes["stop"].iloc[e - 1])
                flat = read_count_columns(self.store.path, c0, c1, grid=False)
                gene, iso = summary_batch(flat.reshape(n_obs, e - s, p).transpose(1, 0, 2))
                for k in GENE_SUMMARIES:
                    gene_out[k][s:e] = gene[k]
                for k in ISOFORM_SUMMARIES:
                    iso_out[k][c0:c1] = np.asarray(iso[k]).reshape(-1)
        order = pd.Index(genes.index).get_indexer(self._keys)
        iso = self.store.isoforms
        source = pd.Index((iso["source_name"] if "source_name" in iso.columns else iso.index.to_series()).astype(str))
        iso_order = source.get_indexer(self._iso_names)
        return ({k: v[order] for k, v in gene_out.items()}, {k: v[iso_order] for k, v in iso_out.items()})

    def _summary_lines(self) -> list[str]:
        lines = super()._summary_lines()
        lines.insert(3, f"- Number of spots after rasterization: {self.n_grid}")
        return lines + ["=== Model configurations", f"- Neighborhood degree: {self._neighbor_degree}",
                        f"- Spatial autocorrelation rho: {self._rho}"]

