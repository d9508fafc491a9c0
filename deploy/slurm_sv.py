"""Run ``spatialscale sv`` on a SLURM cluster through dask-jobqueue.

Each SLURM job hosts Dask workers (one thread each); the isoform store and
the results must sit on a filesystem every node sees.  Example::

    python deploy/slurm_sv.py /shared/sample.zarr --out /shared/sv.zarr \\
        --jobs 8 --cores 4 --memory 16GB --partition compute
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="isoform store on a shared filesystem")
    p.add_argument("--out", required=True, help="results zarr on a shared filesystem")
    p.add_argument("--method", default="hsic-ir")
    p.add_argument("--null", default="liu")
    p.add_argument("--jobs", type=int, default=4, help="SLURM jobs to start (default 4)")
    p.add_argument("--cores", type=int, default=4, help="cores per job = worker processes per job")
    p.add_argument("--memory", default="16GB", help="memory per job")
    p.add_argument("--walltime", default="02:00:00")
    p.add_argument("--partition", "--queue", dest="queue", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--gpu", action="store_true", help="one GPU per job, dask-cuda workers, --device cuda")
    p.add_argument("--local-directory", default="$TMPDIR", help="worker scratch space on the node")
    return p.parse_args(argv)


def make_cluster(args: argparse.Namespace):
    """The dask-jobqueue SLURMCluster for ``args`` (no job is submitted yet)."""
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError as exc:  # pragma: no cover - depends on the site
        raise SystemExit("this recipe needs dask-jobqueue: pip install dask-jobqueue") from exc

    extra = ["--gres=gpu:1"] if args.gpu else []
    return SLURMCluster(
        queue=args.queue,
        account=args.account,
        cores=args.cores,
        processes=1 if args.gpu else args.cores,  # CPU: one single-threaded worker per core
        memory=args.memory,
        walltime=args.walltime,
        local_directory=args.local_directory,
        job_extra_directives=extra,
        job_script_prologue=["export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1"],
        worker_command="dask-cuda-worker" if args.gpu else None,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from dask.distributed import Client

    import spatialscale

    cluster = make_cluster(args)
    cluster.scale(jobs=args.jobs)
    with Client(cluster) as client:
        print(cluster.job_script())
        client.wait_for_workers(1, timeout=1800)
        ds = spatialscale.sv_test(
            spatialscale.open_store(args.store), method=args.method, null=args.null, client=client,
            device="cuda" if args.gpu else "cpu", out=args.out,
        )
    cluster.close()
    print(ds.to_dataframe().nsmallest(10, "sv_pvalue_adj").to_string())


if __name__ == "__main__":
    main()
