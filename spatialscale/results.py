"""Results as xarray Datasets: the variable registry, assembly and zarr I/O."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.errors import InputError
from spatialscale.output import open_results

__all__ = ["VARIABLES", "GENE_SUMMARY_VARIABLES", "ISOFORM_SUMMARY_VARIABLES", "UNS_KEY", "input_order", "make_dataset",
           "open_results", "to_anndata", "var_columns", "write_anndata_copy"]

#: name -> (dims, description); one registry for every result variable
VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "sv_statistic": (("gene",), "HSIC spatial-variability statistic tr(Y'HKHY)/(n-1)^2"),
    "sv_pvalue": (("gene",), "spatial-variability p-value"),
    "sv_pvalue_adj": (("gene",), "Benjamini-Hochberg adjusted sv_pvalue over genes"),
    "n_isoforms": (("gene",), "isoforms of the gene kept after filtering"),
    "n_spots_used": (("gene",), "spots entering the gene's test"),
    "du_statistic": (("gene", "covariate"), "differential-usage statistic"),
    "du_pvalue": (("gene", "covariate"), "differential-usage p-value"),
    "du_pvalue_adj": (("gene", "covariate"), "Benjamini-Hochberg adjusted du_pvalue over genes, per covariate"),
    "intercept": (("gene", "contrast"),
                  "fitted intercept of logit k = log(p_k / p_last); NaN past the gene's isoforms"),
    "beta": (("gene", "covariate", "contrast"), "fitted covariate coefficients on the logits"),
    "sigma": (("gene", "component"), "random-effect total standard deviation"),
    "theta": (("gene", "component"), "spatial share of the random-effect variance"),
    "converged": (("gene",), "the gene's fit stopped by its own convergence rule"),
    "loss": (("gene",), "best negative log joint likelihood (GLM: negative log likelihood)"),
    "epochs": (("gene",), "optimiser epochs (GLM: Newton iterations) used by the gene"),
    "nu": (("gene", "spot", "contrast"), "fitted random effect (only on request)"),
    # cohorts (spatialscale.cohort.run_cohort): per gene (and covariate for DU), over the sections that tested it
    "combined_pvalue": (("gene",), "p-value combining the sections where the gene was tested (attribute combine)"),
    "combined_pvalue_adj": (("gene",), "Benjamini-Hochberg adjusted combined_pvalue over genes"),
    "n_sections_tested": (("gene",), "sections where the gene was tested"),
    "n_sections_significant": (("gene",), "sections where the gene's adjusted p-value is below 0.05"),
    "group_combined_pvalue": (("group", "gene"), "combined_pvalue over the sections of each group (attribute "
                                                 "group_by names the manifest column)"),
    "group_combined_pvalue_adj": (("group", "gene"), "Benjamini-Hochberg adjusted group_combined_pvalue over genes"),
    "group_n_sections_tested": (("group", "gene"), "sections of the group where the gene was tested"),
    "group_n_sections_significant": (("group", "gene"), "sections of the group where the gene's adjusted p-value "
                                                        "is below 0.05"),
    # feature summaries (SPLISOSM's extract_feature_summary; spatialscale.stats.summary)
    "gene_n_isos": (("gene",), "isoforms of the gene (SPLISOSM n_isos)"),
    "gene_perplexity": (("gene",), "exp(entropy) of the gene's pooled isoform usage: effective number of isoforms"),
    "gene_pct_bin_on": (("gene",), "fraction of spots where the gene has any count"),
    "gene_count_avg": (("gene",), "mean gene count per spot, over all spots"),
    "gene_count_std": (("gene",), "standard deviation (ddof=0) of the gene count per spot, over all spots"),
    "gene_major_ratio_avg": (("gene",), "pooled usage ratio of the gene's major isoform (max of iso_ratio_total)"),
    "iso_pct_bin_on": (("isoform",), "fraction of spots where the isoform has any count"),
    "iso_count_total": (("isoform",), "total count of the isoform"),
    "iso_count_avg": (("isoform",), "mean isoform count per spot, over all spots"),
    "iso_count_std": (("isoform",), "standard deviation (ddof=0) of the isoform count per spot, over all spots"),
    "iso_ratio_total": (("isoform",), "pooled usage: isoform total count / gene total count"),
    "iso_ratio_avg": (("isoform",), "mean per-spot usage ratio over the spots where the gene has counts"),
    "iso_ratio_std": (("isoform",), "standard deviation (ddof=0) of the per-spot usage ratio over the spots "
                                    "where the gene has counts"),
}

#: gene-level feature summaries (dimension ``gene``)
GENE_SUMMARY_VARIABLES = ("gene_n_isos", "gene_perplexity", "gene_pct_bin_on", "gene_count_avg", "gene_count_std",
                          "gene_major_ratio_avg")
#: isoform-level feature summaries (dimension ``isoform``)
ISOFORM_SUMMARY_VARIABLES = ("iso_pct_bin_on", "iso_count_total", "iso_count_avg", "iso_count_std", "iso_ratio_total",
                             "iso_ratio_avg", "iso_ratio_std")


def make_dataset(genes: list[str] | np.ndarray, data: dict[str, np.ndarray], attrs: dict[str, Any],
                 covariates: list[str] | None = None, extra_coords: dict[str, Any] | None = None) -> xr.Dataset:
    """Build a results Dataset from registry variables.

    Parameters
    ----------
    genes
        Gene names (the ``gene`` coordinate).
    covariates
        Covariate names (the ``covariate`` coordinate of DU results).
    data
        Variable name -> array; each name must be in :data:`VARIABLES`.
    attrs
        Provenance attributes (flat, JSON-serialisable).
    """
    variables = {}
    for name, values in data.items():
        dims, doc = VARIABLES[name]
        variables[name] = xr.Variable(dims, np.asarray(values), attrs={"description": doc})
    coords = {"gene": np.asarray(genes, dtype=str)}
    if covariates is not None:
        coords["covariate"] = np.asarray(covariates, dtype=str)
    coords.update(extra_coords or {})
    ds = xr.Dataset(variables, coords=coords)
    ds.attrs.update(attrs)
    return ds


# --------------------------------------------------------------------------- back into AnnData
#: ``adata.uns`` key of what spatialscale wrote into an AnnData
UNS_KEY = "spatialscale"
#: entry of ``uns/spatialscale`` that only :func:`write_anndata_copy` writes: the copy's source
COPY_MARK = "annotated_copy_of"


def var_columns(ds: xr.Dataset, var: Any, gene_key: str) -> dict[str, np.ndarray]:
    """Results as ``var`` columns, one value per isoform row of ``var``.

    Gene-level variables (dimension ``gene``) give each isoform row its
    gene's value; DU variables (``gene x covariate``) one column per
    covariate, ``<variable>_<covariate>``; isoform-level summaries
    (``isoform``) go to their own rows.  Rows of genes (isoforms) without a
    result get NaN; booleans become floats (1.0 / 0.0) so that NaN fits.

    Parameters
    ----------
    ds
        A results Dataset of one section.
    var
        The AnnData's ``var`` (isoform rows).
    gene_key
        The ``var`` column naming each isoform's gene.
    """
    import pandas as pd

    if gene_key not in var.columns:
        raise InputError(f"var has no column {gene_key!r} naming each isoform's gene (columns: "
                         f"{list(var.columns)}); pass gene_key=.")
    gene_of = pd.Index(ds["gene"].values.astype(str)).get_indexer(var[gene_key].astype(str).to_numpy())
    iso_of = (pd.Index(ds["isoform"].values.astype(str)).get_indexer(var.index.astype(str))
              if "isoform" in ds.dims else None)
    out: dict[str, np.ndarray] = {}
    for name, da in ds.data_vars.items():
        values = da.values.astype(np.float64) if da.dtype == bool else da.values
        if not np.issubdtype(values.dtype, np.number):
            continue
        if da.dims == ("gene",):
            out[str(name)] = _take(values, gene_of)
        elif da.dims == ("gene", "covariate"):
            for j, cov in enumerate(ds["covariate"].values.astype(str)):
                out[f"{name}_{cov}"] = _take(values[:, j], gene_of)
        elif da.dims == ("isoform",) and iso_of is not None:
            out[str(name)] = _take(values, iso_of)
    return out


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]`` with NaN where ``index`` is -1 (not found)."""
    out = np.full(len(index), np.nan)
    found = index >= 0
    out[found] = values[index[found]]
    return out


