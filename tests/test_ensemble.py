"""Kernel ensembles of the HSIC SV tests: per-kernel tests equal to single-kernel runs, Cauchy combination,
calibration, power against the default kernel, refusals, CLI."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from conftest import make_adata
from scipy.ndimage import gaussian_filter

import spatialscale
from spatialscale import InputError
from spatialscale.cli import main
from spatialscale.families.sv_hsic import KernelSpec, parse_kernel_spec, parse_kernel_specs
from spatialscale.kernel import KernelParams, SparseCAROperator, build_kernel, centred_diag_sq
from spatialscale.stats.combine import cauchy_combine
from spatialscale.stats.ensemble import combine_kernels, ensemble_batch

ENSEMBLE = ["store", "splisosm:rho=0.5", {"prior": "sar", "rho": 0.2}]


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """One section ingested with each kernel of ENSEMBLE (the first is the default kernel)."""
    root = tmp_path_factory.mktemp("ensemble")
    adata = make_adata(400, 24, seed=3)
    return [spatialscale.ingest(adata, root / "default.zarr"),
            spatialscale.ingest(adata, root / "rho05.zarr", rho=0.5),
            spatialscale.ingest(adata, root / "sar02.zarr", prior="sar", rho=0.2)]


def _run(store, **kw):
    return spatialscale.sv_test(store, scheduler="threads", progress=False, **kw)


# ---------------------------------------------------------------- specs
def test_specs_parse_from_strings_and_dicts_alike():
    assert parse_kernel_spec("car:rho=0.2") == parse_kernel_spec({"prior": "car", "rho": 0.2}) == KernelSpec(
        "car", (("rho", 0.2),))
    spec = parse_kernel_spec("SAR: row_scale=true, rho=0.5")
    assert spec.label == "sar:rho=0.5,row_scale=true" and parse_kernel_spec(spec.label) == spec
    assert parse_kernel_spec("store").label == "store" and parse_kernel_spec("icar").label == "icar"
    assert parse_kernel_spec({"rho": 0.9}).label == "splisosm:rho=0.9"
    d = parse_kernel_spec("splisosm:weights=distance,radius=3,bandwidth=0.05")
    assert d.label == "splisosm:bandwidth=0.05,radius=3.0,weights=distance"
    bad = [("foo:rho=0.5", "unknown prior 'foo'.*store, splisosm, car, icar, sar, isar, sma"),
           ("car:rho", "malformed.*KEY=VALUE"), ("car:", "malformed"), ("car:alpha=1", "unknown key.*alpha"),
           ("store:rho=0.5", "takes no settings"), ("car:rho=true", "rho=True must be a number"),
           ("car:rho=0.1,rho=0.2", "given twice"), (3, "a kernel spec is a string")]
    for spec, match in bad:
        with pytest.raises(InputError, match=match):
            parse_kernel_spec(spec)
    with pytest.raises(InputError, match="at least 2 kernels, got 1"):
        parse_kernel_specs(["store"])
    with pytest.raises(InputError, match="given twice"):
        parse_kernel_specs(["car:rho=0.1", {"prior": "car", "rho": 0.1}])


# ---------------------------------------------------------------- equal to single-kernel runs
def test_each_kernel_equals_a_single_run_on_a_store_ingested_with_it(stores):
    ens = _run(stores[0], kernels=ENSEMBLE)
    assert list(ens["kernel"].values) == ["store", "splisosm:rho=0.5", "sar:rho=0.2"]
    assert ens.attrs["kernels"] == list(ens["kernel"].values) and ens.attrs["kernel_combination"] == "cauchy"
    for j, store in enumerate(stores):
        single = _run(store)
        np.testing.assert_allclose(ens["kernel_pvalue"].values[:, j], single["sv_pvalue"].values, rtol=1e-8)
        np.testing.assert_allclose(ens["kernel_statistic"].values[:, j], single["sv_statistic"].values, rtol=1e-8)
        np.testing.assert_allclose(ens["kernel_effect"].values[:, j], single["sv_effect"].values, rtol=1e-8,
                                   atol=1e-12)
    p = ens["kernel_pvalue"].values
    np.testing.assert_allclose(ens["sv_pvalue"].values, cauchy_combine(p), rtol=1e-12)
    best = ens["sv_kernel"].values
    assert np.array_equal(best, np.argmin(p, axis=1))
    rows = np.arange(len(best))
    np.testing.assert_array_equal(ens["sv_statistic"].values, ens["kernel_statistic"].values[rows, best])
    np.testing.assert_array_equal(ens["sv_effect"].values, ens["kernel_effect"].values[rows, best])
    assert (ens["sv_pvalue"] < 0.05).sum() >= 5  # the simulated SV genes are found

    # gene counts, Welch's null, batches of 2 genes: the same per-kernel equality, and batch-size invariance
    gc = _run(stores[0], method="hsic-gc", null="welch", kernels=ENSEMBLE[:2], batch_size=2)
    one = _run(stores[1], method="hsic-gc", null="welch")
    np.testing.assert_allclose(gc["kernel_pvalue"].values[:, 1], one["sv_pvalue"].values, rtol=1e-8)
    whole = _run(stores[0], method="hsic-gc", null="welch", kernels=ENSEMBLE[:2], batch_size=100)
    for name in ("kernel_pvalue", "kernel_statistic", "sv_pvalue", "sv_statistic", "sv_effect"):
        np.testing.assert_allclose(gc[name].values, whole[name].values, rtol=1e-12, err_msg=name)
    # the exact permutation moments (liu-perm): each kernel's p-value equals its single liu-perm run
    lp = _run(stores[0], null="liu-perm", kernels=ENSEMBLE)
    for j, store in enumerate(stores):
        single = _run(store, null="liu-perm")
        np.testing.assert_allclose(lp["kernel_pvalue"].values[:, j], single["sv_pvalue"].values, rtol=1e-8)
    assert not np.allclose(lp["kernel_pvalue"].values, ens["kernel_pvalue"].values)


def test_an_adjusted_ensemble_equals_adjusted_single_runs(stores):
    ens = _run(stores[0], kernels=ENSEMBLE, covariates="region")
    assert len(ens.attrs["covariates"]) == 1 and ens.attrs["covariates"][0].startswith("region")
    for j, store in enumerate(stores):
        single = _run(store, covariates="region")
        np.testing.assert_allclose(ens["kernel_pvalue"].values[:, j], single["sv_pvalue"].values, rtol=1e-8)
        np.testing.assert_allclose(ens["kernel_statistic"].values[:, j], single["sv_statistic"].values, rtol=1e-8)
        np.testing.assert_allclose(ens["kernel_effect"].values[:, j], single["sv_effect"].values, rtol=1e-8,
                                   atol=1e-12)
    plain = _run(stores[0], kernels=ENSEMBLE)
    assert not np.allclose(plain["kernel_pvalue"].values, ens["kernel_pvalue"].values)


def test_ensemble_on_a_cluster_ships_the_kernels_once_and_agrees(stores, client, tmp_path):
    threads = _run(stores[0], kernels=ENSEMBLE)
    out = tmp_path / "ens.zarr"
    dist = spatialscale.sv_test(stores[0], kernels=ENSEMBLE, client=client, progress=False, out=out, batch_size=5)
    np.testing.assert_allclose(dist["kernel_pvalue"].values, threads["kernel_pvalue"].values, rtol=1e-10)
    np.testing.assert_allclose(dist["sv_pvalue"].values, threads["sv_pvalue"].values, rtol=1e-10)
    saved = spatialscale.open_results(out)
    assert list(saved["kernel"].values) == list(threads["kernel"].values)
    np.testing.assert_array_equal(saved["kernel_pvalue"].values, dist["kernel_pvalue"].values)
    # the fingerprint holds the ensemble: the same one is reused, another (or none) is refused without overwrite
    again = _run(stores[0], kernels=ENSEMBLE, out=out)
    assert again.attrs["created"] == dist.attrs["created"]
    for other in ({"kernels": ["store", "splisosm:rho=0.6"]}, {}):
        with pytest.raises(InputError):
            _run(stores[0], out=out, **other)
    changed = _run(stores[0], kernels=["store", "splisosm:rho=0.6"], out=out, overwrite=True)
    assert list(changed["kernel"].values) == ["store", "splisosm:rho=0.6"]


def test_a_cohort_runs_the_ensemble_on_each_section(tmp_path):
    from spatialscale.simulate import simulate_section

    for i, (n, geometry) in enumerate([(120, "grid"), (150, "hex")]):
        simulate_section(n, 6, n_sv=2, geometry=geometry, seed=20 + i).write_h5ad(tmp_path / f"s{i}.h5ad")
    (tmp_path / "m.csv").write_text("section,path\nA,s0.h5ad\nB,s1.h5ad\n")
    cohort = spatialscale.ingest_cohort(tmp_path / "m.csv", tmp_path / "co", scheduler="threads", progress=False)
    kernels = ["store", "icar:rho=0.9"]
    ds = _run(cohort, kernels=kernels)
    assert ds.sizes["kernel"] == 2 and "combined_pvalue" in ds
    for sid in ("A", "B"):
        one = _run(tmp_path / "co" / "sections" / f"{sid}.zarr", kernels=kernels)
        got = ds["kernel_pvalue"].sel(section=sid, gene=one["gene"].values).values
        np.testing.assert_allclose(got, one["kernel_pvalue"].values, rtol=1e-10)
    with pytest.raises(InputError, match="combine='pooled' sums one kernel's"):
        _run(cohort, kernels=kernels, combine="pooled")


# ---------------------------------------------------------------- refusals
def test_unsupported_inputs_are_refused_before_anything_is_written(stores, tmp_path):
    out = tmp_path / "never.zarr"
    cases = [({"kernels": ["store"]}, "at least 2 kernels"),
             ({"kernels": ["store", "car:rho=0.99"]}, r"kernel 'car:rho=0.99': prior='car' on this graph needs rho <"),
             ({"kernels": ["store", "bogus"]}, "unknown prior 'bogus'.*choose one of store, splisosm"),
             ({"kernels": ENSEMBLE, "null": "perm"}, "null='liu', 'welch' or 'liu-perm'"),
             ({"kernels": ENSEMBLE, "null": "liu-perm", "covariates": "region"}, "not 'liu-perm'"),
             ({"kernels": ENSEMBLE, "nan_filling": "none"}, "nan_filling='mean'"),
             ({"kernels": ENSEMBLE, "covariates": "nothing"}, "nothing"),
             ({"kernels": ["store", "splisosm:rho=0.99"]}, "the store's own kernel"),
             ({"kernels": ["store", "splisosm:weights=distance"]}, "needs a radius")]
    for kw, match in cases:
        with pytest.raises(InputError, match=match):
            _run(stores[0], out=out, **kw)
        assert not out.exists()
    with pytest.raises(InputError, match="does not apply to method 'glmm-llr'"):
        _run(stores[0], method="glmm-llr", kernels=ENSEMBLE)
    raster = make_adata(100, 6, seed=1)
    xy = raster.obsm["spatial"].astype(int)
    raster.obs["array_row"], raster.obs["array_col"] = xy[:, 1], xy[:, 0]
    rstore = spatialscale.ingest(raster, tmp_path / "raster.zarr", kernel="fft", min_counts=0)
    with pytest.raises(InputError, match="raster"):
        _run(rstore, kernels=ENSEMBLE, out=out)
    assert not out.exists()


# ---------------------------------------------------------------- calibration and power (pure functions)
SIDE = 20


def _grid_kernels(params: dict[str, KernelParams]) -> dict[str, tuple]:
    xy = np.stack(np.meshgrid(np.arange(SIDE), np.arange(SIDE)), -1).reshape(-1, 2).astype(float)
    out = {}
    for name, p in params.items():
        k = build_kernel(xy, params=p)
        out[name] = (SparseCAROperator(k.precision), k.power_sums, centred_diag_sq(k.precision))
    return out


def _ratio_genes(rng: np.random.Generator, patterns: np.ndarray, effect: float, depth: float = 8.0) -> np.ndarray:
    """``(B, n, 3)`` isoform counts whose logits vary along each gene's ``patterns[b]`` (zeros: null genes)."""
    b, n = patterns.shape
    eta = rng.normal(0, 0.5, (b, 1, 3)) + effect * patterns[:, :, None] * rng.normal(0, 1, (b, 1, 3))
    prob = np.exp(eta) / np.exp(eta).sum(axis=2, keepdims=True)
    total = rng.poisson(depth * rng.lognormal(0, 0.3, (b, 1)), (b, n))
    c0 = rng.binomial(total, prob[..., 0])
    c1 = rng.binomial(total - c0, np.clip(prob[..., 1] / np.clip(1 - prob[..., 0], 1e-12, None), 0, 1))
    return np.stack([c0, c1, total - c0 - c1], axis=2).astype(float)


