"""10x Xenium (Xenium Onboard Analysis output folder) as an AnnData that ingest takes.

Files read (the published Xenium output layout):

- ``cells.parquet`` or ``cells.csv.gz``: one row per cell, ``cell_id``, ``x_centroid``, ``y_centroid``
  (micrometres) and per-cell metrics;
- ``transcripts.parquet``: one row per decoded transcript, with ``cell_id`` (``UNASSIGNED`` or -1
  outside cells), ``feature_name``, ``codeword_index``, ``qv`` and, in recent versions,
  ``is_gene`` / ``codeword_category``; counted per cell x codeword, each codeword an "isoform" of
  its gene ``feature_name``;
- ``cell_feature_matrix.h5`` (10x HDF5 matrix; its ``Gene Expression`` features), for gene counts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse

from spatialscale.errors import InputError
from spatialscale.readers.tenx import read_10x_h5, text_array

__all__ = ["CONTROL_PREFIXES", "read_xenium"]

#: feature names of controls rather than genes (negative control probes and codewords, blank,
#: unassigned and deprecated codewords, intergenic / antisense controls)
CONTROL_PREFIXES = ("NegControlProbe_", "NegControlCodeword_", "BLANK_", "UnassignedCodeword_",
                    "DeprecatedCodeword_", "Intergenic_Region_", "antisense_", "GenomicControl_")
CELL_FILES = ("cells.parquet", "cells.csv.gz", "cells.csv")
_UNASSIGNED = ("UNASSIGNED", "", "-1", "None", "nan")


def _cells(folder: Path) -> pd.DataFrame:
    for name in CELL_FILES:
        path = folder / name
        if path.is_file():
            table = pd.read_parquet(path) if name.endswith(".parquet") else pd.read_csv(path)
            missing = [c for c in ("cell_id", "x_centroid", "y_centroid") if c not in table.columns]
            if missing:
                raise InputError(f"{path} has no column {missing[0]!r} (expected cell_id, x_centroid, y_centroid).")
            table["cell_id"] = text_array(table["cell_id"].to_numpy())
            return table.set_index("cell_id")
    raise InputError(f"{folder} looks like a Xenium output but has no cells.parquet (nor cells.csv.gz).")


def _is_control(names: pd.Series) -> np.ndarray:
    return names.str.startswith(CONTROL_PREFIXES).to_numpy()


def _codeword_counts(path: Path, cells: pd.Index, min_qv: float,
                     batch_rows: int) -> tuple[scipy.sparse.csr_matrix, pd.DataFrame]:
    """Cells x codewords counts of ``transcripts.parquet``, read in record batches."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    have = set(pf.schema_arrow.names)
    missing = [c for c in ("cell_id", "feature_name", "codeword_index") if c not in have]
    if missing:
        raise InputError(f"{path} has no column {missing[0]!r} (expected cell_id, feature_name, codeword_index).")
    columns = ["cell_id", "feature_name", "codeword_index"] + [c for c in ("qv", "is_gene") if c in have]
    codewords: dict[int, str] = {}
    n_cells = len(cells)
    width = 0
    blocks: list[tuple[np.ndarray, np.ndarray]] = []
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        t = batch.to_pandas()
        cid = pd.Series(text_array(t["cell_id"].to_numpy()))
        names = pd.Series(text_array(t["feature_name"].to_numpy()))
        code = t["codeword_index"].to_numpy(dtype=np.int64)
        keep = ~cid.isin(_UNASSIGNED).to_numpy() & (code >= 0) & ~_is_control(names)
        if "is_gene" in t:
            keep &= t["is_gene"].to_numpy().astype(bool)
        if "qv" in t and min_qv > 0:
            keep &= t["qv"].to_numpy(dtype=np.float64) >= min_qv
        rows = cells.get_indexer(cid[keep])
        inside = rows >= 0
        code, names = code[keep][inside], names[keep].to_numpy()[inside]
        pairs = pd.DataFrame({"code": code, "name": names}).drop_duplicates()
        for c, n in zip(pairs["code"], pairs["name"], strict=True):
            prev = codewords.setdefault(int(c), str(n))
            if prev != str(n):
                raise InputError(f"{path}: codeword {int(c)} is both {prev!r} and {n!r}.")
        # one (cell, codeword) key per transcript, summed within the batch: memory ~ non-zeros, not transcripts
        keys, n = np.unique((rows[inside].astype(np.int64) << 32) | code, return_counts=True)
        blocks.append((keys, n))
        width = max(width, int(code.max()) + 1 if len(code) else 0)
    keys = np.concatenate([k for k, _ in blocks]) if blocks else np.zeros(0, np.int64)
    values = np.concatenate([v for _, v in blocks]) if blocks else np.zeros(0, np.int64)
    by_code = scipy.sparse.coo_matrix((values.astype(np.int64), (keys >> 32, keys & 0xFFFFFFFF)),
                                      shape=(n_cells, width)).tocsr()
    by_code.sum_duplicates()
    table = pd.DataFrame({"codeword_index": list(codewords), "gene_symbol": list(codewords.values())})
    table = table.sort_values(["gene_symbol", "codeword_index"], kind="stable")
    counts = by_code.tocsc()[:, table["codeword_index"].to_numpy()].tocsr()
    table.index = pd.Index([f"{g}|{c}" for g, c in zip(table["gene_symbol"], table["codeword_index"], strict=True)],
                           name="codeword")
    return counts, table


