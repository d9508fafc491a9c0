"""NNLS deconvolution and SpatialPCA (spatialscale.expression), with and without a spatial loss."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from spatialscale.expression.nnls import DeconvResult, nnls_deconvolve, normalize_expression
from spatialscale.expression.pca import PCAResult, spatial_pca, standardize_genes
from spatialscale.simulate import simulate_mixture

try:
    from spatialscale.losses import SpatialLoss
except ImportError:  # pragma: no cover - before spatialscale.losses existed
    SpatialLoss = None


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small full-batch problems: one thread avoids OpenMP spin-waits on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def gene_totals(adata) -> np.ndarray:
    """Spots x genes counts, genes sorted as the simulated reference's."""
    genes, codes = np.unique(adata.var["gene_symbol"].to_numpy(), return_inverse=True)
    agg = sp.csr_matrix((np.ones(adata.n_vars), (np.arange(adata.n_vars), codes)), shape=(adata.n_vars, len(genes)))
    return (adata.layers["counts"] @ agg).toarray()


def knn_laplacian(xy: np.ndarray, k: int = 6) -> np.ndarray:
    """Dense graph Laplacian ``D - W`` of the symmetrised kNN graph."""
    _, idx = cKDTree(xy).query(xy, k + 1)
    n = len(xy)
    w = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), idx[:, 1:].ravel())), shape=(n, n))
    w = ((w + w.T) > 0).astype(float).toarray()
    return np.diag(w.sum(1)) - w


class LaplacianLoss:
    """``sum_g coefs_g' L coefs_g / coefs.numel()``: the call signature of SpatialLoss, dense."""

    def __init__(self, xy: np.ndarray) -> None:
        self.lap = torch.as_tensor(knn_laplacian(xy))

    def __call__(self, coefs, normalize=True, index=None):
        value = (coefs * (coefs @ self.lap)).sum()
        return value / coefs.numel() if normalize else value


def make_loss(xy: np.ndarray):
    if SpatialLoss is not None:
        return SpatialLoss("icar", coords=xy)
    return LaplacianLoss(xy)  # pragma: no cover


def rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a - b) ** 2)))


