"""Object storage: stores, cohort folders and results at ``s3://...`` or any other fsspec URL.

This module is the one place that knows fsspec.  The rest of spatialscale
works on local folders; a URL is turned into one of them here:

- **Stores read from a URL** are copied into a verified local *replica*
  (:func:`open_store_url`): ``<cache>/stores/<content token>``, the cache
  being ``$SPATIALSCALE_CACHE`` (default ``~/.cache/spatialscale``).  The
  copy is downloaded into a temporary sibling, every file is checked against
  the store's checksum manifest, and only then renamed into place; a replica
  is reused only for the same content token, never for the same URL.  Tasks
  carry the URL with the replica's path, so a worker on another machine
  fetches its own replica (once per machine: a file lock keeps two worker
  processes from downloading it twice; a machine that cannot make the
  client's path keeps the replica in its own cache).
- **Stores and cohorts written to a URL** are built locally with the usual
  code and *published*: everything is validated first; the upload puts the
  root ``zarr.json`` first as an incomplete mark (a killed upload stays
  recognisably spatialscale's) and last as the real one.  Over an existing
  store the new one goes to a hidden temporary sibling first and is then
  swapped in: object stores have no rename, so the swap marks the old copy
  as incomplete, removes it, copies the new one in (root ``zarr.json``
  last) and removes the temporary.
- **Results at a URL**: each finished batch is uploaded as soon as it is
  recorded (:class:`RemotePartialStore`), checksums included, so an
  interrupted run's batches survive in the object store and a re-run from
  any machine verifies and reuses them; the final Dataset is uploaded
  complete beside the output and replaces older results only then
  (:class:`RemoteOutput`), the staged batches kept until the swap is over.
  A run holds a lock object beside the output (:class:`RemoteLock`),
  refreshed while it runs.

Credentials and endpoints come from the usual fsspec / environment
mechanisms (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_ENDPOINT_URL``, ``~/.aws``, fsspec's ``FSSPEC_<PROTOCOL>_<KEY>``
variables and configuration files); see ``docs/object-storage.md``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spatialscale.errors import InputError
from spatialscale.locations import is_url, register_url_handler
from spatialscale.output import (
    BATCHES,
    CHECKSUMS_ATTR,
    LOCK_PREFIX,
    LOCK_SUFFIX,
    PARTIAL_MARK,
    RESULTS_FORMAT,
    RESULTS_MARK,
    SECTIONS,
    FileLock,
    PartialStore,
    StaleRunError,
    TemporaryFolder,
    _Named,
    _read_dataset,
    dataset_checksums,
    open_results,
    write_batch_group,
)
from spatialscale.store import IsoformStore

__all__ = ["is_url", "filesystem", "join", "cache_dir", "clear_replicas", "RemoteStore", "open_store_url",
           "ensure_replica", "rebind",
           "ReplicaPathError",
           "ingest_url", "RemotePartialStore", "RemoteOutput", "RemoteLock", "claim_remote_output",
           "open_results_url", "is_cohort_url", "open_cohort_url", "ingest_cohort_url", "LOCK_TTL_S"]

log = logging.getLogger("spatialscale")

#: protocols that are the local filesystem (not object storage)
#: attribute of the placeholder root of results being swapped in (spatialscale's, unfinished: never reused)
SWAPPING = "spatialscale_swapping"
#: seconds after its last refresh that a lock object of a run on another machine counts as abandoned
LOCK_TTL_S = 600.0


# --------------------------------------------------------------------------- URLs and filesystems
def join(base: str | os.PathLike, *parts: str) -> Any:
    """``base`` / ``parts``: a URL joined with ``/``, or a local :class:`~pathlib.Path`."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return Path(base).joinpath(*parts)


