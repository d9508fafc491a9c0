"""Spatial GP residualisation of covariates (hsic-gp): parity with SPLISOSM's sklearn backend."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.gaussian_process import GaussianProcessRegressor
from sklearn.gaussian_process.kernels import RBF, WhiteKernel
from sklearn.gaussian_process.kernels import ConstantKernel as Const

from spatialscale.stats import gp


def _section(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Irregular tissue (disc with a hole, anisotropic) and covariates of several kinds."""
    rng = np.random.default_rng(seed)
    pts = rng.uniform(-1, 1, (4 * n, 2))
    keep = (np.hypot(*pts.T) < 1) & (np.hypot(*(pts - [0.3, 0.0]).T) > 0.25)
    xy = pts[keep][:n] * [300.0, 180.0] + [1000.0, 50.0]
    x = gp.zscore_coordinates(xy)
    cols = [
        rng.normal(size=n),                                            # pure noise
        np.sin(1.5 * x[:, 0]) + 0.1 * rng.normal(size=n),              # smooth field + noise
        (x[:, 0] + 0.3 * x[:, 1] > 0.2).astype(float),                 # region indicator
        (np.hypot(x[:, 0] - 1, x[:, 1] - 1) < 0.6).astype(float),      # small region
        (rng.uniform(size=n) < 0.1).astype(float),                     # scattered cell type
        np.sin(4 * x[:, 1]) + 0.3 * rng.normal(size=n),                # rougher field
    ]
    return xy, np.stack(cols, axis=1)


def _sklearn_kernel() -> Any:
    """The reference's covariate kernel: ConstantKernel * RBF(1, fixed) + WhiteKernel."""
    return Const(1.0, (1e-3, 1e3)) * RBF(1.0, "fixed") + WhiteKernel(0.1, (1e-5, 1e1))


@pytest.fixture(scope="module")
def small() -> dict:
    xy, y = _section(600, seed=3)
    res, info = gp.residualize(xy, y, backend="exact")
    return {"xy": xy, "y": y, "x": gp.zscore_coordinates(xy), "z": gp.standardize_covariates(y),
            "res": res, "info": info}


def test_preprocessing_matches_reference_conventions(small: dict) -> None:
    x = small["x"]
    np.testing.assert_allclose(x.mean(0), 0.0, atol=1e-12)
    np.testing.assert_allclose(x.std(0, ddof=1), 1.0, rtol=1e-12)
    xt = torch.as_tensor(small["xy"], dtype=torch.float64)
    np.testing.assert_allclose(x, ((xt - xt.mean(0)) / xt.std(0)).numpy(), atol=1e-12)
    z = small["z"]
    np.testing.assert_allclose(z.std(0, ddof=1), 1.0, rtol=1e-12)
    assert small["res"].shape == (600, 6)
    assert small["info"]["backend"] == "exact" and small["info"]["rank"] == 600


@pytest.fixture(scope="module")
def splisosm_ref(small: dict) -> dict:
    """SPLISOSM's SklearnKernelGPR residuals, plus the GaussianProcessRegressor it fitted, per covariate."""
    import splisosm.gpr.sklearn as ref_mod

    fitted: list[GaussianProcessRegressor] = []

    class Recording(GaussianProcessRegressor):
        def fit(self, X: np.ndarray, y: np.ndarray) -> Recording:
            super().fit(X, y)
            fitted.append(self)
            return self

    xt = torch.as_tensor(small["x"])
    residuals = []
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        mp.setattr(ref_mod, "GaussianProcessRegressor", Recording)
        warnings.simplefilter("ignore")
        for f in range(small["z"].shape[1]):
            zf = torch.as_tensor(small["z"][:, f:f + 1], dtype=torch.float32)
            residuals.append(ref_mod.SklearnKernelGPR().fit_residuals(xt, zf).numpy()[:, 0].astype(np.float64))
    assert len(fitted) == len(residuals)  # one full GP fit per covariate (n <= n_inducing path)
    return {"res": np.stack(residuals, axis=1), "gps": fitted}