def _fields(rng: np.random.Generator, b: int, sigma: float) -> np.ndarray:
    """``b`` standardised Gaussian random fields on the grid, correlated over about ``sigma`` spots."""
    z = gaussian_filter(rng.normal(size=(b, SIDE, SIDE)), (0, sigma, sigma), mode="wrap").reshape(b, -1)
    return (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)


KERNELS = {"default": KernelParams(), "splisosm:rho=0.9": KernelParams(rho=0.9),
           "sar:rho=0.2": KernelParams(prior="sar", rho=0.2), "sar:rho=0.24": KernelParams(prior="sar", rho=0.24),
           "k_neighbors=8": KernelParams(k_neighbors=8)}
#: ensembles of the default kernel and shorter-range ones (mixed), or of members each calibrated under Liu's null
MIXED = ["default", "splisosm:rho=0.9", "sar:rho=0.2"]
CALIBRATED = ["default", "sar:rho=0.24", "k_neighbors=8"]


@pytest.fixture(scope="module")
def grid_kernels():
    return _grid_kernels(KERNELS)


def _reject(kernels: dict, names: list[str], counts: np.ndarray, null: str = "liu") -> tuple[float, np.ndarray]:
    r = ensemble_batch(counts, [kernels[k] for k in names], null=null)
    return float((r["pvalue"] < 0.05).mean()), (r["kernel_pvalue"] < 0.05).mean(axis=0)


