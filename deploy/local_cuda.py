"""Test every gene on all local GPUs: one dask-cuda worker per GPU.

    python deploy/local_cuda.py sample.zarr --out sv.zarr
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store")
    p.add_argument("--out", required=True)
    p.add_argument("--method", default="hsic-ir")
    args = p.parse_args(argv)
    try:
        from dask_cuda import LocalCUDACluster
    except ImportError as exc:  # pragma: no cover - needs a CUDA machine
        raise SystemExit("this recipe needs dask-cuda: pip install 'spatialscale[cuda]'") from exc
    from dask.distributed import Client

    import spatialscale

    with LocalCUDACluster(threads_per_worker=1) as cluster, Client(cluster) as client:
        ds = spatialscale.sv_test(spatialscale.open_store(args.store), method=args.method, device="cuda",
                                  client=client, out=args.out)
    print(ds.to_dataframe().nsmallest(10, "sv_pvalue").to_string())


if __name__ == "__main__":
    main()
