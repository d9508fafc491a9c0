"""Cell-type deconvolution by non-negative least squares with an optional spatial loss.

Each spot's gene expression ``y_s`` (genes) is modelled as a non-negative
combination of the reference signatures, ``y_s ~ X beta_s (+ c_s)``, with
``X`` the genes x types signature matrix and ``c_s`` an optional per-spot
intercept. The coefficients of all spots form ``beta`` (types x spots, the
``coefs`` layout of :class:`spatialscale.losses.SpatialLoss`) and minimise::

    mean_{s,g} (y_sg - (X beta_s)_g - c_s)^2  +  lambda_spatial * spatial_loss(beta)

subject to ``beta >= 0``. Without a spatial loss (or with
``lambda_spatial == 0``) the problem separates into one NNLS per spot, solved
exactly; with one, the coupled problem is solved full-batch by accelerated
projected gradient (FISTA with backtracking and adaptive restart), started
from the per-spot solution. Proportions are ``beta`` normalised to sum to 1
per spot.

The per-spot intercept, when used, is eliminated in closed form: for given
``beta`` its optimum is the mean residual over genes, so the data term is the
least-squares fit of the gene-centred spot to the gene-centred signatures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.linalg
import scipy.optimize
import scipy.sparse

__all__ = ["DeconvResult", "nnls_deconvolve", "normalize_expression"]

_NORMALIZE = ("library", "log1p", "none")


@dataclass
class DeconvResult:
    """Outcome of :func:`nnls_deconvolve`.

    Attributes
    ----------
    proportions
        ``(n_spots, n_types)`` float64, non-negative, each row summing to 1
        (a spot whose coefficients are all 0 gets equal proportions).
    coefficients
        ``(n_spots, n_types)`` float64, the unnormalised ``beta`` (transposed
        to spots x types), on the scale of the normalised data.
    intercept
        ``(n_spots,)`` per-spot intercepts when ``bias=True``, else ``None``.
    history
        Per epoch of the optimiser: ``loss`` (total), ``model_loss`` and
        ``spatial_loss`` (weighted by ``lambda_spatial``), lists of floats;
        entry 0 is the starting point (the per-spot NNLS solution).
    final_loss
        The total loss at the returned coefficients.
    epochs
        Optimiser epochs run (0 when the problem separated by spot).
    converged
        Whether the coefficients changed by less than ``tol`` in the last epoch
        (always ``True`` for the exact per-spot solution).
    normalize
        The normalisation applied to ``counts`` and ``reference``.
    """

    proportions: np.ndarray
    coefficients: np.ndarray
    intercept: np.ndarray | None
    history: dict[str, list[float]] = field(default_factory=dict)
    final_loss: float = math.nan
    epochs: int = 0
    converged: bool = True
    normalize: str = "library"


def normalize_expression(x: np.ndarray, method: str = "library") -> np.ndarray:
    """Put spots (or reference rows) on a common scale, row by row.

    Parameters
    ----------
    x
        ``(n_rows, n_genes)`` non-negative expression (counts, or a reference's
        mean expression per cell).
    method
        ``library``: each row divided by its total and multiplied by the number
        of genes (mean 1 per gene; all-zero rows stay zero). Mixing is linear on
        this scale, so a spot's normalised expression is the proportion-weighted
        sum of the normalised signatures when every type has the same total.
        ``log1p``: ``log1p`` of the row scaled to a total of 10^4 (the
        log-normalised data of Smoother's deconvolution tutorial; mixing is not
        linear there). ``none``: ``x`` as given.

    Returns
    -------
    numpy.ndarray
        float64, the shape of ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    if method == "none":
        return x.copy()
    if method not in _NORMALIZE:
        raise ValueError(f"unknown normalize {method!r}; choose one of {', '.join(_NORMALIZE)}.")
    total = x.sum(axis=1, keepdims=True)
    scale = np.divide(1.0, total, out=np.zeros_like(total), where=total > 0)
    if method == "library":
        return x * scale * x.shape[1]
    return np.log1p(x * scale * 1e4)


