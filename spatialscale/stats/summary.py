"""Feature summaries of a batch of genes: expression level, coverage and isoform usage.

Pure numpy on a batch of counts ``(B, n, p)`` (``B`` genes with ``p``
isoforms each over ``n`` spots), vectorised over the batch.  The summaries
are those of SPLISOSM 1.2.0's ``extract_feature_summary``:

Gene level (``(B,)`` arrays), with ``c_s`` the gene's total count at spot
``s`` and ``S+ = {s : c_s > 0}`` its covered spots:

- ``n_isos``: isoforms ``p``;
- ``perplexity``: ``exp(H)`` of the pooled usage ``q_k = T_k / sum_j T_j``
  (``T_k`` the isoform's total count), ``H = -sum_k q_k log q_k`` with
  ``0 log 0 = 0``: the effective number of isoforms, between 1 and ``p``;
- ``pct_bin_on``: ``|S+| / n``, the fraction of spots with any count
  (a fraction in ``[0, 1]``, not a percentage, as in SPLISOSM);
- ``count_avg`` / ``count_std``: mean and population standard deviation
  (``ddof=0``) of ``c_s`` over **all** ``n`` spots;
- ``major_ratio_avg``: ``max_k q_k``, the pooled usage of the major isoform
  (equivalently the count-weighted average over spots of its per-spot
  ratio, hence the name).

Isoform level (``(B, p)`` arrays), with ``x_sk`` the isoform's count:

- ``pct_bin_on``: fraction of all spots with ``x_sk > 0``;
- ``count_total``, ``count_avg``, ``count_std``: sum, mean and population
  standard deviation of ``x_sk`` over all spots;
- ``ratio_total``: ``q_k`` above;
- ``ratio_avg``, ``ratio_std``: mean and population standard deviation of
  the per-spot ratio ``x_sk / c_s`` over the covered spots ``S+`` only
  (uncovered spots have no ratio); 0 for a gene without any count.

Variances are computed in two passes (deviations from the mean) rather than
as ``E[x^2] - E[x]^2``, so a constant feature has exactly zero spread.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GENE_SUMMARIES", "ISOFORM_SUMMARIES", "summary_batch", "summary_bytes_per_gene"]

#: gene-level summaries returned by :func:`summary_batch` (SPLISOSM's column names)
GENE_SUMMARIES = ("n_isos", "perplexity", "pct_bin_on", "count_avg", "count_std", "major_ratio_avg")
#: isoform-level summaries returned by :func:`summary_batch` (SPLISOSM's column names)
ISOFORM_SUMMARIES = ("pct_bin_on", "count_total", "count_avg", "count_std", "ratio_total", "ratio_avg",
                     "ratio_std")


def summary_bytes_per_gene(n_spots: int, n_isoforms: int) -> float:
    """Working memory (bytes) of one gene in :func:`summary_batch`.

    The counts, the per-spot ratios and the temporaries of the deviations
    (float64, each ``n x p``), plus a little per-spot bookkeeping.
    """
    return 8.0 * n_spots * (5 * n_isoforms + 4)


def summary_batch(counts: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Gene- and isoform-level feature summaries of a batch of genes.

    Parameters
    ----------
    counts
        Isoform counts ``(B, n, p)``: ``B`` genes, ``n`` spots, ``p``
        isoforms per gene (non-negative).

    Returns
    -------
    gene, isoform
        ``gene`` maps each name of :data:`GENE_SUMMARIES` to a ``(B,)``
        array (``n_isos`` int64, the rest float64); ``isoform`` maps each
        name of :data:`ISOFORM_SUMMARIES` to a ``(B, p)`` float64 array.
        See the module docstring for the definitions.
    """
    x = np.asarray(counts, dtype=np.float64)
    if x.ndim != 3:
        raise ValueError(f"counts must be (genes, spots, isoforms); got shape {x.shape}.")
    n_genes, n, p = x.shape
    n_div = max(n, 1)

    # isoform counts over all spots
    iso_total = x.sum(axis=1)                                        # (B, p)
    iso_avg = iso_total / n_div
    iso_std = np.sqrt(np.square(x - iso_avg[:, None, :]).sum(axis=1) / n_div)
    iso_on = np.count_nonzero(x, axis=1) / n_div

    # gene totals per spot
    spot_total = x.sum(axis=2)                                       # (B, n)
    covered = spot_total > 0
    n_covered = covered.sum(axis=1)                                  # (B,)
    gene_total = iso_total.sum(axis=1)                               # (B,)
    gene_avg = gene_total / n_div
    gene_std = np.sqrt(np.square(spot_total - gene_avg[:, None]).sum(axis=1) / n_div)

    # pooled usage, its perplexity and the major isoform's share
    has_counts = gene_total > 0
    pooled = np.divide(iso_total, gene_total[:, None], out=np.zeros_like(iso_total), where=has_counts[:, None])
    plogp = np.where(pooled > 0, pooled * np.log(np.where(pooled > 0, pooled, 1.0)), 0.0)
    perplexity = np.exp(-plogp.sum(axis=1))
    major = pooled.max(axis=1) if p else np.zeros(n_genes)

    # per-spot ratios over covered spots only
    ratios = np.divide(x, spot_total[:, :, None], out=np.zeros_like(x), where=covered[:, :, None])
    n_cov = np.maximum(n_covered, 1)[:, None]
    ratio_avg = ratios.sum(axis=1) / n_cov                           # zeros at uncovered spots add nothing
    dev = np.where(covered[:, :, None], ratios - ratio_avg[:, None, :], 0.0)
    ratio_std = np.sqrt(np.square(dev).sum(axis=1) / n_cov)

    gene = {
        "n_isos": np.full(n_genes, p, dtype=np.int64),
        "perplexity": perplexity,
        "pct_bin_on": n_covered / n_div,
        "count_avg": gene_avg,
        "count_std": gene_std,
        "major_ratio_avg": major,
    }
    isoform = {
        "pct_bin_on": iso_on,
        "count_total": iso_total,
        "count_avg": iso_avg,
        "count_std": iso_std,
        "ratio_total": pooled,
        "ratio_avg": ratio_avg,
        "ratio_std": ratio_std,
    }
    return gene, isoform
