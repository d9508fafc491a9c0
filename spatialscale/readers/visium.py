"""10x Visium and Visium HD (Space Ranger ``outs/``) as an AnnData that ingest takes.

Files read (Space Ranger's published layout):

- counts: ``filtered_probe_bc_matrix.h5`` or ``raw_probe_bc_matrix.h5`` (probe-based assays,
  Space Ranger >= 2.0: one feature per probe, grouped by gene as the gene's "isoforms"), else
  ``filtered_feature_bc_matrix.h5`` / ``raw_feature_bc_matrix.h5`` (one feature per gene);
- ``spatial/tissue_positions.csv`` (header ``barcode,in_tissue,array_row,array_col,
  pxl_row_in_fullres,pxl_col_in_fullres``), ``spatial/tissue_positions_list.csv`` (the same columns
  without a header, Space Ranger 1.x) or ``spatial/tissue_positions.parquet`` (Visium HD);
- ``spatial/scalefactors_json.json`` (``tissue_hires_scalef``, ``tissue_lowres_scalef``,
  ``spot_diameter_fullres``...), needed only to scale the coordinates.

Visium HD keeps one folder per bin size, ``binned_outputs/square_<size>um/``, each laid out as above.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from spatialscale.errors import InputError
from spatialscale.readers.tenx import read_10x_h5

__all__ = ["POSITION_COLUMNS", "PROBE_MATRICES", "GENE_MATRICES", "read_visium", "hd_bin_folder"]

POSITION_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
PROBE_MATRICES = ("filtered_probe_bc_matrix.h5", "raw_probe_bc_matrix.h5")
GENE_MATRICES = ("filtered_feature_bc_matrix.h5", "raw_feature_bc_matrix.h5")
POSITION_FILES = ("spatial/tissue_positions.parquet", "spatial/tissue_positions.csv",
                  "spatial/tissue_positions_list.csv")
SCALEFACTORS = "spatial/scalefactors_json.json"
_BIN = re.compile(r"^square_(\d+)um$")


def hd_bin_folder(folder: Path, bin_size: int | None) -> Path:
    """The ``binned_outputs/square_<size>um`` folder of ``bin_size`` micrometres (default 16, or the only one)."""
    bins = {int(m.group(1)): p for p in sorted((folder / "binned_outputs").iterdir())
            if p.is_dir() and (m := _BIN.match(p.name))}
    if not bins:
        raise InputError(f"{folder}/binned_outputs has no square_<size>um folder (Visium HD bins).")
    sizes = ", ".join(str(b) for b in sorted(bins))
    if bin_size is None:
        if 16 in bins:
            return bins[16]
        if len(bins) == 1:
            return next(iter(bins.values()))
        raise InputError(f"{folder}/binned_outputs has bins of {sizes} um; choose one with reader={{'bin_size': N}} "
                         "(--reader bin_size=N).")
    if int(bin_size) not in bins:
        raise InputError(f"{folder}/binned_outputs has no square_{int(bin_size):03d}um (bins: {sizes} um).")
    return bins[int(bin_size)]


def _positions(folder: Path) -> tuple[pd.DataFrame, str]:
    """The tissue positions table, indexed by barcode, and the file it came from."""
    for name in POSITION_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".parquet":
            table = pd.read_parquet(path)
        else:
            with open(path) as fh:
                first = fh.readline().split(",")[0].strip()
            table = pd.read_csv(path, header=0 if first == "barcode" else None,
                                names=None if first == "barcode" else list(POSITION_COLUMNS))
        missing = [c for c in POSITION_COLUMNS if c not in table.columns]
        if missing:
            raise InputError(f"{path} has no column {missing[0]!r} (expected {', '.join(POSITION_COLUMNS)}).")
        table["barcode"] = table["barcode"].astype(str)
        return table.set_index("barcode"), name
    raise InputError(f"{folder} looks like Space Ranger output but has no spatial/tissue_positions.csv "
                     "(nor spatial/tissue_positions_list.csv or spatial/tissue_positions.parquet).")


def _probe_genes(features: pd.DataFrame) -> pd.DataFrame:
    """Gene name and id of each probe: the ``gene_name`` / ``gene_id`` datasets, else from the probe id.

    A probe id of a 10x probe set reads ``<gene id>|<gene name>|<probe tag>``.
    """
    parts = features["id"].astype(str).str.split("|", expand=True)
    name = features["gene_name"] if "gene_name" in features else (
        parts[1] if parts.shape[1] >= 2 else features.get("name", features["id"]))
    gene_id = features["gene_id"] if "gene_id" in features else (
        parts[0] if parts.shape[1] >= 2 else features["id"])
    out = pd.DataFrame({"gene_symbol": np.asarray(name, dtype=object), "gene_ids": np.asarray(gene_id, dtype=object)})
    out["probe_id"] = features["id"].to_numpy()
    for key in ("probe_region", "feature_type", "genome"):
        if key in features:
            out[key] = features[key].to_numpy()
    return out


def read_visium(folder: str | Path, *, matrix: str = "auto", bin_size: int | None = None, hd: bool = False,
                coordinates: str = "fullres", in_tissue_only: bool = True,
                keep_filtered_probes: bool = False) -> Any:
    """Read a Space Ranger output folder (Visium or one Visium HD bin size) into an AnnData.

    Parameters
    ----------
    folder
        Space Ranger's ``outs/`` (or a Visium HD ``binned_outputs/square_<size>um`` folder).
    matrix
        ``auto`` (the probe matrix when there is one, else the gene matrix),
        ``probe`` or ``gene``. Filtered matrices are preferred over raw ones.
    bin_size
        Visium HD: the bin size in micrometres (default 16, or the only one present).
    hd
        Look for ``binned_outputs/`` (Visium HD) even when ``bin_size`` is not given.
    coordinates
        ``fullres`` (full-resolution image pixels, default), ``hires`` or
        ``lowres`` (multiplied by ``tissue_hires_scalef`` / ``tissue_lowres_scalef``).
    in_tissue_only
        Drop spots or bins whose ``in_tissue`` is 0 (default).
    keep_filtered_probes
        Keep probes that a probe matrix marks in ``filtered_probes`` (dropped by default).

    Returns
    -------
    anndata.AnnData
        Spots x features: counts in ``layers["counts"]`` (sparse CSR),
        ``var["gene_symbol"]`` the gene of each probe (or gene), coordinates
        ``[x, y] = [pxl_col, pxl_row]`` in ``obsm["spatial"]``, and ``in_tissue``,
        ``array_row``, ``array_col``, ``pxl_row_in_fullres``, ``pxl_col_in_fullres`` in ``obs``.

    Raises
    ------
    InputError
        Naming the file that is missing or malformed.
    """
    import anndata as ad

    folder = Path(folder)
    if hd or bin_size is not None or (folder / "binned_outputs").is_dir():
        if (folder / "binned_outputs").is_dir():
            folder = hd_bin_folder(folder, bin_size)
        elif not _BIN.match(folder.name):
            raise InputError(f"{folder} has no binned_outputs/ folder (Visium HD).")
    if matrix not in ("auto", "probe", "gene"):
        raise InputError(f"unknown Visium matrix {matrix!r}; choose auto, probe or gene.")
    if coordinates not in ("fullres", "hires", "lowres"):
        raise InputError(f"unknown Visium coordinates {coordinates!r}; choose fullres, hires or lowres.")
    names = {"auto": PROBE_MATRICES + GENE_MATRICES, "probe": PROBE_MATRICES, "gene": GENE_MATRICES}[matrix]
    found = next((folder / n for n in names if (folder / n).is_file()), None)
    if found is None:
        raise InputError(f"{folder} looks like Space Ranger output but has no {' / '.join(names)}.")
    positions, position_file = _positions(folder)
    scalefactors: dict[str, Any] = {}
    if (folder / SCALEFACTORS).is_file():
        scalefactors = json.loads((folder / SCALEFACTORS).read_text())
    elif coordinates != "fullres":
        raise InputError(f"{folder} has no {SCALEFACTORS}, needed for coordinates={coordinates!r}.")
    counts, barcodes, features = read_10x_h5(found)
    probe = found.name in PROBE_MATRICES
    if probe:
        var = _probe_genes(features)
        var.index = pd.Index(var.pop("probe_id").astype(str), name="probe_id")
        if not keep_filtered_probes and "filtered_probes" in features:
            keep = ~np.asarray(features["filtered_probes"]).astype(bool)
            counts, var = counts[:, keep], var.iloc[keep]
    else:
        var = pd.DataFrame({"gene_symbol": features.get("name", features["id"]).to_numpy(),
                            "gene_ids": features["id"].to_numpy()})
        for key in ("feature_type", "genome"):
            if key in features:
                var[key] = features[key].to_numpy()
        var.index = pd.Index(features["id"].astype(str), name="gene_ids")
    if "feature_type" in var:
        keep = (var["feature_type"] == "Gene Expression").to_numpy()
        counts, var = counts[:, keep], var.iloc[keep]
    var.index = _unique(var.index)
    rows = positions.index.get_indexer(barcodes)
    keep = rows >= 0
    if in_tissue_only:
        keep &= np.where(keep, positions["in_tissue"].to_numpy()[np.maximum(rows, 0)] == 1, False)
    if not keep.any():
        where = "in tissue in" if in_tissue_only else "in"
        raise InputError(f"no barcode of {found} is {where} {folder / position_file}.")
    counts = counts[np.flatnonzero(keep)]
    obs = positions.iloc[rows[keep]].copy()
    obs.index = pd.Index(barcodes[keep], name="barcode")
    scale = 1.0 if coordinates == "fullres" else float(scalefactors[f"tissue_{coordinates}_scalef"])
    xy = obs[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64) * scale
    adata = ad.AnnData(obs=obs, var=var, layers={"counts": counts})
    adata.obsm["spatial"] = xy
    adata.uns["spatialscale_reader"] = {
        "format": "visium-hd" if _BIN.match(folder.name) else "visium", "matrix": found.name,
        "positions": position_file, "coordinates": coordinates, "scalefactors": scalefactors}
    return adata


def _unique(index: pd.Index) -> pd.Index:
    """``index`` with repeated names made unique by a ``-1``, ``-2``... suffix (first one kept)."""
    if index.is_unique:
        return index
    seen: dict[str, int] = {}
    out = []
    for name in index:
        k = seen.get(name, 0)
        out.append(name if k == 0 else f"{name}-{k}")
        seen[name] = k + 1
    return pd.Index(out, name=index.name)
