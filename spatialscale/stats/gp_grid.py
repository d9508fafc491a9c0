"""Spatial Gaussian-process residuals on a regular raster (the ``hsic-gp`` DU test on raster sections).

On a periodic ``(ny, nx)`` grid the RBF kernel ``R_ij = exp(-|x_i - x_j|^2 / (2 l^2))``
(torus distances, physical bin spacing ``(dy, dx)``) is circulant: its eigenvectors are the
2-D Fourier modes and its eigenvalues the DFT of its first row.  With ``c = DFT(y)`` the GP
``y ~ N(0, a R + eps I)`` then has the spectral log marginal likelihood of
:mod:`spatialscale.stats.gp` with energies ``|c_k|^2 / n`` (Parseval), and its residual::

    r = eps (a R + eps I)^-1 y = IDFT(eps / (a s_k + eps) c_k)

costs two FFTs: ``O(n log n)``, never an ``n x n`` matrix, no eigen-decomposition.  The
hyper-parameters ``(a, eps)`` are fitted per covariate (per gene for the isoform ratios, the
gene's ratio columns sharing them) by :func:`spatialscale.stats.gp.fit_hyperparameters`,
without diagonal jitter.  Real inputs need only half the spectrum (``rfft2``): a mode and its
conjugate have the same eigenvalue and energy, so each half-spectrum column but the first
(and, for even widths, the Nyquist column) stands for two modes.

This is the model of SPLISOSM's FFT GP residualiser; the length scale (default one bin)
and the spacing are in the same units.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft

from spatialscale.stats.gp import AMPLITUDE_BOUNDS, NOISE_BOUNDS, fit_hyperparameters

__all__ = ["GRID_GP_OPTIONS", "half_spectrum_weights", "rbf_grid_spectrum", "residualize_grid", "residualize_observed"]

#: options of :func:`residualize_grid` a user may set (the ``gp`` option of hsic-gp on a raster store)
GRID_GP_OPTIONS = ("length_scale", "amplitude_bounds", "noise_bounds", "standardize")


def half_spectrum_weights(nx: int) -> np.ndarray:
    """How many 2-D modes each ``rfft2`` column stands for: ``(nx // 2 + 1,)`` of 1 or 2."""
    w = np.full(nx // 2 + 1, 2.0)
    w[0] = 1.0
    if nx % 2 == 0:
        w[-1] = 1.0
    return w


def rbf_grid_spectrum(shape: tuple[int, int], spacing: tuple[float, float] = (1.0, 1.0),
                      length_scale: float = 1.0) -> np.ndarray:
    """Half-spectrum eigenvalues ``(ny, nx // 2 + 1)`` of the unit-amplitude periodic RBF kernel.

    The kernel is separable, so the spectrum is the outer product of the two
    axes' 1-D spectra; small negative values from rounding are set to zero.
    """
    ny, nx = int(shape[0]), int(shape[1])
    if not np.isfinite(length_scale) or length_scale <= 0:
        raise ValueError(f"length_scale must be positive, got {length_scale!r}")

    def axis(n: int, step: float) -> np.ndarray:
        t = np.arange(n) * float(step)
        t = np.minimum(t, n * float(step) - t)
        return np.exp(-(t * t) / (2.0 * length_scale**2))

    sy = scipy.fft.fft(axis(ny, spacing[0])).real
    sx = scipy.fft.rfft(axis(nx, spacing[1])).real
    return np.maximum(sy[:, None] * sx[None, :], 0.0)


def residualize_grid(
    cube: np.ndarray,
    *,
    spacing: tuple[float, float] = (1.0, 1.0),
    length_scale: float = 1.0,
    amplitude_bounds: tuple[float, float] = AMPLITUDE_BOUNDS,
    noise_bounds: tuple[float, float] = NOISE_BOUNDS,
    joint: bool = False,
    workers: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """GP residuals ``eps (a R + eps I)^-1 y`` of every channel of a raster cube.

    Parameters
    ----------
    cube
        ``(ny, nx, m)`` values on the whole grid, finite (centred and filled by the
        caller: the GP has no mean function).
    spacing, length_scale
        Bin spacing ``(dy, dx)`` and RBF length scale, in the same units.
    amplitude_bounds, noise_bounds
        Box constraints on ``a`` and ``eps``.
    joint
        Fit one ``(a, eps)`` for all ``m`` channels (a gene's isoform ratios: the
        likelihood is the sum over channels) instead of one per channel.
    workers
        ``scipy.fft`` workers.

    Returns
    -------
    residuals : numpy.ndarray
        ``(ny, nx, m)``.
    info : dict
        ``amplitude`` and ``noise`` (``(m,)``, or ``(1,)`` with ``joint``).
    """
    cube = np.asarray(cube, dtype=np.float64)
    if cube.ndim != 3:
        raise ValueError(f"cube must be (ny, nx, m), got shape {cube.shape}")
    if not np.isfinite(cube).all():
        raise ValueError("cube has non-finite values; centre and fill it first")
    ny, nx, m = cube.shape
    n = ny * nx
    s = rbf_grid_spectrum((ny, nx), spacing, length_scale)
    w = np.broadcast_to(half_spectrum_weights(nx)[None, :], s.shape).ravel()
    hat = scipy.fft.rfft2(cube, axes=(0, 1), workers=workers)  # (ny, nx//2+1, m)
    c2 = (hat.real**2 + hat.imag**2).reshape(-1, m) * (w[:, None] / n)
    mult = w.copy()
    if joint:
        c2, mult = c2.sum(1, keepdims=True), mult * m
    amp, noise, _ = fit_hyperparameters(s.ravel(), mult, c2, amplitude_bounds=amplitude_bounds,
                                        noise_bounds=noise_bounds, jitter=0.0)
    a = np.broadcast_to(amp, (m,))
    e = np.broadcast_to(noise, (m,))
    keep = e[None, None, :] / (a[None, None, :] * s[:, :, None] + e[None, None, :])
    res = scipy.fft.irfft2(hat * keep, s=(ny, nx), axes=(0, 1), workers=workers)
    return res, {"amplitude": amp, "noise": noise}


def residualize_observed(
    values: np.ndarray,
    index: np.ndarray,
    shape: tuple[int, int],
    *,
    joint: bool = False,
    workers: int | None = None,
    **gp: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
    """GP residuals of values known on some bins of a grid, at those bins.

    Each column is centred over the observed bins and the other bins take that
    mean (zero after centring), as SPLISOSM fills a raster's empty bins; the
    grid GP (:func:`residualize_grid`) is fitted on the whole grid and its
    residuals are returned at the observed bins, centred again.

    Parameters
    ----------
    values
        ``(n_observed, m)`` finite values.
    index
        ``(n_observed,)`` flat grid position of each row (``row * nx + col``).
    shape
        Grid ``(ny, nx)``.
    joint, workers, **gp
        See :func:`residualize_grid` (``spacing``, ``length_scale``, bounds).

    Returns
    -------
    residuals : numpy.ndarray
        ``(n_observed, m)``, centred.
    info : dict
        As :func:`residualize_grid`.
    """
    values = np.asarray(values, dtype=np.float64)
    m = values.shape[1]
    cube = np.zeros((int(shape[0]) * int(shape[1]), m))
    cube[index] = values - values.mean(0)
    res, info = residualize_grid(cube.reshape(int(shape[0]), int(shape[1]), m), joint=joint, workers=workers, **gp)
    out = res.reshape(-1, m)[index]
    return out - out.mean(0), info
