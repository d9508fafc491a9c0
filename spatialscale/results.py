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

__all__ = ["VARIABLES", "GENE_SUMMARY_VARIABLES", "ISOFORM_SUMMARY_VARIABLES", "UNS_KEY", "dataset_from_anndata",
           "gene_table", "input_order", "make_dataset", "open_results", "result_key", "result_keys", "to_anndata",
           "write_anndata_copy"]

#: name -> (dims, description); one registry for every result variable
VARIABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "sv_statistic": (("gene",), "HSIC spatial-variability statistic tr(Y'HKHY)/(n-1)^2"),
    "sv_pvalue": (("gene",), "spatial-variability p-value"),
    "sv_pvalue_adj": (("gene",), "Benjamini-Hochberg adjusted sv_pvalue over genes"),
    "sv_effect": (("gene",), "effect size ranking genes across sections: HSIC tests, the RV coefficient of the "
                             "responses and the kernel less its null mean (about 0 without SV, at most 1); "
                             "glmm-llr, 1 - exp(-LLR / n) (likelihood-ratio R^2)"),
    # kernel ensembles (sv_test(kernels=[...])): per gene and kernel of the ensemble (coordinate kernel: its spec)
    "sv_kernel": (("gene",), "kernel ensemble: index along kernel of the kernel with the smallest p-value, whose "
                             "statistic and effect are sv_statistic and sv_effect (sv_pvalue: Cauchy combination)"),
    "kernel_statistic": (("gene", "kernel"), "kernel ensemble: each kernel's HSIC statistic tr(Y'HK_cHY)/(n-1)^2"),
    "kernel_pvalue": (("gene", "kernel"), "kernel ensemble: each kernel's p-value (its own null mixture)"),
    "kernel_effect": (("gene", "kernel"), "kernel ensemble: each kernel's effect (RV coefficient less its null mean)"),
    "n_isoforms": (("gene",), "isoforms of the gene kept after filtering"),
    "n_spots_used": (("gene",), "spots entering the gene's test"),
    "du_statistic": (("gene", "covariate"), "differential-usage statistic"),
    "du_pvalue": (("gene", "covariate"), "differential-usage p-value"),
    "du_pvalue_adj": (("gene", "covariate"), "Benjamini-Hochberg adjusted du_pvalue over genes, per covariate"),
    "du_effect": (("gene", "covariate"), "effect size of the kernel DU tests (hsic, hsic-gp): the RV coefficient "
                                         "||Y'Z_c||_F^2 / sqrt(tr((Y'Y)^2) tr((Z_c'Z_c)^2)) of the isoform ratios and "
                                         "the covariate's columns less its mean under independence, "
                                         "tr(Y'Y) tr(Z_c'Z_c) / ((n-1) sqrt(...)) (about 0 without DU, at most 1)"),
    "intercept": (("gene", "contrast"),
                  "fitted intercept of logit k = log(p_k / p_last); NaN past the gene's isoforms"),
    "beta": (("gene", "covariate", "contrast"), "fitted covariate coefficients on the logits"),
    "sigma": (("gene", "component"), "random-effect total standard deviation"),
    "theta": (("gene", "component"), "spatial share of the random-effect variance"),
    "converged": (("gene",), "the gene's fit stopped by its own convergence rule"),
    "loss": (("gene",), "best negative log joint likelihood (GLM: negative log likelihood)"),
    "epochs": (("gene",), "optimiser epochs (GLM: Newton iterations) used by the gene"),
    "nu": (("gene", "spot", "contrast"), "fitted random effect (only on request)"),
    # cohorts (spatialscale.designs.cohort_run): per gene (and covariate for DU), over the sections that tested it
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
    # cohorts with compare= (spatialscale.stats.compare): per gene (x covariate), sections as the replicates
    "compare_statistic": (("gene",), "F statistic of the levels of the manifest column in attribute compare, from a "
                                     "linear model of the sections' effects (attribute compare_test)"),
    "compare_pvalue": (("gene",), "p-value of compare_statistic (F test of the level terms)"),
    "compare_pvalue_adj": (("gene",), "Benjamini-Hochberg adjusted compare_pvalue over genes (per covariate)"),
    "compare_effect": (("level", "gene"), "mean section effect (sv_effect / du_effect) per level; with donors, the "
                                          "mean of the donors' means within the level"),
    # cohorts with min_sections= (spatialscale.stats.combine.partial_conjunction)
    "replicated_pvalue": (("gene",), "partial-conjunction p-value: the gene has the effect in at least "
                                     "min_sections of the sections that tested it (NaN if tested in fewer)"),
    "replicated_pvalue_adj": (("gene",), "Benjamini-Hochberg adjusted replicated_pvalue over genes"),
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