def to_anndata(ds: xr.Dataset | str | Any, adata: Any, *, gene_key: str | None = None, overwrite: bool = False,
               copy: bool = False) -> Any:
    """Write per-gene results into ``adata.var`` and the run's provenance into ``adata.uns``.

    Parameters
    ----------
    ds
        A results Dataset of one section (or the path of results written with
        ``out=``), from :func:`~spatialscale.sv_test`, :func:`~spatialscale.du_test`,
        :func:`~spatialscale.glmm_fit` or :func:`~spatialscale.feature_summary`.
    adata
        The AnnData the results are about (isoforms as ``var`` rows).
    gene_key
        The ``var`` column naming each isoform's gene; default: the one the
        store was ingested with (the results' ``gene_key`` attribute).
    overwrite
        Replace ``var`` columns that exist already and that spatialscale did not
        write (columns it wrote before, listed in ``adata.uns["spatialscale"]``,
        are always replaced).
    copy
        Annotate and return a copy instead of ``adata`` itself.

    Returns
    -------
    anndata.AnnData
        The annotated AnnData: ``var`` gains a column per result variable
        (see :func:`var_columns`); ``uns["spatialscale"][<test>]`` holds the
        run's attributes as a JSON string and the names of the columns written.

    Raises
    ------
    InputError
        Results of several sections (a cohort), a missing ``gene_key``, no
        gene in common, or existing columns of the user's.
    """
    import json

    if not (hasattr(adata, "var") and hasattr(adata, "uns")):
        raise InputError(f"to_anndata writes into an AnnData object, got {type(adata).__name__}; for an AnnData "
                         "file, write an annotated copy with write_anndata_copy(ds, source, dest) (--anndata-out).")
    if not isinstance(ds, xr.Dataset):
        ds = open_results(ds)
    if "section" in ds.dims:
        raise InputError("these results span several sections (a cohort); write one section's results into its "
                         "AnnData: to_anndata(ds.sel(section=...), adata).")
    gene_key = gene_key or str(ds.attrs.get("gene_key", "gene_symbol"))
    columns = var_columns(ds, adata.var, gene_key)
    gene_vars = [c for c in columns if c in ds.data_vars and ds[c].dims == ("gene",)]
    if gene_vars and np.isnan(columns[gene_vars[0]]).all():
        raise InputError(f"none of the results' genes is in var[{gene_key!r}] of this AnnData (results: "
                         f"{', '.join(map(str, ds['gene'].values[:3]))}...); is it the AnnData the store came from?")
    uns = dict(adata.uns.get(UNS_KEY, {})) if isinstance(adata.uns.get(UNS_KEY, {}), dict) else {}
    uns.pop(COPY_MARK, None)  # annotated in memory, it is the user's: only write_anndata_copy marks its files
    ours = {c for entry in uns.values() if isinstance(entry, dict) for c in entry.get("columns", [])}
    theirs = [c for c in columns if c in adata.var.columns and c not in ours]
    if theirs and not overwrite:
        raise InputError(f"var already has column(s) {', '.join(map(repr, theirs[:3]))} that spatialscale did not "
                         "write; pass overwrite=True (--overwrite) to replace them.")
    target = adata.copy() if copy else adata
    for name, values in columns.items():
        target.var[name] = values
    test = str(ds.attrs.get("test", ds.attrs.get("model", "results")))
    attrs = {k: (v.tolist() if isinstance(v, np.ndarray | np.generic) else v) for k, v in ds.attrs.items()}
    uns[test] = {"attrs": json.dumps(attrs, default=str), "columns": list(columns)}
    target.uns[UNS_KEY] = uns
    return target


