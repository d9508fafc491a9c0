"""Checksums of an isoform store's files, its content token, and verified reads.

At ingest every file of a store (each chunk and each ``zarr.json``) is
hashed; the digests go into a manifest kept at
``uns/spatialscale/spatialscale_checksums.json`` (inside an array's folder,
where zarr never lists members, so ``anndata.read_zarr`` sees nothing new),
and the store's **content token** is the hash of those digests and of the
store's metadata (ingest options, kernel).  Two stores have the same token
only if they hold the same counts, spots, isoforms and kernel, wherever they
are: every run fingerprint and resume record is keyed on it, never on a
path.

Reads are verified once per process and file: :func:`verify` hashes a file
the first time it is read and compares it with the manifest, so a missing
chunk (which zarr would silently read as zeros) or a changed byte is a
:class:`StoreDamagedError` that names the file and says to re-ingest.
Arrays added to a store later (the GLMM's eigenpairs) carry a manifest of
their own in their folder.

While a run's task executes, the store it reads is *pinned* to the content
token the client saw (:func:`pinned`); a store replaced under a running task
(re-ingested at the same path) then stops it with a
:class:`StoreChangedError` instead of mixing two datasets.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

from spatialscale.errors import InputError

__all__ = ["MANIFEST_NAME", "MANIFEST_KEY", "StoreDamagedError", "StoreChangedError", "content_token", "file_digest",
           "write_manifest", "write_array_manifest", "read_manifest", "check_content_token", "verify", "verify_prefix",
           "pinned", "input_fingerprint"]

#: file name of a manifest (the store's, in ``uns/spatialscale/``, or an added array's, in its folder)
MANIFEST_NAME = "spatialscale_checksums.json"
#: where the store's manifest lives, relative to the store
MANIFEST_KEY = f"uns/spatialscale/{MANIFEST_NAME}"
_BLOCK = 8 << 20


class StoreDamagedError(InputError):
    """A file of an isoform store is missing or does not match the checksum recorded when it was written."""


class StoreChangedError(InputError):
    """An isoform store was replaced (re-ingested) while a run was reading it."""


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def _files(root: Path, under: Path) -> Iterator[str]:
    """Paths (``/``-separated, from ``root``) of the files below ``under``; manifests and temporaries left out."""
    for dirpath, dirnames, filenames in os.walk(under):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name == MANIFEST_NAME or name.startswith("."):
                continue
            yield Path(dirpath, name).relative_to(root).as_posix()


def content_token(files: dict[str, str], meta: dict[str, Any]) -> str:
    """The content token of a store: its files' digests and its metadata, hashed."""
    blob = json.dumps({"files": files, "meta": meta}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(value, sort_keys=True))
    os.replace(tmp, path)


def write_manifest(root: str | os.PathLike, meta: dict[str, Any]) -> str:
    """Hash every file of a store being written (its root ``zarr.json`` aside); write the manifest; return the token.

    The root ``zarr.json`` holds the completion mark with the token and is
    rewritten when metadata are consolidated; its ``meta`` is covered by the
    token instead.
    """
    root = Path(root)
    files = {rel: file_digest(root / rel) for rel in _files(root, root) if rel != "zarr.json"}
    token = content_token(files, meta)
    _write_json(root / MANIFEST_KEY, {"algorithm": "sha256", "token": token, "files": files})
    return token


def check_content_token(store_path: str | os.PathLike, token: str, meta: dict[str, Any]) -> None:
    """The manifest agrees with the token of the store's mark, and hashes (with ``meta``) to it.

    Checked once per process while the manifest is unchanged; a mismatch is a :class:`StoreDamagedError`.
    """
    path = Path(os.path.abspath(store_path))
    try:
        st = (path / MANIFEST_KEY).stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    _check_content_token(str(path), token, json.dumps(meta, sort_keys=True), stamp)


@lru_cache(maxsize=64)
def _check_content_token(path: str, token: str, meta_json: str, _stamp: tuple | None) -> None:
    manifest = read_manifest(path)
    if manifest["token"] != token or content_token(manifest["files"], json.loads(meta_json)) != token:
        raise StoreDamagedError(f"isoform store {path} is damaged: its checksums do not match its content token; "
                                f"{_REINGEST}")


def write_array_manifest(root: str | os.PathLike, folder: str | os.PathLike) -> None:
    """The manifest of an array added to a store after ingest (written into its folder before it is moved in)."""
    root, folder = Path(root), Path(folder)
    files = {Path(rel).relative_to(folder.relative_to(root)).as_posix(): file_digest(root / rel)
             for rel in _files(root, folder)}
    _write_json(folder / MANIFEST_NAME, {"algorithm": "sha256", "files": files})


