"""The scVI-style VAE / LDVAE (spatialscale.expression.vae, .training): recovery, spatial losses, options."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse
import torch
from scipy.ndimage import gaussian_filter

from spatialscale.expression.training import TrainResult, fit_vae, train_model
from spatialscale.expression.vae import LDVAE, VAE, precision_diagonal
from spatialscale.losses import SpatialLoss
from spatialscale.priors import knn_weights


# ---------------------------------------------------------------------------- helpers
def simulate(side: int = 32, n_genes: int = 300, k: int = 4, *, depth: float = 2000.0, fold: float = 1.5,
             theta: float = 10.0, smooth: float | None = None, seed: int = 0):
    """Spots on a ``side x side`` grid mixing ``k`` cell types with distinct profiles; NB counts.

    Proportions are Dirichlet(1) per spot, or (``smooth``) a softmax of Gaussian-filtered noise fields.
    Returns counts ``(n, n_genes)``, proportions ``(n, k)`` and coordinates ``(n, 2)``.
    """
    rng = np.random.default_rng(seed)
    n = side * side
    if smooth is None:
        props = rng.dirichlet(np.ones(k), n)
    else:
        fields = np.stack([gaussian_filter(rng.normal(size=(side, side)), smooth, mode="wrap") for _ in range(k)], -1)
        logits = fields.reshape(n, k) / fields.std() * 1.5
        props = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    profiles = np.exp(rng.normal(0, 1, n_genes)[None] + rng.normal(0, fold, (k, n_genes)))
    profiles /= profiles.sum(1, keepdims=True)
    mu = depth * np.exp(rng.normal(0, 0.2, n))[:, None] * (props @ profiles)
    counts = rng.negative_binomial(theta, theta / (theta + mu)).astype(np.float64)
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side), indexing="ij"), -1).reshape(n, 2).astype(float)
    return counts, props, xy


def canonical_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Canonical correlations of two column sets (QR of the centred blocks, then singular values)."""
    qa = np.linalg.qr(a - a.mean(0))[0]
    qb = np.linalg.qr(b - b.mean(0))[0]
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def roughness(latent: np.ndarray, laplacian: np.ndarray) -> float:
    """Sum over graph edges of squared latent differences over the total sum of squares (scale-free)."""
    m = latent - latent.mean(0)
    return float(np.trace(m.T @ laplacian @ m) / np.trace(m.T @ m))


