"""The GLMM objective: negative log joint likelihood of a batch of genes, and its gradients.

See :mod:`spatialscale.glmm.glmm` for the model.  Pure batched torch: the
first dimension of every tensor is the gene.
"""

from __future__ import annotations

import math

from spatialscale.glmm.config import PRIOR_DEFAULTS, VAR_FLOOR, GLMMConfig

__all__ = ["log_prior", "neg_log_joint", "project", "back_project", "variance_terms", "loss_and_gradients"]


def log_prior(sigma, cfg: GLMMConfig):
    import torch

    if cfg.var_prior == "none":
        return torch.zeros(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    par = {**PRIOR_DEFAULTS[cfg.var_prior], **cfg.prior_params}
    a, b = float(par["alpha"]), float(par["beta"])
    var = torch.clamp(sigma**2, min=VAR_FLOOR)
    if cfg.var_prior == "gamma":  # Gamma(a, rate b) on sigma
        x = var.sqrt()
        lp = a * math.log(b) - math.lgamma(a) + (a - 1) * torch.log(x) - b * x
    else:  # InverseGamma(a, scale b) on sigma^2
        lp = a * math.log(b) - math.lgamma(a) - (a + 1) * torch.log(var) - b / var
    return lp.sum(-1)


def neg_log_joint(params: dict, data: dict, cfg: GLMMConfig, proj=None):
    """``-log p(Y, nu | beta, b, sigma, theta)`` per gene, ``(B,)``.

    ``params``: ``nu (B, n, q)``, ``beta (B, F, q)``, ``bias (B, q)``,
    ``sigma (B, v)``, ``theta_logit (B, v)``.  ``data``: ``counts (B, n, p)``,
    ``x (n, F)``, ``eigvals (r,)``, ``eigvecs (n, r)`` and ``lgamma_const (B,)``.
    ``proj``: ``V' nu`` ``(B, q, r)`` where the caller has it (a line search
    moves it linearly), else one GEMM here.
    """
    import torch

    nu, beta, bias = params["nu"], params["beta"], params["bias"]
    counts = data["counts"]
    b, n, q = nu.shape
    eta = nu + torch.einsum("nf,bfq->bnq", data["x"], beta) + bias[:, None, :]
    full = torch.cat([eta, torch.zeros(b, n, 1, dtype=eta.dtype, device=eta.device)], dim=-1)
    loglik = (counts * torch.log_softmax(full, dim=-1)).sum((1, 2)) + data["lgamma_const"]

    var = torch.clamp(params["sigma"] ** 2, min=VAR_FLOOR)  # (B, v)
    var = var.expand(b, q) if var.shape[1] == 1 else var
    if cfg.model == "glmm-null":
        quad = (nu**2).sum(1) / var  # (B, q)
        logdet = n * torch.log(var)
    else:
        theta = torch.sigmoid(params["theta_logit"])
        theta = theta.expand(b, q) if theta.shape[1] == 1 else theta
        lam, vec = data["eigvals"], data["eigvecs"]
        r = lam.shape[0]
        c = var[..., None] * (theta[..., None] * lam + 1.0 - theta[..., None])  # (B, q, r)
        proj = project(vec, nu) if proj is None else proj
        quad = (proj**2 / c).sum(-1)
        logdet = torch.log(c).sum(-1)
        if r < n:  # isotropic remainder outside the leading eigenvectors
            d = var * (1.0 - theta)
            quad = quad + ((nu**2).sum(1) - (proj**2).sum(-1)) / d
            logdet = logdet + (n - r) * torch.log(d)
    log_mvn = -0.5 * (n * math.log(2 * math.pi) + logdet + quad).sum(-1)
    return -(loglik + log_mvn + log_prior(params["sigma"], cfg))


def project(vec, nu):
    """``V' nu`` as one GEMM: ``(n, r)``, ``(B, n, q)`` -> ``(B, q, r)``."""
    b, n, q = nu.shape
    flat = nu.permute(1, 0, 2).reshape(n, b * q)
    return (vec.T @ flat).reshape(-1, b, q).permute(1, 2, 0)


def back_project(vec, w):
    """``V w`` as one GEMM: ``(n, r)``, ``(B, q, r)`` -> ``(B, n, q)``."""
    b, q, r = w.shape
    flat = w.permute(2, 0, 1).reshape(r, b * q)
    return (vec @ flat).reshape(-1, b, q).permute(1, 0, 2)


def variance_terms(theta_logit, sigma, quad_proj, quad_rest, data: dict, cfg: GLMMConfig, q: int, n: int):
    """The random-effect part of the loss that depends on (theta, sigma), per gene.

    Given the (detached) squared projections ``quad_proj = (V' nu)^2`` ``(B, q, r)``
    and the remainder ``quad_rest = ||nu||^2 - ||V' nu||^2`` ``(B, q)``, this is
    ``0.5 * (logdet C + nu' C^-1 nu) - log prior`` summed over logits, without
    the ``n log 2 pi`` constant.  Small tensors only: autograd on it is cheap.
    """
    import torch

    b = sigma.shape[0]
    var = torch.clamp(sigma**2, min=VAR_FLOOR)
    var = var.expand(b, q) if var.shape[1] == 1 else var
    if cfg.model == "glmm-null":
        total = quad_proj.sum(-1) + quad_rest
        out = 0.5 * (n * torch.log(var) + total / var)
    else:
        theta = torch.sigmoid(theta_logit)
        theta = theta.expand(b, q) if theta.shape[1] == 1 else theta
        lam = data["eigvals"]
        r = lam.shape[0]
        c = var[..., None] * (theta[..., None] * lam + 1.0 - theta[..., None])
        out = 0.5 * (torch.log(c).sum(-1) + (quad_proj / c).sum(-1))
        if r < n:
            d = var * (1.0 - theta)
            out = out + 0.5 * ((n - r) * torch.log(d) + quad_rest / d)
    return out.sum(-1) - log_prior(sigma, cfg)


def loss_and_gradients(params: dict, data: dict, cfg: GLMMConfig, learn: list[str], parts: dict | None = None):
    """Negative log joint ``(B,)`` and its analytic gradients for the parameters in ``learn``.

    ``d/d eta`` of the multinomial term is ``-(C - N p)`` over the first ``q``
    classes; the prior adds ``C^-1 nu = V diag(1/c) V' nu`` (plus the isotropic
    remainder) to ``d/d nu``.  Gradients in ``(theta, sigma)`` come from
    autograd on :func:`_variance_terms`, a function of small tensors.  A dict
    given as ``parts`` receives the intermediate products a Newton step
    reuses: ``proj`` (``V' nu``, ``None`` for ``glmm-null``), ``quad_proj``,
    ``quad_rest`` and ``prior_grad`` (``C^-1 nu``).
    """
    import torch

    nu, counts = params["nu"], data["counts"]
    b, n, q = nu.shape
    with torch.no_grad():
        eta = nu + params["bias"][:, None, :]
        if data["x"].shape[1]:
            eta = eta + torch.einsum("nf,bfq->bnq", data["x"], params["beta"])
        # softmax([eta, 0]) by hand: for a handful of classes this beats log_softmax on a strided dim
        m = torch.clamp(eta.amax(-1), min=0.0)  # (B, n)
        e = torch.exp(eta - m[..., None])
        denom = e.sum(-1) + torch.exp(-m)
        lse = m + torch.log(denom)
        loglik = (counts[..., :q] * eta).sum((1, 2)) - (data["totals"] * lse).sum(1) + data["lgamma_const"]
        resid = counts[..., :q] - data["totals"][..., None] * (e / denom[..., None])
        if cfg.model == "glm":  # no random effect
            grads = {"bias": -resid.sum(1), "beta": -torch.einsum("nf,bnq->bfq", data["x"], resid)}
            return -loglik, {k: v for k, v in grads.items() if k in learn}
        if cfg.model == "glmm-null":
            proj = None
            quad_proj = (nu**2).sum(1)[..., None]  # (B, q, 1): everything in the "projection"
            quad_rest = torch.zeros(b, q, dtype=nu.dtype, device=nu.device)
        else:
            proj = project(data["eigvecs"], nu)
            quad_proj = proj**2
            quad_rest = (nu**2).sum(1) - quad_proj.sum(-1)
    small = {k: params[k].detach().clone().requires_grad_(k in learn) for k in ("theta_logit", "sigma")}
    var_loss = variance_terms(small["theta_logit"], small["sigma"], quad_proj, quad_rest, data, cfg, q, n)
    loss = -loglik + var_loss.detach() + 0.5 * n * q * math.log(2 * math.pi)
    grads = {}
    small_learn = [k for k in ("theta_logit", "sigma") if k in learn]
    if small_learn:
        for k, g in zip(small_learn, torch.autograd.grad(var_loss.sum(), [small[k] for k in small_learn])):
            grads[k] = g
    with torch.no_grad():
        var = torch.clamp(params["sigma"] ** 2, min=VAR_FLOOR)
        var = var.expand(b, q) if var.shape[1] == 1 else var
        if cfg.model == "glmm-null":
            prior_grad = nu / var[:, None, :]
        else:
            theta = torch.sigmoid(params["theta_logit"])
            theta = theta.expand(b, q) if theta.shape[1] == 1 else theta
            lam, vec = data["eigvals"], data["eigvecs"]
            c = var[..., None] * (theta[..., None] * lam + 1.0 - theta[..., None])
            if lam.shape[0] < n:
                d = var * (1.0 - theta)
                # C^-1 nu = V diag(1/c - 1/d) V' nu + nu / d
                prior_grad = back_project(vec, proj * (1.0 / c - 1.0 / d[..., None])) + nu / d[:, None, :]
            else:
                prior_grad = back_project(vec, proj / c)
        if parts is not None:
            parts.update(proj=proj, quad_proj=quad_proj, quad_rest=quad_rest, prior_grad=prior_grad)
        if "nu" in learn:
            grads["nu"] = -resid + prior_grad
        if "bias" in learn:
            grads["bias"] = -resid.sum(1)
        if "beta" in learn:
            grads["beta"] = -torch.einsum("nf,bnq->bfq", data["x"], resid)
    return loss, grads


