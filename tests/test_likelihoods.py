"""Count log-likelihoods of the expression models against scipy and closed forms, in float64."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
import torch

from spatialscale.expression.likelihoods import STIRLING_FROM, log_nb, log_poisson, log_zinb

X = np.array([0, 1, 2, 5, 17, 100, 1000, 12345], dtype=np.float64)
MU = np.array([1e-3, 0.5, 3.0, 50.0, 1e3, 1e5])
# tiny, moderate, either side of the Stirling switch, and huge (scipy is itself exact to ~1e-7 up to 1e6)
THETA = np.array([1e-8, 1e-3, 0.1, 1.0, 9.99, 10.0, 10.01, 50.0, 1e3, 1e5, 1e6])
LOGITS = np.array([-30.0, -3.0, 0.0, 2.0, 20.0])


def _grid(*axes: np.ndarray) -> list[np.ndarray]:
    return [a.ravel() for a in np.meshgrid(*axes, indexing="ij")]


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(a, dtype=torch.float64)


def test_poisson_matches_scipy():
    x, rate = _grid(X, np.concatenate([MU, [1e-12, 1e6]]))
    got = log_poisson(_t(x), _t(rate)).numpy()
    np.testing.assert_allclose(got, scipy.stats.poisson.logpmf(x, rate), rtol=1e-6, atol=0)
    # rate 0: certain zero
    got0 = log_poisson(_t(np.array([0.0, 3.0])), _t(np.zeros(2))).numpy()
    assert got0[0] == 0.0 and got0[1] == -np.inf


def test_nb_matches_scipy():
    x, mu, theta = _grid(X, MU, THETA)
    got = log_nb(_t(x), _t(mu), _t(theta)).numpy()
    want = scipy.stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    assert got.dtype == np.float64 and np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)


def test_nb_huge_theta_is_poisson():
    # scipy's nbinom loses all digits here (lgamma(1e12) ~ 3e13); the NB tends to the Poisson
    x, mu, theta = _grid(X, MU, np.array([1e12, 1e15]))
    got = log_nb(_t(x), _t(mu), _t(theta)).numpy()
    np.testing.assert_allclose(got, scipy.stats.poisson.logpmf(x, mu), rtol=1e-6, atol=0)


def test_nb_against_high_precision():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 40
    cases = [(3.0, 2.5, 1e9), (12345.0, 1e5, 1e-3), (0.0, 1e-3, 1e7), (7.0, 40.0, 10.0), (1.0, 1e-6, 1e-8)]
    for x, mu, theta in cases:
        xm, mm, tm = mpmath.mpf(x), mpmath.mpf(mu), mpmath.mpf(theta)
        want = float(mpmath.loggamma(xm + tm) - mpmath.loggamma(tm) - mpmath.loggamma(xm + 1)
                     + tm * mpmath.log(tm / (tm + mm)) + xm * mpmath.log(mm / (tm + mm)))
        got = float(log_nb(_t(np.array(x)), _t(np.array(mu)), _t(np.array(theta))))
        assert got == pytest.approx(want, rel=1e-10), (x, mu, theta)


def test_zinb_closed_form():
    x, mu, theta, logit = _grid(X, MU[:4], THETA[1::2], LOGITS)
    got = log_zinb(_t(x), _t(mu), _t(theta), _t(logit)).numpy()
    pi, one_minus_pi = scipy.special.expit(logit), scipy.special.expit(-logit)
    nb = scipy.stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    log_nb0 = scipy.stats.nbinom.logpmf(0, theta, theta / (theta + mu))
    # log(pi + (1 - pi) NB(0)); near probability 1 as log(1 - (1 - pi)(1 - NB(0))) to keep the digits
    p_zero = pi + one_minus_pi * np.exp(log_nb0)
    zero = np.where(p_zero < 0.5, np.log(p_zero), np.log1p(one_minus_pi * np.expm1(log_nb0)))
    want = np.where(x == 0, zero, np.log(one_minus_pi) + nb)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    # no zero inflation at very negative logits: the NB itself
    plain = log_zinb(_t(x), _t(mu), _t(theta), _t(np.full_like(x, -800.0))).numpy()
    np.testing.assert_allclose(plain, nb, rtol=1e-6, atol=0)


def test_broadcasting_and_float32():
    x = torch.tensor([[0.0, 3.0, 40.0], [1.0, 0.0, 7.0]])
    mu = torch.tensor([[0.5, 2.0, 30.0], [1.0, 0.1, 9.0]])
    theta = torch.tensor([0.3, 12.0, 1e4])  # per gene, either side of the switch
    got32 = log_zinb(x, mu, theta, torch.zeros(3))
    got64 = log_zinb(x.double(), mu.double(), theta.double(), torch.zeros(3, dtype=torch.float64))
    assert got32.dtype == torch.float32 and got32.shape == (2, 3)
    np.testing.assert_allclose(got32.numpy(), got64.numpy(), rtol=1e-5)
    assert log_nb(x, mu, 5.0).shape == (2, 3) and log_poisson(x, mu).shape == (2, 3)


def test_gradients_finite_across_the_switch():
    # theta on both sides of the Stirling switch in one tensor: torch.where must not leak nan gradients
    theta = torch.tensor([1e-6, 0.5, STIRLING_FROM - 1e-3, STIRLING_FROM, 1e3, 1e9], dtype=torch.float64,
                         requires_grad=True)
    mu = torch.full((6,), 4.0, dtype=torch.float64, requires_grad=True)
    x = torch.tensor([0.0, 3.0, 5.0, 5.0, 9.0, 2.0], dtype=torch.float64)
    logits = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    log_zinb(x, mu, theta, logits).sum().backward()
    for p in (theta, mu, logits):
        assert torch.isfinite(p.grad).all()
    assert torch.autograd.gradcheck(lambda m, t: log_nb(x[2:5], m, t), (mu[2:5].detach().requires_grad_(),
                                                                        theta[2:5].detach().requires_grad_()))
    # continuity at the switch
    below = log_nb(_t(np.array(25.0)), _t(np.array(30.0)), _t(np.array(STIRLING_FROM * (1 - 1e-12))))
    above = log_nb(_t(np.array(25.0)), _t(np.array(30.0)), _t(np.array(STIRLING_FROM)))
    assert abs(float(below - above)) < 1e-9