def test_ensemble_is_calibrated_under_the_null(grid_kernels):
    rng = np.random.default_rng(7)
    null = _ratio_genes(rng, np.zeros((1500, SIDE * SIDE)), 0.0)
    combined, members = _reject(grid_kernels, CALIBRATED, null)
    print(f"\nnull, 1500 genes: {CALIBRATED} combined {combined:.3f}, members {np.round(members, 3)}")
    assert 0.03 <= combined <= 0.07
    mixed, members = _reject(grid_kernels, MIXED, null)
    print(f"null, 1500 genes: {MIXED} combined {mixed:.3f}, members {np.round(members, 3)}")
    assert mixed <= 0.07  # valid; conservative where a member's Liu null is (short-range kernels)
    # the exact permutation moments bring the short-range members (and so the ensemble) to the level
    perm, members = _reject(grid_kernels, MIXED, null, null="liu-perm")
    print(f"null, 1500 genes, liu-perm: {MIXED} combined {perm:.3f}, members {np.round(members, 3)}")
    assert 0.03 <= perm <= 0.07 and np.all((members >= 0.03) & (members <= 0.07))
    # the Cauchy combination of identical tests is the test itself
    p = np.random.default_rng(0).random(50)
    np.testing.assert_allclose(combine_kernels(np.c_[p, p], np.c_[p, p], np.c_[p, p])["pvalue"], p, rtol=1e-10)


