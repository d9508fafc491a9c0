"""Per-gene fitting state shared by every GLMM fitting method: set-up, optimiser, stopping rule, results.

Every gene of a batch has its own optimiser state and its own stopping rule
(:class:`PerGeneStopping`), so a gene's fit does not depend on the other
genes of its batch.
"""

from __future__ import annotations

import math

import numpy as np

from spatialscale.glmm.config import GLMMConfig, initial_sigma

__all__ = ["setup_fit", "pack_fit", "PerGeneAdam", "PerGeneStopping"]


def setup_fit(counts, eigvals, eigvecs, design, cfg: GLMMConfig, device: str, init: dict | None = None):
    """Tensors of a batch fit: ``(data, params, learn)`` at SPLISOSM's starting values.

    ``data`` holds ``counts``, ``x``, ``lgamma_const``, ``totals`` (and the
    eigenpairs for ``glmm-full``); ``params`` the initial ``nu``, ``beta``,
    ``bias``, ``sigma`` and ``theta_logit`` (any of them replaced by the
    arrays in ``init``, e.g. another model's fit); ``learn`` the names fitted.
    """
    import torch

    dt = torch.float32 if cfg.dtype == "float32" else torch.float64
    c_np = np.asarray(counts, dtype=np.float64)
    b, n, p = c_np.shape
    if p < 2:
        raise ValueError("the GLMM needs genes with at least two isoforms.")
    q = p - 1
    v = 1 if cfg.share_variance else q
    z = np.zeros((n, 0)) if design is None else np.asarray(design, dtype=np.float64).reshape(n, -1)
    counts_t = torch.as_tensor(c_np, dtype=dt, device=device)
    lgamma_const = (torch.lgamma(counts_t.sum(-1) + 1).sum(1) - torch.lgamma(counts_t + 1).sum((1, 2)))
    data = {"counts": counts_t, "x": torch.as_tensor(z, dtype=dt, device=device), "lgamma_const": lgamma_const,
            "totals": counts_t.sum(-1)}
    if cfg.model == "glmm-full":
        if eigvals is None or eigvecs is None:
            raise ValueError("glmm-full needs the kernel's eigenpairs.")
        data["eigvals"] = torch.as_tensor(np.asarray(eigvals), dtype=dt, device=device)
        data["eigvecs"] = torch.as_tensor(np.asarray(eigvecs), dtype=dt, device=device)

    nu0 = np.zeros((b, n, q))
    if cfg.init_ratio == "observed":
        props = c_np / (c_np.sum(-1, keepdims=True) + 1e-5)
        nu0 = np.log((props[..., :-1] + 1e-5) / (props[..., -1:] + 1e-5))
    params = {
        "nu": torch.as_tensor(nu0, dtype=dt, device=device),
        "beta": torch.zeros(b, z.shape[1], q, dtype=dt, device=device),
        "bias": torch.zeros(b, q, dtype=dt, device=device),
        "sigma": torch.as_tensor(np.repeat(initial_sigma(c_np)[:, None], v, 1), dtype=dt, device=device),
        "theta_logit": torch.full((b, v), -3.0, dtype=dt, device=device),
    }
    learn = ["nu", "beta", "bias"] + ([] if cfg.model == "glmm-null" else ["theta_logit"])
    if cfg.model == "glm":
        learn = ["beta", "bias"]
    elif not cfg.var_fix_sigma:
        learn.append("sigma")
    for k, val in (init or {}).items():
        if k not in params:
            raise ValueError(f"unknown starting value {k!r}; expected one of {', '.join(params)}.")
        t = torch.as_tensor(np.asarray(val), dtype=dt, device=device)
        if t.shape != params[k].shape:
            raise ValueError(f"starting value {k!r} has shape {tuple(t.shape)}, expected {tuple(params[k].shape)}.")
        params[k] = t.clone()
    if cfg.model == "glmm-null":
        params["theta_logit"] = torch.full((b, v), -math.inf, dtype=dt, device=device)
    return data, params, learn


def pack_fit(best: dict, best_loss, epochs, converged, data: dict) -> dict[str, np.ndarray]:
    """The result dict of a batch fit from its best parameters (see :func:`fit_glmm`)."""
    import torch

    nu = best["nu"]
    b, n, _ = nu.shape
    with torch.no_grad():
        eta = nu + torch.einsum("nf,bfq->bnq", data["x"], best["beta"]) + best["bias"][:, None, :]
        full = torch.cat([eta, torch.zeros(b, n, 1, dtype=eta.dtype, device=eta.device)], dim=-1)
        probs = torch.softmax(full.double(), dim=-1)

    def out(t):
        return t.detach().cpu().numpy()

    theta = torch.sigmoid(best["theta_logit"])
    return {
        "nu": out(nu), "beta": out(best["beta"]), "intercept": out(best["bias"]),
        "sigma": out(best["sigma"].abs()), "theta": out(theta), "probs": out(probs),
        "loss": out(best_loss), "epochs": out(epochs), "converged": out(converged),
    }


