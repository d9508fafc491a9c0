"""SpatialPCA: principal components with an optional spatial loss on the latent factors.

With ``Z`` the ``(n_spots, n_genes)`` gene-centred (and scaled) data and
``U`` the ``(n_genes, k)`` loadings with orthonormal columns, the latent
factors are ``H = Z U`` and the loadings minimise::

    - ||H||_F^2 / (k n_spots)  +  lambda_spatial * spatial_loss(H^T)

over ``U^T U = I`` (``H^T`` is ``k x n_spots``, the ``coefs`` layout of
:class:`spatialscale.losses.SpatialLoss`). The first term is minus the mean
variance captured per component, so without the spatial loss the optimum is
the top-``k`` principal subspace, computed here directly by SVD. With the
loss, Riemannian gradient descent on the Stiefel manifold (Armijo
backtracking, QR retraction) starts from that subspace and trades captured
variance for smoothness of the factors over the spatial graph.

The objective depends only on the subspace when the spatial loss is the same
quadratic form for every factor, so the loadings are finally rotated within
the subspace to its principal axes (uncorrelated factors in decreasing
variance, as PCA reports them); ``rotate=False`` keeps the optimiser's axes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse

from spatialscale.expression.nnls import _spatial_caller

__all__ = ["PCAResult", "spatial_pca", "standardize_genes"]


@dataclass
class PCAResult:
    """Outcome of :func:`spatial_pca`.

    Attributes
    ----------
    latent
        ``(n_spots, n_latent)`` float64 factors ``Z @ loadings``.
    loadings
        ``(n_genes, n_latent)`` float64 with orthonormal columns.
    explained_variance
        ``(n_latent,)`` variance of each factor (``ddof=1``, as scikit-learn).
    mean, scale
        ``(n_genes,)`` the centring and scaling applied to the data
        (``scale`` all ones when ``scale=False``).
    history
        Per epoch: ``loss`` (total), ``recon_loss`` (minus the mean variance
        per component) and ``spatial_loss`` (weighted); entry 0 is the PCA
        start.
    final_loss
        The total loss at the returned loadings.
    epochs
        Optimiser epochs run (0 without a spatial loss).
    converged
        Whether the last epoch moved the loadings by less than ``tol``.
    """

    latent: np.ndarray
    loadings: np.ndarray
    explained_variance: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    history: dict[str, list[float]] = field(default_factory=dict)
    final_loss: float = math.nan
    epochs: int = 0
    converged: bool = True


def standardize_genes(data: Any, scale: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre each gene (column) and, with ``scale``, divide it by its SD (``ddof=0``).

    Constant genes are centred to 0 and left unscaled. Returns the
    standardised float64 matrix, the means and the scales.
    """
    if scipy.sparse.issparse(data):
        data = data.toarray()
    z = np.array(data, dtype=np.float64)
    mean = z.mean(axis=0)
    z -= mean
    sd = z.std(axis=0) if scale else np.ones(z.shape[1])
    sd = np.where(sd > 0, sd, 1.0)
    z /= sd
    return z, mean, sd


def _check(z: np.ndarray, n_latent: int, lambda_spatial: float) -> None:
    if z.ndim != 2:
        raise ValueError(f"data must be a 2-D (spots x genes) matrix, got {z.ndim} dimension(s).")
    n, g = z.shape
    if g == 0:
        raise ValueError("no genes: data has no columns.")
    if n < 2:
        raise ValueError(f"need at least 2 spots, got {n}.")
    if not np.isfinite(z).all():
        raise ValueError("data has NaN or infinite values.")
    if not 1 <= n_latent <= min(n, g):
        raise ValueError(f"n_latent must be between 1 and min(n_spots, n_genes) = {min(n, g)}, got {n_latent}.")
    if not (lambda_spatial >= 0 and math.isfinite(lambda_spatial)):
        raise ValueError(f"lambda_spatial must be a finite number >= 0, got {lambda_spatial}.")


def _principal_axes(z: np.ndarray, loadings: np.ndarray) -> np.ndarray:
    """Rotate ``loadings`` within their span to uncorrelated factors in decreasing variance, signs fixed.

    The sign of each column makes its largest-magnitude loading positive.
    """
    h = z @ loadings
    evals, evecs = np.linalg.eigh(h.T @ h)
    u = loadings @ evecs[:, ::-1]
    flip = np.sign(u[np.abs(u).argmax(axis=0), np.arange(u.shape[1])])
    return u * np.where(flip == 0, 1.0, flip)


def _qr_retract(u, torch: Any):
    """Orthonormal basis of the columns of ``u`` (QR with a positive diagonal of R, a smooth retraction)."""
    q, r = torch.linalg.qr(u)
    d = torch.sign(torch.diagonal(r))
    return q * torch.where(d == 0, torch.ones_like(d), d)


