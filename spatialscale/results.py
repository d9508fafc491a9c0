"""Results as xarray Datasets: the variable registry, assembly and zarr I/O."""

from __future__ import annotations

from typing import Any

import numpy as np
import xarray as xr

from spatialscale.output import open_results

__all__ = ["VARIABLES", "GENE_SUMMARY_VARIABLES", "ISOFORM_SUMMARY_VARIABLES", "make_dataset", "open_results"]

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
