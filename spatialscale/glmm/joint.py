"""``joint_gd``: Adam (or SGD) on the joint likelihood, every gene with its own optimiser state and stopping rule."""

from __future__ import annotations

import numpy as np

from spatialscale.glmm.config import GLMMConfig
from spatialscale.glmm.objective import loss_and_gradients
from spatialscale.glmm.state import PerGeneAdam, PerGeneStopping, pack_fit, setup_fit

__all__ = ["fit_joint_gd"]


def fit_joint_gd(counts: np.ndarray, eigvals: np.ndarray | None, eigvecs: np.ndarray | None, *,
                 design: np.ndarray | None = None, config: GLMMConfig | None = None, device: str = "cpu",
                 init: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Fit the GLMM (or the GLM's ``gd`` fit) of every gene of a batch by gradient steps on the joint likelihood.

    Arguments and result as :func:`spatialscale.glmm.glmm.fit_glmm`.  One
    forward pass per epoch: the loss at the start of an epoch is the
    post-step loss of the previous one, recorded by the stopping rule.
    """
    import torch

    cfg = config or GLMMConfig()
    data, params, learn = setup_fit(counts, eigvals, eigvecs, design, cfg, device, init)
    b = params["nu"].shape[0]
    adam = PerGeneAdam(params, learn, cfg.lr, cfg.optim)
    best = {k: params[k].detach().clone() for k in params}
    stop = PerGeneStopping(b, cfg, params["nu"].device)
    evaluated = torch.arange(b, device=params["nu"].device)  # epoch 0: the starting values
    for epoch in range(cfg.max_epochs + 1):
        loss, grads_by_name = loss_and_gradients(params, data, cfg, learn)
        with torch.no_grad():
            better = stop.record(evaluated, loss.detach()[evaluated], first=epoch == 0)
            gi = evaluated[better]
            for k in params:
                best[k][gi] = params[k].detach()[gi]
        if epoch == cfg.max_epochs:
            break
        idx = stop.running()
        if idx.numel() == 0:
            break
        with torch.no_grad():
            adam.step(params, {k: grads_by_name[k][idx] for k in learn}, idx)
        evaluated = idx
    return pack_fit(best, stop.best_loss, stop.epochs, stop.converged, data)