def read_xenium(folder: str | Path, *, counts: str = "auto", min_qv: float = 20.0,
                batch_rows: int = 2_000_000) -> Any:
    """Read a Xenium output folder into an AnnData of cells.

    Parameters
    ----------
    folder
        The Xenium output folder (``outs/``).
    counts
        ``auto`` (codewords when ``transcripts.parquet`` is there, else genes),
        ``codeword`` (cells x codewords from ``transcripts.parquet``, grouped
        by gene) or ``gene`` (``cell_feature_matrix.h5``'s Gene Expression features).
    min_qv
        ``codeword``: keep transcripts of quality value ``qv`` at least this (20,
        the threshold of Xenium's own cell-feature matrix; 0 keeps all).
    batch_rows
        ``codeword``: transcripts read per record batch.

    Returns
    -------
    anndata.AnnData
        Cells x features: counts in ``layers["counts"]`` (sparse CSR),
        ``var["gene_symbol"]``, centroids ``(x_centroid, y_centroid)`` in
        ``obsm["spatial"]``, the cells table's other columns in ``obs``. Cells
        with no counts are kept (ingest drops what it must).

    Raises
    ------
    InputError
        Naming the file that is missing or malformed.
    """
    import anndata as ad

    folder = Path(folder)
    if counts not in ("auto", "codeword", "gene"):
        raise InputError(f"unknown Xenium counts {counts!r}; choose auto, codeword or gene.")
    transcripts, matrix = folder / "transcripts.parquet", folder / "cell_feature_matrix.h5"
    if counts == "auto":
        counts = "codeword" if transcripts.is_file() else "gene"
    need = transcripts if counts == "codeword" else matrix
    if not need.is_file():
        raise InputError(f"{folder} looks like a Xenium output but has no {need.name} (needed for counts={counts!r}).")
    cells = _cells(folder)
    if counts == "codeword":
        x, var = _codeword_counts(transcripts, cells.index, float(min_qv), int(batch_rows))
        obs = cells
    else:
        x, barcodes, features = read_10x_h5(matrix)
        keep = (features["feature_type"] == "Gene Expression").to_numpy() if "feature_type" in features \
            else ~_is_control(features.get("name", features["id"]).astype(str))
        x = x[:, np.flatnonzero(keep)]
        features = features.iloc[np.flatnonzero(keep)]
        var = pd.DataFrame({"gene_symbol": features.get("name", features["id"]).to_numpy(),
                            "gene_ids": features["id"].to_numpy()},
                           index=pd.Index(features["id"].astype(str), name="gene_ids"))
        rows = cells.index.get_indexer(barcodes)
        if (rows < 0).all():
            raise InputError(f"no cell of {matrix} is in {folder}/cells.parquet.")
        x = x[np.flatnonzero(rows >= 0)]
        obs = cells.iloc[rows[rows >= 0]]
    obs = obs.copy()
    obs.index.name = "cell_id"
    adata = ad.AnnData(obs=obs, var=var, layers={"counts": x.tocsr()})
    adata.obsm["spatial"] = obs[["x_centroid", "y_centroid"]].to_numpy(dtype=np.float64)
    adata.uns["spatialscale_reader"] = {"format": "xenium", "counts": counts, "min_qv": float(min_qv)}
    return adata
