"""Smoother's spatial priors as kernel options: weights, precisions, admissible rho, kernels built with them."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
from conftest import coords_for

from spatialscale import kernel as K
from spatialscale import priors as P

#: (prior, row_scale) pairs: car and icar need symmetric weights.
CASES = [("car", False), ("icar", False), ("sar", False), ("sar", True), ("isar", False), ("sma", False),
         ("sma", True)]


def _weights(kind: str, n: int = 60, seed: int = 0) -> tuple[np.ndarray, sp.csr_matrix]:
    xy = coords_for("random", n, np.random.default_rng(seed))
    w = P.knn_weights(xy, 4) if kind == "knn" else P.distance_weights(xy, 1.6, 0.15)
    return xy, w


def _dense_precision(w: np.ndarray, prior: str, rho: float, row_scale: bool) -> np.ndarray:
    """Each prior's precision written out from its formula, densely."""
    n = w.shape[0]
    eye, deg = np.eye(n), w.sum(axis=1)
    v = w / deg[:, None] if (row_scale or prior == "isar") else w
    if prior == "splisosm":
        return eye - rho * w / np.sqrt(np.outer(deg, deg))
    if prior == "car":
        return eye - rho * w
    if prior == "icar":
        return np.diag(deg) - rho * w
    if prior in ("sar", "isar"):
        a = eye - rho * v
        return a.T @ a
    b = eye + rho * v  # sma: the covariance is B B'
    return np.linalg.inv(b @ b.T)


def _standardised_cov(q: np.ndarray) -> np.ndarray:
    k = np.linalg.inv(q)
    s = 1.0 / np.sqrt(np.diag(k))
    return k * s[:, None] * s[None, :]


def _admissible(w: sp.spmatrix, prior: str, row_scale: bool) -> float:
    """A rho well inside the admissible range (0.9 of its bound, at most 0.9)."""
    return 0.9 * min(P.rho_range(w, prior, row_scale=row_scale)[1], 1.0)


def _smoother_dense(v: np.ndarray, prior: str, rho: float, standardize: bool = False) -> np.ndarray:
    sw = pytest.importorskip("smoother.weights")
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return sw.weights_to_inv_cov(torch.tensor(v), prior, rho=rho, standardize=standardize).numpy()


def _tensor_to_dense(t) -> np.ndarray:
    return t.to_dense().numpy().astype(np.float64)