def input_order(ds: xr.Dataset, genes: Any, *, gene_key: str | None = None) -> xr.Dataset:
    """The results with their genes in the input's order (results come in the store's batch order).

    Parameters
    ----------
    ds
        A results Dataset.
    genes
        The input AnnData (genes in order of first appearance in
        ``var[gene_key]``), an :class:`~spatialscale.store.IsoformStore` (the
        order of the AnnData it was ingested from), or a sequence of gene names.
    gene_key
        With an AnnData: its gene column (default: the results' ``gene_key``).

    Returns
    -------
    xarray.Dataset
        ``ds`` reindexed along ``gene``: the input's genes that have results,
        in input order.
    """
    import pandas as pd

    if hasattr(genes, "isoforms") and hasattr(genes, "genes"):  # an isoform store
        iso = genes.isoforms
        if "source_index" not in iso.columns:
            raise InputError(f"{genes.path} predates the input order record; pass the input AnnData instead.")
        names = iso.sort_values("source_index", kind="stable")["gene"].astype(str)
    elif hasattr(genes, "var") and hasattr(genes, "obs"):  # an AnnData
        key = gene_key or str(ds.attrs.get("gene_key", "gene_symbol"))
        if key not in genes.var.columns:
            raise InputError(f"var has no column {key!r} naming each isoform's gene; pass gene_key=.")
        names = genes.var[key].astype(str)
    else:
        names = pd.Series([str(g) for g in genes])
    order = pd.unique(names.to_numpy())
    have = set(ds["gene"].values.astype(str))
    return ds.sel(gene=[g for g in order if g in have])