class DenseQuadraticLoss(torch.nn.Module):
    """``sum_k b_k' Q b_k`` (``/ numel`` with ``normalize``), ``Q[index][:, index]`` for a minibatch."""

    def __init__(self, q: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("q", torch.as_tensor(q, dtype=torch.float64))
        self.calls: list[torch.Tensor | None] = []

    def forward(self, coefs: torch.Tensor, normalize: bool = True, index: torch.Tensor | None = None) -> torch.Tensor:
        self.calls.append(None if index is None else index.detach().clone())
        q = self.q if index is None else self.q[index][:, index]
        value = ((coefs @ q) * coefs).sum()
        return value / coefs.numel() if normalize else value


def laplacian(xy: np.ndarray) -> np.ndarray:
    w = knn_weights(xy, 4)
    return (scipy.sparse.diags(np.asarray(w.sum(axis=1)).ravel()) - w).toarray()


@pytest.fixture(scope="module")
def small():
    counts, props, xy = simulate(side=12, n_genes=30, depth=300.0, seed=5)
    return counts, props, xy


FAST = {"max_epochs": 3, "batch_size": 64, "lr": 1e-2, "progress": False, "n_hidden": 16}


# ---------------------------------------------------------------------------- reproducibility
def test_seed_reproduces_bit_for_bit(small):
    counts = small[0]
    state = torch.get_rng_state()
    a = fit_vae(counts, seed=3, **FAST)
    b = fit_vae(counts, seed=3, **FAST)
    c = fit_vae(counts, seed=4, **FAST)
    assert torch.equal(state, torch.get_rng_state())  # the caller's generator is left alone
    assert isinstance(a, TrainResult) and a.latent_mean.dtype == np.float64
    assert np.array_equal(a.latent_mean, b.latent_mean) and np.array_equal(a.latent_var, b.latent_var)
    assert a.history == b.history and np.array_equal(a.validation_index, b.validation_index)
    assert not np.allclose(a.latent_mean, c.latent_mean)


# ---------------------------------------------------------------------------- recovery
@pytest.mark.parametrize("model", ["vae", "ldvae"])
def test_latents_recover_cell_type_proportions(model):
    counts, props, _ = simulate(side=32, n_genes=300, seed=0)
    result = fit_vae(counts, model=model, n_latent=5, max_epochs=20, lr=1e-2, batch_size=128, progress=False)
    cc = canonical_correlations(result.latent_mean, props[:, :3])
    assert cc[:3].min() >= 0.9, cc
    assert result.latent_mean.shape == (1024, 5) and result.epochs == 20
    if model == "ldvae":
        assert result.loadings.shape == (300, 5)
        np.testing.assert_array_equal(result.loadings, result.model.get_loadings())
    else:
        assert result.loadings is None


# ---------------------------------------------------------------------------- spatial losses
def test_spatial_loss_smooths_latents():
    counts, props, xy = simulate(side=24, n_genes=300, depth=1000.0, fold=1.0, smooth=3.0, seed=1)
    lap = laplacian(xy)
    options = {"n_latent": 5, "max_epochs": 100, "lr": 1e-2, "validation_fraction": 0.0, "progress": False}
    plain = fit_vae(counts, **options)
    icar = SpatialLoss("icar", weights=knn_weights(xy, 4))  # the graph Laplacian D - W of the same graph
    spatial = fit_vae(counts, spatial_loss=icar, lambda_spatial=3.0, **options)
    r_plain, r_spatial = roughness(plain.latent_mean, lap), roughness(spatial.latent_mean, lap)
    assert r_spatial < 0.6 * r_plain, (r_plain, r_spatial)
    assert canonical_correlations(spatial.latent_mean, props[:, :3])[:3].min() >= 0.9


def _spd(n: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(n, n))
    return a @ a.T / n + np.eye(n)


def test_kl_form_equals_closed_form():
    n, k, lam = 7, 3, 0.7
    q = _spd(n, 0)
    model = VAE(5, n_latent=k, spatial_loss=DenseQuadraticLoss(q), lambda_spatial=lam, sp_loss_as_kl=True)
    rng = np.random.default_rng(1)
    mean = torch.as_tensor(rng.normal(size=(n, k)))
    var = torch.as_tensor(rng.uniform(0.2, 2.0, (n, k)))

    def exact(rows: np.ndarray) -> float:
        qb = torch.as_tensor(q[np.ix_(rows, rows)])
        prior = torch.distributions.MultivariateNormal(torch.zeros(len(rows), dtype=torch.float64),
                                                       precision_matrix=lam * qb)
        kl = sum(torch.distributions.kl_divergence(
            torch.distributions.MultivariateNormal(mean[rows, j], torch.diag(var[rows, j])), prior) for j in range(k))
        return float(kl) + 0.5 * k * float(torch.logdet(qb))  # spatial_kl leaves out -1/2 sum_k log det Q

    assert float(model.spatial_kl(mean, var)) == pytest.approx(exact(np.arange(n)), rel=1e-10)
    rows = np.array([1, 4, 5])
    got = model.spatial_kl(mean[rows], var[rows], index=torch.as_tensor(rows), n_spots=n)
    assert float(got) == pytest.approx(exact(rows), rel=1e-10)
    # the precision diagonal: probed from the loss, or from the loss's own method
    np.testing.assert_allclose(precision_diagonal(DenseQuadraticLoss(q), n, k).numpy(), np.tile(np.diag(q), (k, 1)))

    class WithDiagonal(DenseQuadraticLoss):
        def precision_diagonal(self) -> torch.Tensor:
            return torch.diagonal(self.q) * 2.0

    np.testing.assert_allclose(precision_diagonal(WithDiagonal(q), n, k).numpy(), np.tile(2 * np.diag(q), (k, 1)))
    # spatialscale.losses.SpatialLoss: from its sparse precision and confidences, as probing its forward gives
    xy = np.random.default_rng(2).uniform(0, 3, (n, 2))
    car = SpatialLoss("car", weights=knn_weights(xy, 3), rho=0.2)
    car.confidences = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    probed = precision_diagonal(lambda b, normalize=True: car(b, normalize=normalize), n, k)
    np.testing.assert_allclose(precision_diagonal(car, n, k).numpy(), probed.numpy(), rtol=1e-12)
    np.testing.assert_allclose(probed[1].numpy(), 2 * np.diag(car.precision.to_dense().numpy()), rtol=1e-12)
    with pytest.raises(ValueError, match="quadratic"):
        precision_diagonal(SpatialLoss("kl", weights=knn_weights(xy, 3)), n, k)


def test_kl_form_trains_and_enters_the_loss(small):
    counts, _, xy = small
    loss = DenseQuadraticLoss(laplacian(xy) + 0.1 * np.eye(len(xy)))
    result = fit_vae(counts, n_latent=3, spatial_loss=loss, lambda_spatial=1.0, sp_loss_as_kl=True,
                     validation_fraction=0.0, max_epochs=3, lr=1e-2, progress=False, n_hidden=16)
    assert np.isfinite(result.latent_mean).all() and np.isfinite(result.history["train"]).all()
    model = result.model
    x = torch.as_tensor(counts, dtype=torch.float32)
    with torch.no_grad():
        out = model(x, sample=False)
        terms = model.loss(x, out, kl_weight=0.5)
        kl = model.spatial_kl(out["qz_m"], out["qz_v"])
    assert float(terms["spatial"]) == pytest.approx(float(kl) / len(counts), rel=1e-5)
    per_spot = (terms["reconstruction"] + terms["kl_l"]).mean()
    assert float(terms["loss"]) == pytest.approx(float(per_spot + 0.5 * terms["spatial"]), rel=1e-5)


def test_spatial_loss_sees_the_training_field(small):
    counts, _, xy = small
    n = len(counts)
    lap = laplacian(xy)
    # minibatches: each call gets the batch's indices, together the training spots once per epoch
    loss = DenseQuadraticLoss(lap)
    result = fit_vae(counts, spatial_loss=loss, lambda_spatial=1.0, **FAST)
    train = np.setdiff1d(np.arange(n), result.validation_index)
    first_epoch = torch.cat([c for c in loss.calls[:3]]).numpy()  # 130 training spots / 64: three batches
    assert sorted(first_epoch.tolist()) == train.tolist()
    # full batch with held-out spots: index = the training spots; without: the whole section (None)
    loss = DenseQuadraticLoss(lap)
    result = fit_vae(counts, spatial_loss=loss, lambda_spatial=1.0, **{**FAST, "batch_size": None})
    assert np.array_equal(loss.calls[0].numpy(), np.setdiff1d(np.arange(n), result.validation_index))
    loss = DenseQuadraticLoss(lap)
    fit_vae(counts, spatial_loss=loss, lambda_spatial=1.0, validation_fraction=0.0, **{**FAST, "batch_size": None})
    assert all(c is None for c in loss.calls)


# ---------------------------------------------------------------------------- options and shapes
@pytest.mark.parametrize(("likelihood", "dispersion", "shape"), [
    ("nb", "gene", (30,)),
    ("zinb", "gene-batch", (2, 30)),
    ("nb", "gene-label", (3, 30)),
    ("zinb", "gene-cell", (144, 30)),
    ("poisson", "gene", None),
])
def test_likelihoods_and_dispersions(small, likelihood, dispersion, shape):
    counts = small[0]
    n = len(counts)
    batch = np.where(np.arange(n) < n // 2, "a", "b")
    labels = np.arange(n) % 3
    result = fit_vae(counts, gene_likelihood=likelihood, dispersion=dispersion, n_latent=4, batch_index=batch,
                     labels=labels, **FAST)
    assert result.latent_mean.shape == (n, 4) and result.latent_var.shape == (n, 4)
    assert np.isfinite(result.latent_mean).all() and (result.latent_var > 0).all()
    assert result.library.shape == (n,) and np.allclose(result.library, np.maximum(counts.sum(1), 1))
    if shape is None:
        assert result.dispersion is None
    else:
        assert result.dispersion.shape == shape and (result.dispersion > 0).all()
    assert len(result.history["train"]) == result.epochs == 3 and np.isfinite(result.final_loss)


def test_learnt_library_ln_latent_and_covariates(small):
    counts = small[0]
    n = len(counts)
    rng = np.random.default_rng(0)
    result = fit_vae(counts, model="ldvae", use_observed_lib_size=False, latent_distribution="ln", n_latent=4,
                     batch_index=np.arange(n) % 2, cat_covs=[rng.integers(0, 3, n)], cont_covs=rng.normal(size=(n, 2)),
                     **FAST)
    model = result.model
    assert model.n_cats_per_cov == [3] and model.n_continuous_cov == 2
    assert result.library.shape == (n,) and np.isfinite(result.library).all() and (result.library > 0).all()
    logs = np.log(counts.sum(1))
    np.testing.assert_allclose(model.library_log_means.numpy(), [logs[0::2].mean(), logs[1::2].mean()], rtol=1e-5)
    assert result.loadings.shape == (30, 4) and np.isfinite(result.loadings).all()
    assert LDVAE(30, n_latent=2).get_loadings().shape == (30, 2)
    with pytest.raises(ValueError, match="linear decoder"):
        VAE(30).get_loadings()


@pytest.mark.parametrize("observed", [True, False])
def test_empty_spots_and_genes(small, observed):
    counts = small[0].copy()
    counts[[0, 7]] = 0.0
    counts[:, 5] = 0.0
    result = fit_vae(counts, model="ldvae", gene_likelihood="zinb", dispersion="gene-cell",
                     use_observed_lib_size=observed, **FAST)
    assert np.isfinite(result.latent_mean).all() and np.isfinite(result.history["train"]).all()
    assert result.dispersion.shape == counts.shape and np.isfinite(result.dispersion).all()
    if observed:
        assert result.library[0] == result.library[7] == 1.0  # an empty spot's library is 1
    else:
        logs = np.log(counts.sum(1)[counts.sum(1) > 0])
        assert float(result.model.library_log_means[0]) == pytest.approx(logs.mean(), rel=1e-5)


def test_train_model_inputs_and_progress(small, capsys):
    counts = small[0]
    model = VAE(30, n_hidden=16, n_latent=2)
    result = train_model(model, scipy.sparse.csr_matrix(counts), max_epochs=2, batch_size=None, progress=True)
    assert result.latent_mean.shape == (len(counts), 2) and result.epochs == 2
    assert "loss=" in capsys.readouterr().err
    again = train_model(VAE(30, n_hidden=16, n_latent=2), torch.as_tensor(counts), max_epochs=1, progress=False)
    assert again.latent_mean.shape == (len(counts), 2)


def test_early_stopping_on_a_plateau(small):
    counts = small[0]
    # an improvement must exceed min_delta: after the first epoch the validation loss is flat by that measure
    result = fit_vae(counts, patience=2, min_delta=1e9, **{**FAST, "max_epochs": 50})
    assert result.stopped_early and result.epochs == 3
    assert len(result.history["validation"]) == len(result.history["train"]) == 3
    result = fit_vae(counts, patience=2, min_delta=1e9, early_stopping=False, **{**FAST, "max_epochs": 5})
    assert not result.stopped_early and result.epochs == 5
    # without held-out spots the training objective is watched
    result = fit_vae(counts, patience=1, min_delta=1e9, validation_fraction=0.0, **{**FAST, "max_epochs": 9})
    assert result.stopped_early and result.epochs == 2 and result.history["validation"] == []


# ---------------------------------------------------------------------------- bad options
@pytest.mark.parametrize(("change", "message"), [
    ({"n_latent": 0}, "n_latent must be"),
    ({"gene_likelihood": "gaussian"}, "gene_likelihood must be one of 'zinb', 'nb', 'poisson'"),
    ({"dispersion": "cell"}, "dispersion must be one of 'gene', 'gene-batch'"),
    ({"latent_distribution": "lognormal"}, "latent_distribution must be one of 'normal', 'ln'"),
    ({"model": "pca"}, "model must be one of 'vae', 'ldvae'"),
    ({"batch_index": ["a"] * 144}, "single level"),
    ({"dispersion": "gene-batch"}, "needs batch_index"),
    ({"dispersion": "gene-label"}, "needs labels"),
    ({"batch_index": [0, 1] * 10}, "one entry per spot"),
    ({"cont_covs": np.zeros((10, 2))}, "cont_covs must be"),
    ({"validation_fraction": 1.0}, "validation_fraction"),
    ({"batch_size": 1}, "batch_size"),
    ({"sp_loss_as_kl": True}, "needs a spatial_loss"),
    ({"counts": "nan"}, "NaN"),
    ({"counts": "negative"}, "negative"),
    ({"counts": "vector"}, r"\(spots, genes\) matrix"),
])
def test_bad_options_raise_one_line_errors(small, change, message):
    counts = small[0].copy()
    change = dict(change)
    kind = change.pop("counts", None)
    if kind == "nan":
        counts[3, 4] = np.nan
    elif kind == "negative":
        counts[0, 0] = -1
    elif kind == "vector":
        counts = counts[0]
    with pytest.raises(ValueError, match=message) as err:
        fit_vae(counts, **{**FAST, **change})
    assert "\n" not in str(err.value)


def test_model_and_train_checks(small):
    counts = small[0]
    with pytest.raises(ValueError, match="n_batch >= 2"):
        VAE(30, dispersion="gene-batch", n_batch=1)
    with pytest.raises(ValueError, match="genes"):
        train_model(VAE(29), counts, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="pass batch_index"):
        train_model(VAE(30, n_batch=2), counts, max_epochs=1, progress=False)
    with pytest.raises(ValueError, match=r"integer codes in \[0, 2\)"):
        train_model(VAE(30, n_batch=2), counts, batch_index=np.full(len(counts), 2), max_epochs=1, progress=False)
    with pytest.raises(ValueError, match="always has a linear decoder"):
        LDVAE(30, linear_decoder=False)