# -- precisions from the formulas ---------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", ["knn", "distance"])
@pytest.mark.parametrize(("prior", "row_scale"), CASES)
def test_precision_matches_dense_formula(weights, prior, row_scale):
    _, w = _weights(weights)
    rho = _admissible(w, prior, row_scale)
    q = P.prior_precision(w, prior, rho, row_scale=row_scale)
    expected = _dense_precision(w.toarray(), prior, rho, row_scale)
    assert sp.issparse(q) and (abs(q - q.T)).max() == 0.0
    np.testing.assert_allclose(q.toarray(), expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert np.linalg.eigvalsh(expected).min() > 1e-6  # positive definite inside the range


def test_sparse_priors_stay_sparse():
    _, w = _weights("knn", n=200)
    for prior in ("car", "icar"):
        assert P.prior_precision(w, prior, 0.2).nnz == w.nnz + (w.diagonal() == 0).sum()
    q = P.prior_precision(w, "isar", 0.9)
    assert q.nnz == ((w + w @ w) != 0).sum()  # the pattern of W + W'W, far from n^2
    assert q.nnz < 0.1 * 200**2


@pytest.mark.parametrize("weights", ["knn", "distance"])
def test_rho_range_matches_dense_spectrum(weights):
    _, w = _weights(weights)
    wd = w.toarray()
    deg = wd.sum(axis=1)
    norm = wd / np.sqrt(np.outer(deg, deg))
    lam = np.linalg.eigvalsh(wd)
    np.testing.assert_allclose(P.rho_range(w, "car")[1], 1.0 / lam[-1], rtol=1e-10)
    np.testing.assert_allclose(P.rho_range(w, "sar")[1], 1.0 / lam[-1], rtol=1e-10)
    np.testing.assert_allclose(P.rho_range(w, "sma")[1], 1.0 / -lam[0], rtol=1e-10)
    np.testing.assert_allclose(P.rho_range(w, "sma", row_scale=True)[1], 1.0 / -np.linalg.eigvalsh(norm)[0],
                               rtol=1e-10)
    for prior, rs in (("icar", False), ("isar", False), ("sar", True), ("splisosm", False)):
        assert P.rho_range(w, prior, row_scale=rs) == (0.0, 1.0)


def test_lanczos_bound_is_safe_and_tight():
    """Above 500 spots the extreme eigenvalues come from Lanczos plus its residual: never inside the spectrum."""
    w = P.knn_weights(coords_for("grid", 625, np.random.default_rng(0)), 4)
    lam = np.linalg.eigvalsh(w.toarray())
    top, bottom = P.extreme_eigenvalue(w, "max"), P.extreme_eigenvalue(w, "min")
    assert lam[-1] <= top <= lam[-1] * (1 + 1e-5)
    assert lam[0] * (1 + 1e-5) <= bottom <= lam[0]


def test_large_graphs_are_checked_from_cheap_bounds():
    """Above 500 spots: rho below 1/max degree passes without Lanczos; one far above fails with a bracket."""
    w = P.knn_weights(coords_for("grid", 2500, np.random.default_rng(0)), 4)
    P.check_rho(w, "car", 0.2499)  # 1 / max row sum = 0.25
    with pytest.raises(ValueError, match=r"needs rho < 1/lambda_max\(W\) lies in \[0\.25, 0\.25\d*\]"):
        P.check_rho(w, "car", 0.99)
    # between the cheap bounds (0.25 and 0.2509) Lanczos decides: 1/lambda_max = 0.2504751 (dense), 1e-6 conservative
    P.check_rho(w, "sar", 0.2504)
    with pytest.raises(ValueError, match=r"prior='sar' on this graph needs rho < 1/lambda_max\(W\) = 0\.250475 "):
        P.check_rho(w, "sar", 0.2506)


# -- the admissible range is enforced -------------------------------------------------------------------------------


def test_car_on_binary_knn_refuses_rho_above_one_over_lambda_max():
    xy, w = _weights("knn", n=200)
    lam_max = np.linalg.eigvalsh(w.toarray())[-1]
    assert 1.0 / lam_max < 0.3  # binary mutual 4-NN graph: lambda_max near 4
    with pytest.raises(ValueError, match=r"prior='car' on this graph needs rho < 1/lambda_max\(W\) = 0\.25"):
        P.check_rho(w, "car", 0.99)
    with pytest.raises(ValueError, match="use prior='icar'"):
        K.build_kernel(xy, params=K.KernelParams(prior="car", rho=0.99))
    # just above the bound the precision really is indefinite; just below it is positive definite
    assert np.linalg.eigvalsh(_dense_precision(w.toarray(), "car", 1.001 / lam_max, False))[0] < 0
    rho = 0.999 / lam_max
    P.check_rho(w, "car", rho)
    assert np.linalg.eigvalsh(P.prior_precision(w, "car", rho).toarray())[0] > 0
    with pytest.raises(ValueError, match="prior='sar' on this graph needs rho < 1/lambda_max"):
        P.prior_precision(w, "sar", 0.5)


def test_intrinsic_priors_need_rho_below_one():
    _, w = _weights("knn")
    wd = w.toarray()
    # at rho = 1, D - W (and (I - D^-1 W)'(I - D^-1 W)) are singular: constants have zero precision
    assert np.linalg.eigvalsh(np.diag(wd.sum(1)) - wd)[0] == pytest.approx(0.0, abs=1e-10)
    assert np.linalg.eigvalsh(_dense_precision(wd, "isar", 1.0, False))[0] == pytest.approx(0.0, abs=1e-10)
    for prior in ("icar", "isar"):
        with pytest.raises(ValueError, match=rf"prior='{prior}' needs 0 <= rho < 1"):
            P.prior_precision(w, prior, 1.0)
        with pytest.raises(ValueError, match=rf"rho must satisfy 0 <= rho < 1 for prior='{prior}'"):
            K.KernelParams(prior=prior, rho=1.0)
    with pytest.raises(ValueError, match="sar with row_scale needs 0 <= rho < 1"):
        P.check_rho(w, "sar", 1.0, row_scale=True)


def test_sma_range_and_size_limit():
    xy, w = _weights("knn", n=150)
    high = P.rho_range(w, "sma")[1]
    with pytest.raises(ValueError, match=r"1/\|lambda_min\(W\)\|"):
        P.check_rho(w, "sma", 1.01 * high)
    with pytest.raises(ValueError, match="allowed up to exact_threshold=100"):
        K.build_kernel(xy, params=K.KernelParams(prior="sma", rho=0.2, exact_threshold=100))


# -- against Smoother's own functions -------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", ["random", "hex"])
@pytest.mark.parametrize("k", [4, 6])
def test_knn_weights_match_smoother(geometry, k):
    sw = pytest.importorskip("smoother.weights")
    xy = coords_for(geometry, 150, np.random.default_rng(1))
    # Smoother searches unrounded coordinates; ours, like SPLISOSM, float32-rounded ones: on a lattice's exact ties
    # the two can pick different neighbours, so Smoother is given the rounded coordinates there
    xs = xy.astype(np.float32).astype(np.float64) if geometry == "hex" else xy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = _tensor_to_dense(sw.coordinate_to_weights_knn_sparse(xs, k=k, symmetric=True, row_scale=False))
        ref_rs = _tensor_to_dense(sw.coordinate_to_weights_knn_sparse(xs, k=k, symmetric=True, row_scale=True))
    w = P.knn_weights(xy, k)
    np.testing.assert_array_equal(w.toarray(), ref)
    np.testing.assert_allclose(P.row_scale_weights(w).toarray(), ref_rs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("geometry", ["random", "hex"])
@pytest.mark.parametrize("scale_coords", [True, False])
def test_distance_weights_match_smoother(geometry, scale_coords):
    sw = pytest.importorskip("smoother.weights")
    import torch

    xy = 3.0 * coords_for(geometry, 150, np.random.default_rng(1))  # hex spacing 3: neighbours at 3 and 5.2
    bandwidth = 0.1 if scale_coords else 2.0
    for row_scale in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = _tensor_to_dense(sw.coordinate_to_weights_dist_sparse(
                torch.tensor(xy), scale_coords=scale_coords, radius_cutoff=4.6, band_width=bandwidth,
                row_scale=row_scale))
        w = P.distance_weights(xy, 4.6, bandwidth, scale_coords=scale_coords)
        assert (w != w.T).nnz == 0
        if row_scale:
            w = P.row_scale_weights(w)
        np.testing.assert_array_equal(w.toarray() > 0, ref > 0)
        np.testing.assert_allclose(w.toarray(), ref, rtol=1e-6, atol=1e-7)  # Smoother's are float32
        assert 3.0 < (ref > 0).sum(axis=1).mean() < 7.0


@pytest.mark.parametrize("weights", ["knn", "distance"])
@pytest.mark.parametrize(("prior", "row_scale"), CASES)
def test_precisions_match_smoother(weights, prior, row_scale):
    _, w = _weights(weights)
    rho = _admissible(w, prior, row_scale)
    v = P.row_scale_weights(w).toarray() if row_scale else w.toarray()
    ours = P.prior_precision(w, prior, rho, row_scale=row_scale).toarray()
    ref = _smoother_dense(v, prior, rho)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    # standardised: the precision of the unit-diagonal covariance
    if prior == "sma":
        ours_sd = P.sma_precision(w, rho, row_scale=row_scale, standardize=True)
    else:
        ours_sd = K.standardised_precision(P.prior_precision(w, prior, rho, row_scale=row_scale)).toarray()
    ref_sd = _smoother_dense(v, prior, rho, standardize=True)
    np.testing.assert_allclose(ours_sd, ref_sd, rtol=0, atol=1e-10 * np.abs(ref_sd).max())


@pytest.mark.parametrize(("prior", "row_scale"), [("car", False), ("icar", False), ("sar", True), ("sma", True)])
def test_kernel_matches_smoother_spatial_weight_matrix(prior, row_scale):
    """Smoother's own pipeline (SpatialWeightMatrix: kNN weights, standardised precision; float32)."""
    pytest.importorskip("smoother")
    from smoother.weights import SpatialWeightMatrix

    xy = coords_for("random", 120, np.random.default_rng(4))
    rho = 0.2 if prior == "car" else 0.9
    swm = SpatialWeightMatrix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        swm.calc_weights_knn(xy, k=4, symmetric=True, row_scale=row_scale, verbose=False)
        # cached=False: Smoother 1.1.0's cache returns an empty dict (its defaultdict is never None)
        ref = _tensor_to_dense(swm.get_inv_cov(prior, rho=rho, cached=False, standardize=True,
                                               return_sparse=prior != "sma"))
    kern = K.build_kernel(xy, params=K.KernelParams(prior=prior, rho=rho, row_scale=row_scale))
    np.testing.assert_allclose(kern.precision.toarray(), ref, rtol=0, atol=2e-4 * np.abs(ref).max())


# -- kernels built with each prior ---------------------------------------------------------------------------------


def test_icar_standardised_equals_the_splisosm_kernel():
    xy = coords_for("random", 200, np.random.default_rng(2))
    default = K.build_kernel(xy)
    icar = K.build_kernel(xy, params=K.KernelParams(prior="icar"))
    np.testing.assert_allclose(np.linalg.inv(icar.precision.toarray()), np.linalg.inv(default.precision.toarray()),
                               rtol=0, atol=1e-10)
    np.testing.assert_allclose(icar.power_sums, default.power_sums, rtol=1e-10)
    # on weighted (distance-band) graphs too
    opts = {"weights": "distance", "radius": 1.6, "bandwidth": 0.05}
    a = K.build_kernel(xy, params=K.KernelParams(**opts))
    b = K.build_kernel(xy, params=K.KernelParams(prior="icar", **opts))
    np.testing.assert_allclose(np.linalg.inv(a.precision.toarray()), np.linalg.inv(b.precision.toarray()),
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("weights", ["knn", "distance"])
@pytest.mark.parametrize(("prior", "row_scale"), [("splisosm", False), *CASES])
def test_build_kernel_with_each_prior(weights, prior, row_scale):
    """The kernel (and the GLMM's eigenpairs) is the standardised dense inverse of the formula's precision."""
    xy, w = _weights(weights, n=200, seed=5)
    rho = _admissible(w, prior, row_scale)
    extra = {"radius": 1.6, "bandwidth": 0.15} if weights == "distance" else {}
    params = K.KernelParams(prior=prior, rho=rho, row_scale=row_scale, weights=weights, **extra)
    kern = K.build_kernel(xy, params=params, eigenpairs=True)
    assert kern.source == weights and kern.power_sum_method == "exact"
    np.testing.assert_array_equal(kern.adjacency.toarray(), w.toarray())
    expected = _standardised_cov(_dense_precision(w.toarray(), prior, rho, row_scale))
    lam, vec = kern.eigenpairs
    assert lam.shape == (200,) and lam.min() > 0
    np.testing.assert_allclose((vec * lam) @ vec.T, expected, rtol=0, atol=1e-9)
    np.testing.assert_allclose(np.linalg.inv(kern.precision.toarray()), expected, rtol=0, atol=1e-9)
    h = np.eye(200) - 1.0 / 200
    ev = np.linalg.eigvalsh(h @ expected @ h)
    ev = ev[ev > 1e-10]
    assert np.all(np.isfinite(kern.power_sums)) and np.all(kern.power_sums > 0)
    np.testing.assert_allclose(kern.power_sums, [np.sum(ev**r) for r in range(1, 5)], rtol=1e-9)
    assert kern.attrs()["kind"] == "car"  # a sparse-precision kernel for every consumer


def test_unstandardised_and_selected_power_sums():
    xy, w = _weights("knn", n=200, seed=6)
    rho = _admissible(w, "sar", False)
    exact = K.build_kernel(xy, params=K.KernelParams(prior="sar", rho=rho, standardize_cov=False))
    np.testing.assert_allclose(exact.precision.toarray(), _dense_precision(w.toarray(), "sar", rho, False),
                               rtol=0, atol=1e-12)
    sel = K.build_kernel(xy, params=K.KernelParams(prior="sar", rho=rho, standardize_cov=False,
                                                   power_sums="selected"))
    np.testing.assert_allclose(sel.power_sums[:2], exact.power_sums[:2], rtol=1e-10)
    assert np.all(np.abs(sel.power_sums[2:] - exact.power_sums[2:]) <= 5 * sel.power_sum_se[2:] + 1e-9)


def test_default_kernel_is_unchanged():
    xy = coords_for("random", 300, np.random.default_rng(2))
    kern = K.build_kernel(xy)
    m = K.standardised_precision(K.car_precision(K.knn_adjacency(xy, 4), 0.99))
    assert (kern.precision != m).nnz == 0
    assert kern.source == "knn"
    assert K.build_kernel(xy, params=K.KernelParams(prior="splisosm")).token == kern.token


# -- options ------------------------------------------------------------------------------------------------------


LEGACY_KEYS = ["k_neighbors", "rho", "standardize_cov", "exact_threshold", "n_probes", "probe_seed", "power_sums",
               "n_sketch", "n_cv_probes"]


def test_to_dict_adds_keys_only_where_not_default():
    assert list(K.KernelParams().to_dict()) == LEGACY_KEYS
    assert K.KernelParams(prior="icar").to_dict() == {**K.KernelParams().to_dict(), "prior": "icar"}
    d = K.KernelParams(prior="isar", weights="distance", radius=2.5, row_scale=True).to_dict()
    assert {k: d[k] for k in d if k not in LEGACY_KEYS} == {
        "prior": "isar", "weights": "distance", "radius": 2.5, "bandwidth": 0.1, "scale_coords": True,
        "row_scale": True}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"prior": "gp"}, "prior must be one of splisosm, car, icar, sar, isar, sma"),
    ({"prior": "car", "row_scale": True}, "row_scale needs prior='sar', 'isar' or 'sma'"),
    ({"row_scale": True}, "row_scale needs prior="),
    ({"prior": "car", "rho": -0.1}, "rho must be a finite number >= 0 for prior='car'"),
    ({"rho": 1.0}, r"rho must satisfy 0 <= rho < 1, got 1.0"),
    ({"weights": "delaunay"}, "weights must be one of knn, distance"),
    ({"weights": "distance"}, "weights='distance' needs a radius > 0"),
    ({"weights": "distance", "radius": 1.0, "bandwidth": 0.0}, "bandwidth must be a finite number > 0"),
    ({"radius": 2.0}, "radius apply only to weights='distance'"),
    ({"bandwidth": 0.3, "scale_coords": False}, "bandwidth, scale_coords apply only to weights='distance'"),
])
def test_bad_options_are_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        K.KernelParams(**kwargs)


