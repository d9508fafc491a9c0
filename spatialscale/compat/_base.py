"""What the SPLISOSM-compatible classes share: the temporary store, gene order, design matrices, result tables.

A compat object ingests the data given to ``setup_data`` into an isoform store
(a temporary folder it owns, or the ``store=`` path), runs the native API
(:mod:`spatialscale.api`) on it and rearranges the answers into SPLISOSM
1.2.0's layout: genes in SPLISOSM's order (the order in which their first
kept isoform appears in ``adata.var``), display names, result dictionaries
with SPLISOSM's keys, array types and dtypes, and the same DataFrames.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from spatialscale.covariates import one_hot
from spatialscale.errors import InputError
from spatialscale.output import TemporaryFolder

__all__ = ["CompatModel", "UnsupportedAttribute", "anndata_from_tensors", "resolve_design", "unsupported"]


class UnsupportedAttribute(InputError, AttributeError):
    """A SPLISOSM attribute the compat classes do not keep (also an ``AttributeError``, so ``hasattr`` is False)."""


def unsupported(what: str, alternative: str) -> InputError:
    """The error for a SPLISOSM option the engine does not offer, naming what to use instead."""
    return InputError(f"spatialscale.compat does not support {what}; {alternative}")


def _as_2d_float32(values: Any) -> np.ndarray:
    """A dense float32 ``(n, F)`` copy of an array, tensor or sparse matrix (rounded as SPLISOSM stores designs)."""
    import scipy.sparse

    if scipy.sparse.issparse(values):
        values = values.toarray()
    elif hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu()
        values = values.to_dense() if values.is_sparse else values
        values = values.numpy()
    arr = np.asarray(values, dtype=np.float32)
    return arr[:, None] if arr.ndim == 1 else arr


def resolve_design(obs: pd.DataFrame, design_mtx: Any, covariate_names: Sequence[str] | None,
                   tables: Any = None) -> tuple[np.ndarray | None, list[str] | None]:
    """SPLISOSM's design matrix and covariate names from ``setup_data``'s ``design_mtx`` argument.

    Parameters
    ----------
    obs
        The spots' annotations (``adata.obs``), one row per input spot.
    design_mtx
        ``None``; an obs column name or a list of them (categorical and text
        columns one-hot, every level kept, named ``<column>_<level>``; others
        as numbers); a DataFrame (its columns name the covariates); an array,
        tensor or sparse matrix (``factor_1``, ``factor_2``...); or, with
        ``tables`` (SpatialData tables), the name of a table whose ``X`` is
        the design (its variables name the covariates).
    covariate_names
        Names that replace the inferred ones (one per column).
    tables
        ``sdata.tables`` for :class:`~spatialscale.compat.SplisosmFFT`.

    Returns
    -------
    design, names
        ``(n_spots, F)`` float64 values rounded through float32 (SPLISOSM keeps
        designs in float32), and the covariate names; ``None, None`` without
        a design.
    """
    if design_mtx is None:
        return None, None
    n = len(obs)
    if isinstance(design_mtx, str) and tables is not None and design_mtx in tables:
        table = tables[design_mtx]
        if table.n_obs != n:
            raise InputError(f"design table {design_mtx!r} has {table.n_obs} observations but the isoform table "
                             f"has {n}.")
        values, names = _as_2d_float32(table.X), [str(v) for v in table.var_names]
    elif isinstance(design_mtx, str) or (isinstance(design_mtx, list) and design_mtx
                                         and all(isinstance(c, str) for c in design_mtx)):
        columns = [design_mtx] if isinstance(design_mtx, str) else list(design_mtx)
        missing = [c for c in columns if c not in obs.columns]
        if missing:
            raise InputError(f"design_mtx column(s) {missing} not found in adata.obs (available: "
                             f"{list(obs.columns)}).")
        parts, names = [], []
        for c in columns:
            col = obs[c]
            if isinstance(col.dtype, pd.CategoricalDtype) or col.dtype.kind == "O":
                dummies = one_hot(col, c)
                parts.append(dummies.to_numpy(dtype=np.float32))
                names += [str(v) for v in dummies.columns]
            else:
                parts.append(col.to_numpy(dtype=np.float32).reshape(-1, 1))
                names.append(str(c))
        values = np.concatenate(parts, axis=1)
    elif isinstance(design_mtx, pd.DataFrame):
        values, names = _as_2d_float32(design_mtx.to_numpy()), [str(c) for c in design_mtx.columns]
    else:
        try:
            values = _as_2d_float32(design_mtx)
        except (TypeError, ValueError) as exc:
            raise InputError(f"design_mtx of type {type(design_mtx).__name__} is not numeric ({exc}).") from None
        names = None
    if values.ndim != 2 or values.shape[0] != n:
        raise InputError(f"the design matrix has {values.shape[0]} rows but there are {n} spots.")
    if covariate_names is not None:
        if len(covariate_names) != values.shape[1]:
            raise InputError(f"covariate_names has {len(covariate_names)} names but the design matrix has "
                             f"{values.shape[1]} columns.")
        names = [str(c) for c in covariate_names]
    elif names is None:
        names = [f"factor_{i + 1}" for i in range(values.shape[1])]
    std = values.std(axis=0)
    for i in np.flatnonzero(std < 1e-5):
        warnings.warn(f"Covariate '{names[i]}' has near-zero variance (std < 1e-5); the differential-usage tests "
                      "will refuse it. Consider removing it.", UserWarning, stacklevel=3)
    return values.astype(np.float64), names


def anndata_from_tensors(data: Sequence[Any], coordinates: Any, gene_names: Sequence[str] | None) -> Any:
    """An AnnData of per-gene count matrices (the tensor form of ``setup_data``).

    Each gene's isoforms become variables ``<gene>_iso<k>`` with ``var["gene_symbol"]``
    naming the gene, counts in ``layers["counts"]`` (sparse if any input is),
    coordinates in ``obsm["spatial"]`` and spots named ``spot_<i>``.
    """
    import anndata as ad
    import scipy.sparse

    if coordinates is None:
        raise InputError("setup_data from per-gene count tensors needs coordinates= (n_spots x 2), the spots' "
                         "positions.")
    if len(data) == 0:
        raise InputError("setup_data got an empty list of per-gene counts.")
    if gene_names is None:
        gene_names = [f"gene_{i + 1}" for i in range(len(data))]
    if isinstance(gene_names, str) or len(gene_names) != len(data):
        raise InputError(f"gene_names must list one name per count matrix ({len(data)}), got {gene_names!r}.")
    if len(set(map(str, gene_names))) != len(gene_names):
        raise InputError("gene_names must be unique.")
    blocks, sparse = [], False
    for g in data:
        if hasattr(g, "detach"):  # torch: sparse tensors to scipy, dense to numpy
            g = g.detach().cpu()
            if g.is_sparse:
                g = g.coalesce()
                idx = g.indices().numpy()
                g = scipy.sparse.csr_matrix((g.values().numpy(), (idx[0], idx[1])), shape=tuple(g.shape))
            else:
                g = g.numpy()
        if scipy.sparse.issparse(g):
            sparse = True
            blocks.append(scipy.sparse.csr_matrix(g, dtype=np.float64))
        else:
            g = np.asarray(g, dtype=np.float64)
            blocks.append(g[:, None] if g.ndim == 1 else g)
    n = {b.shape[0] for b in blocks}
    if len(n) != 1:
        raise InputError(f"the per-gene count matrices have different numbers of spots ({sorted(n)}).")
    counts = scipy.sparse.hstack(blocks, format="csr") if sparse else np.concatenate(blocks, axis=1)
    xy = np.asarray(coordinates.detach().cpu().numpy() if hasattr(coordinates, "detach") else coordinates,
                    dtype=np.float64)
    if xy.shape[0] != counts.shape[0]:
        raise InputError(f"coordinates have {xy.shape[0]} rows but the counts have {counts.shape[0]} spots.")
    genes = [str(gene_names[i]) for i, b in enumerate(blocks) for _ in range(b.shape[1])]
    iso = [f"{str(gene_names[i])}_iso{k}" for i, b in enumerate(blocks) for k in range(b.shape[1])]
    obs = pd.DataFrame(index=[f"spot_{i}" for i in range(counts.shape[0])])
    adata = ad.AnnData(obs=obs, var=pd.DataFrame({"gene_symbol": genes}, index=iso))
    adata.layers["counts"] = counts
    adata.obsm["spatial"] = xy
    return adata


class CompatModel:
    """Shared machinery of the compat classes (not for direct use).

    Parameters
    ----------
    client, scheduler
        Where the native API runs (see :func:`spatialscale.sv_test`): a
        ``distributed.Client``, or a scheduler address / scheduler file /
        ``"threads"``; with neither, the active Dask client if any, else
        local threads.
    store
        Where to write the isoform store of ``setup_data``; by default a
        temporary folder owned by the object and removed by :meth:`close`
        (also on garbage collection and at the end of a ``with`` block).  On
        a cluster whose workers do not share this machine's temporary folder,
        name a path on a shared file system.
    batch_size, batch_memory
        The native API's batching (results do not depend on them).
    """

    _class_name = "Splisosm"

    def __init__(self, *, client: Any = None, scheduler: str | None = None, store: str | os.PathLike | None = None,
                 batch_size: int | None = None, batch_memory: int | str = "256MB") -> None:
        self._client = client
        self._scheduler = scheduler
        self._store_path = None if store is None else Path(store)
        self._batch_size = batch_size
        self._batch_memory = batch_memory
        self._tmpdir: TemporaryFolder | None = None
        self.store = None  # the IsoformStore of setup_data
        self.adata = None
        self.n_genes: int | None = None
        self.n_spots: int | None = None
        self.n_isos_per_gene: list[int] | None = None
        self.n_factors: int | None = None
        self.gene_names: list[str] | None = None
        self.covariate_names: list[str] | None = None
        self.design_mtx = None
        self._design: np.ndarray | None = None  # float64, store spot order
        self._design_frame: pd.DataFrame | None = None
        self._keys: list[str] = []  # store gene names (group_iso_by values) in SPLISOSM order
        self._iso_names: list[str] = []  # kept isoforms in SPLISOSM order
        self._spot_mask: np.ndarray | None = None
        self._counts_layer = "counts"
        self._group_iso_by = "gene_symbol"
        self._gene_summary: pd.DataFrame | None = None
        self._isoform_summary: pd.DataFrame | None = None
        self._filtered_adata = None
        self._sv_test_results: dict[str, Any] = {}
        self._du_test_results: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Remove the temporary isoform store (a ``store=`` path is kept)."""
        if self._tmpdir is not None:
            self._tmpdir.cleanup()
            self._tmpdir = None
            self.store = None

    def __enter__(self) -> CompatModel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ execution
    def _set_execution(self, client: Any) -> None:
        if client is not None:
            self._client = client

    def _execution(self, print_progress: bool = False) -> dict[str, Any]:
        """The native API's execution keywords."""
        return {"client": self._client, "scheduler": self._scheduler, "batch_size": self._batch_size,
                "batch_memory": self._batch_memory, "progress": bool(print_progress)}

    def _require_setup(self) -> None:
        if self.store is None:
            raise RuntimeError("no data set up yet: call setup_data() before testing or summarising.")

    # ------------------------------------------------------------------ ingest
    def _ingest(self, source: Any, **kwargs: Any) -> Any:
        """Ingest ``source`` into this object's store (replacing the previous one)."""
        from spatialscale.store import ingest

        replace = False
        if self._store_path is not None:
            path = self._store_path
            # a named store is replaced only where this object wrote it; any other is the user's to remove
            replace = self.store is not None and Path(self.store.path).resolve() == Path(path).resolve()
        else:
            self.close()
            self._tmpdir = TemporaryFolder("compat")  # removed by close(), or at a later start if killed
            path = self._tmpdir.path / "store.zarr"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*autosharding.*")
            self.store = ingest(source, path, overwrite=replace, progress=False, **kwargs)
        return self.store

    def _set_genes(self, adata: Any, group_iso_by: str, gene_names: str | None) -> None:
        """Gene order, display names and isoform counts from the store, in SPLISOSM's order."""
        store = self.store
        iso = store.isoforms
        kept = pd.Index((iso["source_name"] if "source_name" in iso.columns else iso.index.to_series()).astype(str))
        var_names = pd.Index(adata.var_names.astype(str))
        mask = var_names.isin(kept)
        keys = adata.var[group_iso_by].astype(str).to_numpy()[mask]
        names = var_names[mask]
        order = list(pd.unique(keys))  # SPLISOSM: groups in order of first appearance
        by_gene = pd.Series(np.arange(len(keys))).groupby(keys, sort=False).apply(list)
        self._iso_names = [str(names[i]) for g in order for i in by_gene[g]]
        if gene_names is not None:
            if gene_names not in adata.var.columns:
                raise InputError(f"`gene_names` column '{gene_names}' was not found in `adata.var`.")
            display = adata.var[gene_names].astype(str).to_numpy()[mask]
            self.gene_names = [str(display[by_gene[g][0]]) for g in order]
        else:
            self.gene_names = [str(g) for g in order]
        self._keys = order
        n_iso = store.genes["n_isoforms"]
        self.n_isos_per_gene = [int(n_iso.loc[g]) for g in order]
        self.n_genes = len(order)
        self._group_iso_by = group_iso_by
        self._gene_summary = self._isoform_summary = None
        self._filtered_adata = None
        self._sv_test_results, self._du_test_results = {}, {}

    def _set_design(self, design: np.ndarray | None, names: list[str] | None, spot_index: pd.Index) -> None:
        """Keep the design (rows of the stored spots) for the native API and SPLISOSM's ``design_mtx``."""
        import torch

        if design is None:
            self._design, self._design_frame = None, None
            self.design_mtx, self.n_factors, self.covariate_names = None, 0, None
            return
        self._design = design
        self._design_frame = pd.DataFrame(design, index=spot_index, columns=pd.Index(names, dtype=object))
        self.design_mtx = torch.from_numpy(design.astype(np.float32))
        self.n_factors, self.covariate_names = design.shape[1], list(names)

    def _covariates(self) -> pd.DataFrame:
        """The design as the native API takes it (a DataFrame indexed by the store's spot names)."""
        if self._design_frame is None:
            raise InputError("no design matrix: pass design_mtx= to setup_data() before testing differential "
                             "usage.")
        if self._design_frame.columns.duplicated().any():
            raise InputError(f"covariate names {list(self._design_frame.columns)} repeat; pass distinct "
                             "covariate_names= to setup_data().")
        return self._design_frame

    def _in_order(self, ds: Any, name: str) -> np.ndarray:
        """A result variable of a native Dataset, genes in SPLISOSM's order."""
        return np.asarray(ds[name].sel(gene=self._keys).values)

    # ------------------------------------------------------------------ SPLISOSM's accessors
    @property
    def sv_test_results(self) -> dict[str, Any]:
        """The spatial-variability results (SPLISOSM's ``_sv_test_results``): keys as SPLISOSM's."""
        return self._sv_test_results

    @property
    def du_test_results(self) -> dict[str, Any]:
        """The differential-usage results (SPLISOSM's ``_du_test_results``): keys as SPLISOSM's."""
        return self._du_test_results

    @property
    def filtered_adata(self) -> Any:
        """The input AnnData restricted to the kept spots and isoforms, isoforms in the tests' gene order."""
        self._require_setup()
        if self._filtered_adata is None:
            adata = self.adata if self._spot_mask is None or self._spot_mask.all() else self.adata[self._spot_mask]
            self._filtered_adata = adata[:, self._iso_names].copy()
        return self._filtered_adata

    @property
    def sp_kernel(self) -> Any:
        """Not kept: the kernel lives in the isoform store."""
        raise UnsupportedAttribute(str(unsupported("the sp_kernel object", "the spatial kernel lives in the isoform "
                                                   "store: model.store.precision() (CAR precision) or "
                                                   "model.store.eigenpairs().")))

    def extract_feature_summary(self, level: Literal["gene", "isoform"] = "gene",
                                print_progress: bool = True) -> pd.DataFrame:
        """Gene- or isoform-level feature summaries (SPLISOSM's ``extract_feature_summary``).

        Parameters
        ----------
        level
            ``"gene"``: one row per gene (index ``gene``, display names;
            ``n_isos``, ``perplexity``, ``pct_bin_on``, ``count_avg``,
            ``count_std``, ``major_ratio_avg``); ``"isoform"``: one row per
            kept isoform (the ``adata.var`` columns, then ``pct_bin_on``,
            ``count_total``, ``count_avg``, ``count_std``, ``ratio_total``,
            ``ratio_avg``, ``ratio_std``).
        print_progress
            Show a progress bar of the engine's batches.

        Returns
        -------
        pandas.DataFrame
            Cached after the first call.
        """
        if level not in ("gene", "isoform"):
            raise InputError("`level` must be one of 'gene' or 'isoform'.")
        self._require_setup()
        if self._gene_summary is None or self._isoform_summary is None:
            self._compute_summaries(print_progress)
        return self._gene_summary if level == "gene" else self._isoform_summary

    def _summary_arrays(self, print_progress: bool) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Gene-level arrays (genes in SPLISOSM order) and isoform-level arrays (isoforms in SPLISOSM order)."""
        from spatialscale.api import feature_summary
        from spatialscale.stats.summary import GENE_SUMMARIES, ISOFORM_SUMMARIES

        ds = feature_summary(self.store, **self._execution(print_progress))
        genes = {k: self._in_order(ds, f"gene_{k}") for k in GENE_SUMMARIES}
        isos = ds[[f"iso_{k}" for k in ISOFORM_SUMMARIES]].sel(isoform=self._iso_names)
        return genes, {k: np.asarray(isos[f"iso_{k}"].values) for k in ISOFORM_SUMMARIES}

    def _compute_summaries(self, print_progress: bool) -> None:
        from spatialscale.stats.summary import GENE_SUMMARIES, ISOFORM_SUMMARIES

        genes, isos = self._summary_arrays(print_progress)
        gene_df = pd.DataFrame({k: genes[k] for k in GENE_SUMMARIES},
                               index=pd.Index(self.gene_names, name="gene", dtype=object))
        gene_df["n_isos"] = gene_df["n_isos"].astype(np.int64)
        self._gene_summary = gene_df
        var = self._summary_var().loc[self._iso_names].copy()
        stats = pd.DataFrame({k: np.asarray(isos[k], dtype=np.float64) for k in ISOFORM_SUMMARIES}, index=var.index)
        self._isoform_summary = pd.concat([var, stats], axis=1)

    def _summary_var(self) -> pd.DataFrame:
        """The ``var`` table the isoform summary starts from."""
        return self.filtered_adata.var

    def get_formatted_test_results(self, test_type: Literal["sv", "du"],
                                   with_gene_summary: bool = False) -> pd.DataFrame:
        """Test results as SPLISOSM's DataFrame.

        Parameters
        ----------
        test_type
            ``"sv"``: one row per gene, columns ``gene``, ``statistic``,
            ``pvalue``, ``pvalue_adj``; ``"du"``: one row per gene x covariate
            (genes outer), with ``covariate`` after ``gene``.
        with_gene_summary
            Append the gene-level feature summaries (a left join on ``gene``).

        Returns
        -------
        pandas.DataFrame
            With a default ``RangeIndex``, as SPLISOSM's.
        """
        if test_type not in ("sv", "du"):
            raise InputError("test_type must be 'sv' or 'du'.")
        if test_type == "sv":
            res = self._sv_test_results
            if not res:
                raise InputError("No spatial variability results. Run test_spatial_variability() first.")
            df = pd.DataFrame({"gene": self.gene_names, "statistic": np.asarray(res["statistic"]),
                               "pvalue": np.asarray(res["pvalue"]), "pvalue_adj": np.asarray(res["pvalue_adj"])})
        else:
            res = self._du_test_results
            if not res:
                raise InputError("No differential usage results. Run test_differential_usage() first.")
            names = self.covariate_names if self.covariate_names else [f"factor_{i}" for i in range(self.n_factors)]
            df = pd.DataFrame({
                "gene": np.repeat(self.gene_names, self.n_factors),
                "covariate": np.tile(names, self.n_genes),
                "statistic": np.asarray(res["statistic"]).reshape(-1),
                "pvalue": np.asarray(res["pvalue"]).reshape(-1),
                "pvalue_adj": np.asarray(res["pvalue_adj"]).reshape(-1),
            })
        if with_gene_summary:
            df = df.merge(self.extract_feature_summary("gene", print_progress=False), left_on="gene",
                          right_index=True, how="left")
        return df

    # ------------------------------------------------------------------ display
    def _status(self, results: dict[str, Any]) -> str:
        return f"Completed ({results['method']})" if results else "N/A"

    def _summary_lines(self) -> list[str]:
        avg = f"{np.mean(self.n_isos_per_gene):.1f}" if self.n_isos_per_gene else "N/A"
        return [f"=== {self._class_name} (spatialscale.compat)", f"- Number of genes: {self.n_genes}",
                f"- Number of spots: {self.n_spots}", f"- Number of covariates: {self.n_factors}",
                f"- Average isoforms per gene: {avg}",
                f"- Isoform store: {self.store.path if self.store is not None else 'N/A'}"]

    def __str__(self) -> str:
        return "\n".join(self._summary_lines() + ["=== Test results",
                                                  f"- Spatial variability: {self._status(self._sv_test_results)}",
                                                  f"- Differential usage: {self._status(self._du_test_results)}"])

    __repr__ = __str__


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    """SPLISOSM's validation of a string option (``InputError``, a ``ValueError``)."""
    if value not in choices:
        raise InputError(f"Invalid {name} {value!r}. Must be one of {list(choices)}.")