def _as_dense(a: Any, name: str) -> np.ndarray:
    if scipy.sparse.issparse(a):
        a = a.toarray()
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got {a.ndim} dimension(s).")
    return a


def _check_inputs(counts: Any, reference: Any, lambda_spatial: float) -> tuple[np.ndarray, np.ndarray]:
    y = _as_dense(counts, "counts")
    x = _as_dense(reference, "reference")
    if y.shape[1] == 0 or x.shape[1] == 0:
        raise ValueError("no genes: counts and reference need at least one gene column.")
    if x.shape[0] == 0:
        raise ValueError("no cell types: the reference has no rows.")
    if y.shape[0] == 0:
        raise ValueError("no spots: counts has no rows.")
    if y.shape[1] != x.shape[1]:
        raise ValueError(f"counts has {y.shape[1]} genes but the reference {x.shape[1]} (same genes, same order).")
    if not np.isfinite(x).all():
        raise ValueError("the reference has NaN or infinite values.")
    if not np.isfinite(y).all():
        raise ValueError("counts has NaN or infinite values.")
    if (y < 0).any():
        raise ValueError("counts must be non-negative.")
    if (x < 0).any():
        raise ValueError("the reference must be non-negative.")
    if not (lambda_spatial >= 0 and math.isfinite(lambda_spatial)):
        raise ValueError(f"lambda_spatial must be a finite number >= 0, got {lambda_spatial}.")
    return y, x


