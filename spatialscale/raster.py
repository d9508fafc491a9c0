"""The CAR kernel of a regular raster (square bins), diagonal in the 2-D Fourier basis.

On a periodic ``ny x nx`` grid every bin has the same neighbours, so the
adjacency ``W`` is a circulant (a convolution with a fixed stencil) and so is
the CAR precision ``I - rho W / deg``.  Its eigenvectors are the 2-D Fourier
modes and its eigenvalues are ``1 - rho lambda_W(f)`` with ``lambda_W`` the
real 2-D DFT of the stencil divided by the degree; the kernel ``K = M^-1`` has
eigenvalues ``1 / (1 - rho lambda_W(f))``.  The constant vector is the
``(0, 0)`` mode, so double centring ``H K H`` sets that eigenvalue to zero.
Products, traces and power sums are then ``O(n log n)`` or ``O(n)``: no
sparse factor, no probes, and the null's power sums are exact at any size.

The stencil follows SPLISOSM 1.2.0's ``FFTKernel``: bins at (periodic, torus)
squared distance ``dy^2 a^2 + dx^2 b^2`` up to the ``neighbor_degree``-th
smallest nonzero distance are neighbours (``1``: the 4 rook neighbours of a
square grid).  There is no standardisation on this path (every bin already
has the same variance).

The math here knows nothing of Dask or zarr.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from spatialscale.kernel import CentredProducts

__all__ = ["RasterParams", "RasterKernel", "build_raster_kernel", "car_spectrum", "spectrum_power_sums",
           "FFTKernelOperator", "dense_raster_kernel", "raster_params_from_attrs"]


@dataclass(frozen=True)
class RasterParams:
    """Parameters of a raster (FFT) kernel.

    Parameters
    ----------
    shape
        Grid ``(ny, nx)``: rows and columns of bins.
    spacing
        Physical ``(dy, dx)`` between neighbouring bins (only their ratio
        matters for the neighbourhood).
    rho
        CAR autocorrelation, ``0 <= rho < 1``.
    neighbor_degree
        Rings of neighbours (``1``: nearest bins).
    """

    shape: tuple[int, int]
    spacing: tuple[float, float] = (1.0, 1.0)
    rho: float = 0.99
    neighbor_degree: int = 1

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(int(v) for v in self.shape) < 1:
            raise ValueError(f"shape must be two positive bin counts (ny, nx), got {self.shape!r}.")
        if len(self.spacing) != 2 or not all(np.isfinite(v) and v > 0 for v in self.spacing):
            raise ValueError(f"spacing must be two positive numbers (dy, dx), got {self.spacing!r}.")
        if not np.isfinite(self.rho) or not 0.0 <= self.rho < 1.0:
            raise ValueError(f"rho must satisfy 0 <= rho < 1, got {self.rho!r}.")
        if int(self.neighbor_degree) < 1:
            raise ValueError(f"neighbor_degree must be >= 1, got {self.neighbor_degree!r}.")

    @property
    def n(self) -> int:
        """Bins in the grid."""
        return int(self.shape[0]) * int(self.shape[1])

    def to_dict(self) -> dict:
        """JSON-serialisable parameters."""
        return {"shape": [int(v) for v in self.shape], "spacing": [float(v) for v in self.spacing],
                "rho": float(self.rho), "neighbor_degree": int(self.neighbor_degree)}


_WORK = threading.local()
#: largest work buffer a thread keeps between tasks
WORKSPACE_MAX_BYTES = 256 << 20
#: numpy >= 2 FFTs write into a given array
_NUMPY_FFT_OUT = int(np.__version__.split(".")[0]) >= 2


def workspace(name: str, shape: tuple[int, ...], dtype: type = np.float64) -> np.ndarray:
    """A reusable array of this thread (not zeroed), grown as needed.

    A task's grid columns and their spectra are tens of MB; allocated afresh
    each time, every page is faulted in and zeroed by the kernel, and Dask's
    nanny makes glibc return freed memory at once (``MALLOC_TRIM_THRESHOLD_``),
    so every task would pay that again.  One buffer per thread and name is
    kept instead (the largest a task of this process asked for), up to
    :data:`WORKSPACE_MAX_BYTES`; a larger request gets a fresh array, so an
    idle worker never holds more than that per buffer.
    """
    size = int(np.prod(shape))
    if size * np.dtype(dtype).itemsize > WORKSPACE_MAX_BYTES:
        return np.empty(shape, dtype=dtype)
    bufs = getattr(_WORK, "bufs", None)
    if bufs is None:
        bufs = _WORK.bufs = {}
    buf = bufs.get(name)
    if buf is None or buf.dtype != np.dtype(dtype) or buf.size < size:
        buf = bufs[name] = np.empty(size, dtype=dtype)
    return buf[:size].reshape(shape)


def _torus_sq_distances(shape: tuple[int, int], spacing: tuple[float, float]) -> np.ndarray:
    """Squared periodic distance of every bin from bin ``(0, 0)``."""
    ny, nx = int(shape[0]), int(shape[1])
    y = np.arange(ny) * float(spacing[0])
    x = np.arange(nx) * float(spacing[1])
    y = np.minimum(y, ny * float(spacing[0]) - y)
    x = np.minimum(x, nx * float(spacing[1]) - x)
    return y[:, None] ** 2 + x[None, :] ** 2


def stencil(params: RasterParams) -> np.ndarray:
    """The ``(ny, nx)`` neighbour stencil of bin ``(0, 0)`` (1 for a neighbour, periodic)."""
    d2 = _torus_sq_distances(params.shape, params.spacing)
    levels = np.unique(d2)
    cutoff = levels[min(int(params.neighbor_degree), len(levels) - 1)]
    w = (d2 <= cutoff).astype(np.float64)
    w[0, 0] = 0.0
    return w


def car_spectrum(params: RasterParams, *, centred: bool = True) -> np.ndarray:
    """Eigenvalues ``1 / (1 - rho lambda_W(f))`` of the periodic CAR kernel, as an ``(ny, nx)`` array.

    ``lambda_W`` is the real 2-D DFT of the stencil over its degree; with
    ``centred`` the ``(0, 0)`` (constant) mode is set to zero (``H K H``).
    A grid too small to have neighbours gives the identity kernel.
    """
    import scipy.fft

    w = stencil(params)
    degree = float(w.sum())
    if degree <= 0:
        spec = np.ones(params.shape)
    else:
        spec = 1.0 / (1.0 - params.rho * np.real(scipy.fft.fft2(w)) / degree)
    if centred:
        spec[0, 0] = 0.0
    return spec


def spectrum_power_sums(spectrum: np.ndarray, floor: float = 1e-8) -> np.ndarray:
    """``k_r = sum lambda^r`` for ``r = 1..4`` over the eigenvalues above ``floor`` (exact)."""
    lam = np.asarray(spectrum, dtype=np.float64).ravel()
    lam = lam[lam > floor]
    return np.array([np.sum(lam**r) for r in range(1, 5)])


def dense_raster_kernel(params: RasterParams, *, centred: bool = True) -> np.ndarray:
    """The dense ``(n, n)`` kernel built directly from the periodic graph (small grids; tests)."""
    ny, nx = int(params.shape[0]), int(params.shape[1])
    w0 = stencil(params)
    iy, ix = np.divmod(np.arange(ny * nx), nx)
    # W[i, j] = stencil[(yj - yi) mod ny, (xj - xi) mod nx]
    w = w0[(iy[None, :] - iy[:, None]) % ny, (ix[None, :] - ix[:, None]) % nx]
    degree = float(w0.sum())
    m = np.eye(ny * nx) - (params.rho * w / degree if degree > 0 else 0.0)
    k = np.linalg.inv(m)
    k = 0.5 * (k + k.T)
    if centred:
        h = np.eye(ny * nx) - 1.0 / (ny * nx)
        k = h @ k @ h
    return k


class FFTKernelOperator(CentredProducts):
    """Products with the centred raster kernel ``K_eff`` by real 2-D FFTs (numpy, or torch on a device).

    Rows of the vectors it multiplies are the grid's bins in row-major order
    (bin ``(y, x)`` is row ``y nx + x``).

    Parameters
    ----------
    params
        The raster.
    device
        ``cpu`` (scipy.fft) or a torch device such as ``cuda:0`` (torch.fft).
    """

    def __init__(self, params: RasterParams, device: str = "cpu") -> None:
        self.params = params
        self.shape = (int(params.shape[0]), int(params.shape[1]))
        self.n = params.n
        self.device = device
        spec = car_spectrum(params, centred=True)
        self._diag = float(spec.sum() / self.n)
        # the spectrum is even (lambda(f) = lambda(-f)), so the half kept by rfft2 is enough
        self._half = np.ascontiguousarray(spec[:, : self.shape[1] // 2 + 1])
        self._half_t = None
        self._root, self._root_t = None, None

    @property
    def diagonal_value(self) -> float:
        """Every diagonal entry of ``K_eff`` (a circulant's diagonal is constant): ``tr(K_eff) / n``."""
        return self._diag

    def apply(self, x: np.ndarray) -> np.ndarray:
        """``K_eff @ x`` for an ``(n, m)`` block (the constant mode is removed, so no explicit centring)."""
        x = np.asarray(x, dtype=np.float64)
        one = x.ndim == 1
        x2 = x.reshape(self.n, -1)
        ny, nx = self.shape
        if self.device == "cpu":
            import scipy.fft

            f = scipy.fft.rfft2(x2.reshape(ny, nx, -1), axes=(0, 1))
            f *= self._half[:, :, None]
            out = scipy.fft.irfft2(f, s=(ny, nx), axes=(0, 1)).reshape(self.n, -1)
        else:
            import torch

            if self._half_t is None:
                self._half_t = torch.as_tensor(self._half, device=self.device)
            xt = torch.as_tensor(x2.reshape(ny, nx, -1), device=self.device)
            f = torch.fft.rfft2(xt, dim=(0, 1)) * self._half_t[:, :, None]
            out = torch.fft.irfft2(f, s=(ny, nx), dim=(0, 1)).reshape(self.n, -1).cpu().numpy()
        return out.ravel() if one else out

    def _root_weights(self) -> np.ndarray:
        """``sqrt(lambda_f c_f / n)`` on ``rfft2``'s half grid, ``c_f = 2`` where a frequency stands for its
        conjugate too (else 1), repeated for the real and imaginary parts (a complex array viewed as float64)."""
        if self._root is None:
            k = np.arange(self._half.shape[1])
            w = self._half * np.where((k == 0) | (2 * k == self.shape[1]), 1.0, 2.0) / self.n
            self._root = np.repeat(np.sqrt(np.maximum(w, 0.0)).ravel(), 2)
        return self._root

    def _weighted_spectra(self, cols: np.ndarray) -> np.ndarray:
        """``(m, L)`` float rows: the half spectrum of each row of ``cols`` (``(m, n)``), scaled so that row dot
        products are ``y_i' K y_j``."""
        ny, nx = self.shape
        m = cols.shape[0]
        cols = np.ascontiguousarray(cols, dtype=np.float64).reshape(m, ny, nx)
        if self.device == "cpu":
            if _NUMPY_FFT_OUT:  # into this thread's buffer (no fresh pages per task)
                f = np.fft.rfft2(cols, out=workspace("spectra", (m, ny, nx // 2 + 1), np.complex128))
            else:  # pragma: no cover - numpy < 2
                import scipy.fft

                f = scipy.fft.rfft2(cols)
            g = f.view(np.float64).reshape(m, -1)
            g *= self._root_weights()
            return g
        import torch

        if self._root_t is None:
            self._root_t = torch.as_tensor(self._root_weights(), device=self.device)
        f = torch.fft.rfft2(torch.as_tensor(cols, device=self.device))
        return torch.view_as_real(f).reshape(m, -1) * self._root_t

    def gene_quadratics(self, y: np.ndarray) -> np.ndarray:
        """``Y_g' K_eff Y_g`` of every gene, ``(B, n, d) -> (B, d, d)``, from one forward FFT per column.

        By Parseval, ``y_i' K_eff y_j = sum_f lambda_f Re(conj(Y_i(f)) Y_j(f)) / n``.
        """
        b, n, d = y.shape
        return self.column_quadratics(y.transpose(0, 2, 1).reshape(b * d, n), d)

    def grid_columns(self, m: int) -> np.ndarray:
        """A zeroed ``(m, n)`` array for columns to pass to :meth:`column_quadratics` (this thread's buffer:
        valid until the next call)."""
        out = workspace("columns", (m, self.n))
        out.fill(0.0)
        return out

    def column_quadratics(self, cols: np.ndarray, d: int) -> np.ndarray:
        """:meth:`gene_quadratics` of columns already laid out gene-major: ``(B * d, n) -> (B, d, d)``."""
        g = self._weighted_spectra(cols)
        g = g.reshape(cols.shape[0] // d, d, -1)
        if self.device == "cpu":
            return g @ g.transpose(0, 2, 1)
        return (g @ g.transpose(1, 2)).cpu().numpy()

    def quadratic_columns(self, yc: np.ndarray) -> np.ndarray:
        """``diag(Y' K_eff Y)`` from one forward FFT per column (Parseval: ``sum_f lambda_f |Y_f|^2 / n``).

        ``rfft2`` keeps the frequencies ``0 .. nx/2`` of the last axis; the
        others are their complex conjugates, so every kept column but the
        first (and the Nyquist one, for even ``nx``) is counted twice.
        """
        yc = np.asarray(yc, dtype=np.float64)
        g = self._weighted_spectra(yc.reshape(self.n, -1).T)
        if self.device == "cpu":
            return np.einsum("ij,ij->i", g, g)
        return (g * g).sum(dim=1).cpu().numpy()


@dataclass
class RasterKernel:
    """A built raster kernel: its parameters and the exact power sums of the centred spectrum.

    Attributes mirror :class:`spatialscale.kernel.SpatialKernel` where they
    apply (``power_sums``, ``power_sum_method``, ``token``); a raster kernel
    stores no matrix.
    """

    params: RasterParams
    power_sums: np.ndarray
    token: str = ""

    def __post_init__(self) -> None:
        import hashlib
        import json

        h = hashlib.sha256(json.dumps(self.params.to_dict(), sort_keys=True).encode())
        h.update(np.ascontiguousarray(self.power_sums, dtype=np.float64).tobytes())
        self.token = "fft-" + h.hexdigest()[:16]

    @property
    def n(self) -> int:
        """Bins in the grid."""
        return self.params.n

    def attrs(self) -> dict:
        """JSON-serialisable description kept with the store and results."""
        return {"kind": "fft", **self.params.to_dict(), "power_sums": [float(v) for v in self.power_sums],
                "power_sum_method": "exact", "power_sum_se": [0.0] * 4, "token": self.token, "n_spots": self.n}


def build_raster_kernel(params: RasterParams) -> RasterKernel:
    """The raster kernel with its exact power sums (``O(n log n)``)."""
    return RasterKernel(params, spectrum_power_sums(car_spectrum(params, centred=True)))


def raster_params_from_attrs(attrs: dict) -> RasterParams:
    """The :class:`RasterParams` recorded in a store's kernel attributes."""
    return RasterParams(shape=tuple(int(v) for v in attrs["shape"]), spacing=tuple(float(v) for v in attrs["spacing"]),
                        rho=float(attrs["rho"]), neighbor_degree=int(attrs["neighbor_degree"]))