def _name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def _parent(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[0]


def sibling(url: str, name: str) -> str:
    """A URL beside ``url`` named ``name``."""
    return f"{_parent(url)}/{name}"


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of ``url`` (credentials from the environment / fsspec config) and the path in it.

    Listings are not cached (other processes write the same prefixes).

    Raises
    ------
    InputError
        fsspec or the protocol's package (s3fs for ``s3://``) is missing, or
        the URL is not one fsspec knows.
    """
    try:
        import fsspec
    except ImportError:
        raise InputError(f"{url}: object storage needs fsspec (pip install 'spatialscale[s3]').") from None
    try:
        try:
            fs, path = fsspec.core.url_to_fs(url, use_listings_cache=False)
        except TypeError:  # a filesystem without a listings cache
            fs, path = fsspec.core.url_to_fs(url)
    except ImportError as exc:
        raise InputError(f"{url}: {exc} (for s3:// install s3fs: pip install 'spatialscale[s3]').") from None
    except (ValueError, OSError) as exc:
        raise InputError(f"{url} is not a URL spatialscale can open ({type(exc).__name__}: {exc}).") from None
    return fs, str(path).rstrip("/")


@contextlib.contextmanager
def _errors(url: str, what: str) -> Iterator[None]:
    """Object-store failures (missing bucket, no credentials, unreachable endpoint) as one-line InputErrors."""
    try:
        yield
    except (InputError, StaleRunError):
        raise
    except FileNotFoundError as exc:
        raise InputError(f"cannot {what} {url}: {_why(exc) or 'not found'} (does the bucket exist?).") from None
    except PermissionError as exc:
        raise InputError(f"cannot {what} {url}: permission denied ({_why(exc)}); check the credentials "
                         "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the fsspec configuration).") from None
    except Exception as exc:  # noqa: BLE001 - botocore / aiohttp / OSError: named, never a traceback
        module = type(exc).__module__.split(".")[0]
        if isinstance(exc, OSError | ValueError | TimeoutError) or module in ("botocore", "aiobotocore", "aiohttp",
                                                                           "s3fs", "gcsfs", "adlfs", "fsspec"):
            raise InputError(f"cannot {what} {url} ({type(exc).__name__}: {_why(exc)}); check the URL, the "
                             "endpoint (AWS_ENDPOINT_URL) and the credentials.") from None
        raise


def _why(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _list(fs: Any, path: str) -> list[str]:
    """Every object below ``path``, as paths relative to it (``[]`` if there are none)."""
    try:
        found = fs.find(path)
    except FileNotFoundError:
        return []
    head = path.rstrip("/") + "/"
    return sorted(p[len(head):] for p in found if p.startswith(head))


def exists(url: str) -> bool:
    """Whether an object or a prefix with objects is at ``url``."""
    fs, path = filesystem(url)
    with _errors(url, "read"):
        return bool(fs.exists(path))


def is_object(url: str) -> bool:
    """Whether ``url`` is one object (a file), not a prefix."""
    fs, path = filesystem(url)
    with _errors(url, "read"):
        return bool(fs.isfile(path))


def read_bytes(url: str) -> bytes | None:
    """The object at ``url``, or ``None`` if there is none."""
    fs, path = filesystem(url)
    with _errors(url, "read"):
        try:
            return bytes(fs.cat_file(path))
        except FileNotFoundError:
            return None


def write_bytes(url: str, data: bytes) -> None:
    """Write one object."""
    fs, path = filesystem(url)
    with _errors(url, "write"):
        fs.pipe_file(path, data)


def read_json(url: str) -> dict | None:
    """A JSON object at ``url`` (``None`` if missing or not a JSON object)."""
    data = read_bytes(url)
    try:
        value = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def group_attributes(url: str) -> dict:
    """The attributes of the zarr v3 group at ``url`` (``{}`` if none)."""
    meta = read_json(f"{url}/zarr.json")
    return (meta or {}).get("attributes", {}) or {}


def listing(url: str) -> list[str]:
    """Every object below ``url`` (relative paths)."""
    fs, path = filesystem(url)
    with _errors(url, "list"):
        return _list(fs, path)


def children(url: str) -> list[str]:
    """The names directly below ``url`` (one listing level, not every object below)."""
    fs, path = filesystem(url)
    with _errors(url, "list"):
        try:
            found = fs.ls(path, detail=False)
        except FileNotFoundError:
            return []
    head = path.rstrip("/") + "/"
    return sorted({str(p).rstrip("/")[len(head):].split("/", 1)[0] for p in found
                   if str(p).startswith(head) and len(str(p).rstrip("/")) > len(head)})


def remove(url: str) -> None:
    """Remove every object below ``url`` (and an object at ``url``)."""
    fs, path = filesystem(url)
    with _errors(url, "remove"):
        files = [f"{path}/{rel}" for rel in _list(fs, path)]
        if fs.isfile(path):
            files.append(path)
        if files:
            fs.rm(files)


def check_location(url: str) -> None:
    """``url`` names a path inside a bucket (object stores) that exists and is reachable."""
    fs, path = filesystem(url)
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise InputError(f"{url} names no path; give one such as s3://bucket/name.")
    if getattr(fs, "root_marker", "/") != "":  # a filesystem with a root folder (memory://...): no buckets
        return
    if len(parts) < 2:
        raise InputError(f"{url} names a bucket, not a path inside it; give one such as {url.rstrip('/')}/name.")
    with _errors(url, "reach"):
        if not fs.exists(parts[0]):
            raise InputError(f"cannot write to {url}: bucket {parts[0]!r} does not exist (or these credentials "
                             "cannot see it).")


def _zarr_json(attrs: dict) -> bytes:
    return json.dumps({"zarr_format": 3, "node_type": "group", "attributes": attrs}).encode()


def upload(local: Path, url: str, *, provisional: bytes | None = None, root: bool = True) -> None:
    """Upload a local folder to ``url``; its root ``zarr.json`` goes last (``provisional`` first, if given).

    Until the last object arrives the prefix carries ``provisional`` (an
    incomplete mark, so that a killed upload is still recognisably
    spatialscale's) or no root ``zarr.json`` at all.  ``root=False`` leaves
    the root ``zarr.json`` out (the caller puts it last).
    """
    fs, path = filesystem(url)
    files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
    rest = [f for f in files if f != "zarr.json"]
    with _errors(url, "write"):
        if provisional is not None:
            fs.pipe_file(f"{path}/zarr.json", provisional)
        if rest:
            fs.put([str(local / f) for f in rest], [f"{path}/{f}" for f in rest])
        if root and "zarr.json" in files:
            fs.put_file(str(local / "zarr.json"), f"{path}/zarr.json")


def download(url: str, local: Path, *, skip: Sequence[str] = ()) -> bool:
    """Download every object below ``url`` (but those under the folders ``skip``) into ``local``; ``False`` if none."""
    fs, path = filesystem(url)
    with _errors(url, "read"):
        files = [f for f in _list(fs, path) if f.split("/", 1)[0] not in skip]
        if not files:
            return False
        local.mkdir(parents=True, exist_ok=True)
        for d in sorted({str(Path(f).parent) for f in files}):
            (local / d).mkdir(parents=True, exist_ok=True)
        fs.get([f"{path}/{f}" for f in files], [str(local / f) for f in files])
    return True


def copy_tree(src: str, dst: str, *, skip: Sequence[str] = ()) -> None:
    """Copy every object below ``src`` to ``dst`` (server side), the root ``zarr.json`` last."""
    fs, spath = filesystem(src)
    _, dpath = filesystem(dst)
    with _errors(src, "copy"):
        files = [f for f in _list(fs, spath) if f.split("/", 1)[0] not in skip]
        rest = [f for f in files if f != "zarr.json"]
        if rest:
            fs.copy([f"{spath}/{f}" for f in rest], [f"{dpath}/{f}" for f in rest])
        if "zarr.json" in files:
            fs.copy(f"{spath}/zarr.json", f"{dpath}/zarr.json")


def replace_tree(src: str, dst: str, placeholder: bytes) -> None:
    """Swap the complete tree ``src`` into ``dst`` (which, if present, was checked to be spatialscale's).

    Object stores have no rename: ``dst``'s root ``zarr.json`` is first
    replaced by ``placeholder`` (an incomplete but recognisable mark), then
    its other objects are removed, ``src`` is copied in with its root
    ``zarr.json`` last, and ``src`` is removed.  Whatever moment this is
    interrupted at, ``dst`` is either the old copy, recognisably incomplete,
    or the new copy; ``src`` stays complete until the end.
    """
    fs, dpath = filesystem(dst)
    with _errors(dst, "replace"):
        old = _list(fs, dpath)
        if old:
            fs.pipe_file(f"{dpath}/zarr.json", placeholder)
            rest = [f"{dpath}/{f}" for f in old if f != "zarr.json"]
            if rest:
                fs.rm(rest)
    copy_tree(src, dst)
    remove(src)


# --------------------------------------------------------------------------- locks
class RemoteLock:
    """An advisory lock object beside what it locks: ``.<name>.spatialscale-lock`` (owner host, pid, time).

    Object stores have no file locks: acquiring writes the object, reads it
    back and refuses when another run's lock is there; the holder refreshes
    it every ``ttl / 4`` seconds.  A lock of a process that is gone on this
    machine, or not refreshed for ``ttl`` seconds (``SPATIALSCALE_LOCK_TTL``,
    default 600), is taken over.  The object is created exclusively where
    the store supports it (S3's ``If-None-Match``); elsewhere, and when an
    abandoned lock is taken over, two runs starting within the same moment
    may both believe they hold it: the lock prevents the usual mistakes, and
    the checksums and ownership checks of what is written protect against
    the rest.
    """

    def __init__(self, target: str, *, hint: str = "wait for it to finish") -> None:
        self.target = target.rstrip("/")
        self.url = sibling(self.target, f".{_name(self.target)}{LOCK_SUFFIX}")
        self.hint = hint
        try:
            self.ttl = float(os.environ.get("SPATIALSCALE_LOCK_TTL") or LOCK_TTL_S)
        except ValueError:
            raise InputError(f"SPATIALSCALE_LOCK_TTL must be a number of seconds (got "
                             f"{os.environ.get('SPATIALSCALE_LOCK_TTL')!r}).") from None
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._since = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")

    def _content(self) -> bytes:
        info = {"token": self.token, "pid": os.getpid(), "host": socket.gethostname(), "refreshed": time.time()}
        return (f"{LOCK_PREFIX.decode()}{os.getpid()} on {socket.gethostname()} since {self._since}\n"
                f"{json.dumps(info)}\n").encode()

    @staticmethod
    def _parse(data: bytes) -> dict | None:
        if not data.startswith(LOCK_PREFIX):
            return None
        try:
            head, body = data.decode().split("\n", 1)
            info = json.loads(body)
            info["holder"] = head
            return info if isinstance(info, dict) else None
        except (ValueError, UnicodeDecodeError):
            return None

    def _abandoned(self, info: dict) -> bool:
        if time.time() - float(info.get("refreshed", 0)) > self.ttl:
            return True
        if info.get("host") == socket.gethostname():
            import psutil

            return not psutil.pid_exists(int(info.get("pid", -1)))
        return False

    def acquire(self) -> RemoteLock:
        """Take the lock; a lock another live run holds is an :class:`InputError` naming it."""
        current = read_bytes(self.url)
        if current is not None:
            info = self._parse(current)
            if info is None:
                raise InputError(f"{self.url} exists and is not a spatialscale lock; spatialscale never uses or "
                                 "removes it: move it away.")
            if not self._abandoned(info):
                raise InputError(f"{self.target} is being written by another spatialscale run ({info['holder']}); "
                                 f"{self.hint} (a lock not refreshed for {self.ttl:g} s is taken over; if that run "
                                 f"is gone, remove {self.url}).")
            log.warning("taking over the lock of %s left by a run that is gone (%s)", self.target, info["holder"])
            if read_bytes(self.url) == current:  # still that abandoned lock (not one just taken by another run)
                remove(self.url)
        if not self._create(self._content()):
            raise InputError(f"{self.target} is being written by another spatialscale run (it took the lock just "
                             f"now); {self.hint}.")
        now = read_bytes(self.url)
        info = self._parse(now or b"")
        if info is None or info.get("token") != self.token:
            raise InputError(f"{self.target} is being written by another spatialscale run (it took the lock just "
                             f"now); {self.hint}.")
        self._thread = threading.Thread(target=self._refresh, daemon=True, name="spatialscale-lock")
        self._thread.start()
        return self

    def _create(self, data: bytes) -> bool:
        """Write the lock object only if there is none (``False`` if another run's appeared meanwhile).

        An exclusive create (S3's ``If-None-Match``) where the filesystem has
        one; elsewhere a plain write, checked by reading it back.
        """
        fs, path = filesystem(self.url)
        with _errors(self.url, "write"):
            try:
                fs.pipe_file(path, data, mode="create")
            except FileExistsError:
                return False
            except (TypeError, NotImplementedError):  # no exclusive writes here
                fs.pipe_file(path, data)
        return True

    def _refresh(self) -> None:
        while not self._stop.wait(max(self.ttl / 4, 0.5)):
            with contextlib.suppress(Exception):
                info = self._parse(read_bytes(self.url) or b"")
                if info is None or info.get("token") != self.token:
                    return  # taken over: never write into another run's lock
                write_bytes(self.url, self._content())

    def release(self) -> None:
        """Stop refreshing; remove the lock object if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            with contextlib.suppress(Exception):
                info = self._parse(read_bytes(self.url) or b"")
                if info is not None and info.get("token") == self.token:
                    remove(self.url)

    def __enter__(self) -> RemoteLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- stores at URLs: replicas
def cache_dir() -> Path:
    """Where replicas of stores at URLs live: ``$SPATIALSCALE_CACHE`` or ``~/.cache/spatialscale``."""
    return Path(os.environ.get("SPATIALSCALE_CACHE") or Path.home() / ".cache" / "spatialscale").absolute()


@dataclass(repr=False)
class RemoteStore(IsoformStore):
    """An isoform store at a URL, read through its verified local replica (:attr:`path`)."""

    url: str = ""

    def __repr__(self) -> str:
        return (f"IsoformStore({self.url!r}, n_spots={self.n_spots}, n_genes={self.n_genes}, "
                f"n_isoforms={len(self.isoforms)})")

    def write_covariate_set(self, name: str, *args: Any, **kwargs: Any) -> None:
        """Refused: a store at a URL is read through replicas; covariate sets go into a local store."""
        raise InputError(f"covariate set {name!r}: {self.url} is a store at a URL (read through local replicas); "
                         "write covariate sets into a local store (ingest it to a local path) instead.")

    def remove_covariate_set(self, name: str) -> None:
        """Refused, as :meth:`write_covariate_set`."""
        self.write_covariate_set(name)


def store_mark(url: str) -> dict:
    """The ``spatialscale`` mark of the store at ``url`` (checked: complete, this format, a content token)."""
    from spatialscale.store import check_store_format

    url = url.rstrip("/")
    filesystem(url)
    attrs = read_json(f"{url}/zarr.json")
    if attrs is None:
        if exists(url):
            raise InputError(f"{url} is not an isoform store (no zarr.json).")
        raise InputError(f"no isoform store at {url}; create one with `spatialscale ingest`.")
    mark = (attrs.get("attributes") or {}).get("spatialscale")
    if not isinstance(mark, dict):
        raise InputError(f"{url} is not an isoform store (no spatialscale mark); create one with `spatialscale "
                         "ingest`.")
    if not mark.get("complete", False):
        raise InputError(f"{url} is not a complete isoform store (was its ingest interrupted?). Re-run ingest.")
    check_store_format(url, mark)  # type: ignore[arg-type]
    if not isinstance(mark.get("meta"), dict) or not isinstance(mark.get("content_token"), str):
        raise InputError(f"{url} has a damaged store mark (no metadata or content token); re-ingest it "
                         "(spatialscale ingest SOURCE STORE --overwrite).")
    return mark


def store_token(url: str) -> str:
    """The content token of the store at ``url`` (its mark)."""
    return str(store_mark(url)["content_token"])


def open_store_url(url: str) -> RemoteStore:
    """Open the isoform store at ``url`` through its verified local replica (downloaded once per content)."""
    from spatialscale.checksums import StoreDamagedError
    from spatialscale.store import open_store

    url = url.rstrip("/")
    token = store_token(url)
    replica = cache_dir() / "stores" / token
    ensure_replica(url, token, replica)
    try:
        local = open_store(replica)
    except StoreDamagedError:  # the replica was altered since it was verified: fetched again
        log.warning("the replica %s of %s is damaged; downloading it again", replica, url)
        _discard(replica)
        ensure_replica(url, token, replica)
        local = open_store(replica)
    return RemoteStore(path=local.path, meta=local.meta, content_token=local.content_token, url=url)


class ReplicaPathError(InputError):
    """The folder of a replica cannot be made on this machine."""


def rebind(obj: Any, old: str, new: str) -> Any:
    """``obj`` (a task: nested :func:`functools.partial`) with every argument equal to ``old`` replaced by ``new``."""
    if isinstance(obj, functools.partial):
        return functools.partial(rebind(obj.func, old, new), *(rebind(a, old, new) for a in obj.args),
                                 **{k: rebind(v, old, new) for k, v in obj.keywords.items()})
    if isinstance(obj, str) and obj == old:
        return new
    return obj


_ready: set[tuple[str, str]] = set()
_ready_lock = threading.Lock()


def ensure_replica(url: str, token: str, replica: Path) -> Path:
    """Make ``replica`` a verified copy of the store at ``url`` with content ``token`` (reused if it is one).

    Runs on the client and on every worker (tasks carry the URL and the
    replica's path): the copy is downloaded into a temporary sibling under
    a file lock (one download per machine), every file is checked against
    the store's manifest and content token, then renamed into place.

    Raises
    ------
    InputError
        The replica's folder cannot be made (set ``SPATIALSCALE_CACHE`` to a
        folder that exists on every worker), or the store at ``url`` now
        holds other content (re-ingested) or fails verification.
    """
    key = (str(replica), token)
    if key in _ready and (replica / "zarr.json").is_file():
        return replica
    if not _replica_holds(replica, token):
        try:
            replica.parent.mkdir(parents=True, exist_ok=True)
            if not os.access(replica.parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, "permission denied")
        except OSError as exc:
            raise ReplicaPathError(f"cannot make the replica cache {replica.parent} on {socket.gethostname()} "
                                   f"({exc.strerror or exc}); set SPATIALSCALE_CACHE to a writable folder.") from None
        with _fetch_lock(replica):
            if not _replica_holds(replica, token):
                _download_replica(url, token, replica)
    with _ready_lock:
        _ready.add(key)
    return replica


def clear_replicas() -> list[Path]:
    """Remove the replicas in this machine's cache that no run is reading; returns what was removed.

    Only folders of ``<cache>/stores`` that are complete replicas (their store
    mark's content token is their name) are removed, each under its readers'
    lock taken exclusively, so a replica a run reads is kept.
    """
    removed = []
    folder = cache_dir() / "stores"
    if not folder.is_dir():
        return removed
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_dir() or not _replica_holds(path, path.name):
            continue
        try:
            with FileLock(path, hint=""), _fetch_lock(path):
                _discard(path)
        except InputError:
            continue  # a run is reading it (or fetching it): kept
        removed.append(path)
    return removed


def _fetch_lock(replica: Path) -> FileLock:
    """The lock one download (or install) of a replica holds; runs reading the replica hold its own readers' lock."""
    return FileLock(replica.with_name(f"{replica.name}.fetch"), hint="wait for it to finish")


def _replica_holds(replica: Path, token: str) -> bool:
    from spatialscale.output import group_attributes as local_attributes

    mark = local_attributes(replica).get("spatialscale")
    return isinstance(mark, dict) and mark.get("complete") is True and mark.get("content_token") == token


def _discard(path: Path) -> None:
    aside = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def _download_replica(url: str, token: str, replica: Path) -> None:
    """Download, verify every file, rename into place (called under the replica's lock)."""
    from spatialscale.checksums import content_token, file_digest, read_manifest

    for old in replica.parent.glob(f".{replica.name}.tmp-*"):  # left by a download that was killed
        shutil.rmtree(old, ignore_errors=True)
    tmp = replica.with_name(f".{replica.name}.tmp-{uuid.uuid4().hex[:8]}")
    log.info("downloading %s into its replica %s", url, replica)
    try:
        if not download(url, tmp):
            raise InputError(f"no isoform store at {url}.")
        mark = json.loads((tmp / "zarr.json").read_text()).get("attributes", {}).get("spatialscale") or {}
        if mark.get("content_token") != token:
            raise InputError(f"the isoform store {url} changed while it was downloaded (re-ingested); run again.")
        manifest = read_manifest(tmp)
        files = manifest["files"]
        if manifest.get("token") != token or content_token(files, mark.get("meta") or {}) != token:
            raise InputError(f"isoform store {url} is damaged: its checksums do not match its content token; "
                             "re-ingest it (spatialscale ingest SOURCE STORE --overwrite).")
        for rel, digest in files.items():
            f = tmp / rel
            if not f.is_file() or file_digest(f) != digest:
                raise InputError(f"isoform store {url} is damaged: {rel} is "
                                 f"{'missing' if not f.is_file() else 'altered'}; re-ingest it "
                                 "(spatialscale ingest SOURCE STORE --overwrite).")
        if replica.exists():
            _discard(replica)
        os.replace(tmp, replica)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_store(local: Path, url: str) -> None:
    """Upload the complete local store ``local`` to ``url``, replacing an isoform store there (checked by caller).

    Into an empty target the store is uploaded in place (its incomplete mark
    first, the real one last: an interrupted upload is an incomplete store,
    which the next ingest replaces); over an existing store, beside it and
    then swapped in (:func:`replace_tree`).
    """
    incomplete = _zarr_json({"spatialscale": {"complete": False, "format": _store_format()}})
    if not exists(url):
        upload(local, url, provisional=incomplete)
        return
    tmp = sibling(url, f".{_name(url)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        upload(local, tmp, provisional=incomplete)
        replace_tree(tmp, url, incomplete)
    except BaseException:
        with contextlib.suppress(Exception):
            remove(tmp)
        raise


def _store_format() -> int:
    from spatialscale.store import STORE_FORMAT

    return STORE_FORMAT


def _is_store_url(url: str) -> bool:
    return isinstance(group_attributes(url).get("spatialscale"), dict)


def _remove_stale_siblings(url: str, is_ours: Any) -> None:
    """Remove hidden temporaries of an earlier publish into ``url`` that was killed (called under its lock)."""
    name = _name(url)
    for child in children(_parent(url)):
        if child.startswith((f".{name}.tmp-", f".{name}.final-")):
            other = sibling(url, child)
            if is_ours(other):
                remove(other)


def ingest_url(source: Any, url: str, options: dict[str, Any]) -> RemoteStore:
    """:func:`spatialscale.ingest` into a URL: validated, built locally, then published.

    A store already at ``url`` that ingest wrote from the same input with the
    same options is reused; another isoform store there is replaced only with
    ``overwrite``; anything else there is refused.  Nothing is uploaded before
    the local ingest has succeeded.
    """
    from spatialscale.store import ingest, ingest_fingerprint

    url = url.rstrip("/")
    overwrite = bool(options.pop("overwrite", False))
    check_location(url)
    fingerprint = options.pop("_fingerprint", None)
    _refuse_store_target(url, overwrite, probe_only=True)
    with _local_input(source) as local_source:
        fp = fingerprint or ingest_fingerprint(local_source, **{k: v for k, v in options.items()
                                                              if k not in ("block_bytes", "progress")})
        if not overwrite and _is_store_url(url):
            with contextlib.suppress(InputError):
                mark = store_mark(url)
                if mark["meta"].get("source_fingerprint") == fp:
                    log.info("%s already holds this input (same content and ingest options): reused", url)
                    return open_store_url(url)
        _refuse_store_target(url, overwrite)
        work = TemporaryFolder("publish")
        try:
            local = work.path / "store.zarr"
            built = ingest(local_source, local, _fingerprint=fp, **options)
            with RemoteLock(url, hint="wait for it to finish, or ingest into another path"):
                _refuse_store_target(url, overwrite)  # again, under the lock
                _remove_stale_siblings(url, _is_store_url)
                publish_store(local, url)
            replica = cache_dir() / "stores" / built.content_token
            with contextlib.suppress(OSError, InputError):  # the local copy becomes this machine's replica
                if not _replica_holds(replica, built.content_token):
                    replica.parent.mkdir(parents=True, exist_ok=True)
                    with _fetch_lock(replica):
                        if not _replica_holds(replica, built.content_token):
                            if replica.exists():
                                _discard(replica)
                            os.replace(local, replica)
        finally:
            work.cleanup()
    return open_store_url(url)


def _refuse_store_target(url: str, overwrite: bool, *, probe_only: bool = False) -> None:
    """Refuse a store URL that holds something spatialscale did not write, or a store without ``overwrite``."""
    if not exists(url):
        return
    if is_object(url) or not _is_store_url(url):
        raise InputError(f"{url} exists and was not written by spatialscale (it is no isoform store); spatialscale "
                         "never replaces what it did not write: choose another path.")
    if group_attributes(url)["spatialscale"].get("complete") is False:
        return  # an ingest that was interrupted while uploading: replaced without overwrite
    if not overwrite and not probe_only:
        raise InputError(f"{url} holds an isoform store of another input or other ingest options; pass "
                         "overwrite=True (--overwrite) to replace it, or choose another path.")


def is_anndata_url(url: str) -> bool:
    """Whether ``url`` is an AnnData input (an ``.h5ad`` object or an AnnData zarr), not a store or a cohort."""
    url = url.rstrip("/")
    if url.lower().endswith(".h5ad"):
        return True
    attrs = read_json(f"{url}/zarr.json")
    return (attrs is not None and not isinstance((attrs.get("attributes") or {}).get("spatialscale"), dict)
            and read_json(f"{url}/obs/zarr.json") is not None)


@contextlib.contextmanager
def _local_input(source: Any) -> Iterator[Any]:
    """An ingest input: itself, or an input at a URL (``.h5ad`` file or AnnData zarr) downloaded first."""
    if not is_url(source):
        yield source
        return
    work = TemporaryFolder("input")
    try:
        local = work.path / _name(source)
        if is_object(source):
            fs, path = filesystem(source)
            with _errors(source, "read"):
                fs.get_file(path, str(local))
        elif not download(source, local):
            raise InputError(f"no input at {source}.")
        yield str(local)
    finally:
        work.cleanup()


# --------------------------------------------------------------------------- results at URLs
class RemotePartialStore(PartialStore):
    """:class:`~spatialscale.output.PartialStore` at a URL: each batch uploaded when recorded, verified when read.

    A batch is written locally (arrays and checksums), then uploaded with its
    group's ``zarr.json`` (which marks it done) last; reading downloads it
    and verifies it as a local record.
    """

    def __init__(self, root: str, fp: str, run_id: str | None = None, owner: str | None = None) -> None:
        self.root = root.rstrip("/")  # type: ignore[assignment]
        self.fp = fp
        self.run_id = run_id
        self.owner = (owner or root).rstrip("/")  # type: ignore[assignment]
        self._names: set[str] | None = None  # the recorded batches, listed once (one request, not one per batch)

    def _url(self, name: str) -> str:
        return f"{self.root}/{BATCHES}/{name}"

    def section(self, key: str, fp: str) -> RemotePartialStore:
        """The record of one section of a cohort run (under ``_sections/<key>``)."""
        return RemotePartialStore(f"{self.root}/{SECTIONS}/{key}", fp, self.run_id, owner=self.owner)

    def _fetch(self, url: str, name: str) -> tuple[dict[str, np.ndarray] | None, str | None]:
        with tempfile.TemporaryDirectory(prefix="spatialscale-batch-") as d:
            local = Path(d) / name
            if not download(url, local):
                return None, ""
            return self._verified(local)

    def load(self, batch: Any) -> dict[str, np.ndarray] | None:
        """The batch's verified result, or ``None``; a damaged record is named, removed and recomputed."""
        if self._names is None:
            self._names = set(children(f"{self.root}/{BATCHES}"))
        if batch.name not in self._names:
            return None
        url = self._url(batch.name)
        result, problem = self._fetch(url, batch.name)
        if problem is None:
            return result
        if problem:
            log.warning("batch %s in %s is damaged (%s); recomputing it.", batch.name, self.root, problem)
            with contextlib.suppress(InputError):
                remove(url)
            self._names.discard(batch.name)
        return None

    def adopt(self, other: str | os.PathLike) -> int:
        """Copy the verified batches of this run's fingerprint from another record at a URL; returns how many."""
        source = f"{str(other).rstrip('/')}/{BATCHES}"
        here = set(children(f"{self.root}/{BATCHES}"))
        n = 0
        for name in children(source):
            if name.startswith(".") or name in here:
                continue
            result, problem = self._fetch(f"{source}/{name}", name)
            if problem:
                log.warning("batch %s in %s is damaged (%s); it is recomputed.", name, other, problem)
            if result is None:
                continue
            self.write(_Named(name), result)
            n += 1
        return n

    def check_owner(self) -> None:
        """Raise :class:`StaleRunError` unless this run still owns the output."""
        if self.run_id is None:
            return
        if group_attributes(self.owner).get("run_id") != self.run_id:
            raise StaleRunError(f"{self.owner} is now owned by another run; this run's batch was discarded.")

    def write(self, batch: Any, result: dict[str, np.ndarray]) -> None:
        """Record a batch: written locally with its checksums, uploaded with its ``zarr.json`` last."""
        with tempfile.TemporaryDirectory(prefix="spatialscale-batch-") as d:
            local = Path(d) / batch.name
            write_batch_group(local, result, self.fp)
            self.check_owner()
            url = self._url(batch.name)
            if self._names is None or batch.name in self._names:  # an earlier record: no longer marked done
                fs, path = filesystem(url)
                with _errors(url, "write"), contextlib.suppress(FileNotFoundError):
                    fs.rm_file(f"{path}/zarr.json")
            upload(local, url)
        if self._names is not None:
            self._names.add(batch.name)


def _is_ours_url(url: str) -> bool:
    """A results prefix spatialscale wrote (mark) holding nothing but zarr entries."""
    if is_object(url):
        return False
    attrs = group_attributes(url)
    if attrs.get(RESULTS_MARK) and attrs.get(SWAPPING):  # a swap of ours that was interrupted: all of it is ours
        return True
    return bool(attrs.get(RESULTS_MARK) or attrs.get(PARTIAL_MARK)) and not _stray_url(url)


def _stray_url(url: str) -> list[str]:
    files = listing(url)
    have = set(files)
    out = []
    for rel in files:
        top = rel.split("/", 1)[0]
        if rel == "zarr.json" or top in (BATCHES, SECTIONS) or top.startswith(".zarr.json.") \
                or f"{top}/zarr.json" in have:
            continue
        out.append(top)
    return sorted(set(out))


def _refusal_url(out: str) -> str:
    if is_object(out):
        return f"{out} exists and is not a spatialscale results folder; choose another --out."
    attrs = group_attributes(out)
    if not (attrs.get(RESULTS_MARK) or attrs.get(PARTIAL_MARK)):
        if attrs.get("spatialscale"):
            return f"{out} is an isoform store, not results; choose another --out."
        return (f"{out} exists and was not written by spatialscale; spatialscale never replaces what it did not "
                "write: choose another --out.")
    return (f"{out} holds objects spatialscale did not write ({', '.join(_stray_url(out)[:3])}); move them or "
            "choose another --out.")


def open_results_url(url: str, *, verify: bool = True) -> Any:
    """:func:`spatialscale.open_results` of results at a URL (downloaded, then verified)."""
    url = url.rstrip("/")
    if group_attributes(url).get(SWAPPING):
        raise InputError(f"{url} holds no spatialscale results (an unfinished run: re-run the same command to "
                         "finish it).")
    with tempfile.TemporaryDirectory(prefix="spatialscale-results-") as d:
        local = Path(d) / _name(url)
        if not download(url, local, skip=(BATCHES, SECTIONS)):  # recorded batches are not part of the Dataset
            raise InputError(f"no results at {url}.")
        try:
            return open_results(local, verify=verify)
        except InputError as exc:
            raise type(exc)(str(exc).replace(str(local), url)) from None


def _verified_results_url(out: str) -> Any | None:
    try:
        return open_results_url(out)
    except InputError as exc:
        log.warning("%s; recomputing them.", str(exc).rstrip("."))
        return None


def _within_url(a: str, b: str) -> bool:
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/")


@dataclass
class RemoteOutput:
    """A claimed output at a URL (the counterpart of :class:`spatialscale.output.Output`)."""

    out: str
    fp: str
    lock: RemoteLock
    staging: str | None = None
    resume: bool = False
    existing: Any = None
    partial: RemotePartialStore | None = None
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    base: str | None = None
    keep: tuple[str, ...] = ()
    previous: str | None = None
    content: str | None = None

    def start(self) -> RemotePartialStore:
        """Create (or take over, for resuming) the staging prefix; the first write of the run."""
        if self.partial is None:
            assert self.staging is not None
            log.info("%s batches in %s", "resuming" if self.resume else "recording", self.staging)
            if self.resume:
                attrs = group_attributes(self.staging)
                attrs["run_id"] = self.run_id
                write_bytes(f"{self.staging}/zarr.json", _zarr_json(attrs))
            else:
                write_bytes(f"{self.staging}/zarr.json", _zarr_json({
                    PARTIAL_MARK: True, "fingerprint": self.fp, "run_id": self.run_id,
                    **({"base_fingerprint": self.base} if self.base is not None else {}),
                    **({"content_token": self.content} if self.content is not None else {})}))
            self.partial = RemotePartialStore(self.staging, self.fp, self.run_id)
        return self.partial

    def _placeholder(self) -> bytes:
        # recognisably spatialscale's results of this run, without checksums: never reused, only resumed / replaced
        return _zarr_json({RESULTS_MARK: True, "fingerprint": self.fp, "results_format": RESULTS_FORMAT,
                           SWAPPING: True})

    def commit(self, ds: Any) -> None:
        """Write the final Dataset beside ``out`` (uploaded complete), then swap it in and remove the staging."""
        import warnings

        out = self.out
        tmp = sibling(out, f".{_name(out)}.final-{uuid.uuid4().hex[:8]}")
        ds = ds.copy()
        ds.attrs.update({RESULTS_MARK: True, "fingerprint": self.fp, "results_format": RESULTS_FORMAT})
        if self.base is not None:
            ds.attrs["base_fingerprint"] = self.base
        if self.content is not None:
            ds.attrs["content_token"] = self.content
        with tempfile.TemporaryDirectory(prefix="spatialscale-results-") as d:
            local = Path(d) / "results.zarr"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.to_zarr(local, mode="w-", consolidated=True, zarr_format=3)
            from spatialscale.output import _set_attrs

            _set_attrs(local, **{CHECKSUMS_ATTR: json.dumps(dataset_checksums(_read_dataset(local)))})
            try:  # first beside the output: a failing upload (quota, permissions) leaves it as it was
                upload(local, tmp, provisional=self._placeholder())
            except BaseException as exc:
                with contextlib.suppress(Exception):
                    remove(tmp)
                if isinstance(exc, InputError):
                    where = self.partial.root if self.partial is not None else out
                    raise InputError(f"{str(exc).rstrip('.')}; finished batches are kept in {where}/{BATCHES} and "
                                     "re-running the same command resumes from them.") from None
                raise
            if exists(out) and not _is_ours_url(out):  # changed under us since the claim: never replaced
                remove(tmp)
                raise InputError(_refusal_url(out))
            self._swap(local)
        remove(tmp)
        log.info("results written to %s", out)
        if self.staging is not None and self.staging != out:
            remove(self.staging)

    def _swap(self, local: Path) -> None:
        """Replace ``out`` by the results in ``local`` (also complete beside it), the root ``zarr.json`` last.

        ``out`` first gets the placeholder mark (spatialscale's unfinished
        results: never reused, only resumed or replaced), then loses its other
        objects (not the recorded batches of this run, when it is the staging
        prefix and they stay with the results); the Dataset is uploaded, the
        recorded batches that stay (``keep``) copied in from a sibling
        staging prefix, and the root ``zarr.json`` put last; only then are the
        output's own recorded batches removed.  Until then every staged batch
        is kept, so an interrupted swap is finished by re-running.
        """
        out = self.out
        fs, dpath = filesystem(out)
        here = self.staging == out
        with _errors(out, "replace"):
            old = _list(fs, dpath)
            if old:
                fs.pipe_file(f"{dpath}/zarr.json", self._placeholder())
                rest = [f"{dpath}/{f}" for f in old
                        if f != "zarr.json" and not (here and f.split("/", 1)[0] in (BATCHES, *self.keep))]
                if rest:
                    fs.rm(rest)
        upload(local, out, root=False)
        if not here and self.staging is not None:
            for name in self.keep:  # recorded batches that stay with the results (to extend them later)
                if exists(f"{self.staging}/{name}"):
                    copy_tree(f"{self.staging}/{name}", f"{out}/{name}")
        with _errors(out, "write"):
            fs.put_file(str(local / "zarr.json"), f"{dpath}/zarr.json")
        if here and BATCHES not in self.keep:
            remove(f"{out}/{BATCHES}")

    def release(self) -> None:
        """Release the lock."""
        self.lock.release()


def claim_remote_output(out: str, fp: str, *, overwrite: bool, protect: Sequence[Any] = (), base: str | None = None,
                        keep: Sequence[str] = (), content: str | None = None) -> RemoteOutput:
    """:func:`spatialscale.output.claim_output` for a URL (the same rules; a lock object instead of a file lock)."""
    out = out.rstrip("/")
    for p in protect:
        if is_url(p) and (_within_url(str(p), out) or _within_url(out, str(p))):
            raise InputError(f"--out {out} overlaps the input {p}; write results elsewhere.")
    check_location(out)
    if exists(out) and not _is_ours_url(out):
        raise InputError(_refusal_url(out))
    lock = RemoteLock(out, hint="wait for it to finish or choose another --out").acquire()
    try:
        claim = _claim_locked_url(out, fp, overwrite, lock, base, content)
        claim.base, claim.keep, claim.content = base, tuple(keep), content
    except BaseException:
        lock.release()
        raise
    return claim


def _claim_locked_url(out: str, fp: str, overwrite: bool, lock: RemoteLock, base: str | None,
                      content: str | None) -> RemoteOutput:
    claim = RemoteOutput(out, fp, lock)
    _remove_stale_siblings(out, lambda u: _is_ours_url(u) and bool(group_attributes(u).get(RESULTS_MARK)))
    if not exists(out):
        claim.staging, claim.resume = out, False
        return claim
    if not _is_ours_url(out):
        raise InputError(_refusal_url(out))
    attrs = group_attributes(out)
    same = attrs.get("fingerprint") == fp
    if same and not overwrite:
        if attrs.get(RESULTS_MARK) and not attrs.get(SWAPPING):
            ds = _verified_results_url(out)
            if ds is not None:
                log.info("%s already holds verified results of these options; nothing to compute", out)
                claim.existing = ds
                return claim
        elif attrs.get(PARTIAL_MARK):
            claim.staging, claim.resume = out, True
            return claim
    elif not overwrite and not (base is not None and attrs.get("base_fingerprint") == base):
        what = "a run with other options"
        if content is not None and attrs.get("content_token") not in (None, content):
            what = "other data (the input was re-ingested or changed since they were computed)"
        raise InputError(f"{out} holds results of {what}; pass overwrite=True (--overwrite) to replace them, or "
                         "choose another --out.")
    if not same:
        claim.previous = out
    staging = sibling(out, f".{_name(out)}.partial-{fp}")
    if same and attrs.get(SWAPPING) and not exists(staging) and exists(f"{out}/{BATCHES}"):
        # this run's swap was interrupted where the output was its staging: its batches are still there
        claim.staging, claim.resume = out, True
        return claim
    if exists(staging):
        if not (_is_ours_url(staging) and group_attributes(staging).get("fingerprint") == fp):
            raise InputError(_refusal_url(staging))
        claim.staging, claim.resume = staging, True
    else:
        claim.staging, claim.resume = staging, False
    return claim


# --------------------------------------------------------------------------- cohorts at URLs
def is_cohort_url(url: str) -> bool:
    """Whether ``url`` holds a cohort folder (its ``cohort.json``)."""
    from spatialscale.cohort import COHORT_FILE, COHORT_MARK

    meta = read_json(f"{url.rstrip('/')}/{COHORT_FILE}")
    return bool(meta and meta.get(COHORT_MARK))


def _mirror(url: str) -> Path:
    """The local folder standing for a cohort at ``url`` (its ``cohort.json``; the sections are replicas)."""
    return cache_dir() / "cohorts" / hashlib.sha256(url.encode()).hexdigest()[:16] / "cohort"


def open_cohort_url(url: str) -> Any:
    """Open the cohort at ``url``: its ``cohort.json`` read there, its sections opened as stores at URLs."""
    import pandas as pd

    from spatialscale.cohort import COHORT_FILE, COHORT_FORMAT, Cohort

    url = url.rstrip("/")
    data = read_bytes(f"{url}/{COHORT_FILE}")
    meta = None
    with contextlib.suppress(ValueError):
        meta = json.loads(data) if data is not None else None
    if not isinstance(meta, dict) or not meta.get("spatialscale_cohort"):
        raise InputError(f"{url} is not a cohort folder (no {COHORT_FILE}); create one with `spatialscale cohort "
                         "ingest`.")
    if meta.get("format") != COHORT_FORMAT:
        raise InputError(f"cohort {url} has format {meta.get('format')!r} (this version reads format "
                         f"{COHORT_FORMAT}); ingest the cohort anew.")
    if not meta.get("sections"):
        raise InputError(f"cohort {url} has no ingested sections yet; run `spatialscale cohort ingest` (again).")
    mirror = _mirror(url)
    mirror.mkdir(parents=True, exist_ok=True)
    tmp = mirror / f".{COHORT_FILE}.{uuid.uuid4().hex[:8]}"
    tmp.write_bytes(data or b"")
    os.replace(tmp, mirror / COHORT_FILE)
    sections = pd.DataFrame(meta["sections"]).set_index("section")
    return Cohort(mirror, sections, url=url)


def ingest_cohort_url(manifest: Any, url: str, ingest: Any, **kwargs: Any) -> Any:
    """:func:`spatialscale.ingest_cohort` into a URL: sections ingested locally, then published.

    Sections already at ``url`` are fetched first, so a re-run ingests only
    what is missing or changed; changed sections are published one by one
    (each swapped into place), then ``cohort.json``.  When some sections
    fail, the good ones are still published and the failures named.
    """
    from spatialscale.cohort import COHORT_FILE

    url = url.rstrip("/")
    check_location(url)
    present = exists(url)
    if present and (is_object(url) or not is_cohort_url(url)):
        raise InputError(f"{url} exists and is not a cohort folder; choose another OUT_DIR (spatialscale never "
                         "replaces what it did not write).")
    work = TemporaryFolder("cohort")
    try:
        local = work.path / "cohort"
        with RemoteLock(url, hint="wait for it to finish"):
            remote_sections: dict[str, str] = {}
            if present:
                local.mkdir()
                (local / COHORT_FILE).write_bytes(read_bytes(f"{url}/{COHORT_FILE}") or b"{}")
                for name in children(f"{url}/sections"):
                    sec = f"{url}/sections/{name}"
                    if name.endswith(".zarr") and _is_store_url(sec):
                        with contextlib.suppress(InputError):
                            remote_sections[name] = store_token(sec)
                            download(sec, local / "sections" / name)
            failure = None
            try:
                ingest(manifest, local, **kwargs)
            except InputError as exc:
                if not (local / COHORT_FILE).is_file() or "section(s) failed" not in str(exc):
                    raise
                failure = exc
            _publish_cohort(local, url, remote_sections)
        if failure is not None:
            raise InputError(str(failure).replace(str(local), url))
    finally:
        work.cleanup()
    return open_cohort_url(url)


def _publish_cohort(local: Path, url: str, remote_sections: dict[str, str]) -> None:
    from spatialscale.cohort import COHORT_FILE
    from spatialscale.output import group_attributes as local_attributes

    kept = set()
    for path in sorted((local / "sections").glob("*.zarr")):
        mark = local_attributes(path).get("spatialscale") or {}
        if not mark.get("complete"):
            continue
        kept.add(path.name)
        target = f"{url}/sections/{path.name}"
        if remote_sections.get(path.name) == mark.get("content_token"):
            continue
        if exists(target) and not _is_store_url(target):
            raise InputError(f"{target} exists and was not written by spatialscale; spatialscale never replaces "
                             "what it did not write: move it away.")
        publish_store(path, target)
    for name in remote_sections:  # sections no longer in the cohort (only isoform stores spatialscale wrote)
        if name not in kept:
            remove(f"{url}/sections/{name}")
    fs, path = filesystem(url)
    with _errors(url, "write"):
        fs.put_file(str(local / COHORT_FILE), f"{path}/{COHORT_FILE}")



# the data layers' entry points hand URLs to these (spatialscale.locations)
for _entry, _handler in {"ingest": ingest_url, "local_input": _local_input, "is_store": _is_store_url,
                         "open_store": open_store_url, "store_token": store_token, "open_results": open_results_url,
                         "claim_output": claim_remote_output, "open_cohort": open_cohort_url,
                         "ingest_cohort": ingest_cohort_url, "is_cohort": is_cohort_url}.items():
    register_url_handler(_entry, _handler)
