"""Reading AnnData inputs (in memory, .h5ad, .zarr) lazily, and validating what ingest takes from them."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from spatialscale.errors import InputError

__all__ = ["AnnDataSource", "MAX_COUNT", "MIN_SPOTS", "check_counts", "check_section_size", "column_blocks",
           "coordinate_array", "resolve_table", "spatial_columns", "spot_coordinates",
           "validate_coords"]

#: largest count accepted (whole numbers up to it are exact in float64; the store's integer dtype holds
#: every total below it)
MAX_COUNT = float(2**53)
#: fewest spots a section may have (the kNN graph needs k + 1; the tests' null moments need more)
MIN_SPOTS = 10
#: the numbers of coordinate columns a section may have: x, y, or x, y, z (serial sections, 3-D data)
SPATIAL_DIMS = (2, 3)


# --------------------------------------------------------------------------- sources
def resolve_table(source: Any, table: str | None, *, format: str | None = None,  # noqa: A002 - the option's name
                  reader: dict[str, Any] | None = None) -> Any:
    """The AnnData table that ingest reads from ``source``.

    An instrument output (a Visium / Visium HD / Xenium / long-read folder,
    or a file of one; :func:`spatialscale.readers.detect_format`), or any
    path with ``format`` given, is read by its reader
    (:func:`spatialscale.readers.read_instrument`, with the keywords
    ``reader``) into an in-memory AnnData; ``format="anndata"`` reads the
    path as an AnnData without detection.

    A ``SpatialData`` object (anything with a ``tables`` mapping) gives
    ``source.tables[table]``; a SpatialData zarr store (a folder with a
    ``tables`` group) gives the path of ``tables/<table>``, an AnnData zarr
    group read lazily like any other (``spatialdata`` itself is not needed).
    ``table`` may be left out when there is one table. An AnnData or an
    AnnData file is returned unchanged (``table`` must then be ``None``).

    Raises
    ------
    InputError
        Naming the tables there are, when ``table`` is missing, unknown or
        ambiguous, or given for an input that has no tables.
    """
    import anndata as ad

    if format is not None or reader:
        if not isinstance(source, (str, Path)):
            raise InputError("format= / reader= (--format / --reader) apply to a file or folder input, not to an "
                             "object in memory.")
    if isinstance(source, (str, Path)) and format != "anndata":
        from spatialscale.readers import detect_format, read_instrument

        if format is not None or detect_format(source) is not None:
            if table is not None:
                raise InputError(f"table={table!r} was given, but {source} is an instrument output, not a "
                                 "SpatialData store.")
            return read_instrument(source, format, reader)
        if reader:
            raise InputError(f"reader= (--reader) options were given, but {source} is an AnnData, not an "
                             "instrument output.")
    in_memory = hasattr(source, "tables") and not isinstance(source, ad.AnnData)
    if in_memory:
        names = sorted(source.tables)
        where = "the SpatialData object"
    elif isinstance(source, (str, Path)) and Path(source, "tables").is_dir():
        names = sorted(p.name for p in Path(source, "tables").iterdir()
                       if p.is_dir() and not p.name.startswith("."))
        where = f"the SpatialData store {source}"
    else:
        if table is not None:
            what = source if isinstance(source, (str, Path)) else "the input"
            raise InputError(f"table={table!r} was given, but {what} is an AnnData, not a SpatialData object or store.")
        return source
    if table is None:
        if len(names) != 1:
            raise InputError(f"{where} has {len(names)} tables ({', '.join(names) or 'none'}); name one with table= "
                             "(--table).")
        table = names[0]
    if table not in names:
        raise InputError(f"{where} has no table {table!r} (tables: {', '.join(names) or 'none'}).")
    return source.tables[table] if in_memory else Path(source, "tables", table)


class AnnDataSource:
    """Lazy view of an AnnData's counts layer, coordinates and annotations."""

    def __init__(self, source: Any, layer: str) -> None:
        import anndata as ad

        self._file = None
        self._whole: np.ndarray | None = None
        self._whole_rows: np.ndarray | None = None
        # absolute: the store records where it came from, and is read later from other directories
        self.label = os.path.abspath(source) if not isinstance(source, ad.AnnData) else "<AnnData>"
        if isinstance(source, ad.AnnData):
            self._init_anndata(source, layer)
            return
        path = Path(source)
        if not path.exists():
            raise InputError(f"input {path} does not exist.")
        if path.is_file():
            import h5py

            try:
                self._file = h5py.File(path, "r")
            except OSError as exc:
                raise InputError(f"{path} is not a readable .h5ad (HDF5) file: truncated or another format "
                                 f"({exc}).") from None
            root = self._file
        else:
            import zarr

            try:
                root = zarr.open_group(str(path), mode="r")
            except Exception as exc:  # noqa: BLE001 - zarr raises many kinds
                raise InputError(f"{path} is neither an .h5ad file nor an AnnData zarr store ({exc}).") from None
        try:
            self._init_group(root, layer)
        except InputError:
            self.close()
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged file fails in h5py / zarr / anndata in many ways
            self.close()
            raise InputError(f"could not read the AnnData in {path} ({type(exc).__name__}: {exc}).") from None

    # -- in-memory AnnData
    def _init_anndata(self, adata: Any, layer: str) -> None:
        self.n_obs = adata.n_obs
        self.obs = adata.obs.copy()
        self.var = adata.var.copy()
        if layer in adata.layers:
            x = adata.layers[layer]
        elif layer == "X" and adata.X is not None:
            x = adata.X
        else:
            raise InputError(_missing_layer(layer, sorted(adata.layers), "adata.layers", adata.X is not None))
        if scipy.sparse.issparse(x) or isinstance(x, np.ndarray):
            self._matrix = x.tocsc() if scipy.sparse.issparse(x) else x
        elif hasattr(x, "format"):  # a backed AnnData's sparse X: read in column blocks like a file's
            self._matrix = x.to_memory().tocsc() if small_enough(x) else x
        elif hasattr(x, "shape") and hasattr(x, "dtype"):  # a backed AnnData's dense X (an HDF5 dataset)
            self._matrix = x
        else:
            self._matrix = np.asarray(x)
        self.obsm = {k: coordinate_array(v) for k, v in adata.obsm.items()}
        self.obsp = dict(adata.obsp.items())
        self._shape = tuple(self._matrix.shape)

    # -- on-disk h5ad / zarr
    def _init_group(self, root: Any, layer: str) -> None:
        from anndata.io import read_elem, sparse_dataset

        for key in ("obs", "var"):
            if key not in root:
                raise InputError(f"{self.label} has no {key!r}: not an AnnData file.")
        self.obs = read_elem(root["obs"])
        self.var = read_elem(root["var"])
        self.n_obs = len(self.obs)
        layers = root["layers"] if "layers" in root else {}
        if layer in layers:
            elem = layers[layer]
        elif layer == "X" and "X" in root:
            elem = root["X"]
        else:
            raise InputError(_missing_layer(layer, sorted(layers), f"layers of {self.label}", "X" in root))
        enc = dict(elem.attrs).get("encoding-type", "array")
        if enc in ("csr_matrix", "csc_matrix"):
            ds = sparse_dataset(elem)
            self._matrix = ds.to_memory().tocsc() if enc == "csc_matrix" or small_enough(ds) else ds
        else:
            self._matrix = elem
        self._shape = tuple(self._matrix.shape)
        self.obsm = {}
        if "obsm" in root:
            for k in root["obsm"]:
                with contextlib.suppress(Exception):
                    self.obsm[k] = coordinate_array(read_elem(root["obsm"][k]))
        self.obsp = {}
        if "obsp" in root:
            for k in root["obsp"]:
                self.obsp[k] = read_elem(root["obsp"][k])

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape  # type: ignore[return-value]

    def read_columns(self, cols: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """Dense float64 ``(n_rows, len(cols))`` block of the counts layer.

        When one block held every column (small inputs), it is kept and later
        reads are served from it instead of densifying the layer again.
        """
        cols = np.asarray(cols, dtype=np.int64)
        if self._whole is not None and rows is self._whole_rows:
            return self._whole[:, cols]
        order = np.argsort(cols, kind="stable")
        sorted_cols = cols[order]
        m = self._matrix
        if isinstance(m, np.ndarray) or scipy.sparse.issparse(m):
            block = m[:, sorted_cols]
        elif hasattr(m, "format") and getattr(m, "format", None) == "csr":
            block = self._scan_csr(m, sorted_cols)
        else:  # dense on-disk dataset / zarr array: sorted fancy index on columns
            block = m[:, sorted_cols] if len(sorted_cols) else np.zeros((self.n_obs, 0))
        block = block.toarray() if scipy.sparse.issparse(block) else np.asarray(block)
        out = np.empty_like(block, dtype=np.float64)
        out[:, order] = block
        out = out if rows is None else out[rows]
        if len(cols) == self.shape[1] and np.array_equal(cols, np.arange(self.shape[1])):
            self._whole, self._whole_rows = out, rows
        return out

    def read_columns_sparse(self, cols: np.ndarray) -> scipy.sparse.csc_matrix:
        """The columns ``cols`` (in that order) as a float64 CSC matrix, without densifying sparse layers."""
        cols = np.asarray(cols, dtype=np.int64)
        m = self._matrix
        if scipy.sparse.issparse(m):
            return scipy.sparse.csc_matrix(m[:, cols], dtype=np.float64)
        if hasattr(m, "format") and getattr(m, "format", None) == "csr":
            order = np.argsort(cols, kind="stable")
            block = self._scan_csr(m, cols[order]).tocsc()
            inverse = np.empty_like(order)
            inverse[order] = np.arange(len(order))
            return scipy.sparse.csc_matrix(block[:, inverse], dtype=np.float64)
        return scipy.sparse.csc_matrix(self.read_columns(cols))

    def column_stats(self, cols: np.ndarray, rows: np.ndarray | None, names: pd.Index,
                     layer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Validate a column block and return its totals, non-zero counts and which columns are whole numbers.

        In-memory sparse layers are checked on their stored values, without
        densifying; everything else through :meth:`read_columns`.

        Returns
        -------
        totals, nonzero : numpy.ndarray
            Per column, float64: the sum over the spots ``rows`` and the
            spots with a positive count.
        whole : numpy.ndarray
            Per column, bool: every value a whole number (fractional columns,
            e.g. EM estimates, are stored as float64).

        Raises
        ------
        InputError
            On NaN / infinite, negative or too large counts (:func:`check_counts`).
        """
        m = self._matrix
        if scipy.sparse.issparse(m):
            sub = m[:, cols] if rows is None else m[rows][:, cols]
            sub = scipy.sparse.csc_matrix(sub)
            d = sub.data
            if not (np.isfinite(d).all() and (d >= 0).all() and (d <= MAX_COUNT).all()):
                check_counts(sub.toarray(), names, layer)
            col_of = np.repeat(np.arange(sub.shape[1]), np.diff(sub.indptr))
            totals = np.bincount(col_of, weights=d, minlength=sub.shape[1])
            nonzero = np.bincount(col_of[d > 0], minlength=sub.shape[1]).astype(np.float64)
            whole = np.bincount(col_of[d != np.round(d)], minlength=sub.shape[1]) == 0
            return totals, nonzero, whole
        block = self.read_columns(cols, rows)
        whole = check_counts(block, names, layer)
        return block.sum(axis=0), (block > 0).sum(axis=0).astype(np.float64), whole

    def _scan_csr(self, ds: Any, cols: np.ndarray, row_block: int = 200_000) -> scipy.sparse.csr_matrix:
        parts = [ds[s : min(s + row_block, self.n_obs)][:, cols] for s in range(0, self.n_obs, row_block)]
        return scipy.sparse.vstack(parts).tocsr()

    def close(self) -> None:
        self._whole = None
        if self._file is not None:
            self._file.close()


def _missing_layer(layer: str, available: list[str], where: str, has_x: bool) -> str:
    """The one-line error for a counts layer that is not there."""
    hint = " Counts in X: layer='X' (--layer X)." if has_x and layer != "X" else ""
    return f"layer {layer!r} not found in {where} (available: {available}).{hint}"


def spot_coordinates(obs: pd.DataFrame, obsm: dict[str, np.ndarray],
                     spatial_key: str | tuple[str, ...]) -> np.ndarray:
    """The validated ``(n, 2)`` or ``(n, 3)`` spot coordinates named by ``spatial_key``.

    Parameters
    ----------
    obs, obsm
        The AnnData's annotations (``obsm`` entries already arrays, see
        :func:`coordinate_array`).
    spatial_key
        An ``obsm`` key (an array, or a DataFrame whose numeric columns are
        x, y and optionally z), or two or three ``obs`` column names (a
        tuple, or ``"x,y"`` / ``"x,y,z"``).

    Raises
    ------
    InputError
        When the key is not there (naming what is), or on bad coordinates.
    """
    cols = spatial_columns(spatial_key)
    if cols is None:
        if spatial_key in obsm:
            return validate_coords(obsm[spatial_key], obs.index, f"obsm[{spatial_key!r}]")
        guess = [c for c in ("x", "y", "X", "Y", "x_centroid", "y_centroid", "array_col", "array_row")
                 if c in obs.columns]
        hint = (f"; coordinates in two obs columns: spatial_key=('{guess[0]}', '{guess[1]}') "
                f"(--spatial-key {guess[0]},{guess[1]})" if len(guess) >= 2 else "")
        raise InputError(f"obsm has no coordinates {spatial_key!r} (available: {sorted(obsm)}){hint}.")
    missing = [c for c in cols if c not in obs.columns]
    if missing:
        raise InputError(f"obs has no column {missing[0]!r} for the coordinates (columns: {list(obs.columns)}).")
    return validate_coords(obs[list(cols)].to_numpy(), obs.index, f"obs[{list(cols)!r}]")


def spatial_columns(spatial_key: Any) -> tuple[str, ...] | None:
    """The two (x, y) or three (x, y, z) ``obs`` columns a ``spatial_key`` names, or ``None`` for an ``obsm`` key."""
    if isinstance(spatial_key, str):
        if "," not in spatial_key:
            return None
        spatial_key = [part.strip() for part in spatial_key.split(",")]
    keys = list(spatial_key)
    if len(keys) not in SPATIAL_DIMS or not all(isinstance(k, str) and k for k in keys):
        raise InputError(f"spatial_key must be an obsm key or two or three obs column names (x,y or x,y,z), "
                         f"got {spatial_key!r}.")
    return tuple(keys)


def coordinate_array(value: Any) -> np.ndarray:
    """An ``obsm`` entry as an array: a DataFrame's numeric columns in order (e.g. ``x``, ``y``)."""
    if isinstance(value, pd.DataFrame):
        return value.select_dtypes("number").to_numpy(dtype=np.float64)
    return np.asarray(value)


def small_enough(ds: Any, limit: int | None = None) -> bool:
    """Whether a backed sparse matrix is small enough to load whole (sparse, as CSC).

    ``limit`` (bytes, at 16 per stored value) defaults to a third of the
    memory available now, at least 2 GB: a 10^5 x 60,000 layer with 2 x 10^8
    non-zero counts (3.2 GB) loads on a 24 GB machine.  A larger layer is
    read in column blocks, each a scan of the rows (slow, but within memory).
    """
    if limit is None:
        import psutil

        limit = max(2 << 30, psutil.virtual_memory().available // 3)
    nnz = ds.group["data"].shape[0] if hasattr(ds, "group") else 0
    return nnz * 16 < limit


# --------------------------------------------------------------------------- validation
def validate_coords(coords: np.ndarray, obs_names: pd.Index, where: str) -> np.ndarray:
    """Coordinates as float64 ``(n, 2)`` or ``(n, 3)``, finite and distinct; ``where`` names them in errors.

    Three columns are x, y, z (serial sections, 3-D data): the spot graph and
    the kernel are built on Euclidean distances in 3-D.
    """
    try:
        coords = np.asarray(coords, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise InputError(f"{where} is not numeric ({exc}).") from None
    if coords.ndim != 2 or coords.shape[0] != len(obs_names) or coords.shape[1] not in SPATIAL_DIMS:
        cols = coords.shape[1] if coords.ndim == 2 else 1
        fix = (" (1-D positions: add a constant second column)" if cols < 2 else
               " (keep only the x, y or x, y, z columns)" if cols > 3 and coords.shape[0] == len(obs_names) else "")
        raise InputError(
            f"{where} has shape {coords.shape}; expected ({len(obs_names)}, 2) or ({len(obs_names)}, 3): one row of "
            f"x, y (or x, y, z) coordinates per spot{fix}."
        )
    bad = ~np.isfinite(coords).all(axis=1)
    if bad.any():
        raise InputError(
            f"{where} has {int(bad.sum())} spot(s) with NaN or infinite coordinates "
            f"(first: {obs_names[np.flatnonzero(bad)[0]]!r}); remove or fix them before ingest."
        )
    dup = pd.DataFrame(coords).duplicated(keep=False).to_numpy()
    if dup.any():
        first = np.flatnonzero(dup)[:2]
        raise InputError(
            f"{where} has {int(dup.sum())} spots sharing coordinates with another spot "
            f"(e.g. {obs_names[first[0]]!r} and {obs_names[first[-1]]!r} at {tuple(coords[first[0]])}); "
            "duplicate coordinates make the neighbour graph ambiguous. Merge or drop duplicated spots."
        )
    return coords


def check_section_size(n_spots: int, k_neighbors: int, what: str) -> None:
    """A section needs at least ``MIN_SPOTS`` spots and more than ``k_neighbors``."""
    need = max(MIN_SPOTS, int(k_neighbors) + 1)
    if n_spots < need:
        raise InputError(f"{what} has {n_spots} spot(s); a section needs at least {need} (k_neighbors + 1, and "
                         f"at least {MIN_SPOTS}) for a meaningful spatial test.")


def check_counts(block: np.ndarray, names: pd.Index, layer: str) -> np.ndarray:
    """Raise if a counts block has non-finite, negative or too large values; say which columns are whole numbers.

    Fractional counts (e.g. the EM estimates of long-read quantifiers such as
    IsoQuant, Bambu or oarfish) are accepted: the store keeps them as float64.

    Parameters
    ----------
    block
        ``(n_spots, m)`` counts.
    names
        The ``m`` isoform names (for the messages).
    layer
        The layer they come from (for the messages).

    Returns
    -------
    numpy.ndarray
        ``(m,)`` bool: every value of the column is a whole number.

    Raises
    ------
    InputError
        One line naming the first isoform with NaN / infinite, negative or
        above-2^53 counts.
    """
    if not np.isfinite(block).all():
        j = int(np.flatnonzero(~np.isfinite(block).all(axis=0))[0])
        raise InputError(f"layers[{layer!r}] has NaN or infinite counts (isoform {names[j]!r}).")
    neg = (block < 0).any(axis=0)
    if neg.any():
        raise InputError(f"layers[{layer!r}] has negative counts (isoform {names[int(np.flatnonzero(neg)[0])]!r}).")
    big = (block > MAX_COUNT).any(axis=0)
    if big.any():
        raise InputError(f"layers[{layer!r}] has counts above 2^53 (isoform {names[int(np.flatnonzero(big)[0])]!r}), "
                         "which cannot be stored exactly; these are not read counts.")
    return np.asarray((block == np.round(block)).all(axis=0), dtype=bool).reshape(-1)


def column_blocks(n_cols: int, n_rows: int, block_bytes: int) -> Iterator[slice]:
    width = max(1, int(block_bytes // max(8 * n_rows, 1)))
    for s in range(0, n_cols, width):
        yield slice(s, min(s + width, n_cols))
