"""Where results go: recognised outputs, one run per output, verified batches, a swap at the end.

The rules that keep a user's data safe:

- spatialscale replaces or deletes only what it wrote itself and recognises
  (a zarr group whose attributes carry :data:`RESULTS_MARK` or
  :data:`PARTIAL_MARK`, holding nothing but zarr entries); never an input
  store, the working directory, a folder it did not create or a file;
- an output is claimed only after every option has been validated, under a
  lock (:class:`FileLock`) that a second run on the same output cannot
  take;
- results of another run are never removed first: a new run writes its
  batches beside them (``.<name>.partial-<fingerprint>``), and the finished
  Dataset replaces them only at the end (:meth:`Output.commit`), so a rerun
  that fails leaves the previous results as they were;
- every finished batch carries checksums of its arrays; a batch that is
  missing, truncated or altered is named, discarded and recomputed
  (:class:`PartialStore`); finished results carry checksums too and are
  re-verified before they are reused;
- a batch is committed only by the run that currently owns the output, so
  tasks of a driver that died cannot write into a later run's output.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spatialscale.errors import InputError

__all__ = ["group_attributes", "remove_empty_folders",
           "RESULTS_MARK", "PARTIAL_MARK", "PartialStore", "FileLock", "Output", "claim_output",
           "array_checksum", "dataset_checksums", "open_results", "StaleRunError", "ResultsDamagedError",
           "FileLock", "TemporaryFolder", "write_batch_group"]

log = logging.getLogger("spatialscale")

RESULTS_MARK = "spatialscale_results"
PARTIAL_MARK = "spatialscale_partial"
CHECKSUMS_ATTR = "spatialscale_checksums"
#: the entry of a results checksum record that covers the attributes
ATTRS_KEY = "@attrs"
BATCHES = "_batches"
#: how every lock file spatialscale writes begins (a file without it is not ours)
LOCK_PREFIX = b"pid "
#: what a lock file's name adds to the name of what it locks
LOCK_SUFFIX = ".spatialscale-lock"
SECTIONS = "_sections"
#: 2: checksums cover attributes and are computed on the Dataset as read back
RESULTS_FORMAT = 2


class StaleRunError(RuntimeError):
    """A task tried to record a batch in an output that another run now owns."""


# --------------------------------------------------------------------------- checksums
def array_checksum(values: Any) -> str:
    """SHA-256 of an array's dtype, shape and values (NaNs canonicalised; strings by value)."""
    a = np.asarray(values)
    h = hashlib.sha256()
    if a.dtype.kind in "OUST":  # T: numpy's StringDType, as text coordinates may be read back
        h.update(b"str" + repr(a.shape).encode())
        h.update("\0".join(map(str, a.ravel().tolist())).encode())
        return h.hexdigest()
    a = np.ascontiguousarray(a)
    if a.dtype.kind in "fc":
        a = np.where(np.isnan(a), np.array(np.nan, dtype=a.dtype), a)
    h.update(a.dtype.str.encode() + repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def _plain_json(value: Any) -> Any:
    """numpy scalars and arrays as Python values, for canonical JSON."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def dataset_checksums(ds: Any) -> dict[str, str]:
    """Checksums of every data variable and coordinate of a Dataset, and of its and their attributes.

    The checksums attribute itself is left out; attributes are hashed as
    canonical JSON, so compare checksums of Datasets read back from zarr.
    """
    sums = {str(k): array_checksum(ds[k].values) for k in sorted(map(str, ds.variables))}
    attrs = {"": {str(k): v for k, v in ds.attrs.items() if k != CHECKSUMS_ATTR},
             **{str(k): dict(ds[k].attrs) for k in ds.variables}}
    sums[ATTRS_KEY] = hashlib.sha256(json.dumps(attrs, sort_keys=True, default=_plain_json).encode()).hexdigest()
    return sums


def group_attributes(path: Path) -> dict:
    """The attributes of a zarr v3 group (``{}`` if ``path`` holds none)."""
    try:
        return json.loads((path / "zarr.json").read_text()).get("attributes", {}) or {}
    except (OSError, ValueError):
        return {}


def _set_attrs(path: Path, **attrs: Any) -> None:
    """Update a zarr v3 group's attributes in place (atomic rename of its metadata)."""
    meta_path = path / "zarr.json"
    meta = json.loads(meta_path.read_text())
    meta.setdefault("attributes", {}).update(attrs)
    tmp = path / f".zarr.json.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(meta))
    os.replace(tmp, meta_path)


# --------------------------------------------------------------------------- partial results
@dataclass
class _Named:
    """A batch known only by its name (for copying recorded batches)."""

    name: str


class PartialStore:
    """Per-batch results of one run, under ``<root>/_batches/<batch>``, each with checksums.

    Parameters
    ----------
    root
        The run's staging group (the output itself, or a sibling while other
        results stay in place), or a section's folder inside it.
    fp
        Fingerprint of the run's options: batches of other runs are ignored.
    run_id
        The run that owns ``owner``; :meth:`write` refuses once another run
        has taken it over (``None``: no ownership check).
    owner
        The staging group whose ``run_id`` decides (default ``root``).
    """

    def __init__(self, root: str | os.PathLike, fp: str, run_id: str | None = None,
                 owner: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.fp = fp
        self.run_id = run_id
        self.owner = Path(owner) if owner is not None else self.root

    def _path(self, batch: Any) -> Path:
        return self.root / BATCHES / batch.name

    def load(self, batch: Any) -> dict[str, np.ndarray] | None:
        """The batch's verified result, or ``None`` if it must be (re)computed.

        A batch that exists but fails verification (missing or unreadable
        chunk, changed bytes, missing arrays) is named in a warning and
        removed, so that it is recomputed.
        """
        path = self._path(batch)
        result, problem = self._verified(path)
        if problem is None:
            return result
        if problem:
            log.warning("batch %s in %s is damaged (%s); recomputing it.", batch.name, self.root, problem)
            shutil.rmtree(path, ignore_errors=True)
        return None

    def _verified(self, path: Path) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """A recorded batch's arrays and ``None``, or ``None`` and why not (``""``: not one of this run's).

        A record names the batch (its gene range) it was written for: one
        found under another batch's name (moved or swapped) is rejected.
        """
        attrs = group_attributes(path)
        if attrs.get("fingerprint") != self.fp or not attrs.get("done"):
            return None, ""
        if attrs.get("batch") != path.name:
            return None, f"recorded for batch {attrs.get('batch')!r}, found as {path.name} (moved)"
        try:
            result = self._read(path)
        except Exception as exc:  # noqa: BLE001 - any unreadable chunk means: recompute
            return None, f"unreadable ({type(exc).__name__}: {exc})"
        sums = attrs.get("checksums") or {}
        if sorted(sums) != sorted(result):
            return None, "arrays are missing"
        bad = [k for k, v in result.items() if array_checksum(v) != sums[k]]
        if bad:
            return None, f"checksum mismatch in {', '.join(bad)}"
        return result, None

    def is_done(self, batch: Any) -> bool:
        """Whether the batch is recorded and verifies."""
        return self.load(batch) is not None

    def read(self, batch: Any) -> dict[str, np.ndarray]:
        """The batch's recorded result (verified)."""
        out = self.load(batch)
        if out is None:
            raise KeyError(f"batch {batch.name} is not recorded in {self.root}")
        return out

    @staticmethod
    def _read(path: Path) -> dict[str, np.ndarray]:
        import zarr

        g = zarr.open_group(str(path), mode="r")
        return {k: np.asarray(g[k][...]) for k in g.array_keys()}

    def adopt(self, other: str | os.PathLike) -> int:
        """Copy the verified batches of this run's fingerprint from another record (``other``); returns how many.

        Batches already recorded here are left as they are.
        """
        source = Path(other) / BATCHES
        if not source.is_dir():
            return 0
        n = 0
        for path in sorted(source.iterdir()):
            if path.name.startswith(".") or (self.root / BATCHES / path.name).exists():
                continue
            result, problem = self._verified(path)  # the other record is only read, never changed
            if problem:
                log.warning("batch %s in %s is damaged (%s); it is recomputed.", path.name, source.parent, problem)
            if result is None:
                continue
            self.write(_Named(path.name), result)
            n += 1
        return n

    def check_owner(self) -> None:
        """Raise :class:`StaleRunError` unless this run still owns :attr:`root`."""
        if self.run_id is None:
            return
        owner = group_attributes(self.owner).get("run_id")
        if owner != self.run_id:
            raise StaleRunError(f"{self.owner} is now owned by another run; this run's batch was discarded.")

    def section(self, key: str, fp: str) -> PartialStore:
        """The record of one section of a cohort run (``_sections/<key>``), owned with this record."""
        return PartialStore(self.root / SECTIONS / key, fp, self.run_id, owner=self.owner)

    def write(self, batch: Any, result: dict[str, np.ndarray]) -> None:
        """Record a batch: arrays and checksums in a temporary group, renamed into place."""
        self.check_owner()
        final = self._path(batch)
        tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            write_batch_group(tmp, result, self.fp, final.name)
            self.check_owner()
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def write_batch_group(path: Path, result: dict[str, np.ndarray], fp: str, name: str | None = None) -> None:
    """Write a batch's arrays as a new zarr group at ``path``, with their checksums and the batch's name."""
    import zarr

    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    sums = {}
    for k, v in result.items():
        v = np.asarray(v)
        g.create_array(k, shape=v.shape, dtype=v.dtype, chunks=v.shape or None)[...] = v
        sums[k] = array_checksum(v)
    g.attrs.update({"done": True, "fingerprint": fp, "checksums": sums, "batch": name or Path(path).name})


# --------------------------------------------------------------------------- lock
class FileLock:
    """A lock on a store, cohort or output: exclusive for the run that writes it, shared for runs that read it.

    The lock is ``flock`` on a sibling file ``.<name>.spatialscale-lock``, a
    name no user file has; it is created exclusively and begins with
    :data:`LOCK_PREFIX`, and a file of that name with other content is never
    used, rewritten or removed.  The lock dies with the process holding it, so
    a killed run never blocks the next one; the file is removed by the last
    holder.

    Parameters
    ----------
    target
        What is locked (a store, a cohort folder, a results path).
    shared
        A reader's lock: several readers at once, no writer meanwhile.
    hint
        What to do when it is busy (ends the error message).
    """

    def __init__(self, target: Path, *, shared: bool = False, hint: str = "wait for it to finish") -> None:
        self.target = Path(target)
        self.path = self.target.with_name(f".{self.target.name}{LOCK_SUFFIX}")
        self.shared = shared
        self.hint = hint
        self._fd: int | None = None

    def _open(self) -> int:
        """A descriptor of the lock file, created exclusively if there is none (refusing a file not ours)."""
        import time

        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
            except FileExistsError:
                try:
                    fd = os.open(self.path, os.O_RDWR)
                except FileNotFoundError:  # removed by its last holder meanwhile
                    continue
                except PermissionError:
                    if not self.shared:
                        raise
                    return -1  # a read-only place: nobody writes there either
            except OSError as exc:
                if not self.shared or exc.errno not in (errno.EACCES, errno.EROFS, errno.EPERM):
                    raise
                return -1
            else:
                os.pwrite(fd, self._info(), 0)
                return fd
            head = b""
            for _ in range(20):  # a lock file just created is written at once; wait for its first line
                head = os.pread(fd, len(LOCK_PREFIX), 0)
                if head:
                    break
                time.sleep(0.05)
            if head != LOCK_PREFIX:
                os.close(fd)
                raise InputError(f"{self.path} exists and is not a spatialscale lock; spatialscale never uses or "
                                 "removes it: move it away.")
            return fd

    @staticmethod
    def _info() -> bytes:
        return (f"{LOCK_PREFIX.decode()}{os.getpid()} on {socket.gethostname()} since "
                f"{_dt.datetime.now(_dt.UTC).isoformat(timespec='seconds')}").encode()

    def acquire(self) -> FileLock:
        """Take the lock without waiting; a busy one is an :class:`InputError` naming who holds it."""
        import fcntl

        while True:
            fd = self._open()
            if fd < 0:  # a reader in a folder it cannot write: no lock file, the end-of-run check still holds
                log.info("no reader's lock on %s (its folder is read-only)", self.target)
                return self
            try:
                fcntl.flock(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                readers = False
                if not self.shared:  # held by readers (shared) or by a writer?
                    try:
                        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                        readers = True
                    except BlockingIOError:
                        pass
                holder = ""
                with contextlib.suppress(OSError):
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
                os.close(fd)
                doing = "read by a spatialscale run" if readers else "written by another spatialscale run"
                raise InputError(f"{self.target} is being {doing} ({holder or 'unknown'}); {self.hint}.") from None
            try:  # the file may have been removed by its last holder: lock the file that is there
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        if not self.shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._info(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Release the lock; the last holder removes the file."""
        import fcntl

        if self._fd is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # nobody else holds it
            with contextlib.suppress(OSError):
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    os.unlink(self.path)
        except BlockingIOError:
            pass  # other readers still hold it; the last one removes it
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# --------------------------------------------------------------------------- temporary folders
#: file inside a temporary folder naming the process that owns it
OWNER_FILE = ".spatialscale-owner"


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return False


def remove_orphaned_temporaries(kind: str, folder: str | os.PathLike | None = None) -> list[Path]:
    """Remove ``spatialscale-<kind>-*`` temporary folders whose owning process (on this host) is gone.

    Only folders holding spatialscale's owner file are considered; returns what was removed.
    """
    import tempfile

    base = Path(folder or tempfile.gettempdir())
    host = socket.gethostname()
    removed = []
    for path in base.glob(f"spatialscale-{kind}-*"):
        try:
            owner = json.loads((path / OWNER_FILE).read_text())
            if owner["host"] != host or _process_alive(int(owner["pid"]), float(owner["started"])):
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


class TemporaryFolder:
    """A temporary folder owned by this process (``spatialscale-<kind>-*``), removed by :meth:`cleanup`.

    It records its owner (pid, process start time, host); folders of the
    same kind left by processes that were killed are removed when the next
    one is made.  Use as a context manager (the folder's path) or keep it and
    call :meth:`cleanup`.
    """

    def __init__(self, kind: str) -> None:
        import tempfile

        import psutil

        for path in remove_orphaned_temporaries(kind):
            log.info("removed %s, left by a spatialscale process that is gone", path)
        self.path = Path(tempfile.mkdtemp(prefix=f"spatialscale-{kind}-"))
        (self.path / OWNER_FILE).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                        "started": psutil.Process().create_time()}))

    def cleanup(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        self.cleanup()


# --------------------------------------------------------------------------- claiming an output
def _is_ours(path: Path) -> bool:
    """A zarr group spatialscale wrote (marker) that holds nothing but zarr entries."""
    if not path.is_dir() or path.is_symlink():
        return False
    attrs = group_attributes(path)
    return bool(attrs.get(RESULTS_MARK) or attrs.get(PARTIAL_MARK)) and not _stray_entries(path)


def _stray_entries(path: Path) -> list[str]:
    """Entries of a results folder that are not spatialscale's zarr content."""
    return [e.name for e in path.iterdir()
            if e.name not in ("zarr.json", BATCHES, SECTIONS) and not e.name.startswith(".zarr.json.")
            and not (e.is_dir() and (e / "zarr.json").exists())]


def _within(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or inside it."""
    return a == b or b in a.parents


def _refusal(out: Path) -> str:
    if not out.is_dir():
        return f"{out} exists and is not a spatialscale results folder; choose another --out."
    attrs = group_attributes(out)
    if not (attrs.get(RESULTS_MARK) or attrs.get(PARTIAL_MARK)):
        if attrs.get("spatialscale"):
            return f"{out} is an isoform store, not results; choose another --out."
        return (f"{out} exists and was not written by spatialscale; spatialscale never replaces what it did not "
                "write: choose another --out.")
    stray = _stray_entries(out)
    return (f"{out} holds files spatialscale did not write ({', '.join(stray[:3])}); move them or choose "
            "another --out.")


@dataclass
class Output:
    """A claimed output: where batches go now, and how results replace what was there."""

    out: Path
    fp: str
    lock: FileLock
    staging: Path | None = None
    resume: bool = False
    existing: Any = None
    partial: PartialStore | None = None
    created: list[Path] = field(default_factory=list)
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    base: str | None = None
    keep: tuple[str, ...] = ()
    previous: Path | None = None
    content: str | None = None

    def start(self) -> PartialStore:
        """Create (or take over, for resuming) the staging group; the first write of the run."""
        if self.partial is None:
            log.info("%s batches in %s", "resuming" if self.resume else "recording", self.staging)
            if self.resume:
                _set_attrs(self.staging, run_id=self.run_id)  # from now on only this run commits batches here
                self.partial = PartialStore(self.staging, self.fp, self.run_id)
            else:
                self.partial = _new_partial(self.staging, self.fp, self.run_id, self.base, self.content)
        return self.partial

    def commit(self, ds: Any) -> None:
        """Write the final Dataset beside ``out``, then swap it in and remove the staged batches.

        If writing fails (e.g. a full disk) the finished batches are kept, so
        re-running the same command resumes from them, and ``out`` is left
        as it was.
        """
        import warnings

        out = self.out
        tmp = out.with_name(f".{out.name}.final-{uuid.uuid4().hex[:8]}")
        ds = ds.copy()
        ds.attrs.update({RESULTS_MARK: True, "fingerprint": self.fp, "results_format": RESULTS_FORMAT})
        if self.base is not None:
            ds.attrs["base_fingerprint"] = self.base
        if self.content is not None:
            ds.attrs["content_token"] = self.content
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.to_zarr(tmp, mode="w-", consolidated=True, zarr_format=3)
            # checksums of the Dataset as it reads back (values and attributes), beside the mark
            _set_attrs(tmp, **{CHECKSUMS_ATTR: json.dumps(dataset_checksums(_read_dataset(tmp)))})
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                where = self.partial.root if self.partial is not None else out
                raise OSError(
                    f"could not write results to {out} ({exc.strerror or exc}); finished batches are kept in "
                    f"{where}/{BATCHES} and re-running the same command resumes from them."
                ) from exc
            raise
        for name in self.keep:  # recorded batches that stay with the results (to extend them later)
            if self.staging is not None and (self.staging / name).is_dir():
                os.replace(self.staging / name, tmp / name)
        old = None
        if out.exists():
            if not _is_ours(out):  # changed under us since the claim: never replace it
                shutil.rmtree(tmp, ignore_errors=True)
                raise InputError(_refusal(out))
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        os.replace(tmp, out)
        log.info("results written to %s", out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if self.staging is not None and self.staging != out and self.staging.exists():
            shutil.rmtree(self.staging, ignore_errors=True)

    def release(self) -> None:
        """Release the lock; folders the claim created and never used are removed."""
        self.lock.release()
        if self.partial is None and not self.out.exists():
            remove_empty_folders(self.created)


class ResultsDamagedError(InputError):
    """Results on disk that are unreadable or do not match the checksums written with them."""


def _read_dataset(path: Path) -> Any:
    import xarray as xr

    return xr.open_zarr(str(path), consolidated=None).load()


def open_results(path: str | os.PathLike, *, verify: bool = True) -> Any:
    """Open results written by spatialscale (loaded into memory; results are small), verified by default.

    Parameters
    ----------
    path
        A results zarr written with ``out=`` (``--out``), or its URL (downloaded and verified).
    verify
        Check every variable, coordinate and attribute against the checksums
        written with the results (``False``: skip, e.g. to look at damaged
        results).

    Raises
    ------
    InputError
        ``path`` is not spatialscale's results, or (:class:`ResultsDamagedError`)
        they are unreadable or do not match their checksums.
    """
    from spatialscale.locations import is_url, url_handler

    if is_url(path):
        return url_handler("open_results")(str(path), verify=verify)
    path = Path(os.path.abspath(path))
    attrs = group_attributes(path)
    if not attrs.get(RESULTS_MARK):
        if not path.exists():
            raise InputError(f"no results at {path}.")
        raise InputError(f"{path} holds no spatialscale results" +
                         (" (an unfinished run: re-run the same command to finish it)." if attrs.get(PARTIAL_MARK)
                          else "."))
    fmt = attrs.get("results_format", 1)
    if verify and fmt != RESULTS_FORMAT:
        raise ResultsDamagedError(f"results in {path} were written by another spatialscale (results format {fmt!r}, "
                                  f"this version checks format {RESULTS_FORMAT}); re-run the command with --overwrite "
                                  "or open them with verify=False.")
    try:
        ds = _read_dataset(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable chunk or metadata
        why = " ".join(str(exc).split())[:200]
        raise ResultsDamagedError(f"results in {path} are damaged (unreadable: {type(exc).__name__}: {why}); re-run "
                                  "the command with --overwrite.") from None
    if verify:
        try:
            sums = json.loads(ds.attrs.get(CHECKSUMS_ATTR, "null"))
        except ValueError:
            sums = None
        if not isinstance(sums, dict):
            raise ResultsDamagedError(f"results in {path} carry no readable checksums; re-run the command with "
                                      "--overwrite.")
        found = dataset_checksums(ds)
        bad = sorted(k for k in set(sums) | set(found) if sums.get(k) != found.get(k))
        if bad:
            what = ", ".join("attributes" if k == ATTRS_KEY else k for k in bad[:4])
            raise ResultsDamagedError(f"results in {path} are damaged ({what} do not match the checksums written "
                                      "with them); re-run the command with --overwrite.")
    ds.attrs.pop(CHECKSUMS_ATTR, None)
    return ds


def _verified_results(out: Path) -> Any | None:
    """The finished results at ``out`` if their checksums verify, else ``None`` (logged)."""
    try:
        return open_results(out)
    except InputError as exc:
        log.warning("%s; recomputing them.", str(exc).rstrip("."))
        return None


def _new_partial(path: Path, fp: str, run_id: str, base: str | None = None, content: str | None = None) -> PartialStore:
    import zarr

    g = zarr.open_group(str(path), mode="w-", zarr_format=3)
    g.attrs.update({PARTIAL_MARK: True, "fingerprint": fp, "run_id": run_id,
                    **({"base_fingerprint": base} if base is not None else {}),
                    **({"content_token": content} if content is not None else {})})
    return PartialStore(path, fp, run_id)


def claim_output(out: Path, fp: str, *, overwrite: bool, protect: Sequence[Path] = (), base: str | None = None,
                 keep: Sequence[str] = (), content: str | None = None) -> Output:
    """Claim ``out`` for a run with fingerprint ``fp``; call after every option has been validated.

    Parameters
    ----------
    out
        Results path (made absolute), or a URL (``s3://...``: the same rules, see
        :func:`spatialscale.remote.claim_remote_output`).
    fp
        Fingerprint of the run's options.
    overwrite
        Whether results of another run (written by spatialscale) may be
        replaced at the end.
    protect
        Inputs that must not be, contain or lie inside ``out``.
    base
        Fingerprint of what the run computes apart from its coverage (a
        cohort's options without its set of sections): results or staged
        batches of the same ``base`` are extended without ``overwrite``
        (:attr:`Output.previous` names them, to reuse their batches).
    keep
        Folders of the staging group moved into the results at the end
        (a cohort's per-section batches).
    content
        Content token of the data the run reads (recorded with the results;
        results of other data are named as such).

    Returns
    -------
    Output
        With ``existing`` set when ``out`` already holds verified results of
        the same run (nothing to compute); else :meth:`Output.start` creates
        (or resumes) the staging group where batches go.  Nothing is written
        before that.

    Raises
    ------
    InputError
        ``out`` is an input, the working directory or a folder above it,
        something spatialscale did not write, results of other options
        without ``overwrite``, or locked by another run.
    """
    from spatialscale.locations import is_url, url_handler

    if is_url(out):
        return url_handler("claim_output")(str(out), fp, overwrite=overwrite, protect=protect, base=base, keep=keep,
                                   content=content)
    out = Path(os.path.abspath(out))
    for p in protect:
        if is_url(p):
            continue
        p = Path(os.path.abspath(p))
        if _within(p, out) or _within(out, p):
            raise InputError(f"--out {out} overlaps the input {p}; write results elsewhere.")
    if _within(Path.cwd(), out):
        raise InputError(f"--out {out} is the working directory or a folder above it; name a new folder.")
    if out.exists() and not _is_ours(out):
        raise InputError(_refusal(out))
    parent = out.parent
    if parent.exists() and not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write into {parent} (permission denied); choose another --out.")
    created = [d for d in [parent, *parent.parents] if not d.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {parent} ({exc.strerror or exc}); choose another --out.") from exc
    try:
        try:
            lock = FileLock(out, hint="wait for it to finish or choose another --out").acquire()
        except OSError as exc:
            raise InputError(f"cannot write into {parent} ({exc.strerror or exc}); choose another --out.") from None
        claim = _claim_locked(out, fp, overwrite, lock, base, content)
        claim.base, claim.keep, claim.content = base, tuple(keep), content
    except BaseException:
        with contextlib.suppress(UnboundLocalError):
            lock.release()
        remove_empty_folders(created)
        raise
    claim.created = created
    return claim


def remove_empty_folders(folders: list[Path]) -> None:
    """Remove folders a claim created, deepest first, if they are still empty."""
    for d in folders:
        with contextlib.suppress(OSError):
            d.rmdir()


def _claim_locked(out: Path, fp: str, overwrite: bool, lock: FileLock, base: str | None = None,
                  content: str | None = None) -> Output:
    claim = Output(out, fp, lock)
    if not out.exists():
        claim.staging, claim.resume = out, False
        return claim
    if not _is_ours(out):  # re-checked under the lock
        raise InputError(_refusal(out))
    attrs = group_attributes(out)
    same = attrs.get("fingerprint") == fp
    if same and not overwrite:
        if attrs.get(RESULTS_MARK):
            ds = _verified_results(out)
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
    if not same:  # recorded batches there are reused where their fingerprints match (not when forced anew)
        claim.previous = out
    # other results stay in place until the new ones are complete
    staging = out.with_name(f".{out.name}.partial-{fp}")
    if staging.exists():
        if not (_is_ours(staging) and group_attributes(staging).get("fingerprint") == fp):
            raise InputError(_refusal(staging))
        claim.staging, claim.resume = staging, True
    else:
        claim.staging, claim.resume = staging, False
    return claim