def _stiefel_descent(objective: Callable, u0, *, step: float, max_epochs: int, tol: float, progress: bool,
                     torch: Any):
    """Riemannian gradient descent with Armijo backtracking on ``{U: U^T U = I}``.

    Each epoch tries a Barzilai-Borwein step (from the last two iterates and
    Riemannian gradients; ``step`` for the first epoch) and halves it until
    the Armijo condition holds, so the loss never increases.
    """
    from tqdm.auto import tqdm

    def value_and_rgrad(u):
        ug = u.detach().requires_grad_(True)
        f_u, _ = objective(ug)
        (grad,) = torch.autograd.grad(f_u, ug)
        sym = u.T @ grad
        return f_u.item(), grad - u @ ((sym + sym.T) / 2.0)  # projection onto the tangent space at u

    u = u0.clone()
    total, parts = objective(u)
    history = {"loss": [float(total)], "recon_loss": [parts[0]], "spatial_loss": [parts[1]]}
    converged, epochs = False, 0
    f_u, rgrad = value_and_rgrad(u)
    bar = tqdm(total=max_epochs, desc="spatial pca", disable=not progress, leave=False)
    try:
        while epochs < max_epochs:
            epochs += 1
            slope = float((rgrad * rgrad).sum())
            trial = step
            while True:
                cand = _qr_retract(u - trial * rgrad, torch)
                f_c, parts = objective(cand)
                if f_c.item() <= f_u - 1e-4 * trial * slope or trial < 1e-20:
                    break
                trial *= 0.5
            moved = float((cand - u).abs().max())
            if f_c.item() > f_u:  # no descent at any step: stop here
                break
            f_new, rgrad_new = value_and_rgrad(cand)
            s_k, y_k = cand - u, rgrad_new - rgrad
            sy = float((s_k * y_k).sum())
            step = abs(float((s_k * s_k).sum()) / sy) if sy != 0 else 2.0 * trial
            u, f_u, rgrad = cand, f_new, rgrad_new
            history["loss"].append(f_u)
            history["recon_loss"].append(parts[0])
            history["spatial_loss"].append(parts[1])
            bar.update(1)
            bar.set_postfix(loss=f"{f_u:.6g}", refresh=False)
            if moved <= tol:
                converged = True
                break
    finally:
        bar.close()
    return u, history, epochs, converged


def spatial_pca(
    data: Any,
    n_latent: int = 10,
    *,
    spatial_loss: Callable | None = None,
    lambda_spatial: float = 0.1,
    scale: bool = True,
    rotate: bool = True,
    max_epochs: int = 1000,
    lr: float | None = None,
    tol: float = 1e-6,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = True,
) -> PCAResult:
    """Principal components of spots, optionally smoothed over space by a spatial loss.

    Parameters
    ----------
    data
        ``(n_spots, n_genes)`` normalised expression (numpy or scipy sparse),
        e.g. ``log1p`` of library-size-normalised gene counts
        (``normalize_expression(counts, "log1p")`` in
        :mod:`spatialscale.expression.nnls`), best restricted to highly
        variable genes. Each gene is centred here, and scaled to unit variance
        when ``scale`` (as ``sc.pp.scale`` before ``sc.tl.pca``).
    n_latent
        Number of factors.
    spatial_loss
        A callable ``loss(coefs) -> scalar tensor`` on the ``(n_latent,
        n_spots)`` factors, such as :class:`spatialscale.losses.SpatialLoss`
        (called with its defaults). ``None`` (or ``lambda_spatial=0``) gives
        ordinary PCA.
    lambda_spatial
        Weight of the spatial loss (>= 0).
    scale
        Scale genes to unit variance after centring.
    rotate
        Rotate the final loadings to the principal axes of their span.
    max_epochs
        Most optimiser epochs (full batch).
    lr
        First step size; ``None`` uses ``n_latent / (2 s1)`` with ``s1`` the
        largest variance of the data along a direction (Armijo backtracking
        adapts it).
    tol
        Stop when no loading moves by more than ``tol`` in an epoch.
    seed
        Seeds torch (the fit itself is deterministic).
    device
        Torch device of the optimisation (``spatial_loss`` must run there).
    progress
        Show a tqdm bar with the loss.

    Returns
    -------
    PCAResult
        Latent factors, orthonormal loadings, explained variance, the loss
        history and convergence.

    Raises
    ------
    ValueError
        On empty input, NaN, ``n_latent`` out of range or a negative ``lambda_spatial``.
    """
    import torch

    if scipy.sparse.issparse(data):
        data = data.toarray()
    raw = np.asarray(data, dtype=np.float64)
    _check(raw, n_latent, lambda_spatial)
    z, mean, sd = standardize_genes(raw, scale)
    n = z.shape[0]
    _, svals, vt = np.linalg.svd(z, full_matrices=False)
    loadings = vt[:n_latent].T.copy()
    spatial = spatial_loss is not None and lambda_spatial > 0
    torch.manual_seed(seed)
    dev = torch.device(device)
    zt = torch.as_tensor(z, dtype=torch.float64, device=dev)
    call_spatial = _spatial_caller(spatial_loss, torch) if spatial else None

    def objective(u):
        h = zt @ u
        recon = -(h * h).sum() / (n_latent * n)
        if call_spatial is None:
            return recon, (recon.item(), 0.0)
        sp = lambda_spatial * call_spatial(h.T)
        return recon + sp, (recon.item(), sp.item())

    u = torch.as_tensor(loadings, dtype=torch.float64, device=dev)
    if spatial and max_epochs > 0:
        step = float(lr) if lr is not None else n_latent / (2.0 * max(svals[0] ** 2 / n, 1e-300))
        u, history, epochs, converged = _stiefel_descent(objective, u, step=step, max_epochs=max_epochs, tol=tol,
                                                         progress=progress, torch=torch)
        loadings = u.detach().cpu().numpy()
    else:
        with torch.no_grad():
            total, parts = objective(u)
        history = {"loss": [float(total)], "recon_loss": [parts[0]], "spatial_loss": [parts[1]]}
        epochs, converged = 0, not spatial
    if rotate:
        loadings = _principal_axes(z, loadings)
    with torch.no_grad():
        final = float(objective(torch.as_tensor(loadings, dtype=torch.float64, device=dev))[0])
    latent = z @ loadings
    return PCAResult(latent=latent, loadings=loadings, explained_variance=latent.var(axis=0, ddof=1), mean=mean,
                     scale=sd, history=history, final_loss=final, epochs=epochs, converged=converged)
