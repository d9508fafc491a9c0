"""Run the spatial-variability tests on a SLURM cluster through dask-jobqueue.

The Dask scheduler runs inside this script (start it on a login node or in a
small allocation); every SLURM job it submits hosts Dask workers.  CPU jobs
run one single-threaded worker per core; ``--gpu`` jobs ask for one GPU and
run a dask-cuda worker on it.  The store and the results must lie on a
filesystem every node sees, under the same absolute path.

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
from typing import Any


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
    return p.parse_args(argv)


def make_cluster(args: argparse.Namespace) -> Any:
    """The ``SLURMCluster`` for ``args``; no job is submitted until it is scaled."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:
        raise SystemExit("slurm_sv.py needs dask-jobqueue: pip install dask-jobqueue") from exc

    common: dict[str, Any] = dict(
        queue=args.queue,
        account=args.account,
        memory=args.memory,
        walltime=args.walltime,
        local_directory=args.local_directory,
        job_name="spatialscale",
        job_script_prologue=["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1"],
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


def main(argv: list[str] | None = None) -> None:
    """Start the cluster, run ``sv_test`` on it and print the top genes."""
    args = parse_args(argv)
    from dask.distributed import Client

    import spatialscale

    store = spatialscale.open_store(args.store)
    with make_cluster(args) as cluster, Client(cluster) as client:
        print(cluster.job_script(), flush=True)
        cluster.scale(jobs=args.jobs)
        print(f"dashboard: {client.dashboard_link}; waiting for workers ...", flush=True)
        client.wait_for_workers(1, timeout=args.timeout)
        ds = spatialscale.sv_test(
            store, method=args.method, null=args.null, client=client, device="cuda" if args.gpu else "cpu", out=args.out
        )
    print(ds.to_dataframe().nsmallest(10, "sv_pvalue_adj").to_string())


if __name__ == "__main__":
    main()
