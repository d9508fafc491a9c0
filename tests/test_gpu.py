"""GPU path: dense kernel on cuda:0 and dask-cuda workers (skipped without CUDA)."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_dense_gpu_operator_matches_sparse_cpu():
    from conftest import coords_for

    from spatialscale.kernel import DenseKernelOperator, SparseCAROperator, build_kernel

    kern = build_kernel(coords_for("hex", 3000, np.random.default_rng(0)))
    y = np.random.default_rng(1).normal(size=(3000, 64))
    y -= y.mean(0)
    gpu = DenseKernelOperator(kern.precision, device="cuda:0").quadratic_columns(y)
    cpu = SparseCAROperator(kern.precision).quadratic_columns(y)
    np.testing.assert_allclose(gpu, cpu, rtol=1e-8)


def test_sv_test_on_cuda_matches_cpu(small_store):
    import spatialscale

    cpu = spatialscale.sv_test(small_store, device="cpu", scheduler="threads", progress=False)
    gpu = spatialscale.sv_test(small_store, device="cuda", scheduler="threads", progress=False)
    np.testing.assert_allclose(gpu["sv_pvalue"].values, cpu["sv_pvalue"].values, rtol=1e-8)


def test_local_cuda_cluster(small_store):
    pytest.importorskip("dask_cuda")
    import spatialscale

    cpu = spatialscale.sv_test(small_store, scheduler="threads", progress=False)
    gpu = spatialscale.sv_test(small_store, device="cuda", workers=1, batch_size=5, progress=False)
    np.testing.assert_allclose(gpu["sv_pvalue"].values, cpu["sv_pvalue"].values, rtol=1e-8)


def test_auto_batch_memory_from_free_gpu_memory(small_store):
    import spatialscale
    from spatialscale.engine import free_device_memory

    assert free_device_memory("cuda") > 0
    ds = spatialscale.du_test(small_store, "region",
                              method="glmm-score", model="glmm-full", device="cuda", batch_memory="auto",
                              glmm={"max_epochs": 50}, scheduler="threads", progress=False)
    assert np.isfinite(ds["du_pvalue"].values).all()