#: result variable -> column of the gene table (the test's prefix dropped, as in squidpy's ``uns["moranI"]``)
_TABLE_NAMES = {"sv_statistic": "statistic", "sv_pvalue": "pvalue", "sv_pvalue_adj": "pvalue_adj",
                "du_statistic": "statistic", "du_pvalue": "pvalue", "du_pvalue_adj": "pvalue_adj"}
_TESTS = {"spatial_variability": "sv", "differential_usage": "du"}


def result_key(ds: xr.Dataset) -> str:
    """The default ``key_added`` of a results Dataset: ``spatialscale_<test>_<method>``.

    ``spatialscale_sv_hsic-ir``, ``spatialscale_du_hsic-gp``, ``spatialscale_du_glmm-score``;
    GLMM fits ``spatialscale_fit_<model>``, feature summaries ``spatialscale_summary``.
    """
    attrs = ds.attrs
    if attrs.get("test") in _TESTS:
        return f"spatialscale_{_TESTS[attrs['test']]}_{attrs.get('method', 'results')}"
    if "summary" in attrs:
        return "spatialscale_summary"
    if "model" in attrs:
        return f"spatialscale_fit_{attrs['model']}"
    return "spatialscale_results"


def _flat(da: xr.DataArray, skip: tuple[str, ...]) -> dict[str, np.ndarray]:
    """A variable as columns: one per label of each dimension beside ``skip`` (``beta_region_0``...)."""
    extra = [d for d in da.dims if d not in skip]
    da = da.transpose(*skip, *extra)
    if not extra:
        return {str(da.name): da.values}
    out = {}
    for index in np.ndindex(*[da.sizes[d] for d in extra]):
        labels = [str(da[d].values[i]) for d, i in zip(extra, index)]
        out["_".join([str(da.name), *labels])] = da.values[(slice(None),) * len(skip) + index]
    return out


def gene_table(ds: xr.Dataset) -> Any:
    """The results as a gene-level ``pandas.DataFrame`` (scverse style, as squidpy's ``uns["moranI"]``).

    SV results: one row per gene (indexed by gene), columns ``statistic``,
    ``pvalue``, ``pvalue_adj``, then the other per-gene variables with their
    dtypes (``n_isoforms`` and ``n_spots_used`` integers).  DU results: one
    row per gene and covariate (index ``<gene>:<covariate>``) with columns
    ``gene`` and ``covariate`` first; per-gene variables repeat on each of the
    gene's rows.  Variables with further dimensions (a GLMM's ``beta`` over
    contrasts, ``sigma`` over components) become one column per label
    (``beta_<contrast>``; ``beta_<covariate>_<contrast>`` for a fit).
    Isoform-level variables and per-spot ones (``nu``) are not in the table.
    """
    import pandas as pd

    if "section" in ds.dims:
        raise InputError("these results span several sections (a cohort); make a table of one section: "
                         "gene_table(ds.sel(section=...)).")
    genes = ds["gene"].values.astype(str)
    long = "covariate" in ds.dims and any("covariate" in da.dims for name, da in ds.data_vars.items()
                                          if str(name).startswith("du_"))
    skip = ("gene", "covariate") if long else ("gene",)
    columns: dict[str, np.ndarray] = {}
    for name, da in ds.data_vars.items():
        if "gene" not in da.dims or "isoform" in da.dims or "spot" in da.dims:
            continue
        if long and "covariate" not in da.dims:
            da = da.expand_dims(covariate=ds["covariate"].values)
        da = da.rename(_TABLE_NAMES.get(str(name), str(name)))
        for col, values in _flat(da, skip).items():
            columns[col] = values.reshape(-1) if not long else values.reshape(len(genes), -1).T.reshape(-1)
    first = ["statistic", "pvalue", "pvalue_adj"]
    order = [c for c in first if c in columns] + [c for c in columns if c not in first]
    if not long:
        return pd.DataFrame({c: columns[c] for c in order}, index=pd.Index(genes, name="gene"))
    covs = ds["covariate"].values.astype(str)
    described = {str(c): np.repeat(ds[c].values.astype(str), len(genes)) for c in ds.coords
                 if c != "covariate" and ds[c].dims == ("covariate",)}  # covariate_reference, covariate_encoding
    frame = pd.DataFrame({"gene": np.tile(genes, len(covs)), "covariate": np.repeat(covs, len(genes)),
                          **described, **{c: columns[c] for c in order}})
    frame.index = pd.Index(frame["gene"] + ":" + frame["covariate"], name="test")
    return frame


