"""Readers of instrument outputs: each gives an AnnData that :func:`spatialscale.ingest` takes directly.

Every reader returns spots (or cells, bins) x features with the counts in ``layers["counts"]``
(sparse), each feature's gene in ``var["gene_symbol"]``, coordinates in ``obsm["spatial"]`` and
spot metadata in ``obs`` (see ``docs/instruments.md``). :func:`detect_format` recognises a folder
(or a file of it) by the files it holds; :func:`read_instrument` reads it. The ingest input
resolution (:func:`spatialscale.sources.resolve_table`) calls both, so every entry point that takes
an AnnData path also takes these folders.

Formats: ``visium`` and ``visium-hd`` (Space Ranger), ``xenium`` (Xenium Onboard Analysis),
``long-read`` (an isoform x barcode matrix, a coordinates table and an isoform -> gene table).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from spatialscale.errors import InputError

__all__ = ["FORMATS", "detect_format", "instrument_folder", "read_instrument"]

#: the readers, by the name ``format=`` (``--format``) takes
FORMATS = ("visium", "visium-hd", "xenium", "long-read")

_XENIUM_FILES = ("experiment.xenium", "cell_feature_matrix.h5", "cells.parquet", "cells.csv.gz", "transcripts.parquet")
_VISIUM_FILES = ("filtered_probe_bc_matrix.h5", "raw_probe_bc_matrix.h5", "filtered_feature_bc_matrix.h5",
                 "raw_feature_bc_matrix.h5", "spatial/tissue_positions.csv", "spatial/tissue_positions_list.csv",
                 "spatial/tissue_positions.parquet")


def instrument_folder(path: str | os.PathLike) -> Path:
    """The folder an instrument input names: the path itself, or the folder of a file given (its ``.h5``)."""
    path = Path(path)
    return path.parent if path.is_file() else path


def _detect_folder(folder: Path) -> str | None:
    if not folder.is_dir() or any((folder / key).is_dir() for key in ("obs", "tables")):
        return None  # an AnnData or SpatialData zarr
    if (folder / "binned_outputs").is_dir():
        return "visium-hd"
    if any((folder / n).exists() for n in _XENIUM_FILES):
        return "xenium"
    if any((folder / n).is_file() for n in _VISIUM_FILES) or (folder / "spatial").is_dir():
        return "visium-hd" if folder.name.startswith("square_") and folder.name.endswith("um") else "visium"
    from spatialscale.readers.longread import MARKERS

    if any((folder / n).is_file() for n in MARKERS):
        return "long-read"
    return None


def detect_format(path: str | os.PathLike) -> str | None:
    """The instrument format of a folder (or of a file inside one), or ``None`` when it is none of them.

    A folder is recognised by the files it holds: ``binned_outputs/`` (Visium HD); ``experiment.xenium``,
    ``cell_feature_matrix.h5``, ``cells.parquet`` or ``transcripts.parquet`` (Xenium); a
    ``*_bc_matrix.h5`` or ``spatial/`` (Visium); ``matrix.mtx``, ``counts.h5ad``, ``coordinates.csv``
    or ``isoforms.csv`` (long-read). A Space Ranger run folder is looked into for its ``outs/``.
    An AnnData (``.h5ad`` file, AnnData or SpatialData zarr) is ``None``: it is read as before.

    Parameters
    ----------
    path
        A folder, or one of the files named above (its folder is read).
    """
    path = Path(path)
    if path.is_file():
        names = _XENIUM_FILES + _VISIUM_FILES + ("matrix.mtx", "matrix.mtx.gz")
        return _detect_folder(path.parent) if path.name in names else None
    found = _detect_folder(path)
    if found is None and (path / "outs").is_dir():
        found = _detect_folder(path / "outs")
    return found


def read_instrument(path: str | os.PathLike, format: str | None = None,  # noqa: A002 - the option's name
                    options: dict[str, Any] | None = None) -> Any:
    """Read an instrument output into the AnnData that ingest takes.

    Parameters
    ----------
    path
        The output folder (or a file in it).
    format
        One of :data:`FORMATS`; ``None`` detects it (:func:`detect_format`).
    options
        Keywords of the format's reader (``reader=`` / ``--reader KEY=VALUE``):
        :func:`~spatialscale.readers.visium.read_visium`,
        :func:`~spatialscale.readers.xenium.read_xenium`,
        :func:`~spatialscale.readers.longread.read_long_read`.

    Raises
    ------
    InputError
        An unknown format or option, an unrecognised folder, or a missing file (named).
    """
    import inspect

    from spatialscale.readers.longread import read_long_read
    from spatialscale.readers.visium import read_visium
    from spatialscale.readers.xenium import read_xenium

    path = Path(path)
    if not path.exists():
        raise InputError(f"input {path} does not exist.")
    if format is not None and format not in FORMATS:
        raise InputError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)} (or leave it out to detect).")
    fmt = format or detect_format(path)
    if fmt is None:
        raise InputError(f"{path} is not a recognised instrument output (formats: {', '.join(FORMATS)}).")
    folder = instrument_folder(path)
    if format is None and not path.is_file() and _detect_folder(folder) is None and (folder / "outs").is_dir():
        folder = folder / "outs"
    options = dict(options or {})
    reader = {"visium": read_visium, "visium-hd": read_visium, "xenium": read_xenium, "long-read": read_long_read}[fmt]
    if fmt == "visium-hd":
        options.setdefault("hd", True)
    allowed = [k for k in inspect.signature(reader).parameters if k != "folder"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"unknown {fmt} reader option(s) {', '.join(map(repr, unknown))}; choose from "
                         f"{', '.join(a for a in allowed if a != 'hd')}.")
    return reader(folder, **options)
