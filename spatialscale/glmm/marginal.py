"""``marginal_gd`` / ``marginal_newton``: fits on the Laplace-approximated marginal likelihood.

With ``nu`` integrated out by Laplace's method::

    log p(Y) ~ log p(Y, nu) - 1/2 logdet H(nu),   H = W + C^-1

where ``W`` holds the per-spot multinomial blocks ``N_i (diag p_i - p_i p_i')``
and ``C^-1`` the random effect's precision (``H`` is the negative Hessian of
the log joint in ``nu``).  The loss is its negative,
:func:`neg_log_marginal`, batched over genes in torch, with autograd for
every parameter.

``H`` is dense in ``n q`` for ``glmm-full`` (one Cholesky factorisation of an
``n q x n q`` matrix per gene and epoch, ``O((n q)^3)`` time and
``O((n q)^2)`` memory): meant for sections of up to a few thousand spots, as
in SPLISOSM.  For ``glmm-null`` ``C^-1 = I / sigma^2`` and ``H`` is
block-diagonal, so the log-determinant is a sum over spots of ``q x q`` ones
(linear in ``n``).

``marginal_gd`` moves all parameters by per-gene Adam on the marginal loss.
``marginal_newton`` moves ``nu`` by a Newton-type step ``nu - H^-1 g`` every
``update_nu_every_k`` epochs of the gene (``g`` the gradient of the marginal
loss in ``nu``, ``H`` its dominant curvature, the joint's, already factored
for the loss) and the other parameters by Adam on the marginal loss.  Both
methods thus minimise the same function of ``(nu, beta, bias, theta, sigma)``.
(A step of ``nu`` to the mode of the *joint* instead, with Adam on the other
parameters, stalls: Adam's gradient in ``theta`` then misses the change of
the mode with ``theta``, and the loss along its path rises before it falls.
SPLISOSM's step, too, uses the marginal's gradient.)  Each gene stops on its
own as in ``joint_gd``; its best parameters are returned.
"""

from __future__ import annotations

import math

import numpy as np

from spatialscale.glmm.config import GLMMConfig
from spatialscale.glmm.newton import prior_precision, weight_blocks
from spatialscale.glmm.objective import neg_log_joint
from spatialscale.glmm.state import PerGeneAdam, PerGeneStopping, pack_fit, setup_fit

__all__ = ["dense_neg_hessian", "fit_marginal", "neg_log_marginal"]


def _probs_q(params: dict, data: dict):
    """Probabilities of the ``q`` non-reference isoforms, ``(B, n, q)`` (differentiable)."""
    import torch

    eta = params["nu"] + params["bias"][:, None, :] + torch.einsum("nf,bfq->bnq", data["x"], params["beta"])
    return torch.softmax(torch.cat([eta, torch.zeros_like(eta[..., :1])], -1), -1)[..., :-1]


def dense_neg_hessian(params: dict, data: dict, cfg):
    """``H = W + C^-1`` as a dense ``(B, n q, n q)`` tensor (spot-major: index ``i q + k``); differentiable."""
    import torch


    nu = params["nu"]
    b, n, q = nu.shape
    a, e = prior_precision(params["theta_logit"], params["sigma"], data, cfg, q)
    w = weight_blocks(_probs_q(params, data), data["totals"])  # (B, n, q, q)
    eye_n = torch.eye(n, dtype=nu.dtype, device=nu.device)
    eye_q = torch.eye(q, dtype=nu.dtype, device=nu.device)
    cinv = e[..., None, None] * eye_n  # (B, q, n, n)
    if a is not None:
        vec = data["eigvecs"]
        cinv = cinv + torch.einsum("nr,bqr,mr->bqnm", vec, a, vec)
    h = torch.einsum("bkij,kl->bikjl", cinv, eye_q) + torch.einsum("bikl,ij->bikjl", w, eye_n)
    return h.reshape(b, n * q, n * q)


