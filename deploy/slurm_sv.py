"""Run the spatial-variability tests on a SLURM cluster through dask-jobqueue.

The Dask scheduler runs inside this script (start it on a login node or in a
small allocation); every SLURM job it submits hosts Dask workers.  CPU jobs
run one single-threaded worker per core; ``--gpu`` jobs ask for one GPU and
run a dask-cuda worker on it.  The store and the results must lie on a
filesystem every node sees, under the same absolute path.

Every connection uses TLS with client certificates, so only holders of the
key can reach the scheduler or the workers.  By default the certificates are
made afresh for each run (``Security.temporary()``, self-signed) and the
workers' copy is written, readable only by you, to ``--tls-dir`` (default
``~/.spatialscale/tls``, which must be on a filesystem the compute nodes see).
Give ``--tls-ca-file --tls-cert --tls-key`` to use your own certificate files
instead.  The dashboard listens on 127.0.0.1 only; reach it with
``ssh -L 8787:127.0.0.1:8787 HOST``.

Examples
--------
CPU, 8 jobs of 8 single-threaded workers::

    python deploy/slurm_sv.py /shared/sample.zarr --out /shared/sv.zarr \\
        --jobs 8 --cores 8 --memory 32GB --partition compute

GPU, 4 jobs of one GPU each::

    python deploy/slurm_sv.py /shared/sample.zarr --out /shared/sv.zarr --jobs 4 --gpu --partition gpu
"""

from __future__ import annotations

import argparse
import os
import stat
from typing import Any

DEFAULT_TLS_DIR = "~/.spatialscale/tls"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="isoform store (from `spatialscale ingest`) on a shared filesystem")
    p.add_argument("--out", required=True, help="results zarr on a shared filesystem (resumes if interrupted)")
    p.add_argument("--method", default="hsic-ir", choices=("hsic-ir", "hsic-ic", "hsic-gc"))
    p.add_argument("--null", default="liu", choices=("liu", "welch", "perm"))
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs to submit (default 4)")
    p.add_argument("--cores", type=int, default=8, help="CPUs per job; CPU jobs run one worker per core (8)")
    p.add_argument("--memory", default="32GB", help="memory per job, shared by its workers (32GB)")
    p.add_argument("--walltime", default="02:00:00", help="job time limit (02:00:00)")
    p.add_argument("--partition", "--queue", dest="queue", default=None, help="SLURM partition")
    p.add_argument("--account", default=None, help="SLURM account to charge")
    p.add_argument("--gpu", action="store_true", help="one GPU per job (--gres=gpu:1), dask-cuda worker, device cuda")
    p.add_argument("--local-directory", default=None, help="node-local scratch for workers, e.g. /tmp")
    p.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the first worker (3600)")
    p.add_argument("--interface", default=None, help="network interface of scheduler and workers, e.g. ib0")
    p.add_argument("--dashboard-address", default="127.0.0.1:8787",
                   help="where the dashboard listens (127.0.0.1:8787: this machine only)")
    tls = p.add_argument_group("TLS", "default: temporary self-signed certificates, made for this run")
    tls.add_argument("--tls-ca-file", default=None, help="CA certificate (PEM) that signed --tls-cert")
    tls.add_argument("--tls-cert", default=None, help="certificate (PEM) of the scheduler, workers and client")
    tls.add_argument("--tls-key", default=None, help="private key (PEM) of --tls-cert; must be readable only by you")
    tls.add_argument("--tls-dir", default=DEFAULT_TLS_DIR,
                     help="private directory on the shared filesystem for the workers' copy of the temporary "
                          f"certificates ({DEFAULT_TLS_DIR}; made with mode 700)")
    return p.parse_args(argv)


