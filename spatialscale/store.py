"""The isoform store: AnnData in, a column-chunked zarr v3 group out.

An isoform store is an AnnData zarr (``anndata.read_zarr`` opens it) laid out
for gene batches:

- ``layers/counts``: dense counts, ``(n_spots, n_isoforms)`` (integers; float64
  when the input has fractional counts, as EM quantifiers give), chunked
  by isoform columns only, with genes sorted by (number of isoforms, name),
  so every batch of genes with equal isoform count is one contiguous column
  range;
- ``var``: the kept isoforms in that order (``gene``, ``n_isoforms``);
- ``obs``: the kept spots and their covariates; ``obsm/spatial``;
- ``obsp/spatialscale_precision`` and ``obsp/spatialscale_adjacency``: the
  spatial kernel (see :mod:`spatialscale.kernel`); its power sums, token and
  parameters live in ``uns/spatialscale`` (one JSON string: a nested mapping
  costs a zarr array per entry, a third of a small section's ingest) and in
  the root group's attributes.

A raster store (``kernel="fft"``) differs: its kernel is the periodic CAR
kernel of the bins' bounding grid (:mod:`spatialscale.raster`, no matrix
stored), ``n_spots`` is the number of grid bins, ``obs`` holds the observed
bins only with their grid position (``spatialscale_grid_index``), and
``layers/counts`` is a CSC matrix of their non-zero counts; tasks read
columns scattered into the full grid (:func:`read_count_columns`).

Ingest validates everything first, writes to a temporary sibling and renames
it into place only when complete, so a failed ingest never leaves anything
that looks like a store. The store records the fingerprint of its input
(:func:`ingest_fingerprint`: the input's content and the ingest options); an
ingest of the same input with the same options into that path reuses it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import uuid
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.sparse.csgraph

from spatialscale._version import __version__
from spatialscale.checksums import (
    check_content_token,
    check_pinned,
    input_fingerprint,
    raise_if_replaced,
    verify,
    verify_prefix,
    write_array_manifest,
    write_manifest,
)
from spatialscale.errors import InputError
from spatialscale.kernel import KernelParams, build_kernel, spatial_weights, symmetrise_adjacency
from spatialscale.priors import DEFAULT_BANDWIDTH
from spatialscale.sources import (
    AnnDataSource,
    check_section_size,
    column_blocks,
    resolve_table,
    spatial_columns,
    spot_coordinates,
)

__all__ = ["ingest", "ingest_fingerprint", "is_store", "open_store", "IsoformStore", "STORE_FORMAT",
           "check_ingest_options"]

log = logging.getLogger(__name__)

#: 2: every file checksummed, with a content token (format 1 stores had neither and are refused)
STORE_FORMAT = 2
PRECISION_KEY = "spatialscale_precision"
#: ``obs`` column of a raster store: each observed bin's row-major index in the bounding grid
GRID_INDEX = "spatialscale_grid_index"
ADJACENCY_KEY = "spatialscale_adjacency"
#: where covariate sets learnt from expression live (one group per set, :meth:`IsoformStore.write_covariate_set`)
COVARIATES_KEY = "uns/spatialscale_covariates"
#: the attribute marking a covariate set spatialscale wrote
COVARIATE_MARK = "spatialscale_covariate_set"


# --------------------------------------------------------------------------- ingest
def ingest(
    source: Any,
    store_path: str | os.PathLike,
    *,
    table: str | None = None,
    layer: str = "counts",
    gene_key: str = "gene_symbol",
    spatial_key: str | tuple[str, ...] = "spatial",
    adj_key: str | None = None,
    min_counts: float = 10,
    min_bin_pct: float = 0.0,
    filter_single_iso_genes: bool = True,
    min_component_size: int = 1,
    k_neighbors: int = 4,
    rho: float = 0.99,
    standardize_cov: bool = True,
    prior: str = "splisosm",
    weights: str = "knn",
    radius: float | None = None,
    bandwidth: float = DEFAULT_BANDWIDTH,
    scale_coords: bool = True,
    row_scale: bool = False,
    power_sums: str = "auto",
    eigenpairs: bool = False,
    kernel: str = "car",
    grid_keys: tuple[str, str] = ("array_row", "array_col"),
    grid_spacing: tuple[float, float] = (1.0, 1.0),
    neighbor_degree: int = 1,
    block_bytes: int = 256 << 20,
    overwrite: bool = False,
    progress: bool = False,
    format: str | None = None,  # noqa: A002 - the option's name (--format)
    reader: dict[str, Any] | None = None,
    _fingerprint: str | None = None,
) -> IsoformStore:
    """Ingest an AnnData of isoform counts into an isoform store.

    Parameters
    ----------
    source
        An ``AnnData``, the path of an ``.h5ad`` file or AnnData ``.zarr``,
        or a ``SpatialData`` object or store (with ``table``). On-disk inputs
        are read in column blocks of at most ``block_bytes``.
    store_path
        Where to write the store (a directory), or a URL (``s3://bucket/name.zarr`` or any fsspec URL): the
        store is built locally, then uploaded and swapped into place (see ``docs/object-storage.md``).
    table
        The table of a SpatialData input (e.g. ``square_016um``); may be left
        out when it has one table. Its bins' ``obs`` keep their integer
        ``array_row`` / ``array_col`` (``kernel="fft"``) or it needs
        coordinates in ``obsm[spatial_key]`` (``kernel="car"``).
    layer
        Layer holding isoform counts (spots x isoforms); ``"X"`` reads
        ``adata.X`` (unless a layer is called ``X``). Sparse layers are read
        in column blocks without densifying them; so is a backed AnnData's
        ``X`` (``anndata.read_h5ad(path, backed="r")``). Counts must be
        finite, non-negative and at most 2^53. Whole numbers are stored as
        int32 / int64; fractional counts (the EM estimates of long-read
        quantifiers such as IsoQuant, Bambu or oarfish) as float64, exactly
        as given, and the store's ``meta["integer_counts"]`` is then
        ``False`` (see ``docs/migration.md``, "Fractional counts").
    gene_key
        ``var`` column naming each isoform's gene.
    spatial_key
        The spot coordinates: an ``obsm`` key (an array, or a DataFrame whose
        numeric columns are x and y), or two ``obs`` columns, as a pair
        (``("x", "y")``) or ``"x,y"``. Three columns (an ``obsm`` array of
        ``n x 3``, or ``("x", "y", "z")`` / ``"x,y,z"``) are 3-D coordinates,
        e.g. serial sections stacked along z: the kNN graph or distance band,
        and so every ``prior``, is built on 3-D Euclidean distances (units
        matter: z in the units of x and y). ``kernel="car"`` only; a section
        given with a constant z gets exactly its 2-D results. One column or
        more than three are errors.
    adj_key
        ``obsp`` key of a user adjacency to use instead of the kNN graph.
    min_counts, min_bin_pct
        Keep an isoform with total count >= ``min_counts`` and a fraction of
        spots with counts >= ``min_bin_pct`` (values > 1 are percentages).
    filter_single_iso_genes
        Drop genes left with fewer than two isoforms.
    min_component_size
        Drop spots in graph components smaller than this.
    k_neighbors, rho, standardize_cov
        Spatial kernel parameters (see :class:`spatialscale.kernel.KernelParams`).
    prior, weights, radius, bandwidth, scale_coords, row_scale
        The spatial prior: ``splisosm`` (default, SPLISOSM's CAR kernel) or
        Smoother's ``car``, ``icar``, ``sar``, ``isar``, ``sma``, on the kNN
        graph (``weights="knn"``) or Smoother's Gaussian distance band
        (``weights="distance"`` with ``radius``, ``bandwidth``,
        ``scale_coords``); ``rho`` is checked against the prior's admissible
        range on the graph (see :mod:`spatialscale.priors`). ``kernel="car"`` only.
    power_sums
        How the kernel's null power sums are computed: ``auto`` (exact up to
        5,000 spots, then ``selected``), ``exact``, ``selected`` (``k_1, k_2``
        exact, ``k_3, k_4`` from probes with control variates) or ``hutchinson``
        (SPLISOSM's 60-probe estimate, for parity).
    eigenpairs
        Also compute the kernel's eigenpairs for the GLMM (all of them up to
        5,000 spots, else the leading ``ceil(4 sqrt(n))``) and keep them in the
        store, as the GLMM's first run would. Up to 5,000 spots the exact
        power sums then come from the same decomposition, so a section that
        is tested with both the HSIC tests and the GLMM pays one ``n^3``
        step instead of two (at 5,000 spots the eigenpairs take ~200 MB).
        Only with ``kernel="car"``.
    kernel
        ``car`` (the kNN-graph CAR kernel) or ``fft``: bins of a regular raster
        (Visium HD, binned Stereo-seq or Xenium), located by the integer
        ``obs`` columns ``grid_keys`` (row, column), with the periodic CAR
        kernel of the grid (see :mod:`spatialscale.raster`). The tests then
        run over every bin of the bounding grid, bins without an observation
        with zero counts, as SPLISOSM's ``SplisosmFFT`` does; the store keeps
        only the observed bins' non-zero counts.
    grid_keys, grid_spacing, neighbor_degree
        ``fft``: the obs columns of each bin's row and column, the ``(dy, dx)``
        bin spacing, and the rings of neighbours of the kernel.
    block_bytes
        Memory budget of one column block while ingesting.
    overwrite
        Replace an existing store at ``store_path``. Without it, a store that
        ingest wrote there from the same input content with the same options
        (its recorded input fingerprint, :func:`ingest_fingerprint`) is reused
        as it is; anything else there is an error.
    progress
        Show a progress bar over column blocks.
    format
        The instrument output a path ``source`` is: ``visium``, ``visium-hd``,
        ``xenium`` or ``long-read`` (see ``docs/instruments.md``), or
        ``anndata``. Left out, a folder (or a file of one) is recognised by the
        files it holds, and an ``.h5ad`` / zarr is read as an AnnData.
    reader
        Keywords of the instrument reader (``--reader KEY=VALUE``), e.g.
        ``{"bin_size": 8}`` for Visium HD (:mod:`spatialscale.readers`).

    Returns
    -------
    IsoformStore
        The opened store.

    Raises
    ------
    InputError
        On missing keys, bad coordinates or counts, or nothing left after
        filtering; nothing is written in that case.
    """
    # the options as given (the arguments only: the first statement, before any other local name exists)
    settings = ingest_settings(**{k: v for k, v in locals().items() if k not in ("source", "store_path")})
    from spatialscale.locations import is_url, url_handler
    from spatialscale.output import FileLock, remove_empty_folders

    if is_url(store_path):  # built locally, then published (spatialscale.remote)
        given = {k: v for k, v in locals().items() if k in settings or k in _NOT_CONTENT}
        return url_handler("ingest")(source, str(store_path), given)
    if is_url(source):  # an input at a URL: downloaded first
        with url_handler("local_input")(source) as local_source:
            given = {k: v for k, v in locals().items() if k in settings or k in _NOT_CONTENT}
            return ingest(local_source, store_path, **given)
    store_path = Path(os.path.abspath(store_path))
    params = check_ingest_options(min_counts=min_counts, min_bin_pct=min_bin_pct,
                                  min_component_size=min_component_size, k_neighbors=k_neighbors, rho=rho,
                                  standardize_cov=standardize_cov, power_sums=power_sums, block_bytes=block_bytes,
                                  prior=prior, weights=weights, radius=radius, bandwidth=bandwidth,
                                  scale_coords=scale_coords, row_scale=row_scale)
    raster = check_raster_options(kernel=kernel, grid_keys=grid_keys, grid_spacing=grid_spacing,
                                  neighbor_degree=neighbor_degree, rho=rho, min_component_size=min_component_size,
                                  adj_key=adj_key, eigenpairs=eigenpairs, prior=prior, weights=weights,
                                  spatial_key=spatial_key)
    source = resolve_table(source, table, format=format, reader=reader)
    fingerprint = _fingerprint or input_fingerprint(source, settings)
    if not overwrite:
        reused = _reusable_store(store_path, fingerprint)
        if reused is not None:
            log.info("%s already holds this input (same content and ingest options): reused", store_path)
            return reused
    _check_store_target(store_path, source, overwrite)
    src = AnnDataSource(source, layer)
    created = [d for d in [store_path.parent, *store_path.parent.parents] if not d.exists()]
    try:
        store_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        src.close()
        raise InputError(f"cannot create {store_path.parent} ({exc.strerror or exc}).") from None
    try:
        lock = FileLock(store_path, hint="wait for it to finish, or ingest into another path").acquire()
        try:
            _check_store_target(store_path, source, overwrite)  # again, under the lock
            _remove_stale_siblings(store_path)
            return _ingest(src, store_path, params, layer=layer, gene_key=gene_key, spatial_key=spatial_key,
                           adj_key=adj_key, min_counts=min_counts, min_bin_pct=min_bin_pct,
                           filter_single_iso_genes=filter_single_iso_genes,
                           min_component_size=min_component_size, block_bytes=block_bytes, progress=progress,
                           raster=raster, eigenpairs=bool(eigenpairs), fingerprint=fingerprint)
        finally:
            lock.release()
    except BaseException:
        remove_empty_folders(created)  # folders made for a store that was never written
        raise
    finally:
        src.close()


#: ingest keywords that do not change what a store holds
_NOT_CONTENT = ("block_bytes", "overwrite", "progress", "_fingerprint",
                # the reader's output (an AnnData) is hashed by content instead; AnnData inputs keep their fingerprint
                "format", "reader")


def ingest_settings(**options: Any) -> dict[str, Any]:
    """Every option that shapes an ingested store: ``options`` over :func:`ingest`'s defaults (JSON-ready)."""
    import inspect

    params = inspect.signature(ingest).parameters
    out = {k: p.default for k, p in params.items()
           if p.default is not inspect.Parameter.empty and k not in _NOT_CONTENT}
    out.update({k: v for k, v in options.items() if k in out})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def ingest_fingerprint(source: Any, **options: Any) -> str:
    """The input fingerprint an ingest of ``source`` with ``options`` records (its content and the options).

    Equal fingerprints mean equal stores; a changed matrix, coordinates,
    annotation or option gives another (see
    :func:`spatialscale.checksums.input_fingerprint`).
    """
    source = resolve_table(source, options.get("table"), format=options.get("format"), reader=options.get("reader"))
    return input_fingerprint(source, ingest_settings(**options))


def _reusable_store(store_path: Path, fingerprint: str) -> IsoformStore | None:
    """The complete, verified store at ``store_path`` if ingest wrote it from the same input and options."""
    if not is_store(store_path):
        return None
    try:
        store = open_store(store_path)
    except InputError:
        return None
    return store if store.meta.get("source_fingerprint") == fingerprint else None


def check_ingest_options(*, min_counts: float = 10, min_bin_pct: float = 0.0, min_component_size: int = 1,
                         k_neighbors: int = 4, rho: float = 0.99, standardize_cov: bool = True,
                         power_sums: str = "auto", block_bytes: int = 256 << 20, prior: str = "splisosm",
                         weights: str = "knn", radius: float | None = None, bandwidth: float = DEFAULT_BANDWIDTH,
                         scale_coords: bool = True, row_scale: bool = False) -> KernelParams:
    """Validate ingest's numeric options; return the kernel parameters (``InputError`` naming a bad one)."""
    try:
        params = KernelParams(k_neighbors=k_neighbors, rho=rho, standardize_cov=standardize_cov,
                              power_sums=power_sums, prior=prior, weights=weights, radius=radius,
                              bandwidth=bandwidth, scale_coords=scale_coords, row_scale=row_scale)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid kernel parameters: {exc}") from None
    for name, value, low in (("min_component_size", min_component_size, 1), ("block_bytes", block_bytes, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise InputError(f"{name} must be a whole number >= {low} (got {value!r}).")
    for name, value in (("min_counts", min_counts), ("min_bin_pct", min_bin_pct)):
        if not np.isfinite(float(value)) or float(value) < 0:
            raise InputError(f"{name} must be a finite number >= 0 (got {value!r}).")
    return params


def check_raster_options(*, kernel: str = "car", grid_keys: Any = ("array_row", "array_col"),
                         grid_spacing: Any = (1.0, 1.0), neighbor_degree: int = 1, rho: float = 0.99,
                         min_component_size: int = 1, adj_key: str | None = None,
                         eigenpairs: bool = False, prior: str = "splisosm", weights: str = "knn",
                         spatial_key: Any = "spatial") -> dict | None:
    """Validate the raster options: ``None`` for ``kernel="car"``, else the grid keys and kernel parameters.

    A raster is a 2-D grid: ``kernel="fft"`` with three coordinate columns (``spatial_key=("x", "y", "z")``) or
    three ``grid_keys`` is refused (3-D coordinates take ``kernel="car"``).
    """
    if kernel not in ("car", "fft"):
        raise InputError(f"unknown kernel {kernel!r}; choose car or fft.")
    if kernel == "car":
        if adj_key is not None and weights != "knn":
            raise InputError(f"weights={weights!r} builds the graph from the coordinates; it does not apply with "
                             "adj_key (a given adjacency).")
        return None
    if prior != "splisosm" or weights != "knn":
        raise InputError("kernel='fft' has SPLISOSM's CAR kernel of the grid: prior and weights apply to "
                         "kernel='car'.")
    if eigenpairs:
        raise InputError("eigenpairs=True needs kernel='car': the GLMM does not run on a raster (fft) kernel.")
    if adj_key is not None or int(min_component_size) != 1:
        raise InputError("kernel='fft' builds its kernel from the grid: adj_key and min_component_size do not apply.")
    three_d = not isinstance(spatial_key, str) and len(tuple(spatial_key)) == 3 or \
        isinstance(spatial_key, str) and spatial_key.count(",") == 2 or \
        not isinstance(grid_keys, str) and len(tuple(grid_keys)) == 3
    if three_d:
        raise InputError("kernel='fft' needs a 2-D raster (rows, columns of one section); 3-D coordinates "
                         "(x, y, z) take kernel='car' (kNN graph or distance band in 3-D).")
    if isinstance(grid_keys, str) or len(tuple(grid_keys)) != 2:
        raise InputError(f"grid_keys must name two obs columns (row, column), got {grid_keys!r}.")
    try:
        spacing = tuple(float(v) for v in grid_spacing)
        from spatialscale.raster import RasterParams

        RasterParams((1, 1), spacing, rho, neighbor_degree)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid raster kernel parameters: {exc}") from None
    return {"grid_keys": tuple(str(k) for k in grid_keys), "spacing": spacing, "rho": float(rho),
            "neighbor_degree": int(neighbor_degree)}


def _grid_bins(obs: pd.DataFrame, raster: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """Each observation's bin (row-major index in the bounding grid) and the grid shape."""
    cols = []
    for key in raster["grid_keys"]:
        if key not in obs.columns:
            raise InputError(f"obs has no grid column {key!r} (columns: {list(obs.columns)}); kernel='fft' needs "
                             "each bin's integer row and column (grid_keys).")
        v = pd.to_numeric(obs[key], errors="coerce").to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(v)) or np.any(v != np.round(v)):
            raise InputError(f"obs[{key!r}] must hold whole-number bin indices (found missing or fractional values).")
        cols.append(v.astype(np.int64) - int(v.min()))
    r, c = cols
    shape = (int(r.max()) + 1, int(c.max()) + 1)
    bins = r * shape[1] + c
    dup = pd.Index(bins).duplicated()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        raise InputError(f"{int(dup.sum())} observation(s) share a bin with another (e.g. {obs.index[i]!r} at "
                         f"{raster['grid_keys'][0]}={r[i]}, {raster['grid_keys'][1]}={c[i]} counted from 0); "
                         "aggregate them first.")
    return bins, shape


def is_store(path: str | os.PathLike) -> bool:
    """A folder (or URL) spatialscale's ingest wrote (its ``spatialscale`` marker), complete or not."""
    from spatialscale.locations import is_url, url_handler
    from spatialscale.output import group_attributes

    if is_url(path):
        return url_handler("is_store")(str(path))
    path = Path(path)
    return path.is_dir() and isinstance(group_attributes(path).get("spatialscale"), dict)


def _remove_stale_siblings(store_path: Path) -> None:
    """Remove what an ingest into ``store_path`` that was killed left beside it (called under the store's lock).

    Only ``.<name>.tmp-*`` / ``.<name>.old-*`` folders that carry the store mark
    (complete or not) are removed: the lock proves no other ingest of this path
    is running.
    """
    for pattern in (f".{store_path.name}.tmp-*", f".{store_path.name}.old-*"):
        for path in store_path.parent.glob(pattern):
            if is_store(path):
                shutil.rmtree(path, ignore_errors=True)


def _check_store_target(store_path: Path, source: Any, overwrite: bool) -> None:
    """Refuse a store path that is the input, the working directory, or something spatialscale did not write."""
    import anndata as ad

    if not isinstance(source, ad.AnnData):
        src = Path(os.path.abspath(source))
        if src == store_path or src in store_path.parents or store_path in src.parents:
            raise InputError(f"the store {store_path} overlaps the input {src}; write the store elsewhere.")
    cwd = Path.cwd()
    if store_path == cwd or store_path in cwd.parents:
        raise InputError(f"the store {store_path} is the working directory or a folder above it; name a new folder.")
    if not store_path.exists():
        if store_path.parent.exists() and not os.access(store_path.parent, os.W_OK | os.X_OK):
            raise InputError(f"cannot write into {store_path.parent} (permission denied).")
        return
    if not overwrite:
        if is_store(store_path):
            raise InputError(f"{store_path} holds an isoform store of another input or other ingest options; pass "
                             "overwrite=True (--overwrite) to replace it, or choose another path.")
        raise InputError(f"{store_path} already exists; pass overwrite=True (--overwrite) to replace it.")
    if not is_store(store_path):
        raise InputError(f"{store_path} exists and was not written by spatialscale (it is no isoform store); "
                         "spatialscale never replaces what it did not write: choose another path.")


def _ingest(src: AnnDataSource, store_path: Path, params: KernelParams, *, layer: str, gene_key: str,
            spatial_key: str, adj_key: str | None, min_counts: float, min_bin_pct: float,
            filter_single_iso_genes: bool, min_component_size: int, block_bytes: int,
            progress: bool, raster: dict | None = None, eigenpairs: bool = False,
            fingerprint: str = "") -> IsoformStore:
    from tqdm import tqdm

    n_obs, n_var = src.shape
    if n_obs != len(src.obs) or n_var != len(src.var):
        raise InputError(
            f"layers[{layer!r}] has shape {src.shape} but the AnnData has "
            f"{len(src.obs)} spots x {len(src.var)} isoforms."
        )
    for what, index in (("spot", src.obs.index), ("isoform", src.var.index)):
        names = pd.Index(index)
        if names.dtype != object:  # names as the store keeps them (text): 1 and "1" would collide
            names = names.astype(str)
        if names.is_unique:
            continue
        dup = names.duplicated()
        if dup.any():
            first = str(pd.Index(index)[dup][0])
            fix = "obs_names_make_unique" if what == "spot" else "var_names_make_unique"
            raise InputError(f"{int(dup.sum())} duplicate {what} name(s) (e.g. {first!r}); "
                             f"make them unique first (adata.{fix}()).")
    if gene_key not in src.var.columns:
        raise InputError(
            f"var has no column {gene_key!r} naming each isoform's gene (columns: {list(src.var.columns)})."
        )
    if src.var[gene_key].isna().any():
        raise InputError(f"var[{gene_key!r}] has missing gene names.")
    adjacency = None
    if adj_key is not None:
        if adj_key not in src.obsp:
            raise InputError(f"obsp has no adjacency {adj_key!r} (available: {sorted(src.obsp)}).")
        adjacency = symmetrise_adjacency(src.obsp[adj_key])
        if adjacency.shape[0] != n_obs:
            raise InputError(f"obsp[{adj_key!r}] has shape {adjacency.shape}; expected ({n_obs}, {n_obs}).")
    coords = None
    grid = None
    if raster is not None:
        bins, shape = _grid_bins(src.obs, raster)
        grid = {"bins": bins, "shape": shape, **raster}
    elif adjacency is None or spatial_columns(spatial_key) is not None or spatial_key in src.obsm:
        coords = spot_coordinates(src.obs, src.obsm, spatial_key)

    check_section_size(n_obs, params.k_neighbors, "the input")

    # spots: drop small graph components
    keep_spots = np.ones(n_obs, dtype=bool)
    if min_component_size > 1:
        graph = adjacency if adjacency is not None else spatial_weights(coords, params)
        _, labels = scipy.sparse.csgraph.connected_components(graph, directed=False)
        keep_spots = np.bincount(labels)[labels] >= min_component_size
        if not keep_spots.any():
            raise InputError(f"no spots left after removing graph components smaller than {min_component_size}.")
        if not keep_spots.all():
            warnings.warn(f"removed {int((~keep_spots).sum())} spot(s) in graph components smaller than "
                          f"{min_component_size}; {int(keep_spots.sum())} remain.", UserWarning, stacklevel=3)
    rows = None if keep_spots.all() else np.flatnonzero(keep_spots)
    n_spots = int(keep_spots.sum())
    check_section_size(n_spots, params.k_neighbors, f"the spots left after min_component_size={min_component_size}")

    # isoforms: validate counts and compute filter statistics, block by block
    names = src.var.index.astype(str)
    totals = np.zeros(n_var)
    nonzero = np.zeros(n_var)
    whole = np.ones(n_var, dtype=bool)  # columns of whole numbers; fractional ones (EM estimates) make a float store
    all_cols = np.arange(n_var)
    for sl in tqdm(list(column_blocks(n_var, n_obs, block_bytes)), desc="ingest: check", disable=not progress):
        totals[sl], nonzero[sl], whole[sl] = src.column_stats(all_cols[sl], rows, names[sl], layer)
    if totals.max(initial=0.0) >= 2.0**62:
        raise InputError(f"layers[{layer!r}] has isoform totals of {totals.max():.3g}, beyond the exact range of "
                         "the stored integers; these are not read counts.")
    min_frac = float(min_bin_pct) / 100.0 if min_bin_pct > 1 else float(min_bin_pct)
    keep_iso = (totals >= min_counts) & (nonzero / max(n_spots, 1) >= min_frac)
    var = pd.DataFrame({"gene": src.var[gene_key].astype(str).to_numpy(), "source_index": all_cols,
                        "total_counts": totals}, index=names)
    var = var[keep_iso]
    gene_totals = var.groupby("gene", sort=False)["total_counts"].sum()
    empty = gene_totals.index[gene_totals <= 0]
    if len(empty):
        warnings.warn(f"dropping {len(empty)} gene(s) with no counts at all (e.g. {list(empty[:3])}).",
                      UserWarning, stacklevel=3)
        var = var[~var["gene"].isin(empty)]
    n_iso = var.groupby("gene", sort=False)["gene"].transform("size")
    if filter_single_iso_genes:
        var = var[n_iso.loc[var.index] >= 2]
    if var.empty:
        raise InputError(
            f"no genes left after filtering (min_counts={min_counts}, min_bin_pct={min_bin_pct}, "
            f"filter_single_iso_genes={filter_single_iso_genes}); lower the thresholds or check the counts layer."
        )
    var = var.assign(n_isoforms=var.groupby("gene", sort=False)["gene"].transform("size").astype(np.int64),
                     first_seen=np.arange(len(var)))
    var = var.sort_values(["n_isoforms", "gene", "first_seen"], kind="stable").drop(columns="first_seen")

    # kernel on the kept spots (or on the raster's bounding grid)
    if grid is not None:
        from spatialscale.raster import RasterParams, build_raster_kernel

        kernel = build_raster_kernel(RasterParams(grid["shape"], grid["spacing"], grid["rho"], grid["neighbor_degree"]))
    else:
        try:
            if adjacency is not None:
                kernel = build_kernel(adjacency=adjacency[keep_spots][:, keep_spots], params=params,
                                      eigenpairs=eigenpairs)
            else:
                kernel = build_kernel(coords[keep_spots], params=params, eigenpairs=eigenpairs)
        except ValueError as exc:  # a prior's rho outside its range on this graph, sma too large...
            raise InputError(f"invalid kernel: {exc}") from None

    tmp = store_path.with_name(f".{store_path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        _write_store(tmp, src, var, keep_spots, rows, coords, kernel, layer=layer, block_bytes=block_bytes,
                     progress=progress, grid=grid, meta={
                         "format": STORE_FORMAT, "spatialscale_version": __version__, "source": src.label,
                         **source_stamp(src.label),
                         "layer": layer, "gene_key": gene_key, "spatial_key": spatial_key,
                         "adj_key": adj_key or "", "min_counts": float(min_counts),
                         "min_bin_pct": float(min_bin_pct), "filter_single_iso_genes": bool(filter_single_iso_genes),
                         "min_component_size": int(min_component_size), "n_spots_input": int(n_obs),
                         "source_fingerprint": fingerprint,
                         # only fractional stores carry the flag: integer stores keep their metadata and bytes
                         **({} if whole[var["source_index"].to_numpy()].all() else {"integer_counts": False}),
                     })
        old = None
        if store_path.exists():  # an isoform store (checked under the lock): set aside, then removed
            old = store_path.with_name(f".{store_path.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(store_path, old)
        os.replace(tmp, store_path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_store(store_path)


def _write_store(path: Path, src: AnnDataSource, var: pd.DataFrame, keep_spots: np.ndarray, rows: np.ndarray | None,
                 coords: np.ndarray | None, kernel: Any, *, layer: str, block_bytes: int,
                 progress: bool, meta: dict, grid: dict | None = None) -> None:
    import anndata as ad
    import zarr

    if grid is None:
        n_spots = int(keep_spots.sum())
        obs = src.obs.iloc[np.flatnonzero(keep_spots)].copy()
        obs.index = obs.index.astype(str)
        obsp = {PRECISION_KEY: kernel.precision, ADJACENCY_KEY: kernel.adjacency}
    else:  # the observed bins only; the kernel's dimension is every bin of the bounding grid
        ny, nx = grid["shape"]
        n_spots = ny * nx
        obs = src.obs.copy()
        obs.index = obs.index.astype(str)
        obs[GRID_INDEX] = grid["bins"].astype(np.int64)
        obsp = {}
        row, col = np.divmod(grid["bins"], nx)
        coords = np.c_[col * grid["spacing"][1], row * grid["spacing"][0]].astype(np.float64)
    out_var = var[["gene", "n_isoforms", "total_counts", "source_index"]].copy()
    out_var["source_name"] = var.index
    meta = {**meta, "n_spots": n_spots, "n_isoforms": len(var), "n_genes": int(var["gene"].nunique()),
            "kernel": kernel.attrs(), "complete": False}
    if grid is not None:
        meta["n_observed"] = len(obs)
    skeleton = ad.AnnData(obs=obs, var=out_var, obsp=obsp, uns={"spatialscale": json.dumps(_plain(meta))})
    if coords is not None:
        skeleton.obsm["spatial"] = coords if grid is not None else coords[keep_spots]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with ad.settings.override(zarr_write_format=3):
            skeleton.write_zarr(path)
        root = zarr.open_group(str(path), mode="a")
        root.attrs["spatialscale"] = {"complete": False, "format": STORE_FORMAT}  # ours, even if interrupted
        max_total = float(var["total_counts"].max()) if len(var) else 0.0
        if not meta.get("integer_counts", True):
            dtype = "float64"  # fractional counts, stored exactly as given
        else:
            dtype = "int32" if max_total < 2**31 else "int64"
        src_idx = var["source_index"].to_numpy()
        if grid is None:
            _write_dense_counts(root, src, src_idx, rows, n_spots, dtype, block_bytes, progress)
        else:
            _write_sparse_counts(root, src, src_idx, len(obs), n_spots, dtype, block_bytes, progress)
        if getattr(kernel, "eigenpairs", None) is not None:  # asked for at ingest: kept as ensure_eigenpairs does
            lam, vec = kernel.eigenpairs
            _, vals_key, vecs_key = _eigen_keys(lam.shape[0])
            _put_array(root, vecs_key, vec)
            _put_array(root, vals_key, lam)
        # every file hashed (the content token covers them and the metadata), then the completion mark with a
        # JSON copy of uns/spatialscale: opening the store (on every worker that loads the section) then reads
        # one small file instead of one array per entry
        token = write_manifest(path, _plain(meta))
        root.attrs["spatialscale"] = {"complete": True, "format": STORE_FORMAT, "meta": _plain(meta),
                                      "content_token": token}
        zarr.consolidate_metadata(str(path))


def _eigen_keys(rank: int) -> tuple[int, str, str]:
    """The rank and the store keys of the kernel's eigenvalues and eigenvectors of that rank."""
    return rank, f"uns/spatialscale_eigvals_r{rank}", f"obsm/spatialscale_eigvecs_r{rank}"


def _write_dense_counts(root: Any, src: AnnDataSource, src_idx: np.ndarray, rows: np.ndarray | None, n_spots: int,
                        dtype: str, block_bytes: int, progress: bool) -> None:
    """``layers/counts`` as a dense array, ~4 MB chunks of whole columns (never wider than one ingest block).

    ``dtype``: ``int32`` / ``int64`` for whole-number counts, ``float64`` for fractional ones.
    """
    from tqdm import tqdm

    n_iso = len(src_idx)
    item = 8 if dtype == "float64" else 4  # integer stores keep the chunking (and bytes) they always had
    chunk_cols = max(1, min(n_iso, (4 << 20) // max(item * n_spots, 1), block_bytes // max(8 * n_spots, 1)))
    arr = root.create_array("layers/counts", shape=(n_spots, n_iso), chunks=(n_spots, chunk_cols), dtype=dtype,
                            fill_value=0)
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})
    step = max(chunk_cols, (block_bytes // max(8 * n_spots, 1)) // chunk_cols * chunk_cols)
    for s in tqdm(range(0, n_iso, step), desc="ingest: write", disable=not progress):
        e = min(s + step, n_iso)
        arr[:, s:e] = src.read_columns(src_idx[s:e], rows).astype(dtype)


def _write_sparse_counts(root: Any, src: AnnDataSource, src_idx: np.ndarray, n_obs: int, n_grid: int, dtype: str,
                         block_bytes: int, progress: bool) -> None:
    """``layers/counts`` of a raster as a CSC matrix (AnnData's encoding) over the observed bins.

    Binned sections are mostly zeros (bins without tissue, genes absent from
    most bins), so only the non-zero counts are kept; a task scatters its
    columns into the full grid (:func:`read_count_columns`). ``data`` has the
    dense store's ``dtype`` (``float64`` for fractional counts).
    """
    from tqdm import tqdm

    n_iso = len(src_idx)
    group = root.create_group("layers/counts")
    group.attrs.update({"encoding-type": "csc_matrix", "encoding-version": "0.1.0", "shape": [n_obs, n_iso],
                        "spatialscale_grid_size": int(n_grid)})
    chunk = 1 << 17  # a gene's columns span a few chunks: a task decompresses little it does not use
    idx_dtype = "int32" if n_obs < 2**31 else "int64"
    data = group.create_array("data", shape=(0,), chunks=(chunk,), dtype=dtype)
    indices = group.create_array("indices", shape=(0,), chunks=(chunk,), dtype=idx_dtype)
    indptr = np.zeros(n_iso + 1, dtype=np.int64)
    step = max(1, block_bytes // max(8 * n_obs, 1))  # dense-sized blocks: a dense input is read as such
    for s in tqdm(range(0, n_iso, step), desc="ingest: write", disable=not progress):
        e = min(s + step, n_iso)
        block = src.read_columns_sparse(src_idx[s:e])
        block.eliminate_zeros()
        block.sort_indices()
        data.append(block.data.astype(dtype))
        indices.append(block.indices.astype(idx_dtype))
        indptr[s + 1 : e + 1] = indptr[s] + block.indptr[1:]
    group.create_array("indptr", shape=indptr.shape, chunks=indptr.shape, dtype="int64")[...] = indptr


# --------------------------------------------------------------------------- open
@dataclass
class IsoformStore:
    """An opened isoform store (cheap: reads metadata; the gene tables when first used).

    Attributes
    ----------
    path
        Location of the store.
    genes
        One row per gene in store order: ``n_isoforms``, ``start``, ``stop``
        (its isoform column range).
    isoforms
        The ``var`` table.
    meta
        ``uns/spatialscale``: ingest parameters and kernel description.
    content_token
        Hash of the store's files and metadata: equal tokens, equal data (see
        :mod:`spatialscale.checksums`); what results and recorded batches are
        matched against, never the path.
    """

    path: Path
    meta: dict
    content_token: str = ""

    @cached_property
    def isoforms(self) -> pd.DataFrame:
        return self._read_elem("var")

    @cached_property
    def genes(self) -> pd.DataFrame:
        gene = self.isoforms["gene"].astype(str).to_numpy()
        change = np.flatnonzero(np.r_[True, gene[1:] != gene[:-1]])
        stops = np.r_[change[1:], len(gene)]
        return pd.DataFrame({"n_isoforms": stops - change, "start": change, "stop": stops},
                            index=pd.Index(gene[change], name="gene"))

    @property
    def n_spots(self) -> int:
        return int(self.meta["n_spots"])

    @property
    def n_genes(self) -> int:
        return len(self.genes)

    @property
    def n_observed(self) -> int:
        """Rows of ``obs``: the spots, or a raster's observed bins (``n_spots`` counts every bin of its grid)."""
        return int(self.meta.get("n_observed", self.meta["n_spots"]))

    @property
    def integer_counts(self) -> bool:
        """Whether the stored counts are whole numbers (``False``: fractional, e.g. EM estimates, kept as float64).

        Stores written before fractional counts were accepted have no
        ``integer_counts`` entry and are integer.
        """
        return bool(self.meta.get("integer_counts", True))

    def grid_index(self) -> np.ndarray:
        """A raster store's observed bins' flat grid positions (``row * nx + col``), in ``obs`` order."""
        if self.kernel_kind != "fft":
            raise InputError(f"{self.path} is not a raster store (kernel {self.kernel_kind}).")
        return _grid_index(str(self.path))

    @property
    def kernel_attrs(self) -> dict:
        return dict(self.meta["kernel"])

    @property
    def kernel_kind(self) -> str:
        """``car`` (kNN-graph CAR kernel, sparse precision) or ``fft`` (raster kernel)."""
        return str(self.meta["kernel"].get("kind", "car"))

    @property
    def kernel_token(self) -> str:
        return str(self.meta["kernel"]["token"])

    def __repr__(self) -> str:
        return (f"IsoformStore({str(self.path)!r}, n_spots={self.n_spots}, n_genes={self.n_genes}, "
                f"n_isoforms={len(self.isoforms)})")

    def _group(self) -> Any:
        import zarr

        # each node's own zarr.json (checksummed), not the consolidated copy in the root's
        return zarr.open_group(str(self.path), mode="r", use_consolidated=False)

    def _read_elem(self, key: str) -> Any:
        """An AnnData element of the store, its files verified first."""
        from anndata.io import read_elem

        verify_prefix(self.path, key)
        return read_elem(self._group()[key])

    def read_counts(self, start: int, stop: int) -> np.ndarray:
        """Counts of isoform columns ``start:stop`` as float64 ``(n_spots, m)``."""
        return read_count_columns(self.path, start, stop)

    def gene_counts(self, gene: str) -> np.ndarray:
        """Counts ``(n_spots, p)`` of one gene."""
        row = self.genes.loc[gene]
        return self.read_counts(int(row["start"]), int(row["stop"]))

    def coords(self) -> np.ndarray | None:
        """Spot coordinates, if the store has them."""
        if not (self.path / "obsm" / "spatial" / "zarr.json").is_file():
            return None
        return np.asarray(self._read_elem("obsm/spatial"))

    def obs(self, *, covariate_sets: bool = True) -> pd.DataFrame:
        """Spot annotations (covariates); for a raster store, the observed bins only.

        With ``covariate_sets`` (default), the columns of the covariate sets
        written into the store (:meth:`write_covariate_set`: cell-type
        proportions, latent factors) follow the ingested columns, and
        ``obs.attrs["covariate_sets"]`` maps each set's name to its columns, so
        a covariate-taking call accepts the set's name for all of them.
        """
        obs = self._read_elem("obs")
        if not covariate_sets:
            return obs
        sets = {}
        listed = self.covariate_sets()
        for name, info in listed.items():
            values = self._covariate_values(name, info["columns"], obs.index, values_only=True)[0]
            obs = pd.concat([obs, values], axis=1)
            sets[name] = list(values.columns)
        obs.attrs["covariate_sets"] = sets
        return obs

    # -------------------------------------------------------------------- covariate sets (from expression)
    def covariate_sets(self) -> dict[str, dict[str, Any]]:
        """The covariate sets written into the store: name -> ``{"columns": [...], "provenance": {...}}``."""
        folder = self.path / COVARIATES_KEY
        if not folder.is_dir():
            return {}
        out = {}
        for child in sorted(folder.iterdir()):
            if child.name.startswith(".") or not (child / "zarr.json").is_file():
                continue
            verify_prefix(self.path, f"{COVARIATES_KEY}/{child.name}")
            mark = json.loads((child / "zarr.json").read_text()).get("attributes", {}).get(COVARIATE_MARK)
            if isinstance(mark, dict):
                out[child.name] = {"columns": list(mark["columns"]), "provenance": dict(mark["provenance"])}
        return out

    def covariate_set(self, name: str) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict[str, Any]]:
        """One covariate set: its values (spots x columns, indexed by spot), the model's other outputs, provenance.

        Raises
        ------
        InputError
            If the store holds no set of that name.
        """
        sets = self.covariate_sets()
        if name not in sets:
            raise InputError(f"{self.path} holds no covariate set {name!r} (it has: {sorted(sets) or 'none'}).")
        values, arrays = self._covariate_values(name, sets[name]["columns"], self._read_elem("obs").index)
        return values, arrays, sets[name]["provenance"]

    def _covariate_values(self, name: str, columns: list[str], index: pd.Index, *, values_only: bool = False,
                          ) -> tuple[pd.DataFrame, dict[str, np.ndarray]]:
        """A listed (verified) covariate set's values on ``index`` and (unless ``values_only``) its other arrays."""
        import zarr

        folder = self.path / COVARIATES_KEY / name
        group = zarr.open_group(str(folder), mode="r", use_consolidated=False)
        keys = ["values"] if values_only else sorted(  # not the group's listing: it warns of the checksum file
            p.name for p in folder.iterdir() if (p / "zarr.json").is_file())
        arrays = {k: np.asarray(group[k][...]) for k in keys}
        return pd.DataFrame(arrays.pop("values"), index=index, columns=columns), arrays

    def write_covariate_set(self, name: str, values: pd.DataFrame | np.ndarray, *, columns: list[str] | None = None,
                            extras: dict[str, np.ndarray] | None = None, provenance: dict[str, Any] | None = None,
                            overwrite: bool = False) -> None:
        """Keep named covariates (one row per spot) in the store, with the model's other outputs and provenance.

        The set is written beside any older one of the same name and swapped in
        when complete (checksummed like the store's own files); a set of that
        name is replaced only with ``overwrite``.  Its columns then appear in
        :meth:`obs`, and ``name`` stands for all of them wherever covariates
        are taken.

        Parameters
        ----------
        name
            The set's name (``props``, ``latent``...): letters, digits and
            ``_``, starting with a letter; not an ``obs`` column.
        values
            ``(n_observed, k)`` finite values in ``obs`` order.
        columns
            Column names (default: ``values``' columns, or ``<name>_1``...).
        extras
            Other arrays of the model (variances, loadings...), kept as they are.
        provenance
            JSON-serialisable description (model, options, seed, epochs, loss).
        overwrite
            Replace a set of that name.

        Raises
        ------
        InputError
            A bad name or shape, non-finite values, a column that exists in
            ``obs``, or an existing set without ``overwrite``.
        """
        from spatialscale.output import FileLock

        values, columns = _checked_covariate_set(self, name, values, columns)
        extras = {k: np.asarray(v) for k, v in (extras or {}).items()}
        if "values" in extras:
            raise InputError("extras cannot be called 'values' (that name holds the covariates).")
        mark = {"columns": columns, "provenance": json.loads(json.dumps(provenance or {}, default=_plain))}
        parent = self.path / COVARIATES_KEY
        with FileLock(parent, hint="another process is writing covariates into this store; wait for it"):
            final = parent / name
            if final.exists() and name not in self.covariate_sets():  # not a set spatialscale wrote: never replaced
                raise InputError(f"{final} exists but is not a covariate set spatialscale wrote; it is left alone. "
                                 "Choose another name (key_added=).")
            if final.exists() and not overwrite:
                raise InputError(f"{self.path} already holds covariate set {name!r}; pass overwrite=True to replace "
                                 "it, or choose another name (key_added=).")
            _write_covariate_folder(self.path, final, values, extras, mark)

    def remove_covariate_set(self, name: str) -> None:
        """Remove a covariate set spatialscale wrote (never anything else)."""
        from spatialscale.output import FileLock

        if name not in self.covariate_sets():
            raise InputError(f"{self.path} holds no covariate set {name!r}.")
        with FileLock(self.path / COVARIATES_KEY, hint="another process is writing covariates; wait for it"):
            aside = self.path / COVARIATES_KEY / f".{name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(self.path / COVARIATES_KEY / name, aside)
            shutil.rmtree(aside)

    def _eigen_keys(self, rank: int | None) -> tuple[int, str, str]:
        from spatialscale.kernel import glmm_rank

        return _eigen_keys(glmm_rank(self.n_spots, rank))

    def has_eigenpairs(self, rank: int | None = None) -> bool:
        """Whether the eigenpairs of ``rank`` are in the store (see :meth:`ensure_eigenpairs`)."""
        import zarr

        _, vals_key, vecs_key = self._eigen_keys(rank)
        root = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        return vals_key in root and vecs_key in root

    def eigenpairs(self, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Leading eigenpairs of the section's covariance, as kept in the store (reading never writes).

        Parameters
        ----------
        rank
            ``None``: all eigenpairs up to 5,000 spots, else ``ceil(4 sqrt(n))``
            (see :func:`spatialscale.kernel.default_rank`).

        Returns
        -------
        eigvals, eigvecs
            ``(r,)`` descending and ``(n, r)``; stored as
            ``uns/spatialscale_eigvals_r<r>`` and ``obsm/spatialscale_eigvecs_r<r>``.

        Raises
        ------
        InputError
            If they were never computed: call :meth:`ensure_eigenpairs` (the
            GLMM entry points do, on the client, before any task starts).
        """
        import zarr

        r, vals_key, vecs_key = self._eigen_keys(rank)
        root = zarr.open_group(str(self.path), mode="r", use_consolidated=False)
        if not (vals_key in root and vecs_key in root):
            raise InputError(f"{self.path} has no kernel eigenpairs of rank {r}; compute them with "
                             f"store.ensure_eigenpairs({r}) first.")
        verify_prefix(self.path, vals_key)
        verify_prefix(self.path, vecs_key)
        return np.asarray(root[vals_key][:]), np.asarray(root[vecs_key][:])

    def ensure_eigenpairs(self, rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Compute the eigenpairs of ``rank`` once and keep them in the store (on the client, before a run)."""
        import zarr

        from spatialscale.kernel import kernel_eigenpairs

        if self.has_eigenpairs(rank):
            return self.eigenpairs(rank)
        r, vals_key, vecs_key = self._eigen_keys(rank)
        lam, vec = kernel_eigenpairs(self.precision(), None if r >= self.n_spots else r)
        _write_array_atomic(self.path, vecs_key, vec)
        _write_array_atomic(self.path, vals_key, lam)  # written last: its presence marks both complete
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(str(self.path))
        return lam, vec

    def precision(self) -> scipy.sparse.csr_matrix:
        """The standardised CAR precision of the section."""
        if self.kernel_kind != "car":
            raise InputError(f"{self.path} has a raster (fft) kernel, which has no sparse precision; this needs a "
                             "store ingested with kernel='car'.")

        return scipy.sparse.csr_matrix(self._read_elem(f"obsp/{PRECISION_KEY}"))


def open_store(path: str | os.PathLike) -> IsoformStore:
    """Open an isoform store written by :func:`ingest` (its path made absolute, or a URL).

    A store at a URL (``s3://...``) is read through a local replica, downloaded
    once per content token and verified (:func:`spatialscale.remote.open_store_url`).

    The store's format is checked, and its checksums against its content
    token (once per process while the store is unchanged); the files
    themselves are verified when first read.

    Raises
    ------
    InputError
        If ``path`` is not a complete isoform store, was written by another
        store format, or its checksums do not match
        (:class:`~spatialscale.checksums.StoreDamagedError`).
    """
    from spatialscale.locations import is_url, url_handler

    if is_url(path):  # read through a verified local replica (spatialscale.remote)
        return url_handler("open_store")(str(path))
    path = Path(os.path.abspath(path))
    try:
        store = _open_store(path)
    except InputError:
        raise_if_replaced(str(path))  # a task pinned to this store finds it gone or rewritten under the run
        raise
    check_pinned(str(path), store.content_token)
    return store


def _open_store(path: Path) -> IsoformStore:
    from spatialscale.output import group_attributes

    if not path.exists():
        raise InputError(f"no isoform store at {path}; create one with `spatialscale ingest`.")
    if not (path / "zarr.json").is_file():
        raise InputError(f"{path} is not an isoform store (no zarr.json).")
    mark = group_attributes(path).get("spatialscale")
    if not isinstance(mark, dict):
        raise InputError(f"{path} is not an isoform store (no spatialscale mark); create one with `spatialscale "
                         "ingest`.")
    if not mark.get("complete", False):
        raise InputError(f"{path} is not a complete isoform store (was its ingest interrupted?). Re-run ingest.")
    check_store_format(path, mark)
    meta, token = mark.get("meta"), mark.get("content_token")
    if not isinstance(meta, dict) or not isinstance(token, str):
        raise InputError(f"{path} has a damaged store mark (no metadata or content token); re-ingest it "
                         "(spatialscale ingest SOURCE STORE --overwrite).")
    check_content_token(path, token, meta)
    return IsoformStore(path=path, meta=meta, content_token=token)


def check_store_format(path: Path, mark: dict) -> None:
    """Refuse stores of another format: older ones with how to re-ingest, newer or unknown ones with an upgrade."""
    fmt = mark.get("format")
    if fmt == STORE_FORMAT:
        return
    if isinstance(fmt, int) and not isinstance(fmt, bool) and 0 < fmt < STORE_FORMAT:
        source = (mark.get("meta") or {}).get("source") or "SOURCE"
        raise InputError(f"{path} was written by an earlier spatialscale (store format {fmt}, without checksums); "
                         f"re-ingest it: spatialscale ingest {source} {path} --overwrite.")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > STORE_FORMAT:
        raise InputError(f"{path} was written by a newer spatialscale (store format {fmt}; this version "
                         f"{__version__} reads format {STORE_FORMAT}); upgrade spatialscale to read it.")
    raise InputError(f"{path} has an unknown store format {fmt!r} (this version reads format {STORE_FORMAT}); "
                     "re-ingest it with this version.")


def source_stamp(source: str) -> dict[str, Any]:
    """What identifies the file a store was ingested from besides its path: size and modification time."""
    try:
        st = os.stat(source)
    except (OSError, ValueError):
        return {}
    return {"source_size": int(st.st_size), "source_mtime_ns": int(st.st_mtime_ns)}


def _plain(x: Any) -> Any:
    """numpy scalars/arrays in nested metadata -> Python types."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


def read_count_columns(store_path: str | os.PathLike, start: int, stop: int, *, grid: bool = True,
                       dtype: Any = np.float64) -> np.ndarray:
    """Counts of isoform columns ``start:stop``, ``(n_spots, m)`` float64, without opening the whole store.

    A raster store keeps the observed bins' non-zero counts (CSC); they are
    scattered into the full grid here, zeros elsewhere, or with ``grid=False``
    returned for the observed bins only (``(n_observed, m)``, the rows of
    the store's ``obs``).  ``dtype=None`` keeps a dense store's stored type
    (no conversion pass).
    """
    node = _counts_node(str(store_path))
    if node["kind"] == "dense":
        arr = node["array"]
        verify(store_path, ["layers/counts/zarr.json", *_chunk_keys("layers/counts", arr, start, stop, axis=1)])
        block = arr[:, start:stop]
        return np.asarray(block) if dtype is None else np.asarray(block, dtype=dtype)
    data, rows, ptr = read_sparse_columns(store_path, start, stop)
    index = _grid_index(str(store_path))
    if grid:
        rows = index[rows]
    out = np.zeros((node["grid_size"] if grid else index.size, stop - start))
    out[rows, np.repeat(np.arange(stop - start), np.diff(ptr))] = data
    return out


def read_gene_expression(store_path: str | os.PathLike, genes: Any = None, *,
                         block_columns: int = 4096) -> tuple[np.ndarray, list[str]]:
    """Gene-level counts (the sum of each gene's isoforms), ``(n_observed, n_genes)`` float64, and the genes.

    Read in blocks of whole genes' columns (at most ``block_columns``
    isoforms, or one gene), so a worker never holds more than the result and
    one block.  The rows are the store's ``obs`` (a raster store's observed
    bins).

    Parameters
    ----------
    store_path
        An isoform store.
    genes
        Gene names to keep, in the order given (``None``: every gene, in store order).

    Raises
    ------
    InputError
        Genes the store does not hold, or none at all.
    """
    store = open_store(store_path)
    table = store.genes
    if genes is not None:
        genes = [str(g) for g in genes]
        missing = [g for g in genes if g not in table.index]
        if missing:
            raise InputError(f"{len(missing)} gene(s) are not in {store.path} (e.g. {missing[:3]}).")
        table = table.loc[genes]
    if not len(table):
        raise InputError(f"no genes to read from {store.path}.")
    order = np.argsort(table["start"].to_numpy(), kind="stable")
    starts, stops = table["start"].to_numpy()[order], table["stop"].to_numpy()[order]
    out = np.zeros((store.n_observed, len(table)))
    i = 0
    while i < len(order):
        j = i + 1
        while j < len(order) and stops[j - 1] == starts[j] and stops[j] - starts[i] <= block_columns:
            j += 1  # contiguous genes up to the block size
        block = read_count_columns(store.path, int(starts[i]), int(stops[j - 1]), grid=False)
        out[:, order[i:j]] = np.add.reduceat(block, starts[i:j] - starts[i], axis=1)
        i = j
    return out, [str(g) for g in table.index]


def read_sparse_columns(store_path: str | os.PathLike, start: int,
                        stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A raster store's isoform columns ``start:stop`` as CSC: counts (float64), observed-bin rows, pointers.

    The pointers start at 0; rows index the store's ``obs`` (see
    :meth:`IsoformStore.grid_index` for their grid positions).
    """
    node = _counts_node(str(store_path))
    if node["kind"] != "sparse":
        raise InputError(f"{store_path} keeps dense counts (not a raster store).")
    head = ["layers/counts/zarr.json", *(f"layers/counts/{k}/zarr.json" for k in ("indptr", "data", "indices"))]
    verify(store_path, [*head, *_chunk_keys("layers/counts/indptr", node["indptr"], start, stop + 1)])
    ptr = np.asarray(node["indptr"][start : stop + 1], dtype=np.int64)
    lo, hi = int(ptr[0]), int(ptr[-1])
    verify(store_path, [*_chunk_keys("layers/counts/data", node["data"], lo, hi),
                        *_chunk_keys("layers/counts/indices", node["indices"], lo, hi)])
    data = np.asarray(node["data"][lo:hi], dtype=np.float64)
    rows = np.asarray(node["indices"][lo:hi], dtype=np.int64)
    return data, rows, ptr - ptr[0]


def _chunk_keys(prefix: str, arr: Any, start: int, stop: int, axis: int = 0) -> list[str]:
    """Store keys of the chunks of ``arr`` (at ``prefix``) that hold positions ``start:stop`` along ``axis``."""
    if stop <= start:
        return []
    width = int(arr.chunks[axis])
    coords = [0] * arr.ndim
    keys = []
    for j in range(start // width, (stop - 1) // width + 1):
        coords[axis] = j
        keys.append(f"{prefix}/{arr.metadata.encode_chunk_key(tuple(coords))}")
    return keys


def _counts_node(store_path: str) -> dict:
    """The store's opened count arrays (cached per process, keyed on the group's modification time)."""
    path = Path(store_path) / "layers" / "counts"
    return _counts_node_cached(str(path), (path / "zarr.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _counts_node_cached(path: str, _mtime: int) -> dict:
    import zarr

    node = zarr.open(path, mode="r")
    if isinstance(node, zarr.Array):
        return {"kind": "dense", "array": node}
    return {"kind": "sparse", "indptr": node["indptr"], "data": node["data"], "indices": node["indices"],
            "grid_size": int(node.attrs["spatialscale_grid_size"])}


def _grid_index(store_path: str) -> np.ndarray:
    """Each observed bin's row in the grid (cached per process, keyed on the array's modification time)."""
    path = Path(store_path) / "obs" / GRID_INDEX
    verify_prefix(store_path, f"obs/{GRID_INDEX}")
    return _grid_index_cached(str(path), (path / "zarr.json").stat().st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _grid_index_cached(path: str, _mtime: int) -> np.ndarray:
    import zarr

    return np.asarray(zarr.open_array(path, mode="r")[:], dtype=np.int64)


def _put_array(root: Any, key: str, values: np.ndarray) -> None:
    """An AnnData-encoded dense array at ``key`` of an open zarr group, in one chunk, uncompressed (eigenvectors
    do not compress, and every worker that loads them would pay the decompression)."""
    arr = root.create_array(key, shape=values.shape, dtype=values.dtype, chunks=values.shape, compressors=None)
    arr[...] = values
    arr.attrs.update({"encoding-type": "array", "encoding-version": "0.2.0"})


def _write_array_atomic(store_path: Path, key: str, values: np.ndarray) -> None:
    """Write one AnnData-encoded array into the store: temporary name, then rename."""
    import zarr

    final = Path(store_path) / key
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    rel = str(tmp.relative_to(store_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _put_array(zarr.open_group(str(store_path), mode="a", use_consolidated=False), rel, values)
    write_array_manifest(store_path, tmp)  # checksums travel with the array
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)  # another worker got there first
        return
    os.replace(tmp, final)


def _checked_covariate_set(store: IsoformStore, name: str, values: Any, columns: list[str] | None,
                           ) -> tuple[np.ndarray, list[str]]:
    """Validate a covariate set against the store (before anything is written)."""
    import re

    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", name):
        raise InputError(f"covariate set name {name!r} must be letters, digits and _, starting with a letter.")
    if isinstance(values, pd.DataFrame):
        columns = list(map(str, values.columns)) if columns is None else columns
        values = values.to_numpy()
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[:, None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[0] != store.n_observed:
        raise InputError(f"covariate set {name!r} has shape {arr.shape}; the store has {store.n_observed} spots.")
    columns = [f"{name}_{i + 1}" for i in range(arr.shape[1])] if columns is None else [str(c) for c in columns]
    if len(columns) != arr.shape[1] or len(set(columns)) != len(columns):
        raise InputError(f"covariate set {name!r} needs {arr.shape[1]} distinct column names (got {columns}).")
    if not np.isfinite(arr).all():
        raise InputError(f"covariate set {name!r} has NaN or infinite values.")
    obs = store.obs(covariate_sets=False)
    others = {c for n, info in store.covariate_sets().items() if n != name for c in info["columns"]}
    clash = sorted((set(columns) | {name}) & (set(map(str, obs.columns)) | others))
    if clash:
        raise InputError(f"covariate set {name!r}: {clash} already name obs columns or another set's columns; "
                         "choose another name (key_added=).")
    return arr, columns


def _write_covariate_folder(store_path: Path, final: Path, values: np.ndarray, extras: dict[str, np.ndarray],
                            mark: dict[str, Any]) -> None:
    """Write a covariate set beside ``final``, checksum it, swap it in, remove the old one."""
    import zarr

    parent = final.parent
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = zarr.open_group(str(store_path), mode="a", use_consolidated=False)
        if COVARIATES_KEY not in root:
            group = root.create_group(COVARIATES_KEY)
            group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0"})
        tmp = parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            group = root.create_group(str(tmp.relative_to(store_path)))
            group.attrs.update({"encoding-type": "dict", "encoding-version": "0.1.0", COVARIATE_MARK: mark})
            for key, arr in {"values": values, **extras}.items():
                _put_array(group, key, np.ascontiguousarray(arr))
            write_array_manifest(store_path, tmp)
            aside = parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
            if final.exists():
                os.replace(final, aside)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        zarr.consolidate_metadata(str(store_path))
