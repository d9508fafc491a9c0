"""Count log-likelihoods for the expression models: Poisson, negative binomial and zero-inflated NB.

Every function is elementwise and broadcasts its arguments (torch rules), works in the dtype of
its inputs and is differentiable in the parameters.  The parametrisations are scVI's:

* Poisson with mean ``rate``;
* negative binomial with mean ``mu`` and inverse dispersion ``theta`` (variance
  ``mu + mu^2 / theta``), i.e. scipy's ``nbinom(n=theta, p=theta / (theta + mu))``;
* zero-inflated NB: with probability ``pi = sigmoid(pi_logits)`` an extra zero, else NB.

The NB is written as

``log NB(x) = G(x, theta) - lgamma(x + 1) + x log(mu) - (theta + x) log1p(mu / theta)``,

with ``G(x, theta) = lgamma(x + theta) - lgamma(theta) - x log(theta)``.  The direct form of ``G``
cancels catastrophically for large ``theta`` (``lgamma(1e10)`` is about ``2e11``, so its rounding
error alone is ``3e-5``); for ``theta >= 10`` it is evaluated from Stirling's series instead,

``G = (theta + x - 1/2) log1p(x / theta) - x + r(theta + x) - r(theta)``,
``r(a) = 1/(12a) - 1/(360a^3) + 1/(1260a^5) - 1/(1680a^7)``,

whose truncation error is below ``1e-12`` there.  Both branches see clamped arguments, so a
gradient never passes through the branch not taken (no ``nan`` from ``torch.where``).  The
Poisson limit (``theta -> inf``) is then exact: ``G -> 0`` and ``(theta + x) log1p(mu / theta) -> mu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["log_poisson", "log_nb", "log_zinb"]

#: ``theta`` from which ``lgamma(x + theta) - lgamma(theta) - x log(theta)`` comes from Stirling's series.
STIRLING_FROM = 10.0


def _as_tensors(*args: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """Tensors of a common floating dtype (the first tensor's, else torch's default)."""
    dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()),
                 torch.get_default_dtype())
    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    return tuple(torch.as_tensor(a, dtype=dtype, device=device) for a in args)


def _stirling_tail(a: torch.Tensor) -> torch.Tensor:
    """``lgamma(a) - (a - 1/2) log(a) + a - log(2 pi) / 2`` for ``a >= 10`` (four terms of the series)."""
    inv = 1.0 / a
    inv2 = inv * inv
    return inv * (1.0 / 12.0 - inv2 * (1.0 / 360.0 - inv2 * (1.0 / 1260.0 - inv2 / 1680.0)))


def _lgamma_shift(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``lgamma(x + theta) - lgamma(theta) - x log(theta)``, accurate for every ``theta > 0``, ``x >= 0``."""
    large = theta >= STIRLING_FROM
    if not large.any():
        return torch.lgamma(x + theta) - torch.lgamma(theta) - x * torch.log(theta)
    t_small = torch.clamp(theta, max=STIRLING_FROM)
    t_large = torch.clamp(theta, min=STIRLING_FROM)
    direct = torch.lgamma(x + t_small) - torch.lgamma(t_small) - x * torch.log(t_small)
    series = ((t_large + x - 0.5) * torch.log1p(x / t_large) - x
              + _stirling_tail(t_large + x) - _stirling_tail(t_large))
    if large.all():
        return series
    return torch.where(large, series, direct)


def log_poisson(x: torch.Tensor, rate: torch.Tensor) -> torch.Tensor:
    """Poisson log-probability ``x log(rate) - rate - lgamma(x + 1)``.

    Parameters
    ----------
    x
        Counts (non-negative; non-integer values give the continuous extension).
    rate
        Mean, ``>= 0`` (``rate = 0`` gives ``0`` at ``x = 0`` and ``-inf`` elsewhere).

    Returns
    -------
    torch.Tensor
        Elementwise log-probabilities, the broadcast shape of the inputs.
    """
    x, rate = _as_tensors(x, rate)
    return torch.xlogy(x, rate) - rate - torch.lgamma(x + 1.0)


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Negative binomial log-probability with mean ``mu`` and inverse dispersion ``theta``.

    ``P(x) = Gamma(x + theta) / (Gamma(theta) x!) (theta / (theta + mu))^theta (mu / (theta + mu))^x``,
    which is ``scipy.stats.nbinom.pmf(x, n=theta, p=theta / (theta + mu))``.  Evaluated as in the module
    docstring: exact to rounding for tiny ``theta`` (``1e-8``), huge ``theta`` (the Poisson limit) and
    large counts.

    Parameters
    ----------
    x
        Counts, ``>= 0``.
    mu
        Mean, ``>= 0``.
    theta
        Inverse dispersion, ``> 0``.

    Returns
    -------
    torch.Tensor
        Elementwise log-probabilities, the broadcast shape of the inputs.
    """
    x, mu, theta = _as_tensors(x, mu, theta)
    return (_lgamma_shift(x, theta) - torch.lgamma(x + 1.0) + torch.xlogy(x, mu)
            - (theta + x) * torch.log1p(mu / theta))


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor) -> torch.Tensor:
    """Zero-inflated negative binomial log-probability, dropout probability ``sigmoid(pi_logits)``.

    ``P(0) = pi + (1 - pi) NB(0)`` and ``P(x) = (1 - pi) NB(x)`` for ``x > 0``.  With
    ``log pi = -softplus(-l)`` and ``log(1 - pi) = -softplus(l)`` the zero case is a two-term
    ``logsumexp`` and the rest a sum, so no probability is formed explicitly.

    Parameters
    ----------
    x
        Counts, ``>= 0``.
    mu
        NB mean, ``>= 0``.
    theta
        NB inverse dispersion, ``> 0``.
    pi_logits
        Logit of the zero-inflation probability (any real).

    Returns
    -------
    torch.Tensor
        Elementwise log-probabilities, the broadcast shape of the inputs.
    """
    x, mu, theta, pi_logits = _as_tensors(x, mu, theta, pi_logits)
    log_pi = -F.softplus(-pi_logits)
    log_one_minus_pi = -F.softplus(pi_logits)
    nb = log_nb(x, mu, theta)
    nb_zero = -theta * torch.log1p(mu / theta)
    zero = torch.logaddexp(log_pi, log_one_minus_pi + nb_zero)
    return torch.where(x == 0, zero, log_one_minus_pi + nb)