class PerGeneAdam:
    """Adam steps (torch.optim.Adam's update) or plain gradient steps, with one state per gene.

    Each gene keeps its own moments and step count, so a gene's path never
    depends on its batch-mates (``torch.optim`` shares the step count).

    Parameters
    ----------
    params
        The batch's parameters (first axis: genes).
    names
        The parameters moved by :meth:`step`.
    lr, optim
        Learning rate; ``adam`` or ``sgd``.
    """

    beta1, beta2, eps = 0.9, 0.999, 1e-8

    def __init__(self, params: dict, names: list[str], lr: float, optim: str) -> None:
        import torch

        self.names, self.lr, self.sgd = list(names), lr, optim == "sgd"
        self.m = {k: torch.zeros_like(params[k]) for k in self.names}
        self.s = {k: torch.zeros_like(params[k]) for k in self.names}
        nu = params["nu"]
        self.steps = torch.zeros(nu.shape[0], dtype=nu.dtype, device=nu.device)

    def step(self, params: dict, grads: dict, idx) -> None:
        """Move genes ``idx`` (index tensor) of ``params`` in place, by ``grads`` (rows ``idx`` only)."""
        import torch

        b1, b2 = self.beta1, self.beta2
        self.steps[idx] += 1
        bc1, bc2 = 1 - b1 ** self.steps[idx], 1 - b2 ** self.steps[idx]
        for k in self.names:
            g = torch.nan_to_num(grads[k])
            shape = (-1, *([1] * (g.dim() - 1)))
            m = b1 * self.m[k][idx] + (1 - b1) * g
            v = b2 * self.s[k][idx] + (1 - b2) * g * g
            self.m[k][idx], self.s[k][idx] = m, v
            if self.sgd:
                upd = self.lr * g
            else:
                upd = self.lr * (m / bc1.view(shape)) / ((v / bc2.view(shape)).sqrt() + self.eps)
            params[k][idx] = params[k][idx] - upd




class PerGeneStopping:
    """The one stopping rule of every GLMM fitting loop, kept per gene.

    Each evaluation of a gene's loss (the starting values first, then after
    each of its steps) is recorded: the gene keeps its best loss (and the
    caller its best parameters) on any improvement; it stops after
    ``patience`` steps without an improvement of at least ``tol`` over a
    reference loss that moves only by such improvements, or at a non-finite
    loss.  A stopped gene is never evaluated or changed again.

    Parameters
    ----------
    n_genes
        Genes of the batch.
    cfg
        Supplies ``tol`` and ``patience``.
    device
        Torch device of the state.
    """

    def __init__(self, n_genes: int, cfg: GLMMConfig, device) -> None:
        import torch

        self.tol, self.patience = cfg.tol, cfg.patience
        self.best_loss = torch.full((n_genes,), math.inf, dtype=torch.float64, device=device)
        self.ref_loss = self.best_loss.clone()
        self.wait = torch.zeros(n_genes, dtype=torch.int64, device=device)
        self.active = torch.ones(n_genes, dtype=torch.bool, device=device)
        self.epochs = torch.zeros(n_genes, dtype=torch.int64, device=device)

    def record(self, idx, loss, *, first: bool = False):
        """Record the losses ``(len(idx),)`` of genes ``idx``; return where they improved on the best.

        ``first``: the losses of the starting values (no step counted).
        """
        import torch

        new = loss.detach().double()
        finite = torch.isfinite(new)
        new = torch.where(finite, new, torch.full_like(new, math.inf))
        better = new < self.best_loss[idx]
        self.best_loss[idx] = torch.where(better, new, self.best_loss[idx])
        significant = finite & (new < self.ref_loss[idx] - self.tol)
        self.ref_loss[idx] = torch.where(significant, new, self.ref_loss[idx])
        if not first:
            self.wait[idx] = torch.where(significant, torch.zeros_like(self.wait[idx]), self.wait[idx] + 1)
            self.epochs[idx] += 1
        self.active[idx] = (self.wait[idx] < self.patience) & finite
        return better

    def running(self):
        """Indices of the genes still fitting."""
        return self.active.nonzero()[:, 0]

    @property
    def converged(self):
        """Genes that stopped by the rule (not by the epoch budget)."""
        return ~self.active