def test_exact_matches_splisosm_sklearn_backend(small: dict, splisosm_ref: dict) -> None:
    """(a) residuals equal SPLISOSM's sklearn-backend residuals (which are computed in float32)."""
    for f in range(small["z"].shape[1]):
        r_ref, r = splisosm_ref["res"][:, f], small["res"][:, f]
        assert np.corrcoef(r_ref, r)[0, 1] > 0.9999, f
        np.testing.assert_allclose(r, r_ref, atol=1e-2 * np.abs(r_ref).max())


def test_hyperparameters_and_likelihood_match_sklearn_fit(small: dict, splisosm_ref: dict) -> None:
    """(a) the reference's L-BFGS-B lands on our (a, eps); our optimum is never worse."""
    info = small["info"]
    for f, g in enumerate(splisosm_ref["gps"]):
        a_ref, e_ref = np.exp(g.kernel_.theta)
        np.testing.assert_allclose(info["amplitude"][f], a_ref, rtol=2e-2)
        np.testing.assert_allclose(info["noise"][f], e_ref, rtol=2e-2)
        # the reference fits the float32-rounded covariate: its likelihood differs in the 6th digit
        assert info["log_marginal_likelihood"][f] >= g.log_marginal_likelihood_value_ - 1e-4
        np.testing.assert_allclose(info["log_marginal_likelihood"][f], g.log_marginal_likelihood_value_,
                                   atol=1e-3)
    # pure noise: amplitude at its floor, noise ~ the unit variance; a scattered cell type is close to that
    assert info["amplitude"][0] == pytest.approx(1e-3, rel=1e-6) and info["noise"][0] == pytest.approx(0.998, abs=1e-3)
    assert info["amplitude"][4] < 0.02 and info["noise"][4] == pytest.approx(0.990, abs=1e-3)
    # the region indicator and the smooth field carry strong spatial signal
    assert info["amplitude"][2] == pytest.approx(19.09, rel=1e-3)
    assert info["noise"][2] == pytest.approx(0.0675, rel=1e-2)
    assert info["noise"][1] == pytest.approx(0.0174, rel=1e-2)