def neg_log_marginal(params: dict, data: dict, cfg, *, return_factor: bool = False):
    """Negative Laplace marginal ``-log p(Y, nu) + 1/2 logdet(W + C^-1)`` per gene, ``(B,)``.

    Parameters
    ----------
    params, data, cfg
        As :func:`spatialscale.glmm.objective.neg_log_joint` (``data`` also needs
        ``totals``); differentiable in every parameter.
    return_factor
        Also return the Cholesky factor of ``H`` (detached): ``(B, n q, n q)``
        for ``glmm-full``, per-spot ``(B, n, q, q)`` for ``glmm-null``.

    Notes
    -----
    A gene whose ``H`` is not numerically positive definite gets ``inf``.
    """
    import torch


    joint = neg_log_joint(params, data, cfg)
    nu = params["nu"]
    q = nu.shape[2]
    if cfg.model == "glmm-null":  # block-diagonal H: one q x q block per spot
        _, e = prior_precision(params["theta_logit"], params["sigma"], data, cfg, q)
        h = weight_blocks(_probs_q(params, data), data["totals"]) + torch.diag_embed(e)[:, None]
        chol, info = torch.linalg.cholesky_ex(h)
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum((1, 2))
        bad = (info != 0).any(1)
    else:
        chol, info = torch.linalg.cholesky_ex(dense_neg_hessian(params, data, cfg))
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        bad = info != 0
    loss = torch.where(bad, torch.full_like(joint, math.inf), joint + 0.5 * logdet)
    return (loss, chol.detach()) if return_factor else loss


def _newton_nu_step(nu, grad, chol):
    """``nu - H^-1 grad`` with ``H`` factored in ``chol`` (dense ``(B, n q, n q)`` or per-spot ``(B, n, q, q)``)."""
    import torch

    b, n, q = nu.shape
    if chol.dim() == 4:
        return nu - torch.cholesky_solve(grad[..., None], chol)[..., 0]
    return nu - torch.cholesky_solve(grad.reshape(b, n * q, 1), chol).reshape(b, n, q)


def fit_marginal(counts: np.ndarray, eigvals: np.ndarray | None, eigvecs: np.ndarray | None, *,
                 design: np.ndarray | None = None, config=None, device: str = "cpu",
                 init: dict | None = None) -> dict[str, np.ndarray]:
    """Fit the GLMM of every gene in a batch on the Laplace marginal likelihood.

    Parameters
    ----------
    counts, eigvals, eigvecs, design, config, device, init
        As :func:`spatialscale.glmm.glmm.fit_glmm`; ``config.method`` is
        ``marginal_gd`` or ``marginal_newton`` (``config.lr`` is Adam's
        learning rate; SPLISOSM's wrapper uses 0.1 for these methods).

    Returns
    -------
    dict
        As :func:`spatialscale.glmm.glmm.fit_glmm`; ``loss`` is the negative
        Laplace marginal at the returned (best) parameters.
    """
    import torch

    cfg = config or GLMMConfig(method="marginal_gd")
    newton = cfg.method == "marginal_newton"
    data, params, learn = setup_fit(counts, eigvals, eigvecs, design, cfg, device, init)
    adam_names = [k for k in learn if not (newton and k == "nu")]
    b = params["nu"].shape[0]
    adam = PerGeneAdam(params, adam_names, cfg.lr, cfg.optim)
    best = {k: v.clone() for k, v in params.items()}
    stop = PerGeneStopping(b, cfg, params["nu"].device)
    per_gene = ("counts", "totals", "lgamma_const")

    # One evaluation per epoch: the loss at the start of an epoch is the post-step loss of the
    # previous one (epoch 0: the starting values), recorded by the stopping rule.
    for epoch in range(cfg.max_epochs + 1):
        idx = stop.running()
        if idx.numel() == 0:
            break
        sub_data = {k: (v[idx] if k in per_gene else v) for k, v in data.items()}
        grad_names = adam_names + (["nu"] if newton else [])
        leaves = {k: params[k][idx].clone().requires_grad_(k in grad_names) for k in params}
        loss, chol = neg_log_marginal(leaves, sub_data, cfg, return_factor=True)
        grads = list(torch.autograd.grad(loss.sum(), [leaves[k] for k in grad_names]))
        nu_grad = grads.pop() if newton else None
        with torch.no_grad():
            better = stop.record(idx, loss, first=epoch == 0)
            for k in params:
                best[k][idx[better]] = params[k][idx[better]]
            go = stop.active[idx]
        if epoch == cfg.max_epochs or not bool(go.any()):
            break
        sel = go.nonzero()[:, 0]  # positions within idx of the genes that step
        gidx = idx[sel]
        with torch.no_grad():
            if newton:
                due = (stop.epochs[gidx] % cfg.update_nu_every_k) == 0
                if bool(due.any()):
                    upd = sel[due]
                    params["nu"][gidx[due]] = _newton_nu_step(leaves["nu"].detach()[upd],
                                                              torch.nan_to_num(nu_grad[upd]), chol[upd])
            adam.step(params, {k: g[sel] for k, g in zip(adam_names, grads)}, gidx)
    return pack_fit(best, stop.best_loss, stop.epochs, stop.converged, data)
