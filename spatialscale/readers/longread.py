"""A generic long-read layout (isoform counts per barcode, barcode coordinates, isoform genes) as an AnnData.

A folder with:

- the counts: ``matrix.mtx`` (MatrixMarket, optionally ``.gz``; isoforms x barcodes as 10x MEX
  writes it, or barcodes x isoforms, told apart by the shape) with ``barcodes.tsv`` and
  ``features.tsv`` (first column the names; optionally ``.gz``), or an ``.h5ad`` of barcodes x
  isoforms (``X`` or a ``counts`` layer);
- ``coordinates.csv`` / ``.tsv`` (optionally ``.gz``): columns ``barcode``, ``x``, ``y``, any others
  kept in ``obs``;
- ``isoforms.csv`` / ``.tsv`` (optionally ``.gz``): columns ``isoform``, ``gene``, any others kept
  in ``var``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.io
import scipy.sparse

from spatialscale.errors import InputError

__all__ = ["MARKERS", "read_long_read"]

_TABLE = (".csv", ".tsv", ".csv.gz", ".tsv.gz")
#: file names (without a table suffix) that mark the layout
MARKERS = ("matrix.mtx", "matrix.mtx.gz", "counts.h5ad", *(f"coordinates{s}" for s in _TABLE),
           *(f"isoforms{s}" for s in _TABLE))


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _table(path: Path) -> pd.DataFrame:
    sep = "\t" if ".tsv" in path.name else ","
    return pd.read_csv(path, sep=sep)


def _names(path: Path) -> pd.Index:
    """First column of a headerless barcodes / features file."""
    return pd.Index(pd.read_csv(path, sep="\t", header=None, usecols=[0], dtype=str)[0].to_numpy(dtype=object))


def _counts(folder: Path, matrix: str | None, barcodes: str | None,
            features: str | None) -> tuple[scipy.sparse.csr_matrix, pd.Index, pd.Index, str]:
    """Barcodes x isoforms counts, the barcodes, the isoforms and the file they came from."""
    path = folder / matrix if matrix else _find(folder, ("matrix.mtx", "matrix.mtx.gz", "counts.h5ad"))
    if path is None:
        h5ad = sorted(folder.glob("*.h5ad"))
        path = h5ad[0] if len(h5ad) == 1 else None
    if path is None or not path.is_file():
        what = matrix or "matrix.mtx (or counts.h5ad)"
        raise InputError(f"{folder} looks like a long-read layout but has no {what}.")
    if path.suffix == ".h5ad":
        import anndata as ad

        adata = ad.read_h5ad(path)
        x = adata.layers["counts"] if "counts" in adata.layers else adata.X
        if x is None:
            raise InputError(f"{path} has neither a counts layer nor X.")
        x = scipy.sparse.csr_matrix(x)
        return x, pd.Index(adata.obs_names.astype(str)), pd.Index(adata.var_names.astype(str)), path.name
    bfile = folder / barcodes if barcodes else _find(folder, ("barcodes.tsv", "barcodes.tsv.gz"))
    ffile = folder / features if features else _find(folder, ("features.tsv", "features.tsv.gz", "genes.tsv",
                                                               "genes.tsv.gz"))
    for what, f in (("barcodes.tsv", bfile), ("features.tsv", ffile)):
        if f is None or not f.is_file():
            raise InputError(f"{folder} has {path.name} but no {what} (its {what.split('.')[0]}).")
    bc, feat = _names(bfile), _names(ffile)
    x = scipy.sparse.csr_matrix(scipy.io.mmread(str(path)))
    if x.shape == (len(feat), len(bc)):
        x = x.T.tocsr()
    elif x.shape != (len(bc), len(feat)):
        raise InputError(f"{path} is {x.shape[0]} x {x.shape[1]}, but there are {len(bc)} barcodes and {len(feat)} "
                         "features.")
    return x, bc, feat, path.name


def read_long_read(folder: str | Path, *, matrix: str | None = None, barcodes: str | None = None,
                   features: str | None = None, coordinates: str | None = None, isoforms: str | None = None,
                   barcode_col: str = "barcode", x_col: str = "x", y_col: str = "y",
                   isoform_col: str = "isoform", gene_col: str = "gene") -> Any:
    """Read a long-read isoform-count folder into an AnnData.

    Parameters
    ----------
    folder
        The folder (see the module's description for its files).
    matrix, barcodes, features, coordinates, isoforms
        File names inside ``folder`` other than the default ones.
    barcode_col, x_col, y_col
        Columns of the coordinates table.
    isoform_col, gene_col
        Columns of the isoform -> gene table.

    Returns
    -------
    anndata.AnnData
        Barcodes with coordinates x isoforms with a gene: counts in
        ``layers["counts"]`` (sparse CSR; fractional counts kept as they
        are), ``var["gene_symbol"]``, ``obsm["spatial"]`` from ``x_col`` / ``y_col``.

    Raises
    ------
    InputError
        Naming the file or column that is missing.
    """
    import anndata as ad

    folder = Path(folder)
    x, bc, feat, source = _counts(folder, matrix, barcodes, features)
    cfile = folder / coordinates if coordinates else _find(folder, tuple(f"coordinates{s}" for s in _TABLE))
    gfile = folder / isoforms if isoforms else _find(folder, tuple(f"isoforms{s}" for s in _TABLE))
    for what, f in (("coordinates.csv (barcode -> x, y)", cfile), ("isoforms.csv (isoform -> gene)", gfile)):
        if f is None or not f.is_file():
            raise InputError(f"{folder} looks like a long-read layout but has no {what}.")
    coords, genes = _table(cfile), _table(gfile)
    for f, table, cols in ((cfile, coords, (barcode_col, x_col, y_col)), (gfile, genes, (isoform_col, gene_col))):
        missing = [c for c in cols if c not in table.columns]
        if missing:
            raise InputError(f"{f} has no column {missing[0]!r} (columns: {', '.join(map(str, table.columns))}); "
                             "name it with the reader options.")
    coords[barcode_col] = coords[barcode_col].astype(str)
    genes[isoform_col] = genes[isoform_col].astype(str)
    coords = coords.drop_duplicates(barcode_col).set_index(barcode_col)
    genes = genes.drop_duplicates(isoform_col).set_index(isoform_col)
    rows = coords.index.get_indexer(bc)
    cols = genes.index.get_indexer(feat)
    if not (rows >= 0).any():
        raise InputError(f"no barcode of {source} is in {cfile.name}.")
    if not (cols >= 0).any():
        raise InputError(f"no isoform of {source} is in {gfile.name}.")
    x = x[np.flatnonzero(rows >= 0)][:, np.flatnonzero(cols >= 0)]
    obs = coords.iloc[rows[rows >= 0]].copy()
    obs.index = pd.Index(bc[rows >= 0], name="barcode")
    var = genes.iloc[cols[cols >= 0]].rename(columns={gene_col: "gene_symbol"})
    var.index = pd.Index(feat[cols >= 0], name="isoform")
    var["gene_symbol"] = var["gene_symbol"].astype(str)
    adata = ad.AnnData(obs=obs, var=var, layers={"counts": x.tocsr()})
    adata.obsm["spatial"] = obs[[x_col, y_col]].to_numpy(dtype=np.float64)
    adata.uns["spatialscale_reader"] = {"format": "long-read", "counts": source, "coordinates": cfile.name,
                                        "isoforms": gfile.name}
    return adata