def test_graph_dependent_bounds_are_left_to_the_build():
    assert K.KernelParams(prior="car", rho=1.5).rho == 1.5  # may be admissible on small distance-band weights
    xy = coords_for("random", 100, np.random.default_rng(7))
    w = P.distance_weights(xy, 2.0, 0.02)  # small weights, no isolated spot (a self loop would cap rho at 1)
    assert P.rho_range(w, "car")[1] > 1.1
    kern = K.build_kernel(xy, params=K.KernelParams(prior="car", rho=1.1, weights="distance", radius=2.0,
                                                   bandwidth=0.02))
    np.testing.assert_allclose(np.linalg.inv(kern.precision.toarray()),
                               _standardised_cov(_dense_precision(w.toarray(), "car", 1.1, False)), atol=1e-9)


def test_distance_weights_refuse_useless_radii():
    xy = coords_for("random", 1200, np.random.default_rng(8))
    with pytest.raises(ValueError, match="joins no pair of spots"):
        P.distance_weights(xy, 1e-6)
    with pytest.raises(ValueError, match="neighbours per spot on average"):
        P.distance_weights(xy, 1e6)
    with pytest.raises(ValueError, match="does not apply to a given adjacency"):
        K.build_kernel(adjacency=P.knn_weights(xy[:50], 4),
                       params=K.KernelParams(weights="distance", radius=1.0))