def scipy_nnls(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Per-spot scipy.optimize.nnls of normalised spots on normalised reference rows: spots x types."""
    return np.stack([scipy.optimize.nnls(x.T, row)[0] for row in y])


@pytest.fixture(scope="module")
def noisy():
    adata, ref = simulate_mixture(400, 100, 4, noise=0.3, depth=2.0, seed=0)
    return gene_totals(adata), ref.X, adata.obsm["proportions"].to_numpy(), adata.obsm["spatial"]


# --------------------------------------------------------------------------- NNLS


def test_equals_per_spot_scipy_nnls():
    rng = np.random.default_rng(0)
    ref = rng.gamma(0.5, 2.0, (5, 40))
    props = rng.dirichlet(np.full(5, 0.5), 80)
    counts = rng.poisson(props @ ref * 20)
    res = nnls_deconvolve(counts, ref, progress=False)
    assert isinstance(res, DeconvResult) and res.epochs == 0 and res.converged
    want = scipy_nnls(normalize_expression(counts), normalize_expression(ref))
    assert np.abs(res.coefficients - want).max() < 1e-8
    want_p = want / want.sum(1, keepdims=True)
    assert np.abs(res.proportions - want_p).max() < 1e-5
    # lambda 0 with a loss is the same problem
    res0 = nnls_deconvolve(counts, ref, spatial_loss=lambda c: (c**2).sum(), lambda_spatial=0.0, progress=False)
    assert np.abs(res0.proportions - want_p).max() < 1e-12
    # the optimiser itself (a zero spatial loss forces it) reaches the scipy solution from the clipped lstsq start
    zero = nnls_deconvolve(counts, ref, spatial_loss=lambda c: 0.0 * c.sum(), lambda_spatial=1.0, init="lstsq",
                           max_epochs=20000, tol=1e-10, progress=False)
    assert zero.converged and zero.epochs > 1
    assert np.abs(zero.proportions - want_p).max() < 1e-5, np.abs(zero.proportions - want_p).max()
    # a per-spot intercept: scipy NNLS of the gene-centred spot on the gene-centred signatures
    yb, xb = normalize_expression(counts), normalize_expression(ref)
    res_b = nnls_deconvolve(counts, ref, bias=True, progress=False)
    want_b = scipy_nnls(yb - yb.mean(1, keepdims=True), xb - xb.mean(1, keepdims=True))
    assert np.abs(res_b.coefficients - want_b).max() < 1e-8
    assert np.allclose(res_b.intercept, yb.mean(1) - want_b @ xb.mean(1))


def test_clean_mixture_recovers_proportions():
    adata, ref = simulate_mixture(400, 100, 4, noise=0.0, depth=200.0, seed=0)
    truth = adata.obsm["proportions"].to_numpy()
    res = nnls_deconvolve(gene_totals(adata), ref.X, progress=False)
    err = rmse(res.proportions, truth)
    assert err < 0.02, f"RMSE {err:.4f} on clean data"  # measured 0.0097 (the reference is noisy itself)
    # library normalisation puts beta on the proportion scale: it sums to about 1 before normalising
    assert np.abs(res.coefficients.sum(1) - 1).mean() < 0.02


def test_spatial_loss_lowers_rmse(noisy):
    counts, ref, truth, xy = noisy
    plain = nnls_deconvolve(counts, ref, progress=False)
    smooth = nnls_deconvolve(counts, ref, spatial_loss=make_loss(xy), lambda_spatial=3.0, progress=False)
    e0, e1 = rmse(plain.proportions, truth), rmse(smooth.proportions, truth)
    # measured: 0.1326 without, 0.0765 with the icar loss (lambda 3)
    assert e1 < 0.8 * e0, f"RMSE with spatial loss {e1:.4f}, without {e0:.4f}"
    assert smooth.converged and smooth.epochs > 0
    for res in (plain, smooth):
        assert res.proportions.shape == truth.shape and res.proportions.dtype == np.float64
        assert (res.proportions >= 0).all() and np.allclose(res.proportions.sum(1), 1.0)
        assert (res.coefficients >= 0).all()
    loss = np.array(smooth.history["loss"])
    assert (np.diff(loss) <= 1e-12 * np.abs(loss[:-1])).all()  # monotone
    assert smooth.final_loss == pytest.approx(loss[-1]) and loss[-1] < loss[0]
    assert smooth.history["spatial_loss"][-1] < smooth.history["spatial_loss"][0]


def test_spatial_solution_satisfies_kkt(noisy):
    """The penalised problem is convex: the gradient vanishes where beta > 0 and is >= 0 where beta = 0."""
    counts, ref, _, xy = noisy
    loss = LaplacianLoss(xy)
    lam = 1.0
    res = nnls_deconvolve(counts, ref, spatial_loss=loss, lambda_spatial=lam, tol=1e-10, max_epochs=5000,
                          progress=False)
    y, x = normalize_expression(counts), normalize_expression(ref)
    beta = torch.tensor(res.coefficients.T, requires_grad=True)
    total = ((beta.T @ torch.as_tensor(x) - torch.as_tensor(y)) ** 2).mean() + lam * loss(beta)
    (grad,) = torch.autograd.grad(total, beta)
    grad = grad.numpy()
    scale = np.abs(grad).max() + np.abs(res.coefficients).max()
    positive = res.coefficients.T > 1e-8
    assert np.abs(grad[positive]).max() < 1e-6 * scale
    assert grad[~positive].min() > -1e-6 * scale


def test_zero_spot_and_progress(capsys):
    rng = np.random.default_rng(1)
    ref = rng.gamma(1.0, 1.0, (3, 20))
    counts = rng.poisson(rng.dirichlet(np.ones(3), 30) @ ref * 10)
    counts[4] = 0
    xy = np.c_[np.arange(30) % 6, np.arange(30) // 6].astype(float)
    res = nnls_deconvolve(counts, ref, spatial_loss=LaplacianLoss(xy), lambda_spatial=0.5, progress=True)
    assert np.allclose(res.proportions.sum(1), 1.0)
    assert "nnls deconvolution" in capsys.readouterr().err
    res = nnls_deconvolve(counts, ref, progress=False)
    assert np.allclose(res.proportions[4], 1 / 3)  # no expression: equal proportions
    logged = nnls_deconvolve(sp.csr_matrix(counts), ref, normalize="log1p", progress=False)
    assert np.allclose(logged.proportions.sum(1), 1.0)


@pytest.mark.parametrize(
    ("counts", "reference", "kw", "match"),
    [
        (np.ones((5, 0)), np.ones((2, 0)), {}, "no genes"),
        (np.ones((5, 4)), np.array([[1, 2, np.nan, 1], [1, 1, 1, 1.0]]), {}, "reference has NaN"),
        (-np.ones((5, 4)), np.ones((2, 4)), {}, "non-negative"),
        (np.ones((5, 4)), np.ones((2, 3)), {}, "counts has 4 genes but the reference 3"),
        (np.ones((5, 4)), np.ones((2, 4)), {"lambda_spatial": -1.0}, "lambda_spatial"),
        (np.ones((5, 4)), np.ones((2, 4)), {"normalize": "cpm"}, "unknown normalize"),
        (np.ones((5, 4)), np.vstack([np.ones(4), np.zeros(4)]), {}, "no expression"),
        (np.ones(4), np.ones((2, 4)), {}, "2-D"),
    ],
)
def test_bad_input(counts, reference, kw, match):
    with pytest.raises(ValueError, match=match) as info:
        nnls_deconvolve(counts, reference, progress=False, **kw)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- SpatialPCA


@pytest.fixture(scope="module")
def expression(noisy):
    counts, _, _, xy = noisy
    return normalize_expression(counts, "log1p"), xy


def roughness(latent: np.ndarray, lap: np.ndarray) -> float:
    """Dirichlet energy of the factors per unit variance: ``tr(H' L H) / tr(H' H)`` (centred)."""
    h = latent - latent.mean(0)
    return float(np.trace(h.T @ lap @ h) / np.trace(h.T @ h))


def test_pca_equals_sklearn(expression):
    from sklearn.decomposition import PCA

    data, _ = expression
    res = spatial_pca(data, 5, progress=False)
    assert isinstance(res, PCAResult) and res.epochs == 0
    z, _, _ = standardize_genes(data)
    ref = PCA(5, svd_solver="full").fit(z)
    signs = np.sign((res.loadings * ref.components_.T).sum(0))
    assert np.abs(signs).min() == 1
    assert np.abs(res.loadings - ref.components_.T * signs).max() < 1e-8
    assert np.abs(res.latent - ref.transform(z) * signs).max() < 1e-8
    assert np.allclose(res.explained_variance, ref.explained_variance_)
    assert np.allclose(res.loadings.T @ res.loadings, np.eye(5), atol=1e-12)
    same = spatial_pca(data, 5, spatial_loss=LaplacianLoss(expression[1]), lambda_spatial=0.0, progress=False)
    assert np.array_equal(same.latent, res.latent)


def test_spatial_pca_is_smoother(expression):
    data, xy = expression
    lap = knn_laplacian(xy)
    plain = spatial_pca(data, 5, progress=False)
    smooth = spatial_pca(data, 5, spatial_loss=make_loss(xy), lambda_spatial=0.3, progress=False)
    r0, r1 = roughness(plain.latent, lap), roughness(smooth.latent, lap)
    # measured: 4.03 without, 2.87 with the icar loss (lambda 0.3), keeping 96% of the first factor's variance
    assert r1 < 0.8 * r0, f"roughness with spatial loss {r1:.3f}, without {r0:.3f}"
    assert smooth.explained_variance[0] > 0.9 * plain.explained_variance[0]
    assert smooth.explained_variance.sum() < plain.explained_variance.sum()  # PCA captures the most variance
    assert smooth.converged and smooth.epochs > 0
    assert np.allclose(smooth.loadings.T @ smooth.loadings, np.eye(5), atol=1e-10)
    assert smooth.latent.shape == (400, 5) and smooth.latent.dtype == np.float64
    assert (np.diff(smooth.explained_variance) <= 1e-12).all()  # principal axes, decreasing variance
    loss = np.array(smooth.history["loss"])
    assert (np.diff(loss) <= 1e-12 * np.abs(loss[:-1])).all() and loss[-1] < loss[0]


def test_spatial_pca_reaches_the_quadratic_optimum(expression):
    """With a quadratic loss the optimum is the top eigenspace of ``Z'Z - lambda Z'LZ``."""
    data, xy = expression
    lam = 0.1
    res = spatial_pca(data, 5, spatial_loss=LaplacianLoss(xy), lambda_spatial=lam, progress=False)
    z, _, _ = standardize_genes(data)
    m = z.T @ z - lam * z.T @ knn_laplacian(xy) @ z
    top = np.linalg.eigh(m)[1][:, ::-1][:, :5]
    optimum = -np.trace(top.T @ m @ top) / (5 * z.shape[0])
    assert res.final_loss == pytest.approx(optimum, rel=1e-6)
    cosines = np.linalg.svd(top.T @ res.loadings, compute_uv=False)
    assert cosines.min() > 1 - 1e-5


def test_pca_bad_input():
    with pytest.raises(ValueError, match="no genes"):
        spatial_pca(np.ones((5, 0)), 2, progress=False)
    with pytest.raises(ValueError, match="NaN"):
        spatial_pca(np.array([[1.0, np.nan], [2.0, 3.0], [1.0, 1.0]]), 1, progress=False)
    with pytest.raises(ValueError, match="n_latent"):
        spatial_pca(np.ones((5, 3)), 4, progress=False)
    with pytest.raises(ValueError, match="lambda_spatial"):
        spatial_pca(np.ones((5, 3)), 2, lambda_spatial=-0.1, progress=False)