def test_ensemble_gains_power_where_the_default_scale_is_wrong(grid_kernels):
    rng = np.random.default_rng(11)
    n_genes = 400
    x = np.tile(np.arange(SIDE, dtype=float), SIDE)
    cases = {"fine (sigma 0.7 spots)": (_fields(rng, n_genes, 0.7), 0.3),
             "mid (sigma 3 spots)": (_fields(rng, n_genes, 3.0), 0.15),
             "broad gradient": (np.tile((x - x.mean()) / x.std(), (n_genes, 1)), 0.1)}
    power = {}
    for case, (patterns, effect) in cases.items():
        counts = _ratio_genes(rng, patterns, effect)
        single = float((ensemble_batch(counts, [grid_kernels["default"]] * 2)["kernel_pvalue"][:, 0] < 0.05).mean())
        mixed, _ = _reject(grid_kernels, MIXED, counts)
        calibrated, _ = _reject(grid_kernels, CALIBRATED, counts)
        perm, _ = _reject(grid_kernels, MIXED, counts, null="liu-perm")
        power[case] = (single, mixed, calibrated, perm)
    print("\n" + pd.DataFrame(power, index=["default kernel", "+".join(MIXED), "+".join(CALIBRATED),
                                            "+".join(MIXED) + " liu-perm"]).T.to_string())
    single, mixed, _, _ = power["fine (sigma 0.7 spots)"]
    assert mixed >= single + 0.04  # the shorter-range kernels find fine patterns the default smooths over
    assert power["fine (sigma 0.7 spots)"][3] >= single + 0.1  # and more with the exact permutation moments
    for case in cases:
        single, mixed, calibrated, _ = power[case]
        assert mixed >= single - 0.1 and calibrated >= single - 0.05, case  # and lose little elsewhere


# ---------------------------------------------------------------- CLI
def test_cli_runs_an_ensemble_and_refuses_a_bad_spec(stores, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    rc = main(["sv", str(stores[0].path), "--kernels", "store", "splisosm:rho=0.5", "sar:rho=0.2", "--out", str(out),
               "--no-progress", "--top", "0"])
    assert rc == 0
    ds = spatialscale.open_results(out)
    ref = _run(stores[0], kernels=ENSEMBLE)
    np.testing.assert_allclose(ds["kernel_pvalue"].values, ref["kernel_pvalue"].values, rtol=1e-10)
    capsys.readouterr()
    bad = tmp_path / "bad.zarr"
    rc = main(["sv", str(stores[0].path), "--kernels", "store", "car:rho=abc", "--out", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and not bad.exists()
    assert err.count("\n") == 1 and "car:rho=abc" in err and "must be a number" in err