def _per_spot_nnls(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact NNLS of every spot, ``(n_types, n_spots)``.

    The spots share the Gram matrix ``A = X^T X`` (``x`` is types x genes), so
    with ``A = R^T R`` each spot's problem ``min ||y_s - X b||`` equals
    ``min ||R b - R^{-T} X^T y_s||`` up to a constant: a types x types NNLS.
    A rank-deficient reference falls back to the genes x types problem.
    """
    gram = x @ x.T
    rhs = x @ y.T  # types x spots
    try:
        r = scipy.linalg.cholesky(gram, lower=False)
        if np.linalg.cond(r) > 1e6:
            raise np.linalg.LinAlgError
        design, targets = r, scipy.linalg.solve_triangular(r, rhs, trans="T")
    except np.linalg.LinAlgError:
        design, targets = x.T, y.T
    beta = np.empty((x.shape[0], y.shape[0]))
    for s in range(y.shape[0]):
        beta[:, s] = scipy.optimize.nnls(design, targets[:, s])[0]
    return beta


def _clipped_lstsq(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least squares of every spot clipped at 0, ``(n_types, n_spots)`` (a cheap start for many spots)."""
    return np.clip(np.linalg.lstsq(x.T, y.T, rcond=None)[0], 0.0, None)


def _spatial_caller(spatial_loss: Callable, torch: Any) -> Callable:
    """Call ``spatial_loss`` in the floating dtype of its tensors, if it has any, returning our dtype."""
    dtype = None
    if isinstance(spatial_loss, torch.nn.Module):
        for t in list(spatial_loss.buffers()) + list(spatial_loss.parameters()):
            if t.is_floating_point():
                dtype = t.dtype
                break

    def call(beta):
        value = spatial_loss(beta if dtype is None else beta.to(dtype))
        return value.to(beta.dtype) if torch.is_tensor(value) else torch.as_tensor(value, dtype=beta.dtype)

    return call


def _projected_step(objective: Callable, z, f_z, g_z, step: float, torch: Any):
    """One projected-gradient step from ``z``, halving ``step`` until the quadratic upper bound holds."""
    while True:
        cand = torch.clamp(z - step * g_z, min=0.0)
        diff = cand - z
        f_c, parts = objective(cand)
        bound = f_z + (g_z * diff).sum() + (diff * diff).sum() / (2.0 * step)
        if f_c <= bound + 1e-12 * abs(float(f_z)) or step < 1e-20:
            return cand, f_c, parts, step
        step *= 0.5


def _fista(objective: Callable, beta0, *, step: float, max_epochs: int, tol: float, progress: bool, torch: Any):
    """Minimise ``objective`` over ``beta >= 0`` by FISTA with backtracking and adaptive restart.

    Returns the minimiser, the per-epoch losses, the epochs run and whether
    the last epoch moved ``beta`` by less than ``tol * max(1, max |beta|)``.
    """
    from tqdm.auto import tqdm

    def value_and_grad(b):
        b = b.detach().requires_grad_(True)
        total, _ = objective(b)
        (grad,) = torch.autograd.grad(total, b)
        return total.detach(), grad

    beta = beta0.clone()
    total, parts = objective(beta)
    history = {"loss": [float(total)], "model_loss": [parts[0]], "spatial_loss": [parts[1]]}
    z, t_k, converged, epochs = beta.clone(), 1.0, False, 0
    bar = tqdm(total=max_epochs, desc="nnls deconvolution", disable=not progress, leave=False)
    try:
        while epochs < max_epochs:
            epochs += 1
            cand, f_c, parts, step = _projected_step(objective, z, *value_and_grad(z), step, torch)
            if f_c > total:  # restart: drop the momentum, take a plain projected step from beta
                t_k = 1.0
                cand, f_c, parts, step = _projected_step(objective, beta, *value_and_grad(beta), step, torch)
            t_next = (1.0 + math.sqrt(1.0 + 4.0 * t_k * t_k)) / 2.0
            moved = float((cand - beta).abs().max())
            z = cand + ((t_k - 1.0) / t_next) * (cand - beta)
            beta, total, t_k = cand, f_c, t_next
            history["loss"].append(float(total))
            history["model_loss"].append(parts[0])
            history["spatial_loss"].append(parts[1])
            bar.update(1)
            bar.set_postfix(loss=f"{float(total):.6g}", refresh=False)
            if moved <= tol * max(1.0, float(beta.abs().max())):
                converged = True
                break
    finally:
        bar.close()
    return beta, history, epochs, converged


def nnls_deconvolve(
    counts: Any,
    reference: Any,
    *,
    spatial_loss: Callable | None = None,
    lambda_spatial: float = 1.0,
    normalize: str = "library",
    bias: bool = False,
    init: str = "nnls",
    max_epochs: int = 2000,
    lr: float | None = None,
    tol: float = 1e-7,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> DeconvResult:
    """Deconvolve spots into cell-type proportions by (spatially regularised) NNLS.

    Parameters
    ----------
    counts
        ``(n_spots, n_genes)`` gene-level expression (counts; numpy or scipy
        sparse), genes in the order of ``reference``'s columns.
    reference
        ``(n_types, n_genes)`` mean expression per cell of each type (the
        signatures), e.g. from annotated single-cell data.
    spatial_loss
        A callable ``loss(coefs) -> scalar tensor`` on the ``(n_types, n_spots)``
        coefficients, such as :class:`spatialscale.losses.SpatialLoss` (called
        with its defaults, i.e. ``normalize=True``). It must run on ``device``;
        a torch module is called in the dtype of its floating tensors.
    lambda_spatial
        Weight of the spatial loss (>= 0; 0 or ``spatial_loss=None`` gives the
        per-spot NNLS).
    normalize
        How ``counts`` and ``reference`` rows are put on one scale before the
        fit (see :func:`normalize_expression`): ``library`` (default; each row
        divided by its total, times ``n_genes``: ``beta`` is then on the
        proportion scale and sums to about 1 per spot), ``log1p`` (Smoother's
        log-normalised inputs) or ``none`` (already comparable inputs).
    bias
        Fit a free per-spot intercept (as Smoother's regression layer does).
    init
        Starting point of the spatially regularised fit: ``nnls`` (exact
        per-spot NNLS, one small types x types problem per spot) or ``lstsq``
        (least squares clipped at 0, vectorised, for very many spots).
        Without a spatial loss the exact per-spot NNLS is returned either way.
    max_epochs
        Most optimiser epochs (full-batch projected-gradient steps).
    lr
        First step size; ``None`` uses ``1 / L`` with ``L`` the Lipschitz
        constant of the data term's gradient. Backtracking halves it as
        needed for the spatial term.
    tol
        Stop when no coefficient moves by more than ``tol * max(1, max beta)``.
    seed
        Seeds torch (the fit itself is deterministic).
    device
        Torch device of the optimisation.
    progress
        Show a tqdm bar with the loss.

    Returns
    -------
    DeconvResult
        Proportions, coefficients, the loss history and convergence.

    Raises
    ------
    ValueError
        On empty or mismatched inputs, NaN or negative values, an unknown
        ``normalize`` / ``init`` or a negative ``lambda_spatial``.
    """
    import torch

    y, x = _check_inputs(counts, reference, lambda_spatial)
    if normalize not in _NORMALIZE:
        raise ValueError(f"unknown normalize {normalize!r}; choose one of {', '.join(_NORMALIZE)}.")
    if init not in ("nnls", "lstsq"):
        raise ValueError(f"unknown init {init!r}; choose nnls or lstsq.")
    if max_epochs < 0:
        raise ValueError(f"max_epochs must be >= 0, got {max_epochs}.")
    if (x.sum(axis=1) <= 0).any():
        raise ValueError("a reference cell type has no expression (an all-zero row).")
    y, x = normalize_expression(y, normalize), normalize_expression(x, normalize)
    n_spots, n_genes = y.shape
    y_fit, x_fit = (y - y.mean(axis=1, keepdims=True), x - x.mean(axis=1, keepdims=True)) if bias else (y, x)

    spatial = spatial_loss is not None and lambda_spatial > 0
    beta0 = _per_spot_nnls(y_fit, x_fit) if (init == "nnls" or not spatial) else _clipped_lstsq(y_fit, x_fit)
    torch.manual_seed(seed)
    dev = torch.device(device)
    # the data term in Gram form, O(types^2 x spots) per evaluation instead of O(types x spots x genes):
    # mean_sg (y - X^T beta)^2 = (sum(beta * (A beta)) - 2 sum(beta * C) + ||y||^2) / (spots x genes)
    gram = torch.as_tensor(x_fit @ x_fit.T, dtype=torch.float64, device=dev)
    cross = torch.as_tensor(x_fit @ y_fit.T, dtype=torch.float64, device=dev)
    y_sq, scale = float((y_fit * y_fit).sum()), 1.0 / (n_spots * n_genes)
    call_spatial = _spatial_caller(spatial_loss, torch) if spatial else None

    def objective(beta):
        model = scale * ((beta * (gram @ beta - 2.0 * cross)).sum() + y_sq)
        if call_spatial is None:
            return model, (model.item(), 0.0)
        sp = lambda_spatial * call_spatial(beta)
        return model + sp, (model.item(), sp.item())

    beta = torch.as_tensor(beta0, dtype=torch.float64, device=dev)
    if spatial and max_epochs > 0:
        lipschitz = 2.0 * scale * float(torch.linalg.eigvalsh(gram)[-1])
        step = float(lr) if lr is not None else 1.0 / max(lipschitz, 1e-300)
        beta, history, epochs, converged = _fista(objective, beta, step=step, max_epochs=max_epochs, tol=tol,
                                                  progress=progress, torch=torch)
    else:
        with torch.no_grad():
            total, parts = objective(beta)
        history = {"loss": [float(total)], "model_loss": [parts[0]], "spatial_loss": [parts[1]]}
        epochs, converged = 0, not spatial
    with torch.no_grad():
        final = float(objective(beta)[0])
    coef = beta.detach().cpu().numpy().T.astype(np.float64)
    intercept = (y.mean(axis=1) - coef @ x.mean(axis=1)) if bias else None
    return DeconvResult(proportions=coefficients_to_proportions(coef), coefficients=coef, intercept=intercept,
                        history=history, final_loss=final, epochs=epochs, converged=converged, normalize=normalize)


def coefficients_to_proportions(coef: np.ndarray) -> np.ndarray:
    """Rows of non-negative coefficients scaled to sum to 1 (all-zero rows: equal proportions)."""
    coef = np.clip(np.asarray(coef, dtype=np.float64), 0.0, None)
    total = coef.sum(axis=1, keepdims=True)
    out = np.full_like(coef, 1.0 / coef.shape[1])
    np.divide(coef, total, out=out, where=total > 0)
    return out