def test_prior_on_a_user_adjacency():
    """A weighted user graph takes any prior; row-scaled (non-symmetric) weights are refused by prior_precision."""
    rng = np.random.default_rng(9)
    w = P.knn_weights(coords_for("random", 80, rng), 4)
    w = K.symmetrise_adjacency(w.multiply(rng.uniform(0.5, 2.0, size=w.shape)).tocsr())
    kern = K.build_kernel(adjacency=w, params=K.KernelParams(prior="isar", rho=0.8))
    np.testing.assert_allclose(np.linalg.inv(kern.precision.toarray()),
                               _standardised_cov(_dense_precision(w.toarray(), "isar", 0.8, False)), atol=1e-9)
    with pytest.raises(ValueError, match="weights must be symmetric"):
        P.prior_precision(P.row_scale_weights(w), "sar", 0.5)


# --------------------------------------------------------------------------- through ingest, the tests and the CLI
@pytest.mark.parametrize("prior, rho, weights", [("sar", 0.2, "knn"), ("isar", 0.9, "knn"), ("car", 0.2, "knn"),
                                                 ("sma", 0.2, "knn"), ("icar", 0.9, "distance")])
def test_priors_through_ingest_and_the_tests(tmp_path, prior, rho, weights):
    """A store ingested with a prior gives the HSIC statistic of that prior's dense kernel, and the GLMM runs."""
    from conftest import make_adata

    import spatialscale

    a = make_adata(n=120, n_genes=6, seed=2)
    extra = {"radius": 2.5, "bandwidth": 0.1} if weights == "distance" else {}
    store = spatialscale.ingest(a, tmp_path / "s.zarr", prior=prior, rho=rho, weights=weights, **extra)
    assert store.kernel_attrs["prior"] == prior
    xy = store.coords()
    w = (P.distance_weights(xy, 2.5, 0.1) if weights == "distance" else P.knn_weights(xy, 4)).toarray()
    k = _standardised_cov(_dense_precision(w, prior, rho, False))
    n = k.shape[0]
    h = np.eye(n) - 1.0 / n
    sv = spatialscale.sv_test(store, method="hsic-gc", progress=False)
    for gene in sv["gene"].values[:3]:
        y = store.gene_counts(str(gene)).sum(axis=1)
        want = (y @ h @ k @ h @ y) / (n - 1) ** 2
        assert sv["sv_statistic"].sel(gene=gene).item() == pytest.approx(want, rel=1e-8)
    fit = spatialscale.glmm_fit(store, model="glmm-full", progress=False)
    assert np.isfinite(fit["loss"].values).all() and fit.sizes["gene"] == store.n_genes


