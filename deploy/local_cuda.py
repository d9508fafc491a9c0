"""Run the spatial-variability tests on every GPU of one machine with dask-cuda.

``LocalCUDACluster`` starts one single-threaded worker per visible GPU (pick
GPUs with ``CUDA_VISIBLE_DEVICES``); each worker runs its batches of genes
with ``device="cuda"``.  The scheduler, the workers and the dashboard listen
on 127.0.0.1 only, so nobody else on the network can reach them.

Examples
--------
::

    pip install torch==2.13.0 && pip install ".[cuda]"   # from a checkout of the repository
    python deploy/local_cuda.py sample.zarr --out sv.zarr --method hsic-ir --null liu
"""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options of the recipe."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="isoform store (from `spatialscale ingest`)")
    p.add_argument("--out", default=None, help="results zarr (resumes if interrupted); omit to keep in memory")
    p.add_argument("--method", default="hsic-ir", choices=("hsic-ir", "hsic-ic", "hsic-gc"))
    p.add_argument("--null", default="liu", choices=("liu", "welch", "perm"))
    p.add_argument("--batch-memory", default="512MB", help="working memory of one batch task (512MB)")
    p.add_argument("--top", type=int, default=10, help="print the N most significant genes (10)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Start a LocalCUDACluster, run ``sv_test`` on it and print the top genes."""
    args = parse_args(argv)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:
        raise SystemExit('local_cuda.py needs dask-cuda: pip install ".[cuda]" from the repository') from exc
    from dask.distributed import Client

    import spatialscale

    store = spatialscale.open_store(args.store)
    # everything on the loopback interface: a reachable scheduler runs any code it is sent
    with LocalCUDACluster(threads_per_worker=1, host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster) as client:
        print(f"{len(cluster.workers)} GPU workers at {cluster.scheduler_address}; "
              f"dashboard: {client.dashboard_link}", flush=True)
        ds = spatialscale.sv_test(
            store,
            method=args.method,
            null=args.null,
            device="cuda",
            client=client,
            batch_memory=args.batch_memory,
            out=args.out,
        )
    print(ds.to_dataframe().nsmallest(args.top, "sv_pvalue_adj").to_string())


if __name__ == "__main__":
    main()