def read_manifest(store_path: str | os.PathLike) -> dict[str, Any]:
    """The store's manifest (cached per process while the file is unchanged)."""
    path = Path(store_path) / MANIFEST_KEY
    try:
        st = path.stat()
    except OSError:
        raise StoreDamagedError(f"isoform store {store_path} is damaged: its checksums ({MANIFEST_KEY}) are missing; "
                                f"{_REINGEST}") from None
    return _load_manifest(str(path), st.st_mtime_ns, st.st_size)


_REINGEST = "re-ingest it (spatialscale ingest SOURCE STORE --overwrite)."


@lru_cache(maxsize=16)
def _load_manifest(path: str, _mtime: int, _size: int) -> dict[str, Any]:
    try:
        value = json.loads(Path(path).read_text())
        if not isinstance(value.get("files"), dict) or not isinstance(value.get("token"), str):
            raise ValueError("no files or token")
    except (OSError, ValueError, AttributeError) as exc:
        store = Path(path).parents[2]
        raise StoreDamagedError(f"isoform store {store} is damaged: its checksums ({MANIFEST_KEY}) are unreadable "
                                f"({exc}); {_REINGEST}") from None
    return value


@lru_cache(maxsize=64)
def _array_manifest(path: str, _mtime: int) -> dict[str, str]:
    try:
        return dict(json.loads(Path(path).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}


# --------------------------------------------------------------------------- pins
_pins = threading.local()


@contextlib.contextmanager
def pinned(store_path: str | os.PathLike, token: str) -> Iterator[None]:
    """Within the block (one task, in this thread), reads of ``store_path`` must find content ``token``."""
    key = os.path.abspath(store_path)
    pins = getattr(_pins, "map", None)
    if pins is None:
        pins = _pins.map = {}
    before = pins.get(key)
    pins[key] = token
    try:
        yield
    finally:
        if before is None:
            pins.pop(key, None)
        else:
            pins[key] = before


def pinned_token(store_path: str) -> str | None:
    """The content token this thread's task is pinned to for ``store_path`` (absolute), or None outside a pin."""
    return getattr(_pins, "map", {}).get(store_path)


# --------------------------------------------------------------------------- verification
_verified: dict[tuple[str, str], set[str]] = {}
_verified_lock = threading.Lock()


def _check_token(store: str, manifest: dict[str, Any]) -> None:
    check_pinned(store, manifest["token"])


def check_pinned(store: str, token: str) -> None:
    """Inside a pinned task, raise :class:`StoreChangedError` if ``store`` holds content ``token``, not the pinned."""
    expected = pinned_token(store)
    if expected is not None and token != expected:
        raise StoreChangedError(f"isoform store {store} changed while this run was reading it (re-ingested: content "
                                f"{token[:12]}, the run started on {expected[:12]}); nothing was "
                                "written; run it again.")


def _expected_digest(store: str, manifest: dict[str, Any], rel: str) -> tuple[bool, str | None]:
    """Whether ``rel`` is recorded (in the store's manifest or an added array's), and its digest."""
    files = manifest["files"]
    if rel in files:
        return True, files[rel]
    parts = rel.split("/")
    for i in range(len(parts) - 1, 0, -1):  # an added array's own manifest, in one of the folders above
        mpath = Path(store, *parts[:i], MANIFEST_NAME)
        try:
            mtime = mpath.stat().st_mtime_ns
        except OSError:
            continue
        own = _array_manifest(str(mpath), mtime)
        key = "/".join(parts[i:])
        return key in own, own.get(key)
    return False, None


def verify(store_path: str | os.PathLike, relpaths: Iterable[str]) -> None:
    """Check files of a store against their checksums, each once per process (for the store's current content).

    A recorded file that is missing or differs, or a chunk that exists where
    none was written (zarr reads unwritten chunks as the fill value), is a
    :class:`StoreDamagedError`; a store whose content differs from the token
    pinned for the running task is a :class:`StoreChangedError`.
    """
    store = os.path.abspath(store_path)
    try:
        _verify(store, relpaths)
    except StoreDamagedError:
        raise_if_replaced(store)
        raise


def raise_if_replaced(store: str) -> None:
    """Inside a pinned task, raise :class:`StoreChangedError` if ``store`` no longer holds the pinned content.

    A store removed or re-ingested under a run looks damaged or missing to the
    task reading it; this names what happened instead.
    """
    expected = pinned_token(store)
    if expected is None:
        return
    try:
        token = read_manifest(store)["token"]
    except StoreDamagedError:
        token = None
    if token != expected:
        raise StoreChangedError(f"isoform store {store} changed while this run was reading it (it is gone or was "
                                f"rewritten; the run started on content {expected[:12]}); nothing was written; run "
                                "it again.")


def _verify(store: str, relpaths: Iterable[str]) -> None:
    manifest = read_manifest(store)
    _check_token(store, manifest)
    key = (store, manifest["token"])
    with _verified_lock:
        done = _verified.setdefault(key, set())
    # a file is verified once per process for its recorded digest: an added array replaced since (a covariate
    # set written again) records another digest, so its new bytes are verified too
    todo = [(rel, *_expected_digest(store, manifest, rel)) for rel in relpaths]
    todo = [t for t in todo if (t[0], t[2]) not in done]
    for rel, recorded, digest in todo:
        full = Path(store, rel)
        exists = full.is_file()
        if not recorded:
            if exists:
                raise StoreDamagedError(f"isoform store {store} is damaged: {rel} was not written by its ingest; "
                                        f"{_REINGEST}")
        elif not exists:
            raise StoreDamagedError(f"isoform store {store} is damaged: {rel} is missing; {_REINGEST}")
        elif digest is not None and file_digest(full) != digest:
            raise StoreDamagedError(f"isoform store {store} is damaged: {rel} does not match its checksum; "
                                    f"{_REINGEST}")
        with _verified_lock:
            done.add((rel, digest))


def verify_prefix(store_path: str | os.PathLike, prefix: str) -> None:
    """Verify every recorded file under ``prefix`` (an element such as ``var`` or ``obsp/...``), once per process."""
    store = os.path.abspath(store_path)
    try:
        _verify_prefix(store, prefix)
    except StoreDamagedError:
        raise_if_replaced(store)
        raise


def _verify_prefix(store: str, prefix: str) -> None:
    manifest = read_manifest(store)
    head = prefix.rstrip("/") + "/"
    rels = [r for r in manifest["files"] if r.startswith(head)]
    if not rels:  # an array added after ingest: its own manifest
        mpath = Path(store, prefix, MANIFEST_NAME)
        if not mpath.is_file():
            _check_token(store, manifest)
            raise StoreDamagedError(f"isoform store {store} is damaged: {prefix} has no recorded checksums; "
                                    f"{_REINGEST}")
        rels = [f"{prefix}/{r}" for r in _array_manifest(str(mpath), mpath.stat().st_mtime_ns)]
    _verify(store, rels)


# --------------------------------------------------------------------------- the content of an ingest's input
def input_fingerprint(source: Any, settings: dict[str, Any]) -> str:
    """Hash of what an ingest of ``source`` with ``settings`` reads: equal fingerprints, equal stores.

    A file input (``.h5ad``, AnnData or SpatialData-table zarr folder) is
    hashed byte by byte, whatever its path or modification time; an AnnData
    object by its counts matrix (every layer ``settings["layer"]`` may name),
    ``obs``, ``var``, coordinates and adjacency.  ``settings`` (the ingest
    options that shape the store) are part of the hash, so another option is
    another fingerprint.

    Parameters
    ----------
    source
        An AnnData, or the path of an AnnData file / zarr folder.
    settings
        The ingest options (JSON-serialisable after ``str`` of anything else).
    """
    h = hashlib.sha256(b"spatialscale-input-1\0")
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            h.update(f"\0{f.relative_to(path).as_posix() if f != path else ''}\0".encode())
            h.update(file_digest(f).encode())
        return h.hexdigest()
    _hash_anndata(h, source, settings)
    return h.hexdigest()


def _hash_anndata(h: Any, adata: Any, settings: dict[str, Any]) -> None:
    """Feed an in-memory (or backed) AnnData's ingested content to ``h``."""
    import numpy as np
    import pandas as pd
    import scipy.sparse

    if getattr(adata, "isbacked", False) and getattr(adata, "filename", None):
        h.update(b"\0backed\0" + file_digest(Path(adata.filename)).encode())
    layer = settings.get("layer", "counts")
    x = adata.layers[layer] if layer in adata.layers else adata.X if layer == "X" else None
    arrays: list[Any] = []
    if scipy.sparse.issparse(x):
        h.update(f"\0{x.format}{x.shape}{x.dtype}\0".encode())
        arrays += [x.data, x.indices, x.indptr]
    elif isinstance(x, np.ndarray):
        h.update(f"\0dense{x.shape}{x.dtype}\0".encode())
        arrays.append(x)
    elif x is not None and not getattr(adata, "isbacked", False):
        arrays.append(np.asarray(x))
    for frame in (adata.obs, adata.var):
        h.update(json.dumps([list(map(str, frame.columns)), [str(getattr(t, "categories", t)) for t in frame.dtypes],
                             len(frame)]).encode())
        try:
            arrays.append(pd.util.hash_pandas_object(frame, index=True).to_numpy())
        except TypeError:  # unhashable cells (lists...): their text
            arrays.append(pd.util.hash_pandas_object(frame.astype(str), index=True).to_numpy())
    key = settings.get("spatial_key")
    if isinstance(key, str) and key in adata.obsm:
        value = adata.obsm[key]
        arrays.append(value.to_numpy() if isinstance(value, pd.DataFrame) else np.asarray(value))
    adj = settings.get("adj_key")
    if adj and adj in adata.obsp:
        m = scipy.sparse.csr_matrix(adata.obsp[adj])
        arrays += [m.data, m.indices, m.indptr]
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"\0{a.dtype}{a.shape}\0".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.dtype.kind in "biufc" else repr(a.tolist()).encode())