def test_prior_options_are_checked_before_anything_is_written(tmp_path, capsys):
    from conftest import make_adata

    import spatialscale
    from spatialscale.cli import main
    from spatialscale.errors import InputError

    a = make_adata(n=120, n_genes=4, seed=2)
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["ingest", str(tmp_path / "in.h5ad"), str(tmp_path / "car.zarr"), "--prior", "car", "--rho", "0.99",
                 "--no-progress"]) == 2
    assert "needs rho < 1/lambda_max(W)" in capsys.readouterr().err
    assert main(["ingest", str(tmp_path / "in.h5ad"), str(tmp_path / "d.zarr"), "--weights", "distance",
                 "--no-progress"]) == 2
    assert "needs a radius > 0" in capsys.readouterr().err
    with pytest.raises(InputError, match="prior and weights apply to kernel='car'"):
        spatialscale.ingest(a, tmp_path / "fft.zarr", kernel="fft", prior="sar", rho=0.2)
    with pytest.raises(InputError, match="does not apply with adj_key"):
        spatialscale.ingest(a, tmp_path / "adj.zarr", adj_key="x", weights="distance", radius=0.3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5ad"]
    # the CLI's prior flags reach the store; an AnnData input to sv takes them too
    assert main(["ingest", str(tmp_path / "in.h5ad"), str(tmp_path / "sar.zarr"), "--prior", "sar", "--rho", "0.2",
                 "--row-scale", "--no-progress"]) == 0
    meta = spatialscale.open_store(tmp_path / "sar.zarr").kernel_attrs
    assert (meta["prior"], meta["row_scale"], meta["rho"]) == ("sar", True, 0.2)
    assert main(["sv", str(tmp_path / "in.h5ad"), "--out", str(tmp_path / "sv.zarr"), "--prior", "sar", "--rho",
                 "0.2", "--row-scale", "--no-progress", "--top", "0"]) == 0
    got = spatialscale.open_results(tmp_path / "sv.zarr")
    want = spatialscale.sv_test(tmp_path / "sar.zarr", progress=False)
    np.testing.assert_allclose(got["sv_pvalue"].values, want["sv_pvalue"].values, rtol=1e-10)