def test_residual_is_eps_times_inverse(small: dict) -> None:
    """r = eps (a R + eps I)^-1 z solved densely in float64, for every covariate."""
    x, z, res, info = small["x"], small["z"], small["res"], small["info"]
    r = np.exp(-0.5 * ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    for f in range(z.shape[1]):
        a, e = info["amplitude"][f], info["noise"][f]
        direct = e * np.linalg.solve(a * r + e * np.eye(len(x)), z[:, f])
        np.testing.assert_allclose(res[:, f], direct, atol=1e-8)


def test_spectral_likelihood_equals_sklearn(small: dict) -> None:
    """(c) the objective we maximise is sklearn's log_marginal_likelihood at the same (a, eps)."""
    x, z = small["x"], small["z"]
    basis = gp.exact_basis(x)
    c = basis.vectors.numpy().T @ z
    s = basis.values.numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = GaussianProcessRegressor(kernel=_sklearn_kernel(), optimizer=None).fit(x, z[:, 2])
    # (a, eps, rel. tolerance): at (1e3, 1e-5) the covariance has condition number ~1e10, so the
    # eigen-route and sklearn's Cholesky both carry ~1e-7 relative rounding error
    for a, e, rtol in [(1.0, 0.1, 1e-10), (1e-3, 10.0, 1e-10), (30.0, 0.07, 1e-10), (1e3, 1e-5, 1e-6)]:
        ours = gp.log_marginal_likelihood(s, np.ones_like(s), c[:, 2:3] ** 2, a, e)[0]
        ref = g.log_marginal_likelihood(np.log([a, e]))
        assert ours == pytest.approx(ref, rel=rtol)


def test_lowrank_agrees_with_exact() -> None:
    """(b) Nystrom basis vs dense eigen-decomposition on 2000 spots."""
    xy, y = _section(2000, seed=7)
    r_ex, i_ex = gp.residualize(xy, y, backend="exact")
    r_lr, i_lr = gp.residualize(xy, y, backend="lowrank")
    assert i_lr["backend"] == "lowrank" and 50 < i_lr["rank"] <= i_lr["n_inducing"] <= 2000
    for f in range(y.shape[1]):
        corr = np.corrcoef(r_ex[:, f], r_lr[:, f])[0, 1]
        assert corr > 0.99999, (f, corr)
    np.testing.assert_allclose(i_lr["amplitude"], i_ex["amplitude"], rtol=1e-3)
    np.testing.assert_allclose(i_lr["noise"], i_ex["noise"], rtol=1e-3)
    np.testing.assert_allclose(i_lr["log_marginal_likelihood"], i_ex["log_marginal_likelihood"], atol=1e-2)
    # "auto" picks exact at this size and lowrank above the threshold
    _, i_auto = gp.residualize(xy[:500], y[:500])
    assert i_auto["backend"] == "exact"


def test_sod_matches_splisosm_large_n_path() -> None:
    """backend='sod' reproduces SPLISOSM's subset-of-data path (forced with a small n_inducing)."""
    from splisosm.gpr.sklearn import SklearnKernelGPR

    xy, y = _section(700, seed=11)
    res, info = gp.residualize(xy, y[:, 1:4], backend="sod", sod_size=300)
    assert info["subset"].shape == (300,)
    xt = torch.as_tensor(gp.zscore_coordinates(xy))
    z = gp.standardize_covariates(y[:, 1:4])
    for f in range(3):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r_ref = SklearnKernelGPR(n_inducing=300).fit_residuals(
                xt, torch.as_tensor(z[:, f:f + 1], dtype=torch.float32)).numpy()[:, 0]
        assert np.corrcoef(r_ref, res[:, f])[0, 1] > 0.9999


@pytest.mark.slow
def test_lowrank_100k_bounded_memory() -> None:
    """(d) 100,000 spots in a fresh process: finishes, peak RSS far below one n x n matrix (80 GB)."""
    script = textwrap.dedent("""
        import resource, time
        import numpy as np
        from spatialscale.stats import gp
        rng = np.random.default_rng(0)
        n = 100_000
        xy = rng.uniform(0, 5000, (n, 2)) * [1.0, 0.6]
        x = gp.zscore_coordinates(xy)
        y = np.stack([rng.normal(size=n), np.sin(2 * x[:, 0]) + 0.2 * rng.normal(size=n),
                      (x[:, 1] > 0.4).astype(float)], 1)
        t = time.perf_counter()
        res, info = gp.residualize(xy, y, backend="auto")
        dt = time.perf_counter() - t
        z = gp.standardize_covariates(y)
        c = [np.corrcoef(res[:, f], z[:, f])[0, 1] for f in range(3)]
        # VmHWM: this process's own peak (ru_maxrss survives exec, so it can report the forking parent's size)
        hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")]
        rss = int(hwm[0].split()[1]) / 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(info["backend"], info["rank"], info["n_inducing"], dt, rss, *c)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    backend, rank, m, dt, rss, c_noise, c_smooth, c_region = out.stdout.split()
    assert backend == "lowrank" and int(rank) <= int(m) <= 2000
    assert float(rss) < 3000.0, rss  # MB
    assert float(c_noise) > 0.999      # nothing spatial to remove
    assert float(c_smooth) < 0.5       # the smooth field is mostly removed
    print(f"lowrank 100k: {float(dt):.1f} s, peak RSS {float(rss):.0f} MB, rank {rank}, m {m}")


@pytest.mark.parametrize("where", ["y", "coords"])
def test_nan_input_raises(where: str) -> None:
    """(e) NaN anywhere is a clear ValueError."""
    xy, y = _section(100, seed=1)
    if where == "y":
        y[5, 2] = np.nan
    else:
        xy[7, 0] = np.nan
    with pytest.raises(ValueError, match=f"{where} has 1 non-finite value"):
        gp.residualize(xy, y)


def test_other_bad_inputs_raise() -> None:
    xy, y = _section(100, seed=1)
    y[:, 3] = 2.0
    with pytest.raises(ValueError, match=r"column\(s\) \[3\] have zero variance"):
        gp.residualize(xy, y)
    with pytest.raises(ValueError, match="coords has 100 spots but y has 99"):
        gp.residualize(xy, y[:99, :2])
    with pytest.raises(ValueError, match="unknown GP backend"):
        gp.residualize(xy, y[:, :2], backend="fitc")