def check_anndata_target(source: str | os.PathLike, dest: str | os.PathLike, *, overwrite: bool) -> tuple[Path, Path]:
    """Validate an annotated copy's source and destination before a run (nothing is written).

    ``source`` must be an AnnData file (``.h5ad``) or zarr folder, ``dest`` a new
    path of the same format beside it or elsewhere, or, with ``overwrite``, an
    annotated copy spatialscale wrote before (it holds ``uns/spatialscale``).
    The input itself is never a destination.

    Returns
    -------
    tuple of Path
        The absolute source and destination.
    """
    src, out = Path(os.path.abspath(source)), Path(os.path.abspath(dest))
    if not src.exists():
        raise InputError(f"the AnnData {src} to annotate does not exist.")
    kind = "h5ad" if src.is_file() else "zarr"
    if kind == "zarr" and not (src / "var").is_dir():
        raise InputError(f"{src} is not an AnnData (.h5ad file or AnnData zarr folder) to annotate.")
    if out == src or src in out.parents or out in src.parents:
        raise InputError(f"the annotated copy {out} would overwrite or nest in the input {src}; choose a new path.")
    if (out.suffix == ".h5ad") != (kind == "h5ad"):
        raise InputError(f"the annotated copy keeps the input's format: name it *.{kind} (got {out.name}).")
    if out.exists():
        if not overwrite:
            raise InputError(f"{out} already exists; pass overwrite=True (--overwrite) to replace it.")
        if not _annotated_by_us(out):
            raise InputError(f"{out} exists and is no AnnData that spatialscale annotated; spatialscale never "
                             "replaces what it did not write: choose another path.")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {out.parent} (missing or permission denied).")
    return src, out


def _annotated_by_us(path: Path) -> bool:
    """Whether ``path`` is an AnnData that :func:`write_anndata_copy` wrote (``uns/spatialscale`` holds its mark).

    An AnnData the user annotated with :func:`to_anndata` and saved has ``uns/spatialscale`` too, but
    not the mark: it is the user's file and is never replaced.
    """
    try:
        with _anndata_root(path, "r") as root:
            return "uns" in root and UNS_KEY in root["uns"] and COPY_MARK in root["uns"][UNS_KEY]
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


@contextlib.contextmanager
def _anndata_root(path: Path, mode: str) -> Iterator[Any]:
    """The root group of an ``.h5ad`` file (h5py) or AnnData zarr folder."""
    if path.is_file():
        import h5py

        with h5py.File(path, mode) as f:
            yield f
    else:
        import zarr

        if mode == "r":
            yield zarr.open_group(str(path), mode="r")
            return
        # edit without the consolidated metadata, then consolidate it again as anndata writes it
        yield zarr.open_group(str(path), mode=mode, use_consolidated=False)
        zarr.consolidate_metadata(str(path))


def write_anndata_copy(ds: xr.Dataset, source: str | os.PathLike, dest: str | os.PathLike, *,
                       overwrite: bool = False) -> Path:
    """Write a copy of the AnnData file ``source`` to ``dest`` with the results in ``var`` and ``uns``.

    Only ``var`` and ``uns/spatialscale`` of the copy are rewritten (see
    :func:`to_anndata`); counts and everything else are copied as files, never
    loaded. The copy is written beside ``dest`` and moved into place at the
    end; a failure leaves ``dest`` as it was.

    Parameters
    ----------
    ds
        Results of one section.
    source, dest
        See :func:`check_anndata_target`.
    overwrite
        Replace an earlier annotated copy at ``dest``, and ``var`` columns of
        the source that spatialscale did not write.

    Returns
    -------
    Path
        ``dest``.
    """
    import anndata as ad
    from anndata.io import read_elem, write_elem

    src, out = check_anndata_target(source, dest, overwrite=overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if src.is_file():
            shutil.copyfile(src, tmp)
        else:
            shutil.copytree(src, tmp)
        with _anndata_root(tmp, "r+") as root:
            light = ad.AnnData(var=read_elem(root["var"]))
            if "uns" in root and UNS_KEY in root["uns"]:
                light.uns[UNS_KEY] = read_elem(root["uns"][UNS_KEY])
            to_anndata(ds, light, overwrite=overwrite)
            light.uns[UNS_KEY][COPY_MARK] = str(src)
            write_elem(root, "var", light.var)
            uns = root["uns"] if "uns" in root else root.create_group("uns")
            write_elem(uns, UNS_KEY, light.uns[UNS_KEY])
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:  # the earlier annotated copy, checked as ours just before
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink()
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
        raise
    return out
