"""Feature summaries of every gene and isoform of a section, and attaching them to test results.

Layout
------
:func:`feature_summary` returns one Dataset with two independent dimensions:

- ``gene`` (gene names, store order): the gene-level summaries, prefixed
  ``gene_`` (``gene_n_isos``, ``gene_perplexity``, ``gene_pct_bin_on``,
  ``gene_count_avg``, ``gene_count_std``, ``gene_major_ratio_avg``);
- ``isoform`` (the isoform names of the input AnnData, store order: each
  gene's isoforms are contiguous, genes in the order of ``gene``): the
  isoform-level summaries, prefixed ``iso_`` (``iso_pct_bin_on``,
  ``iso_count_total``, ``iso_count_avg``, ``iso_count_std``,
  ``iso_ratio_total``, ``iso_ratio_avg``, ``iso_ratio_std``), with the
  non-dimension coordinate ``isoform_gene`` naming each isoform's gene.

The suffixes are SPLISOSM's column names.  A flat ``isoform`` dimension
needs no padding (genes have different isoform counts) and merges with any
Dataset over ``gene`` (and ``covariate``) without broadcasting; one gene's
isoforms are ``ds.isel(isoform=ds.isoform_gene.values == "GENE")``,
per-gene aggregates of an isoform variable
``ds["iso_ratio_total"].groupby("isoform_gene").max()``, and a table
per level ``ds[list(GENE_SUMMARY_VARIABLES)].to_dataframe()`` or
``ds[list(ISOFORM_SUMMARY_VARIABLES)].to_dataframe()`` (``to_dataframe()`` of
the whole Dataset would be the gene x isoform product).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import Family, Prepared
from spatialscale.families.common import batch_counts, provenance
from spatialscale.results import GENE_SUMMARY_VARIABLES, ISOFORM_SUMMARY_VARIABLES, make_dataset
from spatialscale.stats.summary import GENE_SUMMARIES, ISOFORM_SUMMARIES, summary_batch, summary_bytes_per_gene
from spatialscale.store import IsoformStore

__all__ = ["FAMILY", "merge_summary"]


def _summary_task(store_path: str, batch: Batch) -> dict[str, np.ndarray]:
    """One Dask task: summaries of the genes of ``batch`` (runs on a worker).

    Isoform-level arrays are returned flat, ``(n_genes * n_isoforms,)`` in
    column order, so batches (contiguous column ranges, in order) concatenate
    into the store's isoform order.
    """
    gene, iso = summary_batch(batch_counts(store_path, batch))
    return {**{f"gene_{k}": v for k, v in gene.items()}, **{f"iso_{k}": v.reshape(-1) for k, v in iso.items()}}


def _prepare(store: IsoformStore, method: str | None, opts: dict[str, Any], covariates: Any,
             device: str) -> Prepared:
    if device != "cpu":
        raise InputError(f"feature summaries run on CPU only; device {device!r} does not apply.")
    n = store.n_spots
    iso = store.isoforms
    iso_names = (iso["source_name"] if "source_name" in iso.columns else iso.index.to_series()).astype(str)

    def assemble(run: Any) -> xr.Dataset:
        names = GENE_SUMMARY_VARIABLES + ISOFORM_SUMMARY_VARIABLES
        data = {k: np.concatenate([r[k] for r in run.parts]) for k in names}
        return make_dataset(
            store.genes.index.to_numpy(), data,
            {"summary": "feature_summary", **provenance(store), "execution": run.kind},
            extra_coords={"isoform": iso_names.to_numpy(dtype=str),
                          "isoform_gene": ("isoform", iso["gene"].astype(str).to_numpy(dtype=str))},
        )

    task = functools.partial(_summary_task, str(store.path.resolve()))
    return Prepared(kind="summary", params={"summaries": list(GENE_SUMMARIES) + list(ISOFORM_SUMMARIES)},
                    task=task, bytes_per_gene=lambda p: summary_bytes_per_gene(n, p), label="summary",
                    assemble=assemble)


FAMILY = Family(
    name="summary",
    command="summary",
    methods=(),
    description="gene- and isoform-level feature summaries (as SPLISOSM's extract_feature_summary)",
    options=(),
    prepare=_prepare,
    variables=GENE_SUMMARY_VARIABLES + ISOFORM_SUMMARY_VARIABLES,
    summaries=False,
)


def merge_summary(results: xr.Dataset, summary: xr.Dataset, *, isoforms: bool = False) -> xr.Dataset:
    """Attach feature summaries to test results, aligned by gene.

    Parameters
    ----------
    results
        SV results (dimension ``gene``) or DU results (``gene``,
        ``covariate``), or any Dataset with a ``gene`` coordinate.
    summary
        From :func:`feature_summary`.
    isoforms
        Also attach the ``iso_*`` variables (dimension ``isoform``, only the
        isoforms of the results' genes).  Off by default: a second
        dimension would make ``to_dataframe()`` the gene x isoform product.

    Returns
    -------
    xarray.Dataset
        ``results`` (its attributes unchanged) with the ``gene_*``
        variables reindexed to its genes, as SPLISOSM's
        ``get_formatted_test_results(with_gene_summary=True)`` left join: a
        gene without a summary gets NaN (with a warning).  Merging again
        replaces the summary variables.

    Raises
    ------
    InputError
        If either Dataset has no ``gene`` coordinate, or both record a
        different number of spots.
    """
    for what, ds in (("results", results), ("summary", summary)):
        if "gene" not in ds.coords:
            raise InputError(f"{what} have no 'gene' coordinate.")
    a, b = results.attrs.get("n_spots"), summary.attrs.get("n_spots")
    if a is not None and b is not None and int(a) != int(b):
        raise InputError(f"results ({a} spots) and summary ({b} spots) come from different sections.")
    genes = results["gene"].values
    missing = ~np.isin(genes, summary["gene"].values)
    if missing.any():
        warnings.warn(f"{int(missing.sum())} gene(s) of the results have no summary (e.g. "
                      f"{list(genes[missing][:3])}); their summaries are NaN.", UserWarning, stacklevel=2)
    per_gene = summary[[k for k in GENE_SUMMARY_VARIABLES if k in summary]].reindex(gene=genes)
    merged = results.assign({k: per_gene[k] for k in per_gene.data_vars})
    if isoforms:
        if "isoform" not in summary.dims:
            raise InputError("summary has no isoform-level variables (dimension 'isoform').")
        per_iso = summary[[k for k in ISOFORM_SUMMARY_VARIABLES if k in summary]]
        per_iso = per_iso.isel(isoform=np.isin(per_iso["isoform_gene"].values, genes))
        merged = merged.drop_dims("isoform", errors="ignore").assign({k: per_iso[k] for k in per_iso.data_vars})
    merged.attrs = dict(results.attrs)
    return merged
