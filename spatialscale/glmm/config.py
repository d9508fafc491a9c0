"""GLMM options: the model, the fitting method and their settings (defaults follow SPLISOSM's SplisosmGLMM)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["FIT_METHODS", "VAR_FLOOR", "PRIOR_DEFAULTS", "GLMMConfig", "initial_sigma"]

#: GLMM fitting methods
FIT_METHODS = ("joint_gd", "joint_newton", "marginal_gd", "marginal_newton")
#: total variance sigma^2 is floored at this value in the likelihood (as SPLISOSM)
VAR_FLOOR = 1e-2
PRIOR_DEFAULTS = {"gamma": {"alpha": 2.0, "beta": 0.3}, "inv_gamma": {"alpha": 2.0, "beta": 0.1}}


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
        Learning rate and the per-gene stopping rule: a gene stops after
        ``patience`` epochs without a decrease of the loss by at least ``tol``.
        ``patience=None``: 1 for ``joint_newton`` (every step is a
        line-searched descent, so one step without progress means the
        optimum; more epochs changed the loss by < 1e-6 relative on the
        benchmark's genes) and 5 (SPLISOSM's) for the others.
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
    patience: int | None = None
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
        if self.patience is None:
            object.__setattr__(self, "patience", 1 if self.method == "joint_newton" else 5)
        if self.max_epochs < 0 or self.patience < 1 or self.lr <= 0 or self.update_nu_every_k < 1 or self.tol < 0:
            raise ValueError("max_epochs >= 0, patience >= 1, lr > 0, tol >= 0 and update_nu_every_k >= 1 are "
                             "required.")


def initial_sigma(counts: np.ndarray) -> np.ndarray:
    """Fano-factor start ``sqrt(clamp(mean_j var_i(C_ij) / max(mean_i N_i, 1), 1e-4, 0.9))`` per gene."""
    c = np.asarray(counts, dtype=np.float64)
    fano = c.var(axis=1, ddof=1).mean(axis=1) / np.maximum(c.sum(axis=2).mean(axis=1), 1.0)
    return np.sqrt(np.clip(fano, 1e-4, 0.9))


