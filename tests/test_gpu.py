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
    kw = {"method": "glmm-score", "model": "glmm-full", "fit": "joint_newton", "glmm": {"dtype": "float64"},
          "scheduler": "threads", "progress": False}
    gpu = spatialscale.du_test(small_store, "region", device="cuda", batch_memory="auto", **kw)
    cpu = spatialscale.du_test(small_store, "region", device="cpu", **kw)
    np.testing.assert_allclose(gpu["du_pvalue"].values, cpu["du_pvalue"].values, rtol=1e-6)


def test_hsic_gp_and_joint_newton_on_cuda_match_cpu(small_store):
    import spatialscale

    kw = {"method": "hsic-gp", "residualize": "both", "gp": {"backend": "lowrank"}, "scheduler": "threads",
          "progress": False}
    gpu = spatialscale.du_test(small_store, "region", device="cuda", **kw)
    cpu = spatialscale.du_test(small_store, "region", device="cpu", **kw)
    np.testing.assert_allclose(gpu.du_pvalue.values, cpu.du_pvalue.values, rtol=1e-6)
    np.testing.assert_allclose(gpu.du_statistic.values, cpu.du_statistic.values, rtol=1e-6)
    opts = {"max_epochs": 40, "dtype": "float64"}
    fit_gpu = spatialscale.glmm_fit(small_store, model="glmm-full", fit="joint_newton", glmm=opts, device="cuda",
                                    scheduler="threads", progress=False)
    fit_cpu = spatialscale.glmm_fit(small_store, model="glmm-full", fit="joint_newton", glmm=opts, device="cpu",
                                    scheduler="threads", progress=False)
    np.testing.assert_allclose(fit_gpu.loss.values, fit_cpu.loss.values, rtol=1e-6)


def test_large_sections_use_sparse_cg_on_the_device(small_store, monkeypatch):
    """Above the dense limit a GPU worker keeps the sparse precision on the device (batched CG), no CPU fallback."""
    import spatialscale
    from spatialscale import worker

    monkeypatch.setattr(worker, "DENSE_GPU_MAX_SPOTS", 10)
    worker._load.cache_clear()
    op, _ = worker.kernel_operator(str(small_store.path), small_store.kernel_token, "cuda")
    assert type(op).__name__ == "SparseCGOperator" and str(op.device).startswith("cuda")
    cpu = spatialscale.sv_test(small_store, device="cpu", scheduler="threads", progress=False)
    gpu = spatialscale.sv_test(small_store, device="cuda", scheduler="threads", progress=False)
    np.testing.assert_allclose(gpu["sv_statistic"].values, cpu["sv_statistic"].values, rtol=1e-6)
    np.testing.assert_allclose(gpu["sv_pvalue"].values, cpu["sv_pvalue"].values, rtol=1e-6)
    worker._load.cache_clear()


def test_raster_kernel_on_cuda_matches_cpu():
    from spatialscale.raster import FFTKernelOperator, RasterParams

    params = RasterParams((300, 400))
    y = np.random.default_rng(2).normal(size=(params.n, 16))
    y -= y.mean(0)
    np.testing.assert_allclose(FFTKernelOperator(params, device="cuda:0").quadratic_columns(y),
                               FFTKernelOperator(params).quadratic_columns(y), rtol=1e-10)


def test_models_on_cuda_match_cpu(tmp_path):
    """Covariates from expression on cuda:0: the spatial losses, NNLS deconvolution (float64: the same
    proportions) and a VAE (float32 training: not bit-identical, the same layout recovered)."""
    import spatialscale
    from spatialscale.losses import SpatialLoss
    from spatialscale.simulate import simulate_mixture

    adata, reference = simulate_mixture(n_spots=900, n_genes=80, n_types=4, noise=0.3, seed=3)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr", progress=False)
    beta = torch.randn(4, store.n_observed, dtype=torch.float64)
    for prior in ("icar", "car", "sar", "sma", "kl"):
        kw = {"rho": 0.2} if prior in ("car", "sar", "sma") else {}
        cpu = SpatialLoss(prior, store, **kw)(beta)
        gpu = SpatialLoss(prior, store, device="cuda", **kw)(beta.cuda())
        np.testing.assert_allclose(gpu.item(), cpu.item(), rtol=1e-10)
    kw = {"spatial_loss": "icar", "progress": False, "scheduler": "threads"}
    cpu = spatialscale.deconvolve(store, reference, key_added="cpu", **kw)
    gpu = spatialscale.deconvolve(store, reference, key_added="gpu", device="cuda", **kw)
    np.testing.assert_allclose(gpu["gpu"].values, cpu["cpu"].values, rtol=0, atol=1e-6)
    truth = adata.obsm["proportions"].loc[store.obs().index].to_numpy()
    vae = spatialscale.latent_factors(store, model="vae", n_latent=4, max_epochs=100, device="cuda", progress=False)
    z = vae["latent"].values
    q1, _ = np.linalg.qr(z - z.mean(0))
    q2, _ = np.linalg.qr(truth[:, 1:] - truth[:, 1:].mean(0))
    assert np.linalg.svd(q1.T @ q2, compute_uv=False).min() > 0.8