def _private_dir(path: str) -> str:
    """``path`` expanded, created if missing, and closed to group and others (mode 700)."""
    path = os.path.abspath(os.path.expanduser(os.path.expandvars(path)))
    os.makedirs(path, mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def make_security(args: argparse.Namespace) -> tuple[Any, str | None]:
    """The ``distributed.Security`` of the run, and the private directory for temporary worker certificates.

    With ``--tls-ca-file/--tls-cert/--tls-key`` the scheduler, the workers and
    this client use those files (they must lie on the shared filesystem);
    otherwise ``Security.temporary()`` makes a self-signed certificate in
    memory, and dask-jobqueue writes the workers' copy (files of mode 600)
    into ``--tls-dir``.
    """
    from distributed.security import Security

    files = {"--tls-ca-file": args.tls_ca_file, "--tls-cert": args.tls_cert, "--tls-key": args.tls_key}
    given = [k for k, v in files.items() if v]
    if not given:
        try:
            return Security.temporary(), _private_dir(args.tls_dir)
        except ImportError as exc:
            raise SystemExit("temporary TLS certificates need `cryptography`: pip install cryptography, "
                             "or pass --tls-ca-file --tls-cert --tls-key") from exc
    if len(given) < len(files):
        raise SystemExit(f"give all of {', '.join(files)} (got only {', '.join(given)})")
    ca, cert, key = (os.path.abspath(os.path.expanduser(v)) for v in files.values())
    for flag, path in zip(files, (ca, cert, key)):
        if not os.path.isfile(path):
            raise SystemExit(f"{flag} {path}: no such file")
    if os.stat(key).st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SystemExit(f"--tls-key {key} is readable by others; run: chmod 600 {key}")
    sec = Security(
        tls_ca_file=ca,
        tls_scheduler_cert=cert,
        tls_scheduler_key=key,
        tls_worker_cert=cert,
        tls_worker_key=key,
        tls_client_cert=cert,
        tls_client_key=key,
        require_encryption=True,
    )
    return sec, None


def make_cluster(args: argparse.Namespace) -> Any:
    """The ``SLURMCluster`` for ``args`` (TLS on every connection); no job is submitted until it is scaled."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise SystemExit("slurm_sv.py needs dask-jobqueue: pip install dask-jobqueue") from exc

    security, tls_dir = make_security(args)
    common: dict[str, Any] = dict(
        queue=args.queue,
        account=args.account,
        memory=args.memory,
        walltime=args.walltime,
        local_directory=args.local_directory,
        job_name="spatialscale",
        job_script_prologue=["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1"],
        # scheduler and workers speak TLS only and ask every peer for a certificate
        protocol="tls://",
        security=security,
        shared_temp_directory=tls_dir,
        interface=args.interface,
        scheduler_options={"dashboard_address": args.dashboard_address},
        # each worker's dashboard on its node's loopback interface only (dask worker binds all interfaces
        # unless told otherwise)
        worker_extra_args=["--dashboard-address", "127.0.0.1:0"],
    )
    if args.gpu:
        # one single-threaded dask-cuda worker per job; the job still books --cores CPUs
        return SLURMCluster(
            cores=1,
            processes=1,
            job_cpu=args.cores,
            worker_command="dask_cuda.cli",
            job_extra_directives=["--gres=gpu:1"],
            **common,
        )
    # one single-threaded worker process per core
    return SLURMCluster(cores=args.cores, processes=args.cores, **common)


def _remove_temporary_certificates(cluster: Any) -> None:
    """Delete the workers' copy of temporary certificates (dask-jobqueue keeps them open as temporary files)."""
    for name in ("_job_ca_file", "_job_cert", "_job_key"):
        f = getattr(cluster, name, None)
        if f is not None:
            f.close()


def main(argv: list[str] | None = None) -> None:
    """Start the cluster, run ``sv_test`` on it and print the top genes."""
    args = parse_args(argv)
    import socket

    from dask.distributed import Client

    import spatialscale

    store = spatialscale.open_store(args.store)
    cluster = make_cluster(args)
    try:
        with cluster, Client(cluster) as client:  # the client uses cluster.security
            print(cluster.job_script(), flush=True)
            cluster.scale(jobs=args.jobs)
            host = args.dashboard_address.rpartition(":")[0] or socket.gethostname()
            port = client.scheduler_info().get("services", {}).get("dashboard")
            hint = f" (from elsewhere: ssh -L {port}:{host}:{port} {socket.gethostname()})" if host in (
                "127.0.0.1", "localhost") else ""
            print(f"scheduler: {cluster.scheduler_address}; dashboard: http://{host}:{port}/status{hint}", flush=True)
            print("waiting for workers ...", flush=True)
            client.wait_for_workers(1, timeout=args.timeout)
            ds = spatialscale.sv_test(
                store, method=args.method, null=args.null, client=client, device="cuda" if args.gpu else "cpu",
                out=args.out,
            )
    finally:
        _remove_temporary_certificates(cluster)
    print(ds.to_dataframe().nsmallest(10, "sv_pvalue_adj").to_string())


if __name__ == "__main__":
    main()
