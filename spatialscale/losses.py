"""Spatial smoothing losses for torch models: Smoother's priors as penalties on per-spot coefficients.

A model that fits coefficients ``beta`` of shape ``(num_group, num_spot)`` (one row per group: a
cell type, an isoform, a factor; one column per spot) can add a spatial loss that rewards
coefficients varying smoothly over the tissue.  The losses are those of Smoother (Su et al. 2023;
``smoother-omics`` 1.1.0, ``smoother/losses.py``), re-derived here:

- the quadratic loss of a Gaussian spatial prior with precision ``Q`` (car, icar, sar, isar, sma,
  and spatialscale's default ``splisosm``)::

      L(beta) = sum_g s_g * beta_g' Q beta_g            (/ beta.numel() when normalize)

  where ``s_g`` is the group's confidence (default 1).  The negative log density of
  ``N(0, Q^-1)`` is ``1/2 beta_g' Q beta_g`` up to constants; like Smoother, the loss has no factor
  ``1/2``, so values equal Smoother's (halve it, or its weight, for the exact negative log prior);
- the pairwise Kullback-Leibler loss (``prior="kl"``) between the softmax distributions of
  neighbouring spots;
- a contrastive loss (:class:`ContrastiveSpatialLoss`) that subtracts the loss of randomly
  permuted spots (contrastive Laplacian eigenmaps).

The precision comes from :func:`spatialscale.priors.prior_precision` (or
:func:`spatialscale.priors.sma_precision`) and its standardisation from
:func:`spatialscale.kernel.standardised_precision`, the definitions the spatial kernels use, so one
prior means the same matrix in a kernel and in a loss.  The spot graph comes from a weight matrix,
spot coordinates (:func:`spatialscale.kernel.spatial_weights`), an isoform store's adjacency, or a
list of these (one per section, block diagonal).  See ``docs/losses.md``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse
import torch

from spatialscale import priors as _priors
from spatialscale.errors import InputError

__all__ = [
    "LOSS_PRIORS",
    "MAX_DENSE_SPOTS",
    "KL_EPS",
    "quadratic_loss",
    "sparse_quadratic_loss",
    "kl_loss",
    "loss_weights",
    "loss_precision",
    "SpatialLoss",
    "ContrastiveSpatialLoss",
]

#: Priors of :class:`SpatialLoss`: the quadratic priors of :mod:`spatialscale.priors` and the pairwise ``"kl"``.
LOSS_PRIORS = (*_priors.PRIORS, "kl")

#: Dense precisions (``prior="sma"``, or ``use_sparse=False``) are allowed up to this many spots by default.
MAX_DENSE_SPOTS = 5000

#: Added to the probabilities before their logarithm in :func:`kl_loss` (Smoother's ``1e-20``).
KL_EPS = 1e-20

#: Relative slack on the upper end of the closed ``rho`` range (rounding only).
_RHO_RTOL = 1e-12

#: What ``weights=`` accepts for one section (a weight matrix, an isoform store or its path, coordinates);
#: a list of these means sections.
WeightsLike = Any


# --------------------------------------------------------------------------- functions


def _scales(group_scales: float | torch.Tensor, num_group: int, like: torch.Tensor) -> torch.Tensor:
    """``group_scales`` as a tensor broadcastable to ``(num_group,)`` (a float, one value, or one per group)."""
    s = torch.as_tensor(group_scales, dtype=like.dtype, device=like.device)
    if s.ndim > 1 or s.numel() not in (1, num_group):
        raise ValueError(f"group_scales must be a float or hold 1 or num_group={num_group} values, got shape "
                         f"{tuple(s.shape)}.")
    return s.reshape(-1)


def _check_beta(beta: torch.Tensor) -> torch.Tensor:
    if not torch.is_tensor(beta):
        beta = torch.as_tensor(np.asarray(beta, dtype=np.float64))
    if beta.ndim != 2:
        raise ValueError(f"coefficients must be a 2-D (num_group, num_spot) tensor, got shape {tuple(beta.shape)}.")
    return beta


def _as_torch_matrix(m: Any, like: torch.Tensor) -> torch.Tensor:
    """A scipy/numpy matrix as a tensor on ``like``'s device (torch tensors pass through)."""
    if torch.is_tensor(m):
        return m
    if scipy.sparse.issparse(m):
        return _sparse_tensor(scipy.sparse.csr_matrix(m), like.dtype, like.device)
    return torch.as_tensor(np.asarray(m), dtype=like.dtype, device=like.device)


