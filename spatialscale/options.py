"""Execution options: where and how a run's tasks execute, validated before anything is written.

Every entry point (``sv_test``, ``du_test``, ``glmm_fit``, ``feature_summary``
and the CLI) builds one :class:`ExecutionOptions` and calls
:meth:`ExecutionOptions.validated` first, so that a bad option is an
:class:`~spatialscale.errors.InputError` that names it, before any store,
result or cluster is touched.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from spatialscale.errors import InputError

__all__ = ["ExecutionOptions", "DEVICES", "check_scheduler_address", "cuda_available", "is_scheduler_file",
           "read_scheduler_file"]

DEVICES = ("cpu", "cuda", "auto")
#: seconds to wait for an existing scheduler to answer
CONNECT_TIMEOUT_S = 10.0
#: seconds for a listener to answer Dask's handshake before it is declared no scheduler
HANDSHAKE_TIMEOUT_S = 5.0


#: device nodes of a GPU driver (NVIDIA; AMD's ROCm, which torch also drives as "cuda")
_GPU_NODES = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")


def cuda_available() -> bool:
    """Whether torch sees a CUDA device in this process (creates no CUDA context).

    On Linux a machine without any GPU driver's device node has no CUDA device:
    that is answered without importing torch (about a second per worker).
    """
    import os
    import sys

    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in _GPU_NODES):
        return False
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def _positive_int(name: str, value: Any, flag: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise InputError(f"{name} must be a whole number >= 1 (got {value!r}; {flag}).")
    return int(value)


def _parse_memory(value: Any) -> int | str:
    if value == "auto":
        return "auto"
    if isinstance(value, bool):
        raise InputError(f"batch_memory must be a size such as '256MB' or 'auto' (got {value!r}).")
    try:
        if isinstance(value, int | float):
            size = int(value)
        else:
            from dask.utils import parse_bytes

            size = int(parse_bytes(str(value)))
    except (ValueError, TypeError, KeyError) as exc:
        raise InputError(f"batch_memory {value!r} is not a size; use e.g. '256MB', '2GiB' or 'auto'.") from exc
    if size < 64 << 10:
        raise InputError(f"batch_memory {value!r} is below 64 KiB; use e.g. '256MB' or 'auto'.")
    return size


def check_scheduler_address(address: str) -> str:
    """Validate a scheduler address (``tcp://host:port``, ``tls://...``) and that a Dask scheduler answers there.

    The address must parse; for ``tcp`` / ``tls`` something must accept a
    connection (a refused or unroutable address fails within seconds) and
    then speak Dask's protocol: a listener that never answers, a web server
    or the dashboard's port fails after :data:`HANDSHAKE_TIMEOUT_S` with a
    named error instead of the client's long connection retries.  ``tls``
    needs the client's certificates in Dask's configuration.  Returns the
    address unchanged.
    """
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, loc = parse_address(address)
        host, port = parse_host_port(loc)
    except ValueError as exc:
        raise InputError(
            f"scheduler {address!r} is not a Dask scheduler address such as tcp://host:8786 ({exc})."
        ) from exc
    if scheme not in registry.backends:
        raise InputError(f"scheduler {address!r} has unknown protocol {scheme!r} "
                         f"(known: {', '.join(sorted(registry.backends))}).")
    if scheme not in ("tcp", "tls") or not host:
        return address
    connection_args = _tls_connection_args(address) if scheme == "tls" else {}
    try:
        with socket.create_connection((host, int(port)), timeout=min(CONNECT_TIMEOUT_S, 5.0)):
            pass
    except OSError as exc:
        raise InputError(f"no Dask scheduler reachable at {address} ({exc.strerror or exc or 'timed out'}).") from None
    _handshake(address, connection_args)
    return address


def _tls_connection_args(address: str) -> dict[str, Any]:
    """The client's TLS settings from Dask's configuration (a named error when there are none)."""
    from distributed.security import Security

    try:
        security = Security()
    except Exception as exc:  # noqa: BLE001 - unreadable certificate paths and the like
        raise InputError(f"the TLS settings in Dask's configuration are unusable ({exc}).") from None
    if not (security.tls_ca_file and security.tls_client_cert):
        raise InputError(f"scheduler {address} uses TLS: give the client its certificates through Dask's "
                         "configuration (DASK_DISTRIBUTED__COMM__TLS__CA_FILE, "
                         "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT, DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY; see "
                         "deploy/README.md).")
    try:
        return security.get_connection_args("client")
    except Exception as exc:  # noqa: BLE001 - missing or malformed certificate files
        raise InputError(f"the client's TLS certificates for {address} cannot be loaded ({exc}).") from None


def _handshake(address: str, connection_args: dict[str, Any]) -> None:
    """Exchange Dask's handshake and an ``identity`` request with ``address``; a named error unless a scheduler answers.

    Runs in a thread of its own, so it works inside a running event loop (Jupyter).
    """
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    from distributed.comm import connect

    async def identity() -> Any:
        comm = await connect(address, timeout=HANDSHAKE_TIMEOUT_S, **connection_args)
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            await comm.close()

    def probe() -> Any:
        return asyncio.run(asyncio.wait_for(identity(), HANDSHAKE_TIMEOUT_S))

    with ThreadPoolExecutor(1) as pool:
        try:
            answer = pool.submit(probe).result()
        except TimeoutError:
            raise InputError(f"{address} accepts connections but did not answer as a Dask scheduler within "
                             f"{HANDSHAKE_TIMEOUT_S:g} s (another service, or the dashboard's port?).") from None
        except Exception as exc:  # noqa: BLE001 - a web server's reply, a TLS mismatch, a closed stream...
            why = (" ".join(str(exc).split())[:200] or type(exc).__name__) if not isinstance(exc, MemoryError) \
                else "its reply is no Dask message"
            raise InputError(f"{address} did not answer as a Dask scheduler ({type(exc).__name__}: {why}).") from None
    if not isinstance(answer, dict) or answer.get("type") != "Scheduler":
        kind = answer.get("type") if isinstance(answer, dict) else type(answer).__name__
        raise InputError(f"{address} answers Dask's protocol but is not a scheduler (it is a {kind}).")


def read_scheduler_file(path: str) -> str:
    """The scheduler address in a Dask scheduler file (a named error for a missing or unreadable one)."""
    import json

    try:
        info = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise InputError(f"scheduler file {path} does not exist.") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"scheduler file {path} is not a Dask scheduler file (JSON with an address): {exc}.") from None
    address = info.get("address") if isinstance(info, dict) else None
    if not isinstance(address, str) or "://" not in address:
        raise InputError(f"scheduler file {path} names no scheduler address (expected JSON with \"address\": "
                         "\"tcp://host:port\").")
    return address


@dataclass(frozen=True)
class ExecutionOptions:
    """Where tasks run and where results go.

    Parameters
    ----------
    client
        A ``distributed.Client`` to run on.
    scheduler
        Address of an existing scheduler (``tcp://host:8786``, ``tls://...``), a
        scheduler file (``.json``), or ``"threads"`` for local threads.
    workers
        Start a LocalCluster (bound to 127.0.0.1) with this many processes.
    device
        ``cpu``, ``cuda`` or ``auto`` (resolved on each worker).
    batch_memory
        Working memory of one task (``"256MB"``, bytes, or ``"auto"``).
    batch_size
        Cap on genes per batch (results do not depend on it).
    out
        Results zarr (made absolute on the client), or a URL (``s3://...``,
        any fsspec URL; docs/object-storage.md); ``None`` keeps results in
        memory.
    overwrite
        Replace results that spatialscale wrote at ``out`` (never anything else).
    progress
        Show a progress bar of batches.
    """

    client: Any = None
    scheduler: str | None = None
    workers: int | None = None
    device: str = "cpu"
    batch_memory: int | str = "256MB"
    batch_size: int | None = None
    out: str | os.PathLike | None = None
    overwrite: bool = False
    progress: bool = True

    def validated(self) -> ExecutionOptions:
        """A checked, normalised copy (absolute ``out``, ``batch_memory`` in bytes or ``"auto"``).

        Raises
        ------
        InputError
            Naming the first invalid option.  Nothing is written or started.
        """
        given = [k for k in ("client", "scheduler", "workers") if getattr(self, k) is not None]
        if len(given) > 1:
            raise InputError(f"give one of client, scheduler and workers (got {', '.join(given)}).")
        if self.device not in DEVICES:
            raise InputError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}.")
        workers = None if self.workers is None else _positive_int("workers", self.workers, "--workers")
        batch_size = None if self.batch_size is None else _positive_int("batch_size", self.batch_size,
                                                                        "--batch-size")
        memory = _parse_memory(self.batch_memory)
        scheduler = self.scheduler
        if scheduler is not None:
            if not isinstance(scheduler, str) or not scheduler.strip():
                raise InputError(f"scheduler must be an address, a scheduler file or 'threads' (got {scheduler!r}).")
            if is_scheduler_file(scheduler):
                check_scheduler_address(read_scheduler_file(scheduler))
                scheduler = str(Path(scheduler).resolve())
            elif scheduler != "threads":
                check_scheduler_address(scheduler)
        local = self.client is None and scheduler in (None, "threads")
        if self.device == "cuda" and local and not cuda_available():
            raise InputError("device 'cuda' was requested but this machine has no CUDA device "
                             "(torch.cuda.is_available() is False); use --device cpu or auto.")
        from spatialscale.locations import is_url

        if self.out is None or is_url(self.out):  # a URL (s3://...) stays as it is: spatialscale.remote
            out = None if self.out is None else str(self.out).rstrip("/")
        else:
            out = Path(os.path.abspath(os.fspath(self.out)))
        return replace(self, scheduler=scheduler, workers=workers, batch_size=batch_size, batch_memory=memory,
                       out=out, overwrite=bool(self.overwrite), progress=bool(self.progress))


def is_scheduler_file(value: str) -> bool:
    """Whether a ``scheduler`` value names a scheduler file rather than an address."""
    return value.endswith(".json") and "://" not in value
