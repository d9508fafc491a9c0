"""What runs inside a worker process: device choice and the kernel cache.

The task graph carries only a store path and the kernel's content token;
each worker process loads the kernel once, factorises it for its device and
keeps it in a small cache keyed by ``(path, token, device)``.
"""

from __future__ import annotations

import threading
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["resolve_device", "kernel_operator", "kernel_eigenpairs", "log_timing", "tune_allocator",
           "autocorr_weights", "DENSE_GPU_MAX_SPOTS", "TIMING_TOPIC"]

#: largest section whose dense centred kernel is put on a GPU
DENSE_GPU_MAX_SPOTS = 40_000
_lock = threading.Lock()
#: topic of the per-task timing events that tasks log on distributed workers (read by ``spatialscale bench``)
TIMING_TOPIC = "spatialscale-timing"


def log_timing(**values: Any) -> None:
    """Log a task's timings (seconds) and counts as a distributed event; a no-op outside a distributed worker."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    worker.log_event(TIMING_TOPIC, values)


def resolve_device(device: str) -> str:
    """Map ``cpu`` / ``cuda`` / ``auto`` to a torch device string on this worker.

    Inside a dask-cuda worker, ``CUDA_VISIBLE_DEVICES`` already pins one GPU,
    which torch sees as ``cuda:0``.
    """
    if device not in ("cpu", "cuda", "auto"):
        raise ValueError(f"Unknown device {device!r}; choose cpu, cuda or auto.")
    if device == "cpu":
        return "cpu"
    from spatialscale.options import cuda_available

    if cuda_available():
        return "cuda:0"
    if device == "cuda":
        raise RuntimeError("device='cuda' was requested but this worker sees no CUDA device.")
    return "cpu"


def kernel_operator(store_path: str, token: str, device: str = "cpu") -> tuple[Any, np.ndarray]:
    """The section's kernel operator and power sums, cached per process.

    Parameters
    ----------
    store_path
        Isoform store path (readable by this worker).
    token
        The kernel's content token; a changed kernel gets a new cache entry.
    device
        ``cpu``, ``cuda`` or ``auto``.
    """
    dev = resolve_device(device)
    with _lock:
        return _load(str(store_path), token, dev)


@lru_cache(maxsize=4)
def _load(store_path: str, token: str, device: str) -> tuple[Any, np.ndarray]:
    from spatialscale.kernel import DenseKernelOperator, SparseCAROperator, SparseCGOperator
    from spatialscale.store import open_store

    store = open_store(store_path)
    if store.kernel_token != token:
        raise RuntimeError(
            f"the kernel in {store_path} changed during the run (token {store.kernel_token} != {token}); restart it."
        )
    sums = np.asarray(store.kernel_attrs["power_sums"], dtype=np.float64)
    if store.kernel_kind == "fft":  # raster kernel: FFT products, on the device where one is used
        from spatialscale.raster import FFTKernelOperator, raster_params_from_attrs

        return FFTKernelOperator(raster_params_from_attrs(store.kernel_attrs), device=device), sums
    precision = store.precision()
    if device.startswith("cuda"):
        if precision.shape[0] <= DENSE_GPU_MAX_SPOTS:
            return DenseKernelOperator(precision, device=device), sums
        # too large for a dense kernel: the sparse precision on the device, solved by batched CG
        return SparseCGOperator(precision, device=device), sums
    return SparseCAROperator(precision), sums


def kernel_diag_sq(store_path: str, token: str) -> float:
    """``sum_i (K_eff)_ii^2`` of the section's centred kernel (for exact permutation moments), cached per process."""
    with _lock:
        return _load_diag_sq(str(store_path), token)


@lru_cache(maxsize=8)
def _load_diag_sq(store_path: str, token: str) -> float:
    from spatialscale.kernel import centred_diag_sq
    from spatialscale.store import open_store

    store = open_store(store_path)
    if store.kernel_token != token:
        raise RuntimeError(f"the kernel in {store_path} changed during the run; restart it.")
    if store.kernel_kind == "fft":  # a circulant's diagonal is constant: tr(K_eff) / n
        k1 = float(store.kernel_attrs["power_sums"][0])
        return k1 * k1 / store.n_spots
    return centred_diag_sq(store.precision())


