"""The 10x Genomics HDF5 feature-barcode matrix (Space Ranger, Xenium Onboard Analysis), read sparse.

The file holds one group ``matrix`` with the matrix in compressed sparse column form, features as
rows and barcodes as columns: ``data``, ``indices`` (feature of each value), ``indptr`` (one entry
per barcode, plus one), ``shape`` (``[n_features, n_barcodes]``), ``barcodes`` and a group
``features`` with ``id``, ``name``, ``feature_type`` and ``genome`` (probe matrices add per-probe
datasets such as ``gene_id``, ``gene_name``, ``probe_region``, ``filtered_probes``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse

from spatialscale.errors import InputError

__all__ = ["read_10x_h5", "text_array"]


def text_array(values: np.ndarray) -> np.ndarray:
    """``values`` as an array of ``str`` (HDF5 / parquet strings come back as bytes)."""
    values = np.asarray(values)
    if values.dtype.kind == "S" or (values.dtype == object and len(values) and isinstance(values[0], bytes)):
        return np.array([v.decode() if isinstance(v, bytes) else str(v) for v in values], dtype=object)
    return values.astype(str).astype(object)


def read_10x_h5(path: str | Path) -> tuple[scipy.sparse.csr_matrix, pd.Index, pd.DataFrame]:
    """The barcodes x features counts of a 10x HDF5 matrix, its barcodes and its features.

    Parameters
    ----------
    path
        A ``*_bc_matrix.h5`` or ``cell_feature_matrix.h5`` file.

    Returns
    -------
    counts : scipy.sparse.csr_matrix
        Barcodes x features (the file's transpose, without densifying).
    barcodes : pandas.Index
        The barcodes (rows of ``counts``).
    features : pandas.DataFrame
        One row per feature: every 1-D dataset of ``matrix/features`` of that
        length (``id``, ``name``, ``feature_type``, ``genome``...), strings decoded.

    Raises
    ------
    InputError
        When the file is not a 10x HDF5 matrix (names what is missing).
    """
    import h5py

    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path} is not a readable 10x HDF5 matrix ({exc}).") from None
    with f:
        group = f.get("matrix")
        need = ("data", "indices", "indptr", "shape", "barcodes", "features")
        missing = [k for k in need if group is None or k not in group]
        if missing:
            raise InputError(f"{path} is not a 10x HDF5 feature-barcode matrix: no matrix/{missing[0]}.")
        n_features, n_barcodes = (int(v) for v in group["shape"][:2])
        indptr = group["indptr"][:].astype(np.int64)
        if len(indptr) != n_barcodes + 1:
            raise InputError(f"{path}: matrix/indptr has {len(indptr)} entries for {n_barcodes} barcodes.")
        data = group["data"][:]
        indices = group["indices"][:].astype(np.int64)
        counts = scipy.sparse.csc_matrix((data, indices, indptr), shape=(n_features, n_barcodes)).T.tocsr()
        barcodes = pd.Index(text_array(group["barcodes"][:]), name="barcode")
        columns = {}
        for key, ds in group["features"].items():
            if isinstance(ds, h5py.Dataset) and ds.ndim == 1 and ds.shape[0] == n_features:
                values = ds[:]
                columns[key] = text_array(values) if values.dtype.kind in "SOU" else values
    if "id" not in columns:
        raise InputError(f"{path} is not a 10x HDF5 feature-barcode matrix: no matrix/features/id.")
    features = pd.DataFrame(columns)
    counts.sum_duplicates()
    return counts, barcodes, features