def _common_dtype(beta: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in the promoted floating dtype (a no-op where they already agree)."""
    dtype = torch.promote_types(beta.dtype, m.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return beta.to(dtype), m.to(dtype)


def quadratic_loss(beta: torch.Tensor, precision: torch.Tensor, group_scales: float | torch.Tensor = 1.0,
                   normalize: bool = True) -> torch.Tensor:
    """Quadratic spatial loss ``sum_g s_g beta_g' Q_g beta_g`` with a dense precision.

    This is Smoother's ``quadratic_loss``: the negative log density of independent Gaussian priors
    ``beta_g ~ N(0, Q_g^-1 / s_g)`` is half of it, up to constants.  No factor ``1/2`` is applied,
    so that values equal Smoother's.

    Parameters
    ----------
    beta
        Coefficients, ``(num_group, num_spot)``.
    precision
        ``(num_spot, num_spot)`` precision shared by every group, or ``(1, num_spot, num_spot)``
        (shared) or ``(num_group, num_spot, num_spot)`` (one per group).  A torch sparse tensor is
        passed on to :func:`sparse_quadratic_loss`; numpy arrays are converted.
    group_scales
        Confidence ``s_g`` of each group: a float, or a tensor of 1 or ``num_group`` values.
    normalize
        Divide by ``beta.numel()`` (``num_group * num_spot``), so values compare across sizes.

    Returns
    -------
    torch.Tensor
        The loss, a scalar, differentiable in ``beta``.
    """
    beta = _check_beta(beta)
    q = _as_torch_matrix(precision, beta)
    if q.layout != torch.strided:
        return sparse_quadratic_loss(beta, q, group_scales, normalize)
    beta, q = _common_dtype(beta, q)
    g, n = beta.shape
    if q.ndim == 2:
        if tuple(q.shape) != (n, n):
            raise ValueError(f"precision must be ({n}, {n}) for {n} spots, got {tuple(q.shape)}.")
        per_group = (beta * (beta @ q)).sum(dim=1)  # diag(B Q B')
    elif q.ndim == 3 and q.shape[0] in (1, g) and tuple(q.shape[1:]) == (n, n):
        per_group = torch.einsum("gi,gij,gj->g", beta, q.expand(g, n, n), beta)
    else:
        raise ValueError(f"precision must be (n, n), (1, n, n) or (num_group, n, n) with num_group={g}, n={n}; "
                         f"got {tuple(q.shape)}.")
    loss = (per_group * _scales(group_scales, g, beta)).sum()
    return loss / beta.numel() if normalize else loss


def sparse_quadratic_loss(beta: torch.Tensor, precision_sparse: torch.Tensor,
                          group_scales: float | torch.Tensor = 1.0, normalize: bool = True) -> torch.Tensor:
    """Quadratic spatial loss with a sparse precision: one product with ``Q``, ``O(nnz * num_group)``.

    The same value as :func:`quadratic_loss` (Smoother's ``sparse_quadratic_loss``).

    Parameters
    ----------
    beta
        Coefficients, ``(num_group, num_spot)``.
    precision_sparse
        ``(num_spot, num_spot)`` precision shared by every group, or the
        ``(num_group * num_spot, num_group * num_spot)`` block-diagonal matrix of one precision per
        group (group ``g``'s block at rows ``g * num_spot ...``, Smoother's layout).  A torch sparse
        (COO or CSR) or dense tensor, or a scipy.sparse matrix.
    group_scales
        Confidence ``s_g`` of each group: a float, or a tensor of 1 or ``num_group`` values.
    normalize
        Divide by ``beta.numel()``.

    Returns
    -------
    torch.Tensor
        The loss, a scalar, differentiable in ``beta``.
    """
    beta = _check_beta(beta)
    q = _as_torch_matrix(precision_sparse, beta)
    beta, q = _common_dtype(beta, q)
    g, n = beta.shape
    scales = _scales(group_scales, g, beta)
    if tuple(q.shape) == (n, n):
        qb = torch.mm(q, beta.T)  # (n, g)
        per_group = (beta.T * qb).sum(dim=0)
    elif tuple(q.shape) == (g * n, g * n):
        qv = torch.mm(q, beta.reshape(-1, 1))  # stacked rows of beta
        per_group = (beta.reshape(-1) * qv[:, 0]).reshape(g, n).sum(dim=1)
    else:
        raise ValueError(f"precision must be ({n}, {n}) or ({g * n}, {g * n}) for {g} groups of {n} spots, got "
                         f"{tuple(q.shape)}.")
    loss = (per_group * scales).sum()
    return loss / beta.numel() if normalize else loss


def kl_loss(p: torch.Tensor, weights: Any = None) -> torch.Tensor:
    """Mean pairwise Kullback-Leibler divergence between the spots' distributions (Smoother's ``kl_loss``).

    Column ``i`` of ``p`` is a distribution over the groups at spot ``i``; with
    ``l = log(p + 1e-20)`` the divergence of spot ``i`` from spot ``j`` is
    ``KL_ij = sum_g (p_gi + 1e-20) (l_gi - l_gj)``.

    - ``weights=None``: the mean of ``KL_ij`` over all ``n^2`` ordered pairs (``i = j`` included),
      computed in ``O(n num_group)`` as ``(1/n) sum_gi p_gi (l_gi - mean_j l_gj)``.
    - ``weights=W``: ``sum_ij W_ij KL_ij / #{W_ij != 0}``, the weighted sum over the number of
      neighbour pairs.  A sparse ``W`` (torch or scipy) is summed over its edges only; entries
      stored with the value zero (explicit zeros) are **not** pairs: they are dropped before
      counting.  A dense ``W`` counts its non-zero entries, as Smoother does.  When ``W`` has no
      non-zero entry the loss is 0 (Smoother: ``nan``).

    Parameters
    ----------
    p
        ``(num_group, num_spot)`` probabilities, each column summing to one.
    weights
        ``None``, or ``(num_spot, num_spot)`` non-negative weights: a torch tensor (dense or sparse
        COO/CSR), a numpy array or a scipy.sparse matrix.

    Returns
    -------
    torch.Tensor
        The loss, a scalar, differentiable in ``p``.
    """
    p = _check_beta(p)
    n = p.shape[1]
    p = p + KL_EPS
    logp = torch.log(p)
    if weights is None:
        return (p * (logp - logp.mean(dim=1, keepdim=True))).sum() / n
    if scipy.sparse.issparse(weights):
        w = scipy.sparse.csr_matrix(weights, dtype=np.float64, copy=True)  # never touch the caller's
        w.eliminate_zeros()
        weights = _sparse_tensor(w, p.dtype, p.device)
    elif not torch.is_tensor(weights):
        weights = torch.as_tensor(np.asarray(weights, dtype=np.float64), dtype=p.dtype, device=p.device)
    if tuple(weights.shape) != (n, n):
        raise ValueError(f"weights must be ({n}, {n}) for {n} spots, got {tuple(weights.shape)}.")
    if weights.layout == torch.strided:
        weights = weights.to(p.dtype)
        ce = p.T @ logp  # ce_ij = sum_g p_gi l_gj
        kl = torch.diagonal(ce).reshape(-1, 1) - ce
        count = (weights != 0).sum()
        total = (kl * weights).sum()
    else:
        w = weights.to_sparse_coo().coalesce().to(p.dtype) if weights.layout != torch.sparse_coo else \
            weights.coalesce().to(p.dtype)
        values, (rows, cols) = w.values(), w.indices()
        keep = values != 0  # explicit zeros are not neighbours
        values, rows, cols = values[keep], rows[keep], cols[keep]
        count = values.numel()
        kl_e = (p[:, rows] * (logp[:, rows] - logp[:, cols])).sum(dim=0)
        total = (kl_e * values).sum()
    if int(count) == 0:
        return p.sum() * 0.0
    return total / count


# --------------------------------------------------------------------------- weights and precisions


def _sparse_tensor(m: scipy.sparse.spmatrix, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A scipy sparse matrix as a coalesced torch COO tensor."""
    c = scipy.sparse.coo_matrix(m)
    idx = torch.as_tensor(np.vstack([c.row, c.col]).astype(np.int64))
    t = torch.sparse_coo_tensor(idx, torch.as_tensor(c.data, dtype=dtype), c.shape, check_invariants=False)
    return t.coalesce().to(device)


def _section_weights(w: Any) -> scipy.sparse.csr_matrix:
    """One section's weights as float64 CSR without explicit zeros, checked square, finite, >= 0, symmetric."""
    if scipy.sparse.issparse(w):
        w = scipy.sparse.csr_matrix(w, dtype=np.float64, copy=True)  # eliminate_zeros works in place
    else:
        a = np.asarray(w)
        if a.ndim != 2:
            raise ValueError(f"weights must be a 2-D (n, n) matrix, got shape {a.shape}.")
        if a.dtype == object or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
            raise ValueError(f"weights must be numeric, got dtype {a.dtype}.")
        a = a.astype(np.float64)
        if not np.all(np.isfinite(a)):
            raise ValueError("weights must be finite and non-negative (found NaN or inf).")
        w = scipy.sparse.csr_matrix(a)
    w.eliminate_zeros()  # a stored zero is not an edge: not a neighbour, no degree
    w = _priors._checked_weights(w)  # square, finite, non-negative, symmetric
    w.eliminate_zeros()
    w.sort_indices()
    return w


def _coords_weights(coords: Any, params: Any) -> scipy.sparse.csr_matrix:
    from spatialscale.kernel import spatial_weights

    x = np.asarray(coords, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] not in (2, 3) or x.shape[0] < 2:
        raise ValueError(f"coordinates must be an (n, 2) or (n, 3) array of at least 2 spots, got shape {x.shape}.")
    if not np.all(np.isfinite(x)):
        raise ValueError("coordinates must be finite (found NaN or inf).")
    return spatial_weights(x, params)


def _store_weights(item: Any) -> scipy.sparse.csr_matrix:
    from spatialscale.store import ADJACENCY_KEY, IsoformStore, open_store

    store = item if isinstance(item, IsoformStore) else open_store(item)
    if store.kernel_kind == "fft":
        raise InputError(f"{store.path} is a raster store (kernel='fft'): it has no spot graph; pass a store ingested "
                         "with kernel='car', the weights, or the coordinates.")
    return _section_weights(store._read_elem(f"obsp/{ADJACENCY_KEY}"))


def _is_coords(a: np.ndarray) -> bool:
    return a.ndim == 2 and a.shape[0] != a.shape[1] and a.shape[1] in (2, 3) and np.issubdtype(a.dtype, np.number) \
        and a.dtype != bool


def _one_section(item: Any, params: Any) -> scipy.sparse.csr_matrix:
    from spatialscale.store import IsoformStore

    if isinstance(item, (IsoformStore, str, os.PathLike)):
        return _store_weights(item)
    if torch.is_tensor(item):
        t = item.detach().cpu()
        if t.layout != torch.strided:
            t = t.to_sparse_coo().coalesce()
            (rows, cols), vals = t.indices().numpy(), t.values().double().numpy()
            return _section_weights(scipy.sparse.csr_matrix((vals, (rows, cols)), shape=tuple(t.shape)))
        item = t.double().numpy()
    if scipy.sparse.issparse(item):
        return _section_weights(item)
    a = np.asarray(item) if isinstance(item, np.ndarray) or hasattr(item, "__array__") or \
        isinstance(item, (list, tuple)) else None
    if a is None or a.dtype == object:
        hint = " (a Smoother SpatialWeightMatrix: pass its coordinates, or its weights as a matrix)" \
            if hasattr(item, "swm_scaled") else ""
        raise ValueError("weights must be a weight matrix, an isoform store or its path, coordinates, or a list of "
                         f"these; got {type(item).__name__}{hint}.")
    if _is_coords(a):
        return _coords_weights(a, params)
    return _section_weights(a)


def loss_weights(weights: Any = None, *, coords: Any = None, k_neighbors: int = 4, weights_kind: str = "knn",
                 radius: float | None = None, bandwidth: float = _priors.DEFAULT_BANDWIDTH,
                 scale_coords: bool = True) -> tuple[scipy.sparse.csr_matrix, tuple[int, ...]]:
    """The symmetric spot graph of a spatial loss, and its sections' sizes.

    Parameters
    ----------
    weights
        One section's graph, or a list of them (sections: a block-diagonal graph, no edge across
        sections, spots in list order).  A section is a symmetric non-negative ``(n, n)`` weight
        matrix (scipy.sparse, numpy or torch); an isoform store (:class:`spatialscale.IsoformStore`
        or a path to one), whose graph is its stored adjacency ``obsp/spatialscale_adjacency`` in the
        store's spot order; or an ``(n, 2)`` or ``(n, 3)`` coordinate array (a dense non-square
        array is read as coordinates), weighted as below.
    coords
        Coordinates (one array, or a list of arrays for sections) instead of ``weights``.
    k_neighbors, weights_kind, radius, bandwidth, scale_coords
        How coordinates become weights (:class:`spatialscale.kernel.KernelParams`'s ``k_neighbors``,
        ``weights``, ``radius``, ``bandwidth``, ``scale_coords``): the mutual kNN graph
        (``"knn"``) or Smoother's Gaussian distance band (``"distance"``).

    Returns
    -------
    graph, sizes
        The ``(n, n)`` float64 CSR graph, explicit zeros removed, and the number of spots of each section.

    Raises
    ------
    ValueError
        Non-square, non-symmetric, negative or non-finite weights; bad coordinates or options.
    InputError
        A raster store (no spot graph), or a path that is not an isoform store.
    """
    from spatialscale.kernel import KernelParams

    if weights is not None and coords is not None:
        raise ValueError("pass either weights= or coords=, not both.")
    source = coords if coords is not None else weights
    if source is None:
        raise ValueError("a spatial loss needs weights= (a weight matrix, an isoform store, coordinates, or a list "
                         "of these, one per section) or coords=.")
    params = KernelParams(k_neighbors=k_neighbors, weights=weights_kind, radius=radius, bandwidth=bandwidth,
                          scale_coords=scale_coords)
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise ValueError("the list of sections is empty.")
    if coords is not None:
        graphs = [_coords_weights(c, params) for c in items]
    else:
        graphs = [_one_section(item, params) for item in items]
    sizes = tuple(int(g.shape[0]) for g in graphs)
    graph = graphs[0] if len(graphs) == 1 else scipy.sparse.block_diag(graphs, format="csr")
    graph = scipy.sparse.csr_matrix(graph, dtype=np.float64)
    graph.sort_indices()
    return graph, sizes


def _check_rho_closed(w: scipy.sparse.csr_matrix, prior: str, rho: float, row_scale: bool) -> bool:
    """Check ``rho`` against the closed admissible range; return whether it is on the boundary (singular ``Q``)."""
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0:
        raise ValueError(f"rho must be a finite number >= 0, got {rho!r}.")
    try:
        _priors.check_rho(w, prior, rho, row_scale=row_scale)
        return False
    except ValueError:
        pass
    low, high = _priors.rho_range(w, prior, row_scale=row_scale)
    what = f"prior={prior!r}" + (" with row_scale" if row_scale else "")
    if prior == "sma":
        raise ValueError(f"{what} on these weights needs {low:g} <= rho < {high:.6g} (its covariance is singular at "
                         f"the bound), got rho={rho:g}.")
    if rho <= high * (1.0 + _RHO_RTOL):
        return True
    raise ValueError(f"{what} on these weights needs rho in [{low:g}, {high:.6g}] (where its precision is positive "
                     f"semi-definite), got rho={rho:g}.")


def _standardize_mode(value: Any) -> bool | str:
    """``standardize_cov`` checked: a bool, ``"diagonal"`` or ``"auto"``."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value in ("diagonal", "auto"):
        return value
    raise ValueError(f"standardize_cov must be False, True, 'diagonal' or 'auto', got {value!r}.")


def _unit_diagonal(q: scipy.sparse.spmatrix | np.ndarray) -> scipy.sparse.csr_matrix | np.ndarray:
    """``D_Q^-1/2 Q D_Q^-1/2``: the precision scaled to unit diagonal.

    A positive semi-definite ``Q`` with a zero diagonal entry has a zero row there (an isolated
    spot's self loop under icar at ``rho = 1``): that row is left as it is (zero).
    """
    d = np.asarray(q.diagonal(), dtype=np.float64)
    if np.any(d < 0):
        raise ValueError("standardize_cov='diagonal' needs a non-negative diagonal of the precision.")
    s = np.ones_like(d)
    s[d > 0] = 1.0 / np.sqrt(d[d > 0])
    if scipy.sparse.issparse(q):
        return (scipy.sparse.diags(s) @ q @ scipy.sparse.diags(s)).tocsr()
    return q * s[:, None] * s[None, :]


def loss_precision(graph: scipy.sparse.spmatrix, prior: str, rho: float, *, standardize_cov: bool | str = False,
                   row_scale: bool = False, max_dense_spots: int = MAX_DENSE_SPOTS,
                   ) -> scipy.sparse.csr_matrix | np.ndarray:
    """The precision of a quadratic spatial loss on ``graph`` (positive semi-definite).

    The formulas are :func:`spatialscale.priors.prior_precision`'s (sma:
    :func:`spatialscale.priors.sma_precision`).  A loss needs only a positive *semi*-definite
    precision, so ``rho`` may take the upper end of :func:`spatialscale.priors.rho_range`:
    icar and isar at ``rho = 1`` (the graph Laplacian ``D - W`` and ``(I - D^-1 W)'(I - D^-1 W)``),
    car and sar at ``1 / lambda_max(W)``.  sma's covariance is singular there, so it keeps the open
    range.

    Parameters
    ----------
    graph
        Symmetric non-negative weights (:func:`loss_weights`).
    prior
        One of :data:`spatialscale.priors.PRIORS`.
    rho
        Spatial autocorrelation, in the closed range ``[low, high]`` of ``rho_range``.
    standardize_cov
        ``False``: the prior's precision.  ``True``: the precision of its covariance rescaled to unit
        diagonal (:func:`spatialscale.kernel.standardised_precision`); a singular precision (``rho``
        at the upper bound) has no covariance and is refused.  ``"diagonal"``: the precision itself
        rescaled to unit diagonal (``D_Q^-1/2 Q D_Q^-1/2``; for icar at ``rho = 1`` the normalised
        graph Laplacian), what Smoother falls back to when it cannot invert the precision.
        ``"auto"``: ``True`` inside the range, ``"diagonal"`` at its upper bound.
    row_scale
        Row-scale the weights first (``D^-1 W``; sar, isar, sma).
    max_dense_spots
        sma's precision is dense: refused above this many spots.

    Returns
    -------
    scipy.sparse.csr_matrix or numpy.ndarray
        Sparse precision, or a dense array for sma.

    Raises
    ------
    ValueError
        Unknown prior, ``row_scale`` with a prior that needs symmetric weights, ``rho`` outside the
        closed range, ``standardize_cov=True`` on a singular precision, or sma above ``max_dense_spots``.
    """
    if prior not in _priors.PRIORS:
        raise ValueError(f"prior must be one of {', '.join(LOSS_PRIORS)}, got {prior!r}.")
    standardize_cov = _standardize_mode(standardize_cov)
    _priors._check_prior(prior, row_scale)
    w = _section_weights(graph)
    n = w.shape[0]
    if prior == "sma" and n > max_dense_spots:
        raise ValueError(f"prior='sma' has a dense precision ({n} x {n}); it is allowed up to max_dense_spots="
                         f"{max_dense_spots} spots. Use prior='sar' or 'isar' (sparse), or raise max_dense_spots if "
                         "the memory allows.")
    singular = _check_rho_closed(w, prior, rho, row_scale)
    mode = ("diagonal" if singular else True) if standardize_cov == "auto" else standardize_cov
    if mode is True and singular:
        raise ValueError(f"standardize_cov=True needs a positive-definite precision, and prior={prior!r} at "
                         f"rho={rho:g} (the upper end of its range) is singular (some patterns, such as constants, "
                         "have zero precision); use a rho below the bound, standardize_cov=False, or "
                         "standardize_cov='diagonal' (the precision scaled to unit diagonal; for icar the normalised "
                         "Laplacian).")
    if prior == "sma":
        q: Any = _priors.sma_precision(w, float(rho), row_scale=row_scale, standardize=mode is True)
    else:
        q = _priors.prior_precision(w, prior, float(rho), row_scale=row_scale, check=False)
        if mode is True:
            from spatialscale.kernel import standardised_precision

            d = q.diagonal()
            if np.any(d <= 0):
                raise ValueError(f"standardize_cov=True needs a positive-definite precision; prior={prior!r} on these "
                                 f"weights has {int(np.sum(d <= 0))} spots without weight (zero precision).")
            q = standardised_precision(q)
    if mode == "diagonal":
        q = _unit_diagonal(q)
    if scipy.sparse.issparse(q):
        q = scipy.sparse.csr_matrix(q)
        q.eliminate_zeros()
        q.sort_indices()
    return q


def _take(m: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``m[index][:, index]`` for a dense or sparse COO matrix."""
    if m.layout == torch.strided:
        return m.index_select(0, index).index_select(1, index)
    return m.index_select(0, index).index_select(1, index).coalesce()


# --------------------------------------------------------------------------- modules


class SpatialLoss(torch.nn.Module):
    """Spatial smoothing loss on coefficients ``(num_group, num_spot)``: Smoother's ``SpatialLoss``, in float64.

    ``loss(coefs)`` is ``sum_g s_g coefs_g' Q coefs_g / coefs.numel()`` for the quadratic priors
    (:func:`quadratic_loss`), or the weighted pairwise KL divergence between the spots'
    ``softmax(coefs, dim=0)`` distributions for ``prior="kl"`` (:func:`kl_loss`).

    Parameters
    ----------
    prior
        ``"car"``, ``"icar"``, ``"sar"``, ``"isar"``, ``"sma"``, ``"splisosm"`` or ``"kl"``.
    weights
        The spot graph (:func:`loss_weights`): a symmetric non-negative weight matrix (scipy.sparse,
        numpy, torch), an isoform store or its path (the store's adjacency), an ``(n, 2)`` /
        ``(n, 3)`` coordinate array, or a list of these, one per section (block diagonal: no edge
        across sections).  Optional for ``prior="kl"`` (then all pairs count).
    coords
        Coordinates instead of ``weights`` (an array, or a list of arrays for sections).
    rho
        Spatial autocorrelation, in the *closed* range of :func:`spatialscale.priors.rho_range`
        (``[0, 1]`` for icar, isar, splisosm; ``[0, 1 / lambda_max(W)]`` for car, sar; sma:
        ``[0, 1 / |lambda_min|)``).  The default 1 makes icar the graph Laplacian ``D - W``.
    standardize_cov
        ``False``, ``True`` (precision of the unit-diagonal covariance; refused where the precision
        is singular), ``"diagonal"`` (the precision scaled to unit diagonal) or ``"auto"`` (``True``,
        or ``"diagonal"`` where singular); see :func:`loss_precision`.
    row_scale
        Row-scale the weights (``D^-1 W``) for sar, sma (isar always does) and kl.
    use_sparse
        Keep the precision as a torch sparse COO tensor (one sparse product per call); ``False``
        keeps it dense (at most ``max_dense_spots`` spots).  sma's precision is dense either way.
    k_neighbors, weights_kind, radius, bandwidth, scale_coords
        How coordinates become weights: the mutual kNN graph (``weights_kind="knn"``,
        ``k_neighbors``) or Smoother's Gaussian distance band (``"distance"``: ``radius`` in
        coordinate units, ``bandwidth``, ``scale_coords``), as :class:`spatialscale.kernel.KernelParams`.
    max_dense_spots
        Largest section set (all spots together) with a dense precision.
    dtype, device
        Of the precision, the confidences and the losses (coefficients are cast to ``dtype``).

    Attributes
    ----------
    precision
        Buffer: the ``(n, n)`` precision, sparse COO (or dense: sma, ``use_sparse=False``); ``None``
        for ``prior="kl"``.  Moves with ``.to(device)``.
    kl_weights
        Buffer: the sparse COO weights of ``prior="kl"`` (``None`` without weights or for the
        quadratic priors).
    confidences
        Buffer: the groups' confidences ``s_g``, ``(1,)`` (all groups alike) or ``(num_group,)``;
        assign a tensor to change them, or use :meth:`estimate_confidence`.
    graph
        The symmetric spot graph (scipy CSR, before any row scaling); ``None`` for kl without weights.
    section_sizes
        Spots of each section, in order.
    n_spots
        Spots in all (``None`` for kl without weights).
    """

    precision: torch.Tensor | None
    kl_weights: torch.Tensor | None
    confidences: torch.Tensor

    def __init__(self, prior: str = "icar", weights: WeightsLike | Sequence[WeightsLike] | None = None, *,
                 coords: Any = None, rho: float = 1.0, standardize_cov: bool | str = False, row_scale: bool = False,
                 use_sparse: bool = True, k_neighbors: int = 4, weights_kind: str = "knn",
                 radius: float | None = None, bandwidth: float = _priors.DEFAULT_BANDWIDTH,
                 scale_coords: bool = True, max_dense_spots: int = MAX_DENSE_SPOTS,
                 dtype: torch.dtype = torch.float64, device: torch.device | str = "cpu") -> None:
        super().__init__()
        if prior not in LOSS_PRIORS:
            raise ValueError(f"prior must be one of {', '.join(LOSS_PRIORS)}, got {prior!r}.")
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype, got {dtype!r}.")
        self.prior = prior
        self.rho = float(rho)
        self.standardize_cov = _standardize_mode(standardize_cov)
        self.row_scale = bool(row_scale)
        self.use_sparse = bool(use_sparse)
        self.max_dense_spots = int(max_dense_spots)
        self.graph: scipy.sparse.csr_matrix | None = None
        self.section_sizes: tuple[int, ...] = ()
        if weights is not None or coords is not None or prior != "kl":
            self.graph, self.section_sizes = loss_weights(
                weights, coords=coords, k_neighbors=k_neighbors, weights_kind=weights_kind, radius=radius,
                bandwidth=bandwidth, scale_coords=scale_coords)
        self.n_spots: int | None = None if self.graph is None else int(self.graph.shape[0])

        precision: torch.Tensor | None = None
        kl_w: torch.Tensor | None = None
        if prior == "kl":
            if self.graph is not None:
                w = _priors.row_scale_weights(self.graph) if self.row_scale else self.graph
                kl_w = _sparse_tensor(w, dtype, device)
        else:
            dense = prior == "sma" or not self.use_sparse
            if dense and prior != "sma" and self.n_spots > self.max_dense_spots:
                raise ValueError(f"use_sparse=False keeps a dense ({self.n_spots} x {self.n_spots}) precision; it is "
                                 f"allowed up to max_dense_spots={self.max_dense_spots} spots. Use use_sparse=True, "
                                 "or raise max_dense_spots if the memory allows.")
            q = loss_precision(self.graph, prior, self.rho, standardize_cov=self.standardize_cov,
                               row_scale=self.row_scale, max_dense_spots=self.max_dense_spots)
            if dense:
                arr = q.toarray() if scipy.sparse.issparse(q) else np.asarray(q)
                precision = torch.as_tensor(arr, dtype=dtype, device=device)
            else:
                precision = _sparse_tensor(q, dtype, device)
        self.register_buffer("precision", precision)
        self.register_buffer("kl_weights", kl_w)
        self.register_buffer("confidences", torch.ones(1, dtype=dtype, device=device))

    def extra_repr(self) -> str:
        where = "no weights" if self.n_spots is None else f"n_spots={self.n_spots}, sections={len(self.section_sizes)}"
        if self.prior == "kl":
            return f"prior='kl', {where}"
        return (f"prior={self.prior!r}, rho={self.rho:g}, standardize_cov={self.standardize_cov!r}, "
                f"row_scale={self.row_scale}, {where}, sparse={self.precision.layout != torch.strided}")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the losses: the precision's (kl: the weights'; follows ``.to(dtype)``)."""
        for t in (self.precision, self.kl_weights, self.confidences):
            if t is not None:
                return t.dtype
        return torch.float64  # unreachable: confidences always exist

    def _prepare(self, coefs: torch.Tensor, index: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not torch.is_tensor(coefs):
            raise ValueError(f"coefs must be a torch tensor, got {type(coefs).__name__}.")
        if coefs.ndim != 2:
            raise ValueError(f"coefs must be 2-D (num_group, num_spot), got shape {tuple(coefs.shape)}.")
        device = self.confidences.device
        if coefs.device != device:
            raise ValueError(f"coefs are on {coefs.device} but the loss is on {device}; move one (loss.to(device)).")
        if index is not None:
            index = torch.as_tensor(index, device=device)
            if index.ndim != 1 or index.dtype in (torch.bool,) or index.is_floating_point() or index.is_complex():
                raise ValueError("index must be a 1-D integer tensor of spot indices.")
            index = index.long()
            if coefs.shape[1] != index.numel():
                raise ValueError(f"with index, coefs must hold the batch's spots: {index.numel()} columns, got "
                                 f"{coefs.shape[1]}.")
            if self.n_spots is not None and index.numel() and (int(index.min()) < 0 or
                                                               int(index.max()) >= self.n_spots):
                raise ValueError(f"index must lie in [0, {self.n_spots}), got values in [{int(index.min())}, "
                                 f"{int(index.max())}].")
        elif self.n_spots is not None and coefs.shape[1] != self.n_spots:
            raise ValueError(f"coefs have {coefs.shape[1]} spots (columns) but the spatial weights {self.n_spots}.")
        return coefs.to(self.dtype), index

    def forward(self, coefs: torch.Tensor, normalize: bool = True, index: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """The loss of ``coefs``.

        Parameters
        ----------
        coefs
            ``(num_group, num_spot)`` coefficients (columns in the graph's spot order), or with
            ``index`` the ``(num_group, len(index))`` coefficients of a minibatch of spots (column
            ``j`` belongs to spot ``index[j]``).  Cast to the loss's dtype.
        normalize
            Divide the quadratic loss by ``coefs.numel()`` (ignored by ``prior="kl"``, as in Smoother).
        index
            Spot indices of a minibatch.  The quadratic loss then uses ``Q[index][:, index]``, the
            precision of the batch's coefficients *given* the other spots' at the prior mean 0 (the
            conditional ``N(0, Q_bb^-1)``): a minibatch approximation that ignores the edges leaving
            the batch, so the batch losses do not sum to the full loss.  kl uses
            ``W[index][:, index]``.

        Returns
        -------
        torch.Tensor
            A scalar, differentiable in ``coefs``.
        """
        coefs, index = self._prepare(coefs, index)
        if self.prior == "kl":
            p = torch.softmax(coefs, dim=0)
            w = self.kl_weights
            if w is not None and index is not None:
                w = _take(w, index)
            return kl_loss(p, w)
        q = self.precision if index is None else _take(self.precision, index)
        if q.layout != torch.strided:
            return sparse_quadratic_loss(coefs, q, self.confidences, normalize)
        return quadratic_loss(coefs, q, self.confidences, normalize)

    def estimate_confidence(self, ref_exp: torch.Tensor, st_exp: torch.Tensor, method: str = "lr") -> None:
        """Set :attr:`confidences` from a least-squares deconvolution (Smoother's ``estimate_confidence``).

        The least-squares solution ``X`` of ``ref_exp X = st_exp`` is ``(num_group, num_spot)``;
        each group's confidence is the standard deviation of its row over the spots, divided by
        the largest one.  The more a group varies, the stronger it is smoothed.

        Parameters
        ----------
        ref_exp
            Reference signatures, ``(num_gene, num_group)``.
        st_exp
            Spatial expression, ``(num_gene, num_spot)``.
        method
            ``"lr"`` (least squares), the only method.
        """
        if method != "lr":
            raise ValueError(f"method must be 'lr', got {method!r}.")
        dtype, device = self.dtype, self.confidences.device
        solution = torch.linalg.lstsq(torch.as_tensor(ref_exp, dtype=dtype, device=device),
                                      torch.as_tensor(st_exp, dtype=dtype, device=device)).solution
        sd = torch.std(solution, dim=1)
        self.confidences = (sd / sd.max()).detach()


class ContrastiveSpatialLoss(SpatialLoss):
    """Contrastive spatial loss: true neighbours' loss minus that of randomly permuted spots.

    ``loss = max(L(coefs) - ratio * mean_k L(coefs[:, perm_k]), lower_bound)`` with ``L`` the
    :class:`SpatialLoss`, ``num_perm`` random spot permutations ``perm_k`` and ``lower_bound``
    multiplied by ``coefs.numel()`` when ``normalize=False`` (contrastive Laplacian eigenmaps, Zhu
    et al. 2021; Smoother's ``ContrastiveSpatialLoss``).  The permutations come from a
    ``torch.Generator`` seeded with ``seed`` at construction: each call draws the next
    ``num_perm`` permutations, so a run is reproducible given the seed (Smoother draws them from
    torch's global generator).  :meth:`manual_seed` restarts the sequence.

    Parameters
    ----------
    prior, weights, rho
        As :class:`SpatialLoss`; the defaults (icar, ``rho = 1``) make ``Q`` the graph Laplacian.
    standardize_cov
        Default ``"auto"``: the unit-diagonal covariance's precision where ``Q`` is positive
        definite, else ``Q`` scaled to unit diagonal (the normalised Laplacian at the defaults);
        this is what Smoother's default ``standardize_cov=True`` computes.  ``True`` is refused on a
        singular ``Q``.
    num_perm
        Negative samples (permutations) per call.
    neg2pos_ratio
        Weight of the negative samples' mean loss.
    lower_bound
        Floor of the loss (per coefficient).
    seed
        Seed of the permutations.
    **kwargs
        The other keywords of :class:`SpatialLoss`.
    """

    def __init__(self, prior: str = "icar", weights: WeightsLike | Sequence[WeightsLike] | None = None, *,
                 rho: float = 1.0, standardize_cov: bool | str = "auto", num_perm: int = 10,
                 neg2pos_ratio: float = 0.5, lower_bound: float = -1.0, seed: int = 0, **kwargs: Any) -> None:
        super().__init__(prior, weights, rho=rho, standardize_cov=standardize_cov, **kwargs)
        if int(num_perm) != num_perm or num_perm < 1:
            raise ValueError(f"num_perm must be an integer >= 1, got {num_perm!r}.")
        if not math.isfinite(float(neg2pos_ratio)) or neg2pos_ratio < 0:
            raise ValueError(f"neg2pos_ratio must be a finite number >= 0, got {neg2pos_ratio!r}.")
        if not math.isfinite(float(lower_bound)):
            raise ValueError(f"lower_bound must be finite, got {lower_bound!r}.")
        self.num_perm = int(num_perm)
        self.neg2pos_ratio = float(neg2pos_ratio)
        self.lower_bound = float(lower_bound)
        self.manual_seed(seed)

    def manual_seed(self, seed: int) -> None:
        """Restart the permutations from ``seed``."""
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, num_perm={self.num_perm}, neg2pos_ratio={self.neg2pos_ratio:g}, "
                f"lower_bound={self.lower_bound:g}, seed={self.seed}")

    def forward(self, coefs: torch.Tensor, normalize: bool = True, index: torch.Tensor | None = None,
                ) -> torch.Tensor:
        """The contrastive loss of ``coefs`` (arguments as :meth:`SpatialLoss.forward`)."""
        pos = super().forward(coefs, normalize=normalize, index=index)
        m = coefs.shape[1]
        neg = pos.new_zeros(())
        for _ in range(self.num_perm):
            perm = torch.randperm(m, generator=self.generator).to(coefs.device)
            neg = neg + super().forward(coefs[:, perm], normalize=normalize, index=index)
        total = pos - self.neg2pos_ratio * (neg / self.num_perm)
        floor = self.lower_bound if normalize else self.lower_bound * coefs.shape[0] * coefs.shape[1]
        return torch.clamp(total, min=floor)
