"""Spatial-variability HSIC tests for one batch of genes (``hsic-ir/ic/gc``).

:func:`sv_batch` is the whole per-batch computation: counts in, statistics
and p-values out.  It is vectorised over the genes of the batch; the engine
calls it once per Dask task.
"""

from __future__ import annotations

import numpy as np

from spatialscale.stats.adjust import residualise
from spatialscale.stats.hsic import (
    KernelOperator,
    feature_power_sums,
    mixture_cumulants,
    quadratic_statistic,
    quadratic_statistic_simplex,
)
from spatialscale.stats.nulls import (
    liu_pvalue,
    permutation_moments,
    permutation_pvalue,
    rescale_to_mixture,
    welch_pvalue,
)
from spatialscale.stats.responses import (
    count_response,
    gene_count_response,
    ratio_response,
)

__all__ = ["SV_METHODS", "NAN_FILLINGS", "sv_batch", "sv_effect", "sv_batch_sparse_ratios", "sv_batch_dense_ratios",
           "sv_responses",
           "permutations"]

SV_METHODS = ("hsic-ir", "hsic-ic", "hsic-gc")
NAN_FILLINGS = ("mean", "none")


def sv_responses(counts: np.ndarray, method: str, transformation: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Centred responses ``(B, n, d)`` and spot coverage ``(B, n)`` of a batch."""
    if method == "hsic-ir":
        return ratio_response(counts, transformation)
    covered = np.ones(counts.shape[:2], dtype=bool)
    if method == "hsic-ic":
        return count_response(counts), covered
    if method == "hsic-gc":
        return gene_count_response(counts), covered
    raise ValueError(f"Unknown SV method {method!r}; choose from {SV_METHODS}.")


def permutations(n: int, n_perms: int, seed: int) -> np.ndarray:
    """The ``(n_perms, n)`` spot permutations shared by every gene.

    One seeded set for the whole run makes each gene's permutation p-value
    independent of how genes are batched.
    """
    rng = np.random.default_rng(seed)
    return np.stack([rng.permutation(n) for _ in range(int(n_perms))]) if n_perms else np.zeros((0, n), int)


def _masked_kernel_sums(op: KernelOperator, covered: np.ndarray, n_probes: int, seed: int) -> np.ndarray:
    """Hutchinson power sums of each gene's kernel restricted to its covered spots.

    The restricted kernel is ``H_S (K_eff)_SS H_S`` with ``H_S`` centring over
    the covered set ``S``.  Probes are ``default_rng(seed).choice([-1, 1],
    size=(|S|, n_probes))`` per gene.
    """
    # genes with the same covered set share one estimate (every gene's probes come from the same seed)
    packed, inverse = np.unique(np.packbits(covered, axis=1), axis=0, return_inverse=True)
    distinct = np.unpackbits(packed, axis=1, count=covered.shape[1]).astype(bool)
    per_block = max(1, int(2**24 // max(covered.shape[1] * n_probes, 1)))  # about 128 MiB of probes at a time
    sums = np.concatenate([_masked_sums(op, distinct[s : s + per_block], n_probes, seed)
                           for s in range(0, len(distinct), per_block)])
    return sums[np.asarray(inverse).reshape(-1)]


def _masked_sums(op: KernelOperator, covered: np.ndarray, n_probes: int, seed: int) -> np.ndarray:
    """:func:`_masked_kernel_sums` of a few distinct covered sets."""
    b, n = covered.shape
    z = np.zeros((n, b * n_probes))
    for g in range(b):
        rng = np.random.default_rng(seed)
        z[covered[g], g * n_probes : (g + 1) * n_probes] = rng.choice(
            np.array([-1.0, 1.0]), size=(int(covered[g].sum()), n_probes)
        )
    mask = np.repeat(covered.T, n_probes, axis=1)

    def apply(x: np.ndarray) -> np.ndarray:
        x = np.where(mask, x, 0.0)
        cnt = mask.sum(axis=0, keepdims=True).clip(1)
        x = np.where(mask, x - x.sum(axis=0, keepdims=True) / cnt, 0.0)
        u = np.where(mask, op.apply(x), 0.0)
        return np.where(mask, u - u.sum(axis=0, keepdims=True) / cnt, 0.0)

    u = apply(z)
    w = apply(u)
    sums = np.stack([np.sum(z * u, 0), np.sum(u * u, 0), np.sum(u * w, 0), np.sum(w * w, 0)], axis=1)
    return sums.reshape(b, n_probes, 4).mean(axis=1)


def sv_batch(
    counts: np.ndarray,
    op: KernelOperator,
    kernel_sums: np.ndarray,
    *,
    method: str = "hsic-ir",
    transformation: str = "none",
    nan_filling: str = "mean",
    null: str = "liu",
    n_perms: int = 1000,
    perm_seed: int = 0,
    perm_block: int = 32,
    n_probes: int = 60,
    probe_seed: int = 0,
    kernel_diag_sq: float | None = None,
    covariate_basis: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """HSIC spatial-variability test of every gene in a batch.

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts of ``B`` genes with ``p`` isoforms.
    op
        The section's kernel operator (``K_eff`` products).
    kernel_sums
        ``(4,)`` power sums ``tr(K_eff^r)``.
    method
        ``hsic-ir`` (isoform ratios), ``hsic-ic`` (isoform counts) or
        ``hsic-gc`` (gene counts).
    transformation
        Ratio transformation for ``hsic-ir``.
    nan_filling
        ``mean``: spots without coverage take the covered-spot mean;
        ``none``: they are dropped per gene, with the kernel restricted to
        the covered spots (its power sums by seeded Hutchinson probes).
    null
        ``liu``, ``welch``, ``perm`` or ``liu-perm`` (Liu's shape with the
        exact permutation mean and variance; needs ``kernel_diag_sq`` and
        ``nan_filling="mean"``).
    n_perms, perm_seed, perm_block
        Permutation count, seed and how many permutations share one solve.
    n_probes, probe_seed
        Hutchinson probes for ``nan_filling="none"``.
    kernel_diag_sq
        ``sum_i (K_eff)_ii^2`` of the section's kernel (for ``liu-perm``).
    covariate_basis
        ``(n, u)`` orthonormal basis ``U`` of the centred covariates
        (:func:`spatialscale.stats.adjust.covariate_basis`): the test is
        adjusted for them.  Each gene's centred response becomes
        ``M Y = Y - U (U' Y)``, the statistic ``tr(Y' M K_eff M Y)``, and
        ``kernel_sums`` must then be the power sums of ``M K_eff M``
        (:func:`spatialscale.stats.adjust.projected_kernel_sums`); the
        mixture's feature sums are scaled by the residual degrees of freedom
        ``n - 1 - u``.  Needs ``nan_filling="mean"`` and a ``liu``,
        ``welch`` or ``perm`` null (permutations of the residuals, projected
        again).

    Returns
    -------
    dict
        ``statistic`` (``Q / (n_eff - 1)^2``), ``pvalue``, ``n_spots_used`` and
        ``effect`` (:func:`sv_effect`), each ``(B,)``; ``null_statistic`` (``Q``) and ``null_cumulants``
        ``(B, 4)`` (its null's mixture sums ``c_1..c_4``; NaN where the test is
        degenerate), which pool across independent sections
        (:func:`spatialscale.stats.combine.pooled_liu`); with ``liu-perm`` the
        statistic is the one rescaled to the mixture's exact moments.
    """
    if null == "liu-perm" and (kernel_diag_sq is None or nan_filling != "mean"):
        raise ValueError("null='liu-perm' needs kernel_diag_sq and nan_filling='mean'.")
    if nan_filling not in NAN_FILLINGS:
        raise ValueError(f"Unknown nan_filling {nan_filling!r}; choose from {NAN_FILLINGS}.")
    adjusted = covariate_basis is not None
    if adjusted and (nan_filling != "mean" or null == "liu-perm"):
        raise ValueError("covariate adjustment needs nan_filling='mean' and a liu, welch or perm null.")
    counts = np.asarray(counts, dtype=np.float64)
    b, n, _ = counts.shape
    y, covered = sv_responses(counts, method, transformation)
    finite = np.isfinite(y.sum(axis=(1, 2)))  # a NaN or infinity anywhere makes the gene's sum non-finite
    if not finite.all():
        finite = np.isfinite(y).all(axis=(1, 2))  # per gene, exactly (a finite gene's sum could overflow)
        y = np.where(finite[:, None, None], y, 0.0)
    if adjusted:
        y = residualise(y, covariate_basis)  # rows still sum to zero for ratios / clr (M acts on each column)
    if method == "hsic-ir" and transformation in ("none", "clr") and y.shape[2] > 1:
        q = quadratic_statistic_simplex(op, y)
    else:
        q = quadratic_statistic(op, y)
    f = feature_power_sums(y)
    n_eff = np.full(b, n, dtype=np.float64)
    k = np.broadcast_to(np.asarray(kernel_sums, dtype=np.float64), (b, 4)).copy()
    if method == "hsic-ir" and nan_filling == "none":
        # every gene's kernel sums are estimated alike, full coverage included (as SPLISOSM does)
        n_eff = covered.sum(axis=1).astype(np.float64)
        k = _masked_kernel_sums(op, covered, n_probes, probe_seed)
    # the mixture's feature eigenvalues estimate the response covariance: Y'MY has n - 1 - u degrees of freedom
    c = mixture_cumulants(k, f, n_eff - covariate_basis.shape[1] if adjusted else n_eff)
    q_null = q  # the statistic on the null mixture's scale
    if null in ("liu", "welch"):
        p = _mixture_pvalue(q, c, null)
    elif null == "perm":
        p = permutation_pvalue(q, _permutation_statistics(op, y, n_perms, perm_seed, perm_block, covariate_basis))
    elif null == "liu-perm":
        mean, var = permutation_moments(k, kernel_diag_sq, f, (np.einsum("bnd,bnd->bn", y, y) ** 2).sum(1), n_eff)
        q_null = rescale_to_mixture(q, c, mean, var)
        p = liu_pvalue(q_null, c)
    else:
        raise ValueError(f"Unknown null {null!r}; choose from ('liu', 'welch', 'perm', 'liu-perm').")
    return _sv_result(q, q_null, p, c, f, k, n_eff, finite)


def _mixture_pvalue(q: np.ndarray, c: np.ndarray, null: str) -> np.ndarray:
    """Liu's or Welch's p-value of ``q`` under the mixture with sums ``c``."""
    return liu_pvalue(q, c) if null == "liu" else welch_pvalue(q, c)


def sv_effect(q: np.ndarray, feature_sums: np.ndarray, kernel_sums: np.ndarray, n: np.ndarray) -> np.ndarray:
    """Effect size of an HSIC SV statistic: the RV coefficient of the responses and the kernel, less its null mean.

    With ``Q = tr(Y' K Y)`` (``Y`` centred, ``K`` the centred kernel),
    ``RV = Q / sqrt(tr(K^2) tr((Y'Y)^2))`` is the cosine between the
    responses' Gram matrix ``Y Y'`` and ``K``: in ``[0, 1]`` for a
    positive semi-definite kernel, 1 when the usage varies only along the
    kernel's leading direction.  Under no spatial variability its mean is
    ``tr(K) tr(Y'Y) / ((n - 1) sqrt(tr(K^2) tr((Y'Y)^2)))`` (about
    ``1 / sqrt(n)`` for a CAR kernel), which depends on the section's size;
    subtracting it gives an effect near 0 for a non-SV gene in any section
    and comparable across sections of different sizes (the adjusted RV).
    Scale-free: the ratios' overall variance and the kernel's scale cancel.

    Parameters
    ----------
    q
        ``(B,)`` statistics ``tr(Y'KY)``.
    feature_sums, kernel_sums
        ``(B, 4)`` power sums ``tr((Y'Y)^r)`` and ``tr(K^r)``.
    n
        ``(B,)`` spots in each test.
    """
    f = np.asarray(feature_sums, dtype=np.float64)
    k = np.asarray(kernel_sums, dtype=np.float64)
    scale = np.sqrt(np.clip(f[..., 1] * k[..., 1], 0.0, None))
    ok = scale > 0
    safe = np.where(ok, scale, 1.0)
    null_mean = k[..., 0] * f[..., 0] / np.maximum(np.asarray(n, dtype=np.float64) - 1.0, 1.0)
    return np.where(ok, (np.asarray(q, dtype=np.float64) - null_mean) / safe, np.nan)


def _sv_result(q: np.ndarray, q_null: np.ndarray, p: np.ndarray, c: np.ndarray, f: np.ndarray, k: np.ndarray,
               n_eff: np.ndarray, finite: np.ndarray) -> dict[str, np.ndarray]:
    """A batch's results: statistics, p-values (1 where degenerate or not finite) and the poolable null terms."""
    degenerate = (f[:, 1] <= 0) | (k[:, 1] <= 0)
    p = np.where(degenerate | ~finite, 1.0, p)
    stat = np.where(finite, q / np.maximum(n_eff - 1.0, 1.0) ** 2, np.nan)
    usable = finite & ~degenerate
    return {"statistic": stat, "pvalue": p, "n_spots_used": n_eff.astype(np.int64),
            "effect": np.where(usable, sv_effect(q, f, k, n_eff), np.nan),
            "null_statistic": np.where(usable, q_null, np.nan), "null_cumulants": np.where(usable[:, None], c, np.nan)}


def sv_batch_dense_ratios(
    counts: np.ndarray,
    n_isoforms: int,
    op: KernelOperator,
    kernel_sums: np.ndarray,
    *,
    null: str = "liu",
) -> dict[str, np.ndarray]:
    """:func:`sv_batch` for ``hsic-ir`` (no transformation, mean filling) from a batch's counts as stored.

    For an operator with a row ordering (the sparse kernel's factor,
    :attr:`~spatialscale.kernel.SparseCAROperator.row_order`): the centred
    ratios are formed from the ``(n, B p)`` counts in two passes over the
    spots and written straight into the factor's order
    (:func:`spatialscale.stats._numba.dense_centred_ratios`), and the
    statistic takes one triangular sweep; no ``(B, n, p)`` copy is made.
    Equals :func:`sv_batch` on the same counts (up to summation order).

    Parameters
    ----------
    counts
        ``(n, B * n_isoforms)`` counts, gene-major columns.
    n_isoforms
        Isoforms per gene (``>= 2``).
    op
        Operator with ``row_order`` and ``ordered_quadratics``.
    kernel_sums
        ``(4,)`` power sums of the centred kernel.
    null
        ``liu`` or ``welch``.
    """
    from spatialscale.stats._numba import dense_centred_ratios
    from spatialscale.stats.hsic import gram_power_sums

    if n_isoforms < 2 or null not in ("liu", "welch"):
        raise ValueError("the dense ratio path needs >= 2 isoforms per gene and null 'liu' or 'welch'.")
    n = op.n
    cols, gram, _ = dense_centred_ratios(counts, n_isoforms, op.row_order)
    n_genes = gram.shape[0]
    a = op.ordered_quadratics(cols, n_isoforms - 1)
    q = np.trace(a, axis1=1, axis2=2) + a.sum(axis=(1, 2))
    f = gram_power_sums(gram)
    finite = np.isfinite(q) & np.isfinite(f).all(1)
    q = np.where(finite, q, 0.0)
    f = np.where(finite[:, None], f, 0.0)
    k = np.broadcast_to(np.asarray(kernel_sums, dtype=np.float64), (n_genes, 4))
    n_eff = np.full(n_genes, n, dtype=np.float64)
    c = mixture_cumulants(k, f, n_eff)
    return _sv_result(q, q, _mixture_pvalue(q, c, null), c, f, k, n_eff, finite)


def sv_batch_sparse_ratios(
    data: np.ndarray,
    rows: np.ndarray,
    indptr: np.ndarray,
    grid: np.ndarray,
    n_genes: int,
    n_isoforms: int,
    op: KernelOperator,
    kernel_sums: np.ndarray,
    *,
    null: str = "liu",
) -> dict[str, np.ndarray]:
    """:func:`sv_batch` for ``hsic-ir`` (no transformation, mean filling) from a raster batch's sparse counts.

    The centred ratios are zero wherever a gene has no counts, so they are
    formed from the stored counts alone
    (:func:`spatialscale.stats._numba.sparse_centred_ratios`) directly as the
    grid columns the FFT operator transforms; the result equals
    :func:`sv_batch` on the same counts scattered into the grid.

    Parameters
    ----------
    data, rows, indptr
        CSC of the batch's ``n_genes * n_isoforms`` columns over the observed bins.
    grid
        ``(n_observed,)`` grid position of each observed bin.
    n_genes, n_isoforms
        Batch shape (``n_isoforms >= 2``).
    op
        The raster's FFT operator (``column_quadratics``; ``grid_columns`` if it lends a buffer).
    kernel_sums
        ``(4,)`` power sums of the centred kernel.
    null
        ``liu`` or ``welch``.
    """
    from spatialscale.stats._numba import sparse_centred_ratios
    from spatialscale.stats.hsic import gram_power_sums

    if n_isoforms < 2 or null not in ("liu", "welch"):
        raise ValueError("the sparse ratio path needs >= 2 isoforms per gene and null 'liu' or 'welch'.")
    n = op.n
    buffer = op.grid_columns(n_genes * (n_isoforms - 1)) if hasattr(op, "grid_columns") else None
    cols, gram, _ = sparse_centred_ratios(data, rows, indptr, grid, n_genes, n_isoforms, n, cols=buffer)
    d = n_isoforms - 1
    a = op.column_quadratics(cols, d)  # (B, d, d) = Yq' K Yq
    q = np.trace(a, axis1=1, axis2=2) + a.sum(axis=(1, 2))
    f = gram_power_sums(gram)
    finite = np.isfinite(q) & np.isfinite(f).all(1)
    q = np.where(finite, q, 0.0)
    f = np.where(finite[:, None], f, 0.0)
    k = np.broadcast_to(np.asarray(kernel_sums, dtype=np.float64), (n_genes, 4))
    n_eff = np.full(n_genes, n, dtype=np.float64)
    c = mixture_cumulants(k, f, n_eff)
    return _sv_result(q, q, _mixture_pvalue(q, c, null), c, f, k, n_eff, finite)


def _permutation_statistics(op: KernelOperator, y: np.ndarray, n_perms: int, seed: int, block: int,
                            basis: np.ndarray | None = None) -> np.ndarray:
    """``(B, n_perms)`` statistics of the batch under the shared permutations (with ``basis``: of the permuted
    residuals projected again, ``M P M Y``)."""
    b, n, d = y.shape
    perms = permutations(n, n_perms, seed)
    out = np.empty((b, len(perms)))
    for s in range(0, len(perms), block):
        chunk = perms[s : s + block]
        yp = y[:, chunk, :]  # (B, P, n, d)
        stacked = yp.transpose(2, 1, 0, 3).reshape(n, -1)  # columns ordered (P, B, d)
        if basis is not None and basis.shape[1]:
            stacked = stacked - basis @ (basis.T @ stacked)
        qc = op.quadratic_columns(np.ascontiguousarray(stacked))
        out[:, s : s + len(chunk)] = qc.reshape(len(chunk), b, d).sum(axis=2).T
    return out
