"""Spatial losses (spatialscale.losses): values against Smoother 1.1.0 and the formulas, weights inputs, minibatches."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from conftest import coords_for

from spatialscale import kernel as K
from spatialscale import priors as P
from spatialscale.errors import InputError
from spatialscale.losses import (
    ContrastiveSpatialLoss,
    SpatialLoss,
    kl_loss,
    loss_precision,
    loss_weights,
    quadratic_loss,
    sparse_quadratic_loss,
)

#: (prior, row_scale) pairs Smoother computes (car and icar need symmetric weights).
CASES = [("car", False), ("icar", False), ("sar", False), ("sar", True), ("isar", False), ("sma", False),
         ("sma", True)]

#: Distance-band options used throughout (coordinates on a [0, 9]^2 square: about 5 neighbours per spot).
BAND = {"radius": 1.6, "bandwidth": 0.15}


def _xy(n: int = 80, seed: int = 0) -> np.ndarray:
    return coords_for("random", n, np.random.default_rng(seed))


def _beta(g: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.as_tensor(np.random.default_rng(seed).standard_normal((g, n)))


def _graph(xy: np.ndarray, kind: str) -> sp.csr_matrix:
    return P.knn_weights(xy, 4) if kind == "knn" else P.distance_weights(xy, BAND["radius"], BAND["bandwidth"])


def _rho(w: sp.spmatrix, prior: str, row_scale: bool) -> float:
    """A rho inside the open range: 0.9 of its bound, at most 0.9."""
    return 0.9 * min(P.rho_range(w, prior, row_scale=row_scale)[1], 1.0)


def _smoother_swm(xy: np.ndarray, kind: str, row_scale: bool, float64: bool = True):
    """Smoother's SpatialWeightMatrix on the same coordinates (its weights made float64 where asked).

    Smoother builds float32 weights (binary kNN weights are exact in float32; distance-band weights are
    rounded to ~6e-8 relative).  Converting them to float64 makes every later step of Smoother (precision,
    standardisation by dense inversion, the loss) run in float64, so its values can be compared at 1e-6.
    """
    from smoother.weights import SpatialWeightMatrix

    swm = SpatialWeightMatrix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "knn":
            swm.calc_weights_knn(xy, k=4, symmetric=True, row_scale=row_scale, verbose=False)
        else:
            swm.calc_weights_dist(torch.tensor(xy), radius_cutoff=BAND["radius"], band_width=BAND["bandwidth"],
                                  row_scale=row_scale, verbose=False)
    if float64:
        swm.swm_scaled = swm.swm_scaled.double()
    return swm


def _ours(prior: str, xy: np.ndarray, kind: str, **kwargs) -> SpatialLoss:
    extra = {"weights_kind": "distance", **BAND} if kind == "distance" else {}
    return SpatialLoss(prior, xy, **extra, **kwargs)


# -- against Smoother 1.1.0 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["knn", "distance"])
@pytest.mark.parametrize(("prior", "row_scale"), CASES)
@pytest.mark.parametrize("standardize", [False, True])
def test_spatial_loss_matches_smoother(kind, prior, row_scale, standardize):
    pytest.importorskip("smoother")
    from smoother.losses import SpatialLoss as SmootherLoss

    xy = _xy()
    rho = _rho(_graph(xy, kind), prior, row_scale)
    swm = _smoother_swm(xy, kind, row_scale)
    beta = _beta(3, 80)
    for use_sparse in (True, False):
        if prior == "sma" and use_sparse:
            continue  # Smoother refuses sma's (dense) precision on its sparse path; ours is dense either way
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref_loss = SmootherLoss(prior, swm, rho=rho, use_sparse=use_sparse, standardize_cov=standardize)
            ref = [float(ref_loss(beta, normalize=norm)) for norm in (True, False)]
        ours = _ours(prior, xy, kind, rho=rho, row_scale=row_scale, standardize_cov=standardize,
                     use_sparse=use_sparse)
        got = [float(ours(beta, normalize=norm)) for norm in (True, False)]
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        assert got[1] == pytest.approx(got[0] * beta.numel(), rel=1e-12)
        assert (ours.precision.layout == torch.strided) == (prior == "sma" or not use_sparse)
    # sma on our sparse path is the same dense precision
    if prior == "sma":
        assert float(_ours(prior, xy, kind, rho=rho, row_scale=row_scale, standardize_cov=standardize)(beta)) == \
            pytest.approx(ref[0], rel=1e-6)


def test_native_float32_smoother_agrees_within_float32_rounding():
    """Smoother's own float32 pipeline: 1e-5 relative, the rounding of float32 sums over ~10^3 terms."""
    pytest.importorskip("smoother")
    from smoother.losses import SpatialLoss as SmootherLoss

    xy = _xy(120, seed=3)
    swm = _smoother_swm(xy, "knn", False, float64=False)
    beta = _beta(4, 120)
    for prior, rho, sd in (("icar", 0.9, True), ("car", 0.2, False), ("sar", 0.2, True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = float(SmootherLoss(prior, swm, rho=rho, standardize_cov=sd)(beta.float()))
        got = float(SpatialLoss(prior, xy, rho=rho, standardize_cov=sd)(beta))
        assert got == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("kind", ["knn", "distance"])
@pytest.mark.parametrize("row_scale", [False, True])
def test_kl_prior_matches_smoother(kind, row_scale):
    pytest.importorskip("smoother")
    from smoother.losses import SpatialLoss as SmootherLoss

    xy = _xy()
    swm = _smoother_swm(xy, kind, row_scale)
    coefs = 2.0 * _beta(5, 80)
    ref = float(SmootherLoss("kl", swm)(coefs))
    ours = _ours("kl", xy, kind, row_scale=row_scale)
    assert float(ours(coefs)) == pytest.approx(ref, rel=1e-6)
    assert float(ours(coefs, normalize=False)) == float(ours(coefs))  # kl ignores normalize, as in Smoother
    # without weights: the mean over all pairs
    assert float(SpatialLoss("kl")(coefs)) == pytest.approx(float(SmootherLoss("kl", None)(coefs)), rel=1e-10)


def test_kl_loss_matches_smoother():
    sl = pytest.importorskip("smoother.losses")
    rng = np.random.default_rng(2)
    p = torch.softmax(torch.as_tensor(rng.standard_normal((4, 60)) * 2), dim=0)
    p[0, :5] = 0.0  # zero probabilities: the 1e-20 guard
    w = P.knn_weights(_xy(60, 5), 4)
    wd = torch.as_tensor(w.toarray())
    ref_none, ref_w = float(sl.kl_loss(p)), float(sl.kl_loss(p, wd))
    assert float(kl_loss(p)) == pytest.approx(ref_none, rel=1e-10)
    for weights in (wd, w, w.toarray(), wd.to_sparse(), wd.to_sparse_csr()):
        assert float(kl_loss(p, weights)) == pytest.approx(ref_w, rel=1e-10)
    # the explicit pairwise formula
    lp = torch.log(p + 1e-20)
    kl = ((p + 1e-20)[:, :, None] * (lp[:, :, None] - lp[:, None, :])).sum(0)
    assert ref_none == pytest.approx(float(kl.mean()), rel=1e-10)
    assert ref_w == pytest.approx(float((kl * wd).sum() / (wd != 0).sum()), rel=1e-10)


def test_quadratic_functions_match_smoother():
    sl = pytest.importorskip("smoother.losses")
    rng = np.random.default_rng(3)
    g, n = 3, 50
    beta = _beta(g, n, seed=4)
    w = P.knn_weights(_xy(n, 6), 4)
    q = torch.as_tensor(P.prior_precision(w, "icar", 0.9).toarray())
    scales = torch.as_tensor(rng.uniform(0.5, 2.0, g))
    per_group = torch.stack([q * (1.0 + 0.1 * k) for k in range(g)])
    for norm in (True, False):
        ref = float(sl.quadratic_loss(beta, q[None], scales, normalize=norm))
        assert float(quadratic_loss(beta, q, scales, norm)) == pytest.approx(ref, rel=1e-12)
        assert float(quadratic_loss(beta, q[None], scales, norm)) == pytest.approx(ref, rel=1e-12)
        assert float(sparse_quadratic_loss(beta, q.to_sparse(), scales, norm)) == pytest.approx(ref, rel=1e-12)
        assert float(sparse_quadratic_loss(beta, sp.csr_matrix(q.numpy()), scales, norm)) == pytest.approx(ref,
                                                                                                           rel=1e-12)
        ref_g = float(sl.quadratic_loss(beta, per_group, scales, normalize=norm))
        assert float(quadratic_loss(beta, per_group, scales, norm)) == pytest.approx(ref_g, rel=1e-12)
        block = torch.block_diag(*per_group).to_sparse()
        ref_b = float(sl.sparse_quadratic_loss(beta, block, scales, normalize=norm))
        assert ref_b == pytest.approx(ref_g, rel=1e-12)
        assert float(sparse_quadratic_loss(beta, block, scales, norm)) == pytest.approx(ref_b, rel=1e-12)
    # a float scale, and the formula written out
    want = 2.5 * sum(float(beta[k] @ q @ beta[k]) for k in range(g)) / (g * n)
    assert float(quadratic_loss(beta, q, 2.5)) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(("standardize", "ratio"), [(False, 0.5), ("auto", 0.5), (False, 5.0)])
def test_contrastive_matches_smoother_with_the_same_permutations(monkeypatch, normalize, standardize, ratio):
    """Smoother draws its negatives with the global torch.randperm: feed it the permutations ours draws."""
    sl = pytest.importorskip("smoother.losses")
    xy = _xy()
    n = 80
    swm = _smoother_swm(xy, "knn", False)
    beta = _beta(3, n)
    ours = ContrastiveSpatialLoss(weights=xy, standardize_cov=standardize, neg2pos_ratio=ratio, seed=7)
    gen = torch.Generator().manual_seed(7)
    perms = [torch.randperm(n, generator=gen) for _ in range(ours.num_perm)]
    got = float(ours(beta, normalize=normalize))
    # Smoother's default standardize_cov=True cannot invert the Laplacian and falls back to the unit-diagonal
    # precision (its 1e-8 guard: ~1e-8 relative), which is what 'auto' computes at rho = 1
    ref_loss = sl.ContrastiveSpatialLoss(spatial_weights=swm, neg2pos_ratio=ratio,
                                         standardize_cov=standardize == "auto")
    queue = iter(perms)
    monkeypatch.setattr(torch, "randperm", lambda m, *a, **k: next(queue))
    ref = float(ref_loss(beta, normalize=normalize))
    monkeypatch.undo()
    assert got == pytest.approx(ref, rel=1e-6)
    # the formula, with the same permutations
    base = SpatialLoss("icar", xy, standardize_cov="diagonal" if standardize == "auto" else False)
    neg = np.mean([float(base(beta[:, p], normalize=normalize)) for p in perms])
    floor = -1.0 * (1 if normalize else beta.numel())
    want = max(float(base(beta, normalize=normalize)) - ratio * neg, floor)
    assert got == pytest.approx(want, rel=1e-12)
    if ratio == 5.0:
        assert got == floor  # clamped at the lower bound


def test_contrastive_is_reproducible_given_the_seed():
    xy = _xy()
    beta = _beta(2, 80)
    a, b = ContrastiveSpatialLoss(weights=xy, seed=3), ContrastiveSpatialLoss(weights=xy, seed=3)
    first = [float(a(beta)) for _ in range(3)]
    assert first == [float(b(beta)) for _ in range(3)]
    assert len(set(first)) == 3  # each call draws new permutations
    a.manual_seed(3)
    assert float(a(beta)) == first[0]
    assert float(ContrastiveSpatialLoss(weights=xy, seed=4)(beta)) != first[0]


# -- the formulas ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("prior", "row_scale"), [("splisosm", False), *CASES])
def test_precision_is_the_priors_definition(prior, row_scale):
    """One definition serves kernels and losses: the loss's buffer is priors.prior_precision / kernel's."""
    xy = _xy(60)
    w = P.knn_weights(xy, 4)
    rho = _rho(w, prior, row_scale)
    plain = SpatialLoss(prior, xy, rho=rho, row_scale=row_scale).precision.to_dense().numpy()
    if prior == "sma":
        want = P.sma_precision(w, rho, row_scale=row_scale)
    else:
        want = P.prior_precision(w, prior, rho, row_scale=row_scale).toarray()
    np.testing.assert_allclose(plain, want, rtol=0, atol=1e-13 * np.abs(want).max())
    sd = SpatialLoss(prior, xy, rho=rho, row_scale=row_scale, standardize_cov=True).precision.to_dense().numpy()
    kern = K.prior_kernel_precision(w, K.KernelParams(prior=prior, rho=rho, row_scale=row_scale)).toarray()
    np.testing.assert_allclose(sd, kern, rtol=0, atol=1e-12 * np.abs(kern).max())
    np.testing.assert_allclose(np.diag(np.linalg.inv(sd)), 1.0, rtol=1e-9)  # unit-diagonal covariance


def test_boundary_rho_is_accepted_and_is_the_laplacian():
    xy = _xy()
    w = P.knn_weights(xy, 4)
    beta = _beta(2, 80)
    icar = SpatialLoss("icar", xy)  # Smoother's default rho = 1
    lap = np.diag(np.asarray(w.sum(1)).ravel()) - w.toarray()
    np.testing.assert_array_equal(icar.precision.to_dense().numpy(), lap)
    rows, cols = w.nonzero()
    b = beta.numpy()
    edges = 0.5 * sum((w[i, j] * (b[:, i] - b[:, j]) ** 2).sum() for i, j in zip(rows, cols))  # 1/2 sum_ij w (bi-bj)^2
    assert float(icar(beta, normalize=False)) == pytest.approx(edges, rel=1e-12)
    assert float(icar(torch.ones(2, 80, dtype=torch.float64))) == pytest.approx(0.0, abs=1e-12)
    # car at 1 / lambda_max(W): positive semi-definite, singular; beyond it, refused with the range named
    high = P.rho_range(w, "car")[1]
    q = SpatialLoss("car", w, rho=high).precision.to_dense().numpy()
    assert -1e-13 < np.linalg.eigvalsh(q)[0] < 1e-10
    with pytest.raises(ValueError, match=rf"prior='car' on these weights needs rho in \[0, {high:.6g}\]"):
        SpatialLoss("car", w, rho=1.0001 * high)
    for prior in ("isar", "splisosm"):
        assert SpatialLoss(prior, w, rho=1.0).rho == 1.0
    with pytest.raises(ValueError, match=r"prior='sma' on these weights needs 0 <= rho < "):
        SpatialLoss("sma", w, rho=P.rho_range(w, "sma")[1])


def test_standardize_options_on_a_singular_precision():
    xy = _xy()
    w = P.knn_weights(xy, 4)
    with pytest.raises(ValueError, match=r"standardize_cov=True needs a positive-definite precision.*rho=1"):
        SpatialLoss("icar", xy, standardize_cov=True)
    diag = SpatialLoss("icar", xy, standardize_cov="diagonal").precision.to_dense().numpy()
    deg = np.asarray(w.sum(1)).ravel()
    np.testing.assert_allclose(diag, np.eye(80) - w.toarray() / np.sqrt(np.outer(deg, deg)), atol=1e-15)
    np.testing.assert_array_equal(SpatialLoss("icar", xy, standardize_cov="auto").precision.to_dense().numpy(), diag)
    auto = SpatialLoss("icar", xy, rho=0.9, standardize_cov="auto").precision.to_dense()
    np.testing.assert_array_equal(auto, SpatialLoss("icar", xy, rho=0.9, standardize_cov=True).precision.to_dense())
    with pytest.raises(ValueError, match="standardize_cov must be False, True, 'diagonal' or 'auto'"):
        SpatialLoss("icar", xy, standardize_cov=1)


def test_gradient_is_two_q_beta_over_numel():
    xy = _xy()
    for loss in (SpatialLoss("sar", xy, rho=0.2, standardize_cov=True), SpatialLoss("sma", xy, rho=0.2),
                 SpatialLoss("icar", xy, use_sparse=False)):
        beta = _beta(3, 80).requires_grad_(True)
        loss.confidences = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
        value = loss(beta)
        (grad,) = torch.autograd.grad(value, beta)
        q = loss.precision.to_dense()
        want = 2.0 * loss.confidences[:, None] * (beta.detach() @ q) / beta.numel()
        np.testing.assert_allclose(grad.numpy(), want.numpy(), rtol=1e-12, atol=1e-15)
        b = beta.detach()
        assert float(value.detach()) == pytest.approx(float((loss.confidences * ((b @ q) * b).sum(1)).sum() / 240),
                                                      rel=1e-12)
    small = SpatialLoss("isar", _xy(12, 2), rho=0.9)
    assert torch.autograd.gradcheck(small, (_beta(2, 12).requires_grad_(True),))
    kl = SpatialLoss("kl", _xy(12, 2))
    assert torch.autograd.gradcheck(kl, (_beta(3, 12).requires_grad_(True),))


def test_minibatch_uses_the_conditional_precision():
    xy = _xy()
    rng = np.random.default_rng(5)
    idx = torch.as_tensor(rng.choice(80, 25, replace=False))
    full = _beta(3, 80)
    batch = full[:, idx]
    for loss in (SpatialLoss("icar", xy), SpatialLoss("isar", xy, rho=0.9, standardize_cov=True),
                 SpatialLoss("sma", xy, rho=0.2), SpatialLoss("car", xy, rho=0.2, use_sparse=False)):
        q = loss.precision.to_dense().numpy()[np.ix_(idx.numpy(), idx.numpy())]
        b = batch.numpy()
        want = float(np.einsum("gi,ij,gj->", b, q, b))
        assert float(loss(batch, index=idx)) == pytest.approx(want / b.size, rel=1e-12)
        assert float(loss(batch, normalize=False, index=idx)) == pytest.approx(want, rel=1e-12)
        assert float(loss(batch, index=idx.numpy())) == pytest.approx(want / b.size, rel=1e-12)
    # the full index is the full loss
    icar = SpatialLoss("icar", xy)
    assert float(icar(full, index=torch.arange(80))) == pytest.approx(float(icar(full)), rel=1e-12)
    # kl: the batch's weights
    kl = SpatialLoss("kl", xy)
    wb = P.knn_weights(xy, 4)[idx.numpy()][:, idx.numpy()]
    assert float(kl(batch, index=idx)) == pytest.approx(float(kl_loss(torch.softmax(batch, 0), wb)), rel=1e-12)
    # contrastive: permutations of the batch under the batch's precision
    con = ContrastiveSpatialLoss(weights=xy, seed=1)
    gen = torch.Generator().manual_seed(1)
    base = SpatialLoss("icar", xy, standardize_cov="diagonal")
    perms = [torch.randperm(25, generator=gen) for _ in range(10)]
    want = float(base(batch, index=idx)) - 0.5 * np.mean([float(base(batch[:, p], index=idx)) for p in perms])
    assert float(con(batch, index=idx)) == pytest.approx(max(want, -1.0), rel=1e-12)


# -- weights inputs -----------------------------------------------------------------------------------------------


def test_explicit_zeros_are_not_neighbours():
    xy = _xy(40, 3)
    w = P.knn_weights(xy, 4).tocoo()
    # store explicit zeros: a zero for every pair (i, i+1) not already an edge, and every edge of spot 0
    extra = [(i, i + 1) for i in range(39) if w.tocsr()[i, i + 1] == 0]
    rows = np.r_[w.row, [i for i, _ in extra], [j for _, j in extra]]
    cols = np.r_[w.col, [j for _, j in extra], [i for i, _ in extra]]
    vals = np.r_[w.data, np.zeros(2 * len(extra))]
    on0 = (rows == 0) | (cols == 0)
    vals[on0] = 0.0  # spot 0 keeps its entries, all of them zero: isolated
    zeros = sp.csr_matrix((vals, (rows, cols)), shape=(40, 40))
    assert (zeros.data == 0).sum() > 40  # the zeros really are stored
    clean = zeros.copy()
    clean.eliminate_zeros()
    kept = (zeros.indptr.copy(), zeros.indices.copy(), zeros.data.copy())
    p = torch.softmax(_beta(3, 40), dim=0)
    # kl: the count of neighbour pairs ignores the stored zeros (a dense count of != 0 agrees)
    want = float(kl_loss(p, torch.as_tensor(clean.toarray())))
    assert float(kl_loss(p, zeros)) == pytest.approx(want, rel=1e-12)
    zc = zeros.tocoo()
    tz = torch.sparse_coo_tensor(np.vstack([zc.row, zc.col]), zc.data, (40, 40))
    assert tz.coalesce().values().numel() > clean.nnz
    assert float(kl_loss(p, tz)) == pytest.approx(want, rel=1e-12)
    assert float(SpatialLoss("kl", zeros)(torch.log(p))) == pytest.approx(want, rel=1e-12)
    # icar: spot 0 has no neighbour (degree 0, a zero row), and the precision has no stored zero
    icar = SpatialLoss("icar", zeros, rho=0.9)
    q = icar.precision.coalesce()
    assert q.values().numel() == (P.prior_precision(clean, "icar", 0.9) != 0).sum()
    assert float(q.to_dense()[0].abs().sum()) == 0.0
    assert icar.graph.nnz == clean.nnz
    for before, after in zip(kept, (zeros.indptr, zeros.indices, zeros.data)):  # the caller's matrix is untouched
        np.testing.assert_array_equal(before, after)


def test_sections_are_block_diagonal():
    xy1, xy2 = _xy(50, 1), _xy(70, 2) + 100.0
    beta = _beta(3, 120)
    for prior, rho in (("icar", 1.0), ("sar", 0.2), ("sma", 0.2), ("kl", 1.0)):
        both = SpatialLoss(prior, [xy1, xy2], rho=rho)
        one, two = SpatialLoss(prior, xy1, rho=rho), SpatialLoss(prior, xy2, rho=rho)
        assert both.section_sizes == (50, 70) and both.n_spots == 120
        assert both.graph[:50, 50:].nnz == 0
        if prior == "kl":
            continue
        want = (float(one(beta[:, :50], normalize=False)) + float(two(beta[:, 50:], normalize=False))) / 360
        assert float(both(beta)) == pytest.approx(want, rel=1e-12)
        assert float(SpatialLoss(prior, coords=[xy1, xy2], rho=rho)(beta)) == pytest.approx(want, rel=1e-12)
    # sections of mixed kinds: a weight matrix and coordinates
    mixed = SpatialLoss("icar", [P.knn_weights(xy1, 4), xy2])
    assert float(mixed(beta)) == float(SpatialLoss("icar", [xy1, xy2])(beta))
    # coordinates stacked into one section would join the sections (here they are far apart: no edge either way)
    assert (SpatialLoss("icar", np.vstack([xy1, xy2])).graph != both.graph).nnz == 0


def test_coordinates_and_weights_options():
    xy = _xy()
    w = P.distance_weights(xy, 1.6, 0.15)
    by_coords = SpatialLoss("icar", xy, weights_kind="distance", radius=1.6, bandwidth=0.15)
    assert (by_coords.graph != w).nnz == 0
    assert (SpatialLoss("icar", coords=xy, k_neighbors=6).graph != P.knn_weights(xy, 6)).nnz == 0
    beta = _beta(2, 80)
    for same in (w, w.toarray(), torch.as_tensor(w.toarray()), torch.as_tensor(w.toarray()).to_sparse()):
        assert float(SpatialLoss("icar", same)(beta)) == pytest.approx(float(by_coords(beta)), rel=1e-12)
    with pytest.raises(ValueError, match="radius apply only to weights='distance'"):
        SpatialLoss("icar", xy, radius=1.0)
    graph, sizes = loss_weights([xy, xy[:30]])
    assert sizes == (80, 30) and graph.shape == (110, 110)


def test_weights_from_a_store(tmp_path):
    import spatialscale
    from spatialscale.simulate import simulate_section

    adata = simulate_section(100, 6, n_sv=2, seed=0)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    adj = store._read_elem("obsp/spatialscale_adjacency")
    xy = store.coords()
    beta = _beta(3, store.n_spots)
    for prior, rho in (("icar", 1.0), ("sar", 0.2), ("kl", 1.0)):
        want = float(SpatialLoss(prior, adj, rho=rho)(beta))
        assert float(SpatialLoss(prior, store, rho=rho)(beta)) == want
        assert float(SpatialLoss(prior, str(tmp_path / "s.zarr"), rho=rho)(beta)) == want
        assert float(SpatialLoss(prior, tmp_path / "s.zarr", rho=rho)(beta)) == want
        assert float(SpatialLoss(prior, coords=xy, rho=rho)(beta)) == pytest.approx(want, rel=1e-12)
    two = SpatialLoss("icar", [store, xy])
    assert two.section_sizes == (100, 100)
    # a raster store has no graph
    adata.obs["array_row"] = xy[:, 1].astype(int)
    adata.obs["array_col"] = xy[:, 0].astype(int)
    raster = spatialscale.ingest(adata, tmp_path / "r.zarr", kernel="fft")
    with pytest.raises(InputError, match="raster store .*no spot graph"):
        SpatialLoss("icar", raster)
    with pytest.raises(InputError):
        SpatialLoss("icar", str(tmp_path / "missing.zarr"))


def test_module_buffers_dtype_and_confidences():
    xy = _xy()
    loss = SpatialLoss("isar", xy, rho=0.9)
    names = dict(loss.named_buffers())
    assert set(names) == {"precision", "confidences"}  # kl_weights is None here
    assert names["precision"].layout == torch.sparse_coo and names["precision"].dtype == torch.float64
    beta = _beta(3, 80)
    v64 = float(loss(beta))
    loss32 = SpatialLoss("isar", xy, rho=0.9).to(torch.float32)
    assert loss32.precision.dtype == torch.float32
    out = loss32(beta.float())
    assert out.dtype == torch.float32 and float(out) == pytest.approx(v64, rel=1e-5)
    assert float(SpatialLoss("isar", xy, rho=0.9, dtype=torch.float32)(beta)) == pytest.approx(v64, rel=1e-5)
    state = loss.state_dict()
    assert set(state) == {"precision", "confidences"}
    # per-group confidences
    loss.confidences = torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64)
    q = loss.precision.to_dense()
    want = sum(c * float(beta[k] @ q @ beta[k]) for k, c in enumerate([1.0, 0.0, 3.0])) / 240
    assert float(loss(beta)) == pytest.approx(want, rel=1e-12)
    # estimate_confidence: the groups' sd of the least-squares solution, over the largest
    rng = np.random.default_rng(0)
    ref, st = torch.as_tensor(rng.random((30, 3))), torch.as_tensor(rng.random((30, 80)))
    loss.estimate_confidence(ref, st)
    sol = np.linalg.lstsq(ref.numpy(), st.numpy(), rcond=None)[0]
    sd = sol.std(axis=1, ddof=1)
    np.testing.assert_allclose(loss.confidences.numpy(), sd / sd.max(), rtol=1e-10)


def test_loss_precision_function():
    w = P.knn_weights(_xy(), 4)
    q = loss_precision(w, "icar", 1.0)
    assert sp.issparse(q) and abs(q.sum()) < 1e-12  # rows of a Laplacian sum to zero
    assert isinstance(loss_precision(w, "sma", 0.2), np.ndarray)


# -- bad input --------------------------------------------------------------------------------------------------


def test_bad_inputs_are_one_line_errors(tmp_path):
    xy = _xy()
    w = P.knn_weights(xy, 4)
    bad_nan = w.toarray()
    bad_nan[0, 1] = bad_nan[1, 0] = np.nan
    asym = w.toarray()
    asym[0, 5] = 3.0
    cases = [
        ({"prior": "gauss", "weights": w}, "prior must be one of splisosm, car, icar, sar, isar, sma, kl"),
        ({"weights": np.ones((5, 4))}, "weights must be square"),
        ({"weights": -w}, "finite and non-negative"),
        ({"weights": bad_nan}, "finite and non-negative"),
        ({"weights": asym}, "weights must be symmetric"),
        ({}, "a spatial loss needs weights="),
        ({"weights": w, "coords": xy}, "either weights= or coords="),
        ({"coords": np.where(np.arange(160).reshape(80, 2) == 3, np.nan, xy)}, "coordinates must be finite"),
        ({"coords": np.zeros((10, 4))}, r"coordinates must be an \(n, 2\) or \(n, 3\) array"),
        ({"weights": w, "rho": -0.5}, "rho must be a finite number >= 0"),
        ({"weights": w, "rho": 2.0}, r"prior='icar' on these weights needs rho in \[0, 1\]"),
        ({"prior": "car", "weights": w, "row_scale": True}, "prior='car' needs symmetric weights"),
        ({"prior": "sma", "weights": w, "rho": 0.1, "max_dense_spots": 50},
         r"prior='sma' has a dense precision \(80 x 80\); it is allowed up to max_dense_spots=50"),
        ({"weights": w, "use_sparse": False, "max_dense_spots": 50}, "use_sparse=False keeps a dense"),
        ({"weights": [], "prior": "icar"}, "the list of sections is empty"),
        ({"weights": {"a": 1}}, "weights must be a weight matrix, an isoform store or its path, coordinates"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            SpatialLoss(**kwargs)
        assert "\n" not in str(err.value)
    loss = SpatialLoss("icar", w)
    with pytest.raises(ValueError, match="coefs have 79 spots .* but the spatial weights 80"):
        loss(torch.zeros(2, 79))
    with pytest.raises(ValueError, match="coefs must be 2-D"):
        loss(torch.zeros(80))
    with pytest.raises(ValueError, match=r"index must lie in \[0, 80\)"):
        loss(torch.zeros(2, 3), index=torch.tensor([0, 1, 80]))
    with pytest.raises(ValueError, match="with index, coefs must hold the batch's spots: 3 columns"):
        loss(torch.zeros(2, 80), index=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="index must be a 1-D integer tensor"):
        loss(torch.zeros(2, 3), index=torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="num_perm must be an integer >= 1"):
        ContrastiveSpatialLoss(weights=w, num_perm=0)
    with pytest.raises(ValueError, match="group_scales must be a float or hold 1 or num_group=2 values"):
        quadratic_loss(torch.zeros(2, 80), loss.precision.to_dense(), torch.ones(3))