def autocorr_weights(store_path: str, token: str, weighting: str) -> Any:
    """The section's Moran / Geary weights from its stored spot graph (a raster's: its bins' grid), cached per process.

    Parameters
    ----------
    store_path
        Isoform store path (readable by this worker).
    token
        The store's content token; a rewritten store gets a new cache entry.
    weighting
        ``row`` or ``binary`` (:func:`spatialscale.stats.autocorr.spatial_weights`).

    Returns
    -------
    spatialscale.stats.autocorr.SpatialWeights
    """
    with _lock:
        return _load_autocorr_weights(str(store_path), token, weighting)


@lru_cache(maxsize=4)
def _load_autocorr_weights(store_path: str, token: str, weighting: str) -> Any:
    from spatialscale.stats.autocorr import grid_adjacency, grid_offsets, spatial_weights
    from spatialscale.store import ADJACENCY_KEY, open_store

    store = open_store(store_path)
    if store.content_token != token:
        raise RuntimeError(f"{store_path} changed during the run (token {store.content_token} != {token}); "
                           "restart it.")
    if store.kernel_kind == "fft":  # a raster keeps no graph: its observed bins' grid neighbours
        attrs = store.kernel_attrs
        offsets = grid_offsets(tuple(attrs["spacing"]), int(attrs["neighbor_degree"]))
        return spatial_weights(grid_adjacency(store.grid_index(), tuple(attrs["shape"]), offsets), weighting)
    return spatial_weights(store._read_elem(f"obsp/{ADJACENCY_KEY}"), weighting)


def kernel_eigenpairs(store_path: str, token: str, rank: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The section's kernel eigenpairs (already written to the store), cached per process."""
    with _lock:
        return _load_eigenpairs(str(store_path), token, rank)


@lru_cache(maxsize=2)
def _load_eigenpairs(store_path: str, token: str, rank: int | None) -> tuple[np.ndarray, np.ndarray]:
    from spatialscale.store import open_store

    store = open_store(store_path)
    if store.kernel_token != token:
        raise RuntimeError(f"the kernel in {store_path} changed during the run; restart it.")
    return store.eigenpairs(rank)


def coordinates_token(xy: np.ndarray | None) -> str:
    """Content token of a section's coordinates (what the GP caches are keyed by, with the path)."""
    import hashlib

    if xy is None:
        return "none"
    return hashlib.sha256(np.ascontiguousarray(xy, dtype=np.float64).tobytes()).hexdigest()[:16]


def normalized_coordinates(store_path: str, token: str) -> np.ndarray:
    """The section's coordinates z-scored per axis (``ddof=1``), cached per process (the GP's inputs).

    ``token`` (:func:`coordinates_token` of the coordinates the client saw)
    keys the cache with the path, so a store rewritten at the same path is
    never served from a stale entry; a mismatch on reading is an error.
    """
    with _lock:
        return _load_coordinates(str(store_path), token)


@lru_cache(maxsize=2)
def _load_coordinates(store_path: str, token: str) -> np.ndarray:
    from spatialscale.errors import InputError
    from spatialscale.store import open_store

    xy = open_store(store_path).coords()
    if xy is None:
        raise InputError(f"{store_path} has no spatial coordinates; hsic-gp needs them (use hsic or the t-tests).")
    if coordinates_token(xy) != token:
        raise RuntimeError(f"the coordinates in {store_path} changed during the run; restart it.")
    xy = np.asarray(xy, dtype=np.float64)
    return (xy - xy.mean(0)) / np.maximum(xy.std(0, ddof=1), 1e-8)


def gp_basis(store_path: str, token: str, options: tuple, device: str = "cpu") -> Any:
    """The section's spatial-GP kernel basis (``options``: sorted ``(key, value)`` pairs), cached per process.

    Keyed by path, coordinates token, options and device.
    """
    with _lock:
        return _load_gp_basis(str(store_path), token, options, device)


@lru_cache(maxsize=2)
def _load_gp_basis(store_path: str, token: str, options: tuple, device: str) -> Any:
    from spatialscale.stats.gp import section_basis

    return section_basis(_load_coordinates(store_path, token), device=device, **dict(options))


@lru_cache(maxsize=1)
def tune_allocator() -> bool:
    """Keep large temporary arrays in glibc's heap for iterative fits (once per process).

    distributed starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also
    freezes glibc's mmap threshold at 128 kB: every large temporary of every
    optimiser epoch is then a fresh ``mmap`` with page faults, which doubled
    GLMM fitting time in our measurements.  Raising the mmap threshold to 64 MB
    and the trim threshold to 256 MB restores it; memory above 256 MB of free
    heap is still returned to the system.  Returns whether glibc took it.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(libc.mallopt(m_trim_threshold, 256 << 20))
    except (OSError, AttributeError):
        return False