def _isoform_columns(ds: xr.Dataset, var: Any, key: str) -> dict[str, np.ndarray]:
    """Isoform-level variables (feature summaries) as ``var`` columns ``<key>_<variable>`` (NaN where absent)."""
    import pandas as pd

    if "isoform" not in ds.dims:
        return {}
    iso_of = pd.Index(ds["isoform"].values.astype(str)).get_indexer(var.index.astype(str))
    return {f"{key}_{name}": _take(np.asarray(da.values, dtype=np.float64), iso_of)
            for name, da in ds.data_vars.items() if da.dims == ("isoform",)}


def _take(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """``values[index]`` with NaN where ``index`` is -1 (not found)."""
    out = np.full(len(index), np.nan)
    found = index >= 0
    out[found] = values[index[found]]
    return out


def _plain_params(attrs: dict[str, Any]) -> dict[str, Any]:
    """Run attributes as values h5ad and zarr can write: numbers, text, booleans and lists of one type."""
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        if isinstance(v, np.ndarray | np.generic):
            v = v.tolist()
        if v is None:
            continue
        if isinstance(v, dict):
            v = _plain_params(v)
        elif isinstance(v, list | tuple):
            kinds = {type(x) for x in v}
            v = list(v) if len(kinds) == 1 and kinds <= {str, int, float, bool} else [str(x) for x in v]
        elif not isinstance(v, str | int | float | bool):
            v = str(v)
        out[str(k)] = v
    return out


def to_anndata(ds: xr.Dataset | str | Any, adata: Any, *, key_added: str | None = None, gene_key: str | None = None,
               overwrite: bool = False, copy: bool = False) -> Any:
    """Write results into an AnnData the scverse way: a gene table in ``uns[key_added]``.

    Parameters
    ----------
    ds
        A results Dataset of one section (or the path of results written with
        ``out=``), from :func:`~spatialscale.sv_test`, :func:`~spatialscale.du_test`,
        :func:`~spatialscale.glmm_fit` or :func:`~spatialscale.feature_summary`.
    adata
        The AnnData the results are about (isoforms as ``var`` rows).
    key_added
        Where the results go; default :func:`result_key` (``spatialscale_sv_hsic-ir``...),
        so results of another test or method get their own key.
    gene_key
        The ``var`` column naming each isoform's gene, to check that the
        results belong to this AnnData; default: the one the store was
        ingested with (the results' ``gene_key`` attribute).
    overwrite
        Replace a ``uns`` entry or ``var`` columns that exist already and that
        spatialscale did not write (what it wrote under the same key before is
        always replaced).
    copy
        Annotate and return a copy instead of ``adata`` itself.

    Returns
    -------
    anndata.AnnData
        The annotated AnnData:

        - ``uns[key_added]``: the gene table (:func:`gene_table`; SV: one row
          per gene, ``statistic``, ``pvalue``, ``pvalue_adj``, ``n_isoforms``...;
          DU: one row per gene and covariate),
        - ``var["<key_added>_<variable>"]``: isoform-level variables only
          (feature summaries' ``iso_*``), NaN for isoforms without results,
        - ``uns["spatialscale"][key_added]``: provenance, a mapping with
          ``params`` (the run's attributes: test, method, options, kernel,
          version, the input it read) and ``var_columns``.

    Raises
    ------
    InputError
        Results of several sections (a cohort), a missing ``gene_key``, no
        gene in common, or an existing entry or column of the user's.
    """
    if not (hasattr(adata, "var") and hasattr(adata, "uns")):
        raise InputError(f"to_anndata writes into an AnnData object, got {type(adata).__name__}; for an AnnData "
                         "file, write an annotated copy with write_anndata_copy(ds, source, dest) (--anndata-out).")
    if not isinstance(ds, xr.Dataset):
        ds = open_results(ds)
    if "section" in ds.dims:
        raise InputError("these results span several sections (a cohort); write one section's results into its "
                         "AnnData: to_anndata(ds.sel(section=...), adata).")
    key = key_added or result_key(ds)
    if not isinstance(key, str) or not key or "/" in key:
        raise InputError(f"key_added must be a non-empty name without '/', got {key!r}.")
    if key == UNS_KEY:
        raise InputError(f"key_added={UNS_KEY!r} is where spatialscale keeps provenance; choose another key.")
    gene_key = gene_key or str(ds.attrs.get("gene_key", "gene_symbol"))
    if gene_key not in adata.var.columns:
        raise InputError(f"var has no column {gene_key!r} naming each isoform's gene (columns: "
                         f"{list(adata.var.columns)}); pass gene_key=.")
    table = gene_table(ds)
    genes = set(adata.var[gene_key].astype(str))
    if len(ds["gene"]) and not genes.intersection(ds["gene"].values.astype(str)):
        raise InputError(f"none of the results' genes is in var[{gene_key!r}] of this AnnData (results: "
                         f"{', '.join(map(str, ds['gene'].values[:3]))}...); is it the AnnData the store came from?")
    columns = _isoform_columns(ds, adata.var, key)
    uns = dict(adata.uns.get(UNS_KEY, {})) if isinstance(adata.uns.get(UNS_KEY, {}), dict) else {}
    uns.pop(COPY_MARK, None)  # annotated in memory, it is the user's: only write_anndata_copy marks its files
    ours = {c for entry in uns.values() if isinstance(entry, dict)
            for c in [*entry.get("var_columns", []), *entry.get("columns", [])]}
    if key in adata.uns and key not in uns and not overwrite:
        raise InputError(f"uns already has an entry {key!r} that spatialscale did not write; pass key_added= "
                         "another name, or overwrite=True (--overwrite) to replace it.")
    theirs = [c for c in columns if c in adata.var.columns and c not in ours]
    if theirs and not overwrite:
        raise InputError(f"var already has column(s) {', '.join(map(repr, theirs[:3]))} that spatialscale did not "
                         "write; pass overwrite=True (--overwrite) to replace them.")
    target = adata.copy() if copy else adata
    old = uns.get(key, {}) if isinstance(uns.get(key), dict) else {}
    for name in old.get("var_columns", []):  # this key's earlier columns: replaced by this run's
        if name not in columns and name in target.var.columns:
            del target.var[name]
    for name, values in columns.items():
        target.var[name] = values
    target.uns[key] = table
    uns[key] = {"params": _plain_params(dict(ds.attrs)), "var_columns": list(columns)}
    target.uns[UNS_KEY] = uns
    return target


def result_keys(adata: Any) -> list[str]:
    """The ``key_added`` of every spatialscale result in ``adata`` (``uns`` entries with provenance)."""
    uns = adata.uns.get(UNS_KEY, {})
    if not hasattr(uns, "items"):
        return []
    return [str(k) for k, v in uns.items() if hasattr(v, "get") and "params" in v and k in adata.uns]


def dataset_from_anndata(adata: Any, key: str | None = None) -> xr.Dataset:
    """The results Dataset back from an AnnData annotated by :func:`to_anndata`.

    Parameters
    ----------
    adata
        The annotated AnnData (in memory, or read back from ``.h5ad`` / zarr).
    key
        The ``key_added`` of the results; may be left out when there is one.

    Returns
    -------
    xarray.Dataset
        The variables of the run's Dataset (``sv_pvalue``, ``du_pvalue`` over
        ``gene`` x ``covariate``...) from the gene table, isoform-level ones from
        ``var``, and the run's attributes.
    """
    import pandas as pd

    keys = result_keys(adata)
    if key is None:
        if len(keys) != 1:
            raise InputError(f"the AnnData holds {len(keys)} spatialscale results ({', '.join(keys) or 'none'}); "
                             "name one with key=." if keys else "the AnnData holds no spatialscale results; "
                             "add them with spatialscale.to_anndata(ds, adata).")
        key = keys[0]
    if key not in keys:
        raise InputError(f"the AnnData has no spatialscale results {key!r} (results: {', '.join(keys) or 'none'}).")
    entry = adata.uns[UNS_KEY][key]
    params = dict(entry["params"])
    table = adata.uns[key]
    if not isinstance(table, pd.DataFrame):
        raise InputError(f"uns[{key!r}] is not the gene table spatialscale wrote (a {type(table).__name__}).")
    prefix = _TESTS.get(str(params.get("test")), "")
    rename = {v: f"{prefix}_{v}" for v in ("statistic", "pvalue", "pvalue_adj")} if prefix else {}
    per_gene = {"n_isoforms", "n_spots_used"}
    if {"gene", "covariate"} <= set(table.columns):
        genes = pd.unique(table["gene"].astype(str))
        covs = pd.unique(table["covariate"].astype(str))
        described = [c for c in table.columns if str(c).startswith("covariate_")]
        first = table.drop_duplicates("covariate").set_index("covariate")
        coords = {"gene": genes, "covariate": covs,
                  **{c: ("covariate", first.loc[covs, c].astype(str).to_numpy()) for c in described}}
        wide = table.drop(columns=described).set_index(["gene", "covariate"])
        data = {}
        for col in wide.columns:
            grid = wide[col].unstack("covariate").reindex(index=genes, columns=covs)
            if col in per_gene or str(col).startswith("gene_"):
                data[col] = (("gene",), grid.iloc[:, 0].to_numpy().astype(wide[col].dtype))
            else:
                data[rename.get(col, col)] = (("gene", "covariate"), grid.to_numpy())
    else:
        coords = {"gene": table.index.astype(str).to_numpy()}
        data = {rename.get(c, c): (("gene",), table[c].to_numpy()) for c in table.columns}
    ds = xr.Dataset(data, coords=coords)
    for col in entry.get("var_columns", []):
        if col in adata.var.columns:
            values = adata.var[col]
            have = values.notna().to_numpy()
            ds[col[len(key) + 1 :]] = xr.DataArray(values.to_numpy()[have], dims=("isoform",),
                                                   coords={"isoform": adata.var.index.astype(str)[have]})
    ds.attrs.update(params)
    return ds


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
    from spatialscale.locations import is_url

    for what, value in (("the AnnData to annotate", source), ("the annotated copy", dest)):
        if is_url(value):
            raise InputError(f"{what} {value} is a URL; annotated copies (--anndata-out) are local AnnData files: "
                             "give local paths.")
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
                       key_added: str | None = None, overwrite: bool = False) -> Path:
    """Write a copy of the AnnData file ``source`` to ``dest`` with the results in ``var`` and ``uns``.

    Only ``var``, ``uns/<key_added>`` and ``uns/spatialscale`` of the copy are
    rewritten (see :func:`to_anndata`); counts and everything else are copied as files, never
    loaded. The copy is written beside ``dest`` and moved into place at the
    end; a failure leaves ``dest`` as it was.

    Parameters
    ----------
    ds
        Results of one section.
    source, dest
        See :func:`check_anndata_target`.
    key_added
        The results' ``uns`` key (default :func:`result_key`).
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
            key = key_added or result_key(ds)
            light = ad.AnnData(var=read_elem(root["var"]))
            for name in (UNS_KEY, key):
                if "uns" in root and name in root["uns"]:
                    light.uns[name] = read_elem(root["uns"][name])
            to_anndata(ds, light, key_added=key, overwrite=overwrite)
            light.uns[UNS_KEY][COPY_MARK] = str(src)
            write_elem(root, "var", light.var)
            uns = root["uns"] if "uns" in root else root.create_group("uns")
            write_elem(uns, UNS_KEY, light.uns[UNS_KEY])
            write_elem(uns, key, light.uns[key])
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