def spot_mask(adata: Any, store: Any) -> np.ndarray:
    """Which of ``adata``'s spots the store kept (all, unless small graph components were dropped)."""
    kept = pd.Index(store.obs().index.astype(str))
    return pd.Index(adata.obs_names.astype(str)).isin(kept)


def power_sums_for(n_spots: int) -> str:
    """SPLISOSM's kernel cumulants: exact up to 5,000 spots, its 60 seeded Hutchinson probes above."""
    return "exact" if n_spots <= 5000 else "hutchinson"


def component_spots(adata: Any, spatial_key: str, adj_key: str | None, k_neighbors: int,
                    min_component_size: int) -> int:
    """Spots left after dropping graph components smaller than ``min_component_size`` (as ingest does)."""
    if min_component_size <= 1:
        return int(adata.n_obs)
    import scipy.sparse.csgraph

    from spatialscale.kernel import knn_adjacency, symmetrise_adjacency

    if adj_key is not None:
        if adj_key not in adata.obsp:
            return int(adata.n_obs)  # ingest names the missing key
        graph = symmetrise_adjacency(adata.obsp[adj_key])
    else:
        if spatial_key not in adata.obsm:
            return int(adata.n_obs)
        graph = knn_adjacency(np.asarray(adata.obsm[spatial_key], dtype=np.float64), int(k_neighbors))
    _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
    return int((np.bincount(labels)[labels] >= min_component_size).sum())
