"""A kernel ensemble of HSIC spatial-variability tests for one batch of genes.

Each gene's centred responses ``Y`` (isoform ratios, isoform counts or gene
counts) are formed once and tested against every kernel ``K_c`` of the
ensemble: ``Q_c = tr(Y' K_c Y)`` with the null mixture of that kernel's power
sums ``tr(K_c^r)`` and the responses' feature power sums (Liu's or Welch's
approximation), exactly as a single-kernel run on a store ingested with that
kernel.  The per-kernel p-values are combined by the Cauchy combination
(:func:`spatialscale.stats.combine.cauchy_combine`, equal weights), whose
tail stays standard Cauchy under any dependence between the kernels' tests.

The functions are vectorised over the genes of a batch; they know nothing of
Dask, stores or workers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from spatialscale.stats.adjust import residualise
from spatialscale.stats.combine import cauchy_combine
from spatialscale.stats.hsic import (
    KernelOperator,
    feature_power_sums,
    mixture_cumulants,
    quadratic_statistic,
    quadratic_statistic_simplex,
)
from spatialscale.stats.nulls import liu_pvalue, permutation_moments, rescale_to_mixture, welch_pvalue
from spatialscale.stats.sv import sv_effect, sv_responses

__all__ = ["ENSEMBLE_NULLS", "EnsembleResponses", "ensemble_responses", "kernel_test", "combine_kernels",
           "ensemble_batch"]

#: nulls an ensemble member may use: the mixture approximations (one set of power sums per kernel), and
#: Liu's shape with the exact permutation mean and variance (also the kernel's ``sum_i (K_c)_ii^2``)
ENSEMBLE_NULLS = ("liu", "welch", "liu-perm")


class EnsembleResponses:
    """A batch's centred responses and what every kernel's test shares.

    Attributes
    ----------
    y
        ``(B, n, d)`` column-centred responses (zero for genes with a
        non-finite response).
    finite
        ``(B,)`` whether the gene's responses are finite.
    feature_sums
        ``(B, 4)`` power sums ``tr((Y'Y)^r)``, ``r = 1..4``.
    simplex
        Whether the columns of ``y`` sum to zero in every spot (ratios or clr
        coordinates of more than one isoform), so ``Q`` needs one solve per
        isoform less (:func:`spatialscale.stats.hsic.quadratic_statistic_simplex`).
    n_adjusted
        Covariate directions ``u`` projected out of ``y`` (0 without covariates):
        the mixture's feature eigenvalues then have ``n - 1 - u`` degrees of freedom.
    """

    def __init__(self, y: np.ndarray, finite: np.ndarray, feature_sums: np.ndarray, simplex: bool,
                 n_adjusted: int = 0) -> None:
        self.y = y
        self.finite = finite
        self.feature_sums = feature_sums
        self.simplex = simplex
        self.n_adjusted = int(n_adjusted)

    @property
    def n_genes(self) -> int:
        """Genes of the batch."""
        return int(self.y.shape[0])

    @property
    def n_spots(self) -> int:
        """Spots of every test (every spot: mean filling)."""
        return int(self.y.shape[1])


def ensemble_responses(counts: np.ndarray, method: str = "hsic-ir", transformation: str = "none",
                       covariate_basis: np.ndarray | None = None) -> EnsembleResponses:
    """Centred responses of a batch, formed once for every kernel of the ensemble.

    Spots where a gene has no counts take the covered spots' mean ratio
    (``nan_filling="mean"``), as in :func:`spatialscale.stats.sv.sv_batch`.

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    method
        ``hsic-ir``, ``hsic-ic`` or ``hsic-gc``.
    transformation
        Ratio transformation of ``hsic-ir``.
    covariate_basis
        ``(n, u)`` orthonormal basis of the centred covariates
        (:func:`spatialscale.stats.adjust.covariate_basis`): the responses are
        projected off them (``M Y``), as in an adjusted single-kernel run; each
        kernel's power sums must then be those of ``M K_c M``.

    Returns
    -------
    EnsembleResponses
    """
    counts = np.asarray(counts, dtype=np.float64)
    y, _ = sv_responses(counts, method, transformation)
    finite = np.isfinite(y.sum(axis=(1, 2)))
    if not finite.all():
        finite = np.isfinite(y).all(axis=(1, 2))
        y = np.where(finite[:, None, None], y, 0.0)
    u = 0
    if covariate_basis is not None:
        y = residualise(y, covariate_basis)  # ratios' rows still sum to zero (M acts on each column)
        u = int(covariate_basis.shape[1])
    simplex = method == "hsic-ir" and transformation in ("none", "clr") and y.shape[2] > 1
    return EnsembleResponses(y, finite, feature_power_sums(y), simplex, u)


def kernel_test(op: KernelOperator, kernel_sums: np.ndarray, responses: EnsembleResponses,
                null: str = "liu", kernel_diag_sq: float | None = None) -> dict[str, np.ndarray]:
    """One kernel's HSIC test of every gene of a batch.

    Parameters
    ----------
    op
        The kernel's operator (products with the centred kernel ``K_c``).
    kernel_sums
        ``(4,)`` power sums ``tr(K_c^r)`` (adjusted responses: of ``M K_c M``).
    responses
        The batch's responses (:func:`ensemble_responses`).
    null
        ``liu``, ``welch`` or ``liu-perm`` (as :func:`spatialscale.stats.sv.sv_batch`'s:
        the statistic rescaled to the mixture's exact permutation moments; needs
        ``kernel_diag_sq``, and responses without covariate adjustment).
    kernel_diag_sq
        ``sum_i (K_c)_ii^2`` of the kernel (``liu-perm``).

    Returns
    -------
    dict
        ``statistic`` (``Q / (n - 1)^2``; NaN for non-finite genes),
        ``pvalue`` (1 where the test is degenerate or the gene not finite)
        and ``effect`` (:func:`spatialscale.stats.sv.sv_effect`; NaN where
        not usable), each ``(B,)``.
    """
    if null not in ENSEMBLE_NULLS:
        raise ValueError(f"an ensemble kernel's null must be one of {ENSEMBLE_NULLS}, got {null!r}.")
    y, f = responses.y, responses.feature_sums
    b, n = responses.n_genes, responses.n_spots
    q = quadratic_statistic_simplex(op, y) if responses.simplex else quadratic_statistic(op, y)
    k = np.broadcast_to(np.asarray(kernel_sums, dtype=np.float64), (b, 4))
    n_eff = np.full(b, float(n))
    c = mixture_cumulants(k, f, n_eff - responses.n_adjusted)
    if null == "liu-perm":
        if kernel_diag_sq is None or responses.n_adjusted:
            raise ValueError("null='liu-perm' needs kernel_diag_sq and responses without covariate adjustment.")
        row_sq = (np.einsum("bnd,bnd->bn", y, y) ** 2).sum(1)
        mean, var = permutation_moments(k, kernel_diag_sq, f, row_sq, n_eff)
        p = liu_pvalue(rescale_to_mixture(q, c, mean, var), c)
    else:
        p = liu_pvalue(q, c) if null == "liu" else welch_pvalue(q, c)
    degenerate = (f[:, 1] <= 0) | (k[:, 1] <= 0)
    finite = responses.finite
    usable = finite & ~degenerate
    return {"statistic": np.where(finite, q / max(n - 1.0, 1.0) ** 2, np.nan),
            "pvalue": np.where(usable, p, 1.0),
            "effect": np.where(usable, sv_effect(q, f, k, n_eff), np.nan)}


def combine_kernels(pvalues: np.ndarray, statistics: np.ndarray, effects: np.ndarray) -> dict[str, np.ndarray]:
    """Per-gene summary of the kernels' tests (kernels on the last axis).

    Parameters
    ----------
    pvalues, statistics, effects
        ``(B, k)`` per-kernel p-values, statistics and effects.

    Returns
    -------
    dict
        ``pvalue``: the equal-weight Cauchy combination of the kernels'
        p-values; ``best``: the index of the kernel with the smallest p-value
        (the first of ties); ``statistic`` and ``effect``: that kernel's.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    best = np.argmin(np.where(np.isfinite(p), p, np.inf), axis=-1)
    pick = best[:, None]
    return {"pvalue": cauchy_combine(p), "best": best.astype(np.int64),
            "statistic": np.take_along_axis(np.asarray(statistics, dtype=np.float64), pick, axis=-1)[:, 0],
            "effect": np.take_along_axis(np.asarray(effects, dtype=np.float64), pick, axis=-1)[:, 0]}


def ensemble_batch(counts: np.ndarray, kernels: Sequence[tuple[Any, ...]], *,
                   method: str = "hsic-ir", transformation: str = "none", null: str = "liu",
                   covariate_basis: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The kernel-ensemble HSIC test of every gene of a batch.

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts of ``B`` genes with ``p`` isoforms.
    kernels
        ``(operator, power sums)`` of each kernel of the ensemble (at least two);
        with ``null="liu-perm"``, ``(operator, power sums, sum_i (K_c)_ii^2)``.
    method, transformation
        As :func:`spatialscale.stats.sv.sv_batch` (mean filling).
    null
        ``liu``, ``welch`` or ``liu-perm`` (each kernel's own mixture; :func:`kernel_test`).
    covariate_basis
        Adjust for covariates (:func:`ensemble_responses`); the power sums in
        ``kernels`` are then those of the projected kernels ``M K_c M``
        (:func:`spatialscale.stats.adjust.projected_kernel_sums`).

    Returns
    -------
    dict
        ``kernel_statistic``, ``kernel_pvalue``, ``kernel_effect`` ``(B, k)``
        (each kernel's test, equal to a single-kernel run with that kernel);
        ``pvalue`` ``(B,)`` (Cauchy combination); ``statistic``, ``effect``,
        ``best`` ``(B,)`` (those of the kernel with the smallest p-value);
        ``n_spots_used`` ``(B,)``.
    """
    if len(kernels) < 2:
        raise ValueError(f"a kernel ensemble needs at least 2 kernels, got {len(kernels)}.")
    responses = ensemble_responses(counts, method, transformation, covariate_basis)
    tests = [kernel_test(member[0], member[1], responses, null, member[2] if len(member) > 2 else None)
             for member in kernels]
    stat, p, eff = (np.stack([t[key] for t in tests], axis=1) for key in ("statistic", "pvalue", "effect"))
    out = combine_kernels(p, stat, eff)
    return {"kernel_statistic": stat, "kernel_pvalue": p, "kernel_effect": eff, **out,
            "n_spots_used": np.full(responses.n_genes, responses.n_spots, dtype=np.int64)}
