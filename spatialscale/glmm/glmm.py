"""Multinomial GLMM with a spatial random effect, fitted for a batch of genes at once.

Model (docs/statistics.md), for one gene with ``p`` isoforms and
``q = p - 1`` logits against the last isoform::

    Y_i ~ Multinomial(N_i, softmax([eta_i, 0]))
    eta = X beta + b + nu
    nu_j ~ N(0, sigma^2 (theta K + (1 - theta) I)),   theta = sigmoid(theta_logit)

With eigenpairs ``K = V diag(lambda) V'`` the covariance has eigenvalues
``c = sigma^2 (theta lambda + 1 - theta)``; a rank-``r`` ``V`` keeps the
remaining ``n - r`` directions at the isotropic ``d = sigma^2 (1 - theta)``
(Woodbury).  ``glmm-null`` fixes ``theta = 0`` (white noise); ``glm`` has
no ``nu`` (see :mod:`spatialscale.glmm.glm`).

``joint_gd`` maximises the joint log-likelihood of ``(nu, beta, b, theta,
[sigma])`` with Adam.  Every gene has its own Adam state and stops on its
own (after ``patience`` epochs without an improvement of at least ``tol``):
a converged gene no longer changes, so the fit of a gene does not depend on
the other genes of its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["GLMMConfig", "fit_glmm", "initial_sigma", "laplace_log_marginal", "loss_and_gradients", "neg_log_joint"]

#: GLMM fitting methods
FIT_METHODS = ("joint_gd", "joint_newton", "marginal_gd", "marginal_newton")
#: total variance sigma^2 is floored at this value in the likelihood (as SPLISOSM)
VAR_FLOOR = 1e-2
_PRIOR_DEFAULTS = {"gamma": {"alpha": 2.0, "beta": 0.3}, "inv_gamma": {"alpha": 2.0, "beta": 0.1}}


@dataclass(frozen=True)
class GLMMConfig:
    """Model and fitting options (defaults follow SPLISOSM's ``SplisosmGLMM``).

    Parameters
    ----------
    model
        ``glmm-full`` (spatial kernel), ``glmm-null`` (white noise, theta = 0),
        or ``glm`` (no random effect: Adam on the GLM likelihood, the ``gd`` fit).
    method
        ``joint_gd`` (Adam on the joint likelihood), ``joint_newton``
        (Newton steps on the joint likelihood), ``marginal_gd`` / ``marginal_newton``
        (the Laplace-approximated marginal likelihood; dense in ``n q``).
    share_variance
        One (sigma, theta) per gene (else one per logit).
    var_fix_sigma
        Keep sigma at its Fano-factor start value.
    var_prior
        ``none``, ``gamma`` (on sigma) or ``inv_gamma`` (on sigma^2).
    prior_params
        ``alpha`` / ``beta`` of the prior.
    init_ratio
        ``uniform`` (nu = 0) or ``observed`` (nu = observed log-ratios).
    optim
        Gradient optimiser of the ``*_gd`` fits (and of the parameters that
        ``marginal_newton`` does not move by Newton steps): ``adam`` (per-gene
        Adam state) or ``sgd`` (plain gradient steps).  SPLISOSM's ``lbfgs``
        is not offered (one line search per gene of a batch).
    lr, tol, patience, max_epochs
        Learning rate and the per-gene stopping rule.
    update_nu_every_k
        ``marginal_newton`` only: the Newton step of ``nu`` (towards the mode of
        the joint) is taken every ``k``-th epoch.
    dtype
        ``float32`` (as SPLISOSM) or ``float64``.
    """

    model: str = "glmm-full"
    method: str = "joint_gd"
    share_variance: bool = True
    var_fix_sigma: bool = True
    var_prior: str = "none"
    prior_params: dict = field(default_factory=dict)
    init_ratio: str = "uniform"
    optim: str = "adam"
    lr: float = 1e-2
    tol: float = 1e-5
    patience: int = 5
    max_epochs: int = 500
    update_nu_every_k: int = 1
    dtype: str = "float32"

    def __post_init__(self) -> None:
        checks = {"model": ("glmm-full", "glmm-null", "glm"), "method": FIT_METHODS,
                  "var_prior": ("none", "gamma", "inv_gamma"), "init_ratio": ("uniform", "observed"),
                  "dtype": ("float32", "float64"), "optim": ("adam", "sgd")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}.")
        if self.max_epochs < 0 or self.patience < 1 or self.lr <= 0 or self.update_nu_every_k < 1:
            raise ValueError("max_epochs >= 0, patience >= 1, lr > 0 and update_nu_every_k >= 1 are required.")


def initial_sigma(counts: np.ndarray) -> np.ndarray:
    """Fano-factor start ``sqrt(clamp(mean_j var_i(C_ij) / max(mean_i N_i, 1), 1e-4, 0.9))`` per gene."""
    c = np.asarray(counts, dtype=np.float64)
    fano = c.var(axis=1, ddof=1).mean(axis=1) / np.maximum(c.sum(axis=2).mean(axis=1), 1.0)
    return np.sqrt(np.clip(fano, 1e-4, 0.9))


def _log_prior(sigma, cfg: GLMMConfig):
    import torch

    if cfg.var_prior == "none":
        return torch.zeros(sigma.shape[0], dtype=sigma.dtype, device=sigma.device)
    par = {**_PRIOR_DEFAULTS[cfg.var_prior], **cfg.prior_params}
    a, b = float(par["alpha"]), float(par["beta"])
    var = torch.clamp(sigma**2, min=VAR_FLOOR)
    if cfg.var_prior == "gamma":  # Gamma(a, rate b) on sigma
        x = var.sqrt()
        lp = a * math.log(b) - math.lgamma(a) + (a - 1) * torch.log(x) - b * x
    else:  # InverseGamma(a, scale b) on sigma^2
        lp = a * math.log(b) - math.lgamma(a) - (a + 1) * torch.log(var) - b / var
    return lp.sum(-1)


def neg_log_joint(params: dict, data: dict, cfg: GLMMConfig):
    """``-log p(Y, nu | beta, b, sigma, theta)`` per gene, ``(B,)``.

    ``params``: ``nu (B, n, q)``, ``beta (B, F, q)``, ``bias (B, q)``,
    ``sigma (B, v)``, ``theta_logit (B, v)``.  ``data``: ``counts (B, n, p)``,
    ``x (n, F)``, ``eigvals (r,)``, ``eigvecs (n, r)`` and ``lgamma_const (B,)``.
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
        proj = torch.einsum("nr,bnq->bqr", vec, nu)
        quad = (proj**2 / c).sum(-1)
        logdet = torch.log(c).sum(-1)
        if r < n:  # isotropic remainder outside the leading eigenvectors
            d = var * (1.0 - theta)
            quad = quad + ((nu**2).sum(1) - (proj**2).sum(-1)) / d
            logdet = logdet + (n - r) * torch.log(d)
    log_mvn = -0.5 * (n * math.log(2 * math.pi) + logdet + quad).sum(-1)
    return -(loglik + log_mvn + _log_prior(params["sigma"], cfg))


def _project(vec, nu):
    """``V' nu`` as one GEMM: ``(n, r)``, ``(B, n, q)`` -> ``(B, q, r)``."""
    b, n, q = nu.shape
    flat = nu.permute(1, 0, 2).reshape(n, b * q)
    return (vec.T @ flat).reshape(-1, b, q).permute(1, 2, 0)


def _back_project(vec, w):
    """``V w`` as one GEMM: ``(n, r)``, ``(B, q, r)`` -> ``(B, n, q)``."""
    b, q, r = w.shape
    flat = w.permute(2, 0, 1).reshape(r, b * q)
    return (vec @ flat).reshape(-1, b, q).permute(1, 0, 2)


def _variance_terms(theta_logit, sigma, quad_proj, quad_rest, data: dict, cfg: GLMMConfig, q: int, n: int):
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
    return out.sum(-1) - _log_prior(sigma, cfg)


def loss_and_gradients(params: dict, data: dict, cfg: GLMMConfig, learn: list[str]):
    """Negative log joint ``(B,)`` and its analytic gradients for the parameters in ``learn``.

    ``d/d eta`` of the multinomial term is ``-(C - N p)`` over the first ``q``
    classes; the prior adds ``C^-1 nu = V diag(1/c) V' nu`` (plus the isotropic
    remainder) to ``d/d nu``.  Gradients in ``(theta, sigma)`` come from
    autograd on :func:`_variance_terms`, a function of small tensors.
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
            proj = _project(data["eigvecs"], nu)
            quad_proj = proj**2
            quad_rest = (nu**2).sum(1) - quad_proj.sum(-1)
    small = {k: params[k].detach().clone().requires_grad_(k in learn) for k in ("theta_logit", "sigma")}
    var_loss = _variance_terms(small["theta_logit"], small["sigma"], quad_proj, quad_rest, data, cfg, q, n)
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
                prior_grad = _back_project(vec, proj * (1.0 / c - 1.0 / d[..., None])) + nu / d[:, None, :]
            else:
                prior_grad = _back_project(vec, proj / c)
        if "nu" in learn:
            grads["nu"] = -resid + prior_grad
        if "bias" in learn:
            grads["bias"] = -resid.sum(1)
        if "beta" in learn:
            grads["beta"] = -torch.einsum("nf,bnq->bfq", data["x"], resid)
    return loss, grads


def _setup_fit(counts, eigvals, eigvecs, design, cfg: GLMMConfig, device: str, init: dict | None = None):
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


def _pack_fit(best: dict, best_loss, epochs, converged, data: dict) -> dict[str, np.ndarray]:
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


def fit_glmm(
    counts: np.ndarray,
    eigvals: np.ndarray | None,
    eigvecs: np.ndarray | None,
    *,
    design: np.ndarray | None = None,
    config: GLMMConfig | None = None,
    device: str = "cpu",
    init: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Fit the GLMM of every gene in a batch (``config.method``; ``joint_gd`` here).

    Parameters
    ----------
    counts
        ``(B, n, p)`` isoform counts.
    eigvals, eigvecs
        Leading eigenpairs of the standardised spatial covariance ``K``
        (``(r,)``, ``(n, r)``; ``r = n`` for the full kernel).  Unused for
        ``glmm-null``.
    design
        ``(n, F)`` fixed-effect covariates (intercepts are always fitted).
    config
        :class:`GLMMConfig`.
    device
        Torch device.
    init
        Starting values instead of SPLISOSM's (any of ``nu``, ``beta``,
        ``bias``, ``sigma``, ``theta_logit``, shaped as the parameters).

    Returns
    -------
    dict
        ``nu (B, n, q)``, ``beta (B, F, q)``, ``intercept (B, q)``,
        ``sigma (B, v)``, ``theta (B, v)``, ``probs (B, n, p)``, ``loss``
        ``(B,)`` (best negative log joint), ``epochs`` and ``converged`` ``(B,)``.
    """
    import torch

    cfg = config or GLMMConfig()
    if cfg.method == "joint_newton" and cfg.model != "glm":
        from spatialscale.glmm.newton import fit_joint_newton

        return fit_joint_newton(counts, eigvals, eigvecs, design=design, config=cfg, device=device, init=init)
    if cfg.method in ("marginal_gd", "marginal_newton") and cfg.model != "glm":
        from spatialscale.glmm.marginal import fit_marginal

        return fit_marginal(counts, eigvals, eigvecs, design=design, config=cfg, device=device, init=init)
    data, params, learn = _setup_fit(counts, eigvals, eigvecs, design, cfg, device, init)
    b = params["nu"].shape[0]
    adam = PerGeneAdam(params, learn, cfg.lr, cfg.optim)
    best_loss = torch.full((b,), math.inf, dtype=torch.float64, device=device)
    best = {k: params[k].detach().clone() for k in params}
    wait = torch.zeros(b, dtype=torch.int64, device=device)
    active = torch.ones(b, dtype=torch.bool, device=device)
    epochs = torch.zeros(b, dtype=torch.int64, device=device)

    def shape(mask, like):
        return mask.view(-1, *([1] * (like.dim() - 1)))

    # One forward pass per epoch: the loss at the start of an epoch is the
    # post-step loss of the previous epoch, which decides convergence.
    stepped = torch.zeros(b, dtype=torch.bool, device=device)
    for epoch in range(cfg.max_epochs + 1):
        loss, grads_by_name = loss_and_gradients(params, data, cfg, learn)
        if epoch > 0:
            with torch.no_grad():
                new = loss.detach().double()
                new = torch.where(torch.isfinite(new), new, torch.full_like(new, math.inf))
                improved = stepped & (new < best_loss - cfg.tol)
                for k in params:
                    best[k] = torch.where(shape(improved, params[k]), params[k].detach(), best[k])
                best_loss = torch.where(improved, new, best_loss)
                wait = torch.where(improved, torch.zeros_like(wait), wait + stepped.long())
                epochs += stepped.long()
                active &= (wait < cfg.patience) & torch.isfinite(new)
        if epoch == cfg.max_epochs or not bool(active.any()):
            break
        with torch.no_grad():
            idx = active.nonzero()[:, 0]
            adam.step(params, {k: grads_by_name[k][idx] for k in learn}, idx)
            stepped = active.clone()

    return _pack_fit(best, best_loss, epochs, ~active, data)


def laplace_log_marginal(fit: dict[str, np.ndarray], counts: np.ndarray, eigvals: np.ndarray | None,
                         eigvecs: np.ndarray | None, *, design: np.ndarray | None = None,
                         config: GLMMConfig | None = None) -> np.ndarray:
    """Laplace approximation of ``log p(Y)`` with ``nu`` integrated out, at a fit.

    ``log p(Y) ~ log p(Y, nu_hat) - 1/2 logdet(-H)`` with ``H`` the Hessian of
    the log joint in ``nu`` (``n q x n q``: the multinomial's per-spot blocks
    ``-N_i (diag p_i - p_i p_i')`` plus ``-C^-1`` per logit).  Dense: meant
    for sections of a few thousand spots.

    Returns
    -------
    numpy.ndarray
        ``(B,)`` log marginal likelihoods.
    """
    import torch

    cfg = config or GLMMConfig()
    c = np.asarray(counts, dtype=np.float64)
    b, n, p = c.shape
    q = p - 1
    z = np.zeros((n, 0)) if design is None else np.asarray(design, dtype=np.float64).reshape(n, -1)
    ct = torch.as_tensor(c)
    data = {"counts": ct, "x": torch.as_tensor(z),
            "lgamma_const": torch.lgamma(ct.sum(-1) + 1).sum(1) - torch.lgamma(ct + 1).sum((1, 2))}
    params = {"nu": torch.as_tensor(fit["nu"], dtype=torch.float64),
              "beta": torch.as_tensor(fit["beta"], dtype=torch.float64),
              "bias": torch.as_tensor(fit["intercept"], dtype=torch.float64),
              "sigma": torch.as_tensor(fit["sigma"], dtype=torch.float64),
              "theta_logit": torch.logit(torch.as_tensor(fit["theta"], dtype=torch.float64))}
    var = np.maximum(np.asarray(fit["sigma"], dtype=np.float64) ** 2, VAR_FLOOR)
    var = np.broadcast_to(var, (b, q)) if var.shape[1] == 1 else var
    if cfg.model == "glmm-full":
        data["eigvals"] = torch.as_tensor(np.asarray(eigvals, dtype=np.float64))
        data["eigvecs"] = torch.as_tensor(np.asarray(eigvecs, dtype=np.float64))
        theta = np.asarray(fit["theta"], dtype=np.float64)
        theta = np.broadcast_to(theta, (b, q)) if theta.shape[1] == 1 else theta
        lam, vec = np.asarray(eigvals, dtype=np.float64), np.asarray(eigvecs, dtype=np.float64)
        cov = var[..., None] * (theta[..., None] * lam + 1.0 - theta[..., None])  # (B, q, r)
        prec = np.einsum("nr,bqr,mr->bqnm", vec, 1.0 / cov, vec)
        if lam.shape[0] < n:
            d = var * (1.0 - theta)
            prec = prec + (1.0 / d)[..., None, None] * (np.eye(n) - vec @ vec.T)
    else:
        params["theta_logit"] = torch.full_like(params["sigma"], -math.inf)
        prec = (1.0 / var)[..., None, None] * np.eye(n)
    log_joint = -neg_log_joint(params, data, cfg).numpy()
    probs = np.asarray(fit["probs"], dtype=np.float64)[..., :-1]  # (B, n, q)
    w = c.sum(-1)[..., None, None] * (np.einsum("bnq,qr->bnqr", probs, np.eye(q))
                                      - np.einsum("bnq,bnr->bnqr", probs, probs))
    neg_h = np.zeros((b, q * n, q * n))
    idx = np.arange(n)
    for j in range(q):
        neg_h[:, j * n:(j + 1) * n, j * n:(j + 1) * n] += prec[:, j]
        for k in range(q):
            neg_h[:, j * n + idx, k * n + idx] += w[:, :, j, k]
    logdet = 2.0 * np.log(np.diagonal(np.linalg.cholesky(neg_h), axis1=1, axis2=2)).sum(-1)
    return log_joint - 0.5 * logdet
