r"""scVI-style variational autoencoders for count matrices: :class:`VAE` and the linear-decoded :class:`LDVAE`.

The model is scVI's (Lopez et al. 2018; Svensson et al. 2020 for the linear decoder), written
here in plain torch, with the spatial losses of Smoother's SpatialVAE (Su et al. 2023):

* **Encoder** ``q(z | x) = N(mu(x), diag(sigma^2(x)))`` on ``log1p`` counts (plus the batch
  one-hot), a stack of ``Linear -> BatchNorm -> ReLU -> Dropout`` layers and two linear heads
  (``sigma^2 = exp(.) + 1e-4``).  ``latent_distribution="ln"`` (logistic normal) feeds the
  decoder ``softmax(z)`` instead of ``z``.
* **Library size** ``l`` (log scale): the observed ``log(sum_g x_g)`` (``use_observed_lib_size``), or a
  second one-dimensional latent with ``q(l | x)`` normal and a prior ``N(m_b, v_b)`` whose mean and
  variance are those of the observed log library sizes of the spot's batch ``b``.
* **Decoder** ``px_scale = softmax(f(z, covariates))`` over genes, ``px_rate = exp(l) * px_scale``,
  inverse dispersion ``px_r = exp(.)`` per gene, gene and batch, gene and label, or gene and spot
  (a decoder head), and zero-inflation logits (a decoder head) for ``"zinb"``.  ``f`` is an MLP,
  or, for the LDVAE, one linear map (optionally batch-normalised, no bias by default), whose
  weights on ``z`` are the gene loadings (:meth:`VAE.get_loadings`).  The batch one-hot, the
  categorical covariates' one-hots and the continuous covariates are injected into every decoder
  layer.
* **Loss** per spot: ``-log p(x | z, l) + kl_weight * KL(q(z | x) || N(0, I)) + KL(q(l | x) || p(l))``,
  averaged over spots.

Spatial losses
--------------
A spatial loss is any callable like :class:`spatialscale.losses.SpatialLoss` (or Smoother's):
``spatial_loss(coefs, normalize=False, index=None)`` with ``coefs`` a ``(num_group, num_spot)``
tensor returns a scalar quadratic form ``L(B) = sum_k b_k' Q_k b_k`` in a spatial precision
``Q`` (one per group or shared); with ``index`` (a minibatch of spot indices) it uses the batch's
conditional precision ``Q[index][:, index]``.  It is applied to the posterior means
``M = (mu_ik)`` (``num_group`` = latent dimensions, ``num_spot`` = spots of the field: every spot in
full-batch training, the minibatch otherwise) in one of two ways.

*Additive* (``sp_loss_as_kl=False``, Smoother's default): the objective gains
``lambda_spatial * L(M') / m``, ``m`` the number of spots in the field, so it is on the per-spot
scale of the rest of the loss.

*As a KL* (``sp_loss_as_kl=True``): the prior of each latent dimension across spots is the
spatial Gaussian ``z_k ~ N(0, (lambda Q_k)^-1)`` instead of ``N(0, I)``, and the per-spot KL is
replaced by the KL of the factorised posterior against it.  For one dimension ``k``, with
``q = N(mu_k, S_k)``, ``S_k = diag(sigma_k^2)`` and ``P = lambda Q_k`` on ``m`` spots, the Gaussian
KL ``1/2 [tr(P S) + mu' P mu - m - log det S - log det P]`` becomes

.. math::

    \mathrm{KL}_k = \tfrac12 \Big[\lambda \sum_i Q_{k,ii} \sigma_{ik}^2 + \lambda\, \mu_k^\top Q_k \mu_k
    - \sum_i \log \sigma_{ik}^2 - m - m \log\lambda - \log\det Q_k\Big],

because only the diagonal of ``Q`` meets the diagonal ``S``.  Summed over ``k`` the quadratic
terms are exactly ``lambda L(M')``, so the spatial loss is used as is; ``diag(Q_k)`` comes from
the loss (below).  The term ``-1/2 sum_k log det Q_k`` does not depend on the parameters (and is
``-inf`` for intrinsic priors such as icar), so it is left out: :meth:`VAE.spatial_kl` is the KL
up to that constant.  The KL (divided by ``m``, like the additive term) is warmed up with
``kl_weight`` as the ordinary KL.  With a minibatch ``B`` the prior is the conditional one
given the other spots at their prior mean, ``N(0, (lambda Q_BB)^-1)``, whose diagonal is
``diag(Q)[B]``.  With a standardised covariance (unit prior variance per spot) and
``lambda = 1`` the prior has the same per-spot marginals as scVI's ``N(0, I)``.

The diagonal of ``Q`` is taken from ``spatial_loss.precision_diagonal()`` when the loss has that
method (a ``(num_spot,)`` or ``(num_group, num_spot)`` tensor or array), else from its ``precision``
(:class:`spatialscale.losses.SpatialLoss`) or Smoother-style ``inv_cov`` tensor (times
``confidences`` where present), else it is probed from the loss
itself: the gradient of ``L`` at a one-hot ``B`` is ``2 Q_k e_i``, one call per spot, computed
once and cached.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spatialscale.expression.likelihoods import log_nb, log_poisson, log_zinb

__all__ = ["VAE", "LDVAE", "LIKELIHOODS", "DISPERSIONS", "LATENT_DISTRIBUTIONS", "precision_diagonal"]

#: Count likelihoods of the decoder.
LIKELIHOODS = ("zinb", "nb", "poisson")

#: Ways the NB inverse dispersion is shared.
DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")

#: Posterior families of the latent: Gaussian, or logistic normal (decoder sees ``softmax(z)``).
LATENT_DISTRIBUTIONS = ("normal", "ln")

#: Added to the encoder's variances (scVI's ``var_eps``).
VAR_EPS = 1e-4

#: Batch-norm settings of scVI's layers.
BN_MOMENTUM = 0.01
BN_EPS = 1e-3


def _check_choice(name: str, value: str, valid: Sequence[str]) -> None:
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}.")


class _Layer(nn.Module):
    """``Linear -> BatchNorm -> activation -> Dropout``, each after the linear map optional."""

    def __init__(self, n_in: int, n_out: int, *, bias: bool, batch_norm: bool, activation: bool,
                 dropout_rate: float) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out, bias=bias)
        self.norm = nn.BatchNorm1d(n_out, momentum=BN_MOMENTUM, eps=BN_EPS) if batch_norm else None
        self.activation = activation
        self.dropout = nn.Dropout(dropout_rate) if dropout_rate > 0 else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.linear(h)
        if self.norm is not None:
            h = self.norm(h)
        if self.activation:
            h = F.relu(h)
        if self.dropout is not None:
            h = self.dropout(h)
        return h


class FCLayers(nn.Module):
    """Fully connected layers with a covariate vector concatenated to the input of every layer.

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    n_cov
        Width of the covariate vector (one-hots and continuous covariates); 0 for none.
    n_layers
        Number of layers (hidden width ``n_hidden`` between them).
    n_hidden
        Hidden width.
    dropout_rate
        Dropout after each layer.
    batch_norm, activation, bias
        Batch norm, ReLU and linear bias in each layer.
    """

    def __init__(self, n_in: int, n_out: int, *, n_cov: int = 0, n_layers: int = 1, n_hidden: int = 128,
                 dropout_rate: float = 0.1, batch_norm: bool = True, activation: bool = True,
                 bias: bool = True) -> None:
        super().__init__()
        dims = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.n_cov = n_cov
        self.layers = nn.ModuleList(
            _Layer(d_in + n_cov, d_out, bias=bias, batch_norm=batch_norm, activation=activation,
                   dropout_rate=dropout_rate)
            for d_in, d_out in itertools.pairwise(dims))

    def forward(self, h: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            if self.n_cov:
                h = torch.cat([h, cov], dim=-1)
            h = layer(h)
        return h


class Encoder(nn.Module):
    """Gaussian encoder: :class:`FCLayers` then linear heads for the mean and ``log`` variance."""

    def __init__(self, n_in: int, n_out: int, *, n_cov: int, n_layers: int, n_hidden: int, dropout_rate: float,
                 batch_norm: bool) -> None:
        super().__init__()
        self.body = FCLayers(n_in, n_hidden, n_cov=n_cov, n_layers=n_layers, n_hidden=n_hidden,
                             dropout_rate=dropout_rate, batch_norm=batch_norm)
        self.mean = nn.Linear(n_hidden, n_out)
        self.log_var = nn.Linear(n_hidden, n_out)

    def forward(self, h: torch.Tensor, cov: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(h, cov)
        return self.mean(h), torch.exp(self.log_var(h)) + VAR_EPS


def precision_diagonal(spatial_loss: Callable[..., torch.Tensor], n_spots: int, n_groups: int) -> torch.Tensor:
    """The diagonal of a quadratic spatial loss's precision, ``(n_groups, n_spots)`` float64.

    ``spatial_loss.precision_diagonal()`` where the loss has it; else its ``precision``
    (:class:`spatialscale.losses.SpatialLoss`: ``(n, n)``) or Smoother-style ``inv_cov``
    (``(1 or n_groups, n, n)``) tensor, dense or sparse, times ``confidences``; else probed: the
    gradient of ``L(B) = sum_k b_k' Q_k b_k`` at ``B = [e_i, ..., e_i]`` is ``2 Q_k e_i`` (``n_spots``
    calls of the loss with ``normalize=False``).

    Parameters
    ----------
    spatial_loss
        The loss (module docstring).
    n_spots
        Spots of the field.
    n_groups
        Latent dimensions.

    Returns
    -------
    torch.Tensor
        ``(n_groups, n_spots)``, on the CPU.
    """
    if getattr(spatial_loss, "prior", None) == "kl":
        raise ValueError("sp_loss_as_kl needs a quadratic spatial loss; prior='kl' is a pairwise KL, not a precision.")
    method = getattr(spatial_loss, "precision_diagonal", None)
    stored = next((m for m in (getattr(spatial_loss, "precision", None), getattr(spatial_loss, "inv_cov", None))
                   if isinstance(m, torch.Tensor)), None)
    if callable(method):
        diag = torch.as_tensor(np.asarray(_to_numpy(method())), dtype=torch.float64)
    elif stored is not None:
        mats = [stored] if stored.ndim == 2 else [stored[g] for g in range(stored.shape[0])]
        diag = torch.stack([_matrix_diagonal(m) for m in mats])
        conf = getattr(spatial_loss, "confidences", None)
        if isinstance(conf, torch.Tensor):
            diag = diag * conf.detach().cpu().to(torch.float64).reshape(-1, 1)
    else:
        dtype = _loss_dtype(spatial_loss) or torch.float64
        diag = torch.empty(n_groups, n_spots, dtype=torch.float64)
        for i in range(n_spots):
            b = torch.zeros(n_groups, n_spots, dtype=dtype)
            b[:, i] = 1.0
            b.requires_grad_(True)
            (grad,) = torch.autograd.grad(spatial_loss(b, normalize=False), b)
            diag[:, i] = 0.5 * grad[:, i].detach().cpu().to(torch.float64)
    if diag.ndim == 1:
        diag = diag.reshape(1, -1)
    if diag.shape[-1] != n_spots or diag.shape[0] not in (1, n_groups):
        raise ValueError(f"the spatial loss's precision diagonal has shape {tuple(diag.shape)}, expected "
                         f"({n_spots},) or ({n_groups}, {n_spots}); does the loss cover the {n_spots} spots?")
    return diag.expand(n_groups, n_spots).clone()


def _matrix_diagonal(m: torch.Tensor) -> torch.Tensor:
    """Diagonal of a dense or sparse COO square matrix, float64 on the CPU."""
    m = m.detach()
    if m.layout == torch.strided:
        return torch.diagonal(m).cpu().to(torch.float64)
    m = m.coalesce().cpu()
    rows, cols = m.indices()
    on = rows == cols
    diag = torch.zeros(m.shape[0], dtype=torch.float64)
    diag[rows[on]] = m.values()[on].to(torch.float64)
    return diag


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.to_dense() if value.is_sparse else value
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _loss_dtype(spatial_loss: Any) -> torch.dtype | None:
    """Floating dtype of the tensors a spatial loss holds (buffers, parameters or plain attributes)."""
    tensors: list[torch.Tensor] = []
    if isinstance(spatial_loss, nn.Module):
        tensors += list(spatial_loss.buffers()) + list(spatial_loss.parameters())
    tensors += [v for v in getattr(spatial_loss, "__dict__", {}).values() if isinstance(v, torch.Tensor)]
    return next((t.dtype for t in tensors if t.is_floating_point()), None)


def call_spatial_loss(spatial_loss: Callable[..., torch.Tensor], coefs: torch.Tensor,
                      index: torch.Tensor | None = None) -> torch.Tensor:
    """``spatial_loss(coefs, normalize=False[, index=index])`` in the loss's dtype, returned in ``coefs``'s."""
    dtype = _loss_dtype(spatial_loss)
    x = coefs if dtype is None else coefs.to(dtype)
    kwargs: dict[str, Any] = {"normalize": False}
    if index is not None:
        kwargs["index"] = index
    return torch.as_tensor(spatial_loss(x, **kwargs)).to(coefs.dtype)


class VAE(nn.Module):
    """scVI-style VAE on counts, with an optional linear decoder and spatial loss (module docstring).

    Parameters
    ----------
    n_input
        Number of genes.
    n_hidden
        Width of the hidden layers.
    n_latent
        Latent dimensions.
    n_layers
        Hidden layers of the encoder and (non-linear) decoder.
    dropout_rate
        Dropout in the encoder.
    gene_likelihood
        ``"zinb"``, ``"nb"`` or ``"poisson"``.
    dispersion
        ``"gene"`` (one ``theta`` per gene), ``"gene-batch"`` (per gene and batch; ``n_batch >= 2``),
        ``"gene-label"`` (per gene and label; ``n_labels >= 1``) or ``"gene-cell"`` (a decoder head).
    latent_distribution
        ``"normal"``, or ``"ln"`` (logistic normal: the decoder sees ``softmax(z)``).
    use_observed_lib_size
        Library size from the counts (``log`` of the spot totals, at least 1); else a learnt latent with
        the per-batch log-normal prior (:meth:`set_library_prior`).
    n_batch
        Batches (0 or 1: none); the one-hot goes into the encoder and the decoder.
    n_labels
        Labels, for ``dispersion="gene-label"``.
    n_cats_per_cov
        Levels of each categorical covariate of the decoder.
    n_continuous_cov
        Number of continuous covariates of the decoder.
    linear_decoder
        LDVAE: the decoder is one linear map of ``z`` (and the covariates).
    use_batch_norm_encoder, use_batch_norm_decoder
        Batch norm in the encoder and decoder layers.
    decoder_bias
        Bias of the linear decoder (default: none, as scVI's LDVAE); the MLP decoder always has biases.
    spatial_loss
        Optional spatial loss (module docstring); not registered as a sub-module, so its tensors are
        neither trained nor saved with the model.
    lambda_spatial
        Weight of the spatial loss, or the scale ``lambda`` of the spatial prior precision.
    sp_loss_as_kl
        Use the spatial loss as the KL to a spatial Gaussian prior instead of an added term.
    """

    def __init__(
        self,
        n_input: int,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        gene_likelihood: str = "nb",
        dispersion: str = "gene",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        n_batch: int = 0,
        n_labels: int = 0,
        n_cats_per_cov: Sequence[int] | None = None,
        n_continuous_cov: int = 0,
        linear_decoder: bool = False,
        use_batch_norm_encoder: bool = True,
        use_batch_norm_decoder: bool = True,
        decoder_bias: bool = False,
        spatial_loss: Callable[..., torch.Tensor] | None = None,
        lambda_spatial: float = 0.1,
        sp_loss_as_kl: bool = False,
    ) -> None:
        super().__init__()
        _check_choice("gene_likelihood", gene_likelihood, LIKELIHOODS)
        _check_choice("dispersion", dispersion, DISPERSIONS)
        _check_choice("latent_distribution", latent_distribution, LATENT_DISTRIBUTIONS)
        for name, value, least in (("n_input", n_input, 1), ("n_hidden", n_hidden, 1), ("n_latent", n_latent, 1),
                                   ("n_layers", n_layers, 1), ("n_batch", n_batch, 0), ("n_labels", n_labels, 0),
                                   ("n_continuous_cov", n_continuous_cov, 0)):
            if int(value) != value or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}.")
        if not 0 <= dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}.")
        n_cats = [int(c) for c in (n_cats_per_cov or [])]
        if any(c < 1 for c in n_cats):
            raise ValueError(f"n_cats_per_cov must be level counts >= 1, got {list(n_cats_per_cov or [])}.")
        if dispersion == "gene-batch" and n_batch < 2:
            raise ValueError(f"dispersion='gene-batch' needs n_batch >= 2, got n_batch={n_batch}.")
        if dispersion == "gene-label" and n_labels < 1:
            raise ValueError("dispersion='gene-label' needs n_labels >= 1.")
        self.n_input = int(n_input)
        self.n_hidden = int(n_hidden)
        self.n_latent = int(n_latent)
        self.n_layers = int(n_layers)
        self.gene_likelihood = gene_likelihood
        self.dispersion = dispersion
        self.latent_distribution = latent_distribution
        self.use_observed_lib_size = bool(use_observed_lib_size)
        self.n_batch = int(n_batch)
        self.n_labels = int(n_labels)
        self.n_cats_per_cov = n_cats
        self.n_continuous_cov = int(n_continuous_cov)
        self.linear_decoder = bool(linear_decoder)
        self.use_batch_norm_decoder = bool(use_batch_norm_decoder)
        self.set_spatial_loss(spatial_loss, lambda_spatial, sp_loss_as_kl)

        n_batch_cov = self.n_batch if self.n_batch > 1 else 0
        n_dec_cov = n_batch_cov + sum(c for c in n_cats if c > 1) + self.n_continuous_cov
        enc = {"n_layers": n_layers, "n_hidden": n_hidden, "dropout_rate": dropout_rate,
               "batch_norm": use_batch_norm_encoder}
        self.z_encoder = Encoder(n_input, n_latent, n_cov=n_batch_cov, **enc)
        self.l_encoder = None if self.use_observed_lib_size else Encoder(n_input, 1, n_cov=n_batch_cov, **enc)
        n_levels = max(self.n_batch, 1)
        self.register_buffer("library_log_means", torch.zeros(n_levels))
        self.register_buffer("library_log_vars", torch.ones(n_levels))

        needs_r_head = dispersion == "gene-cell" and gene_likelihood != "poisson"
        needs_dropout_head = gene_likelihood == "zinb"
        if self.linear_decoder:
            lin = {"n_cov": n_dec_cov, "n_layers": 1, "dropout_rate": 0.0, "batch_norm": use_batch_norm_decoder,
                   "activation": False, "bias": decoder_bias}
            self.px_decoder = None
            self.px_scale_decoder = FCLayers(n_latent, n_input, **lin)
            self.px_r_decoder = FCLayers(n_latent, n_input, **lin) if needs_r_head else None
            self.px_dropout_decoder = FCLayers(n_latent, n_input, **lin) if needs_dropout_head else None
        else:
            self.px_decoder = FCLayers(n_latent, n_hidden, n_cov=n_dec_cov, n_layers=n_layers, n_hidden=n_hidden,
                                       dropout_rate=0.0, batch_norm=use_batch_norm_decoder)
            self.px_scale_decoder = nn.Linear(n_hidden, n_input)
            self.px_r_decoder = nn.Linear(n_hidden, n_input) if needs_r_head else None
            self.px_dropout_decoder = nn.Linear(n_hidden, n_input) if needs_dropout_head else None
        if gene_likelihood == "poisson" or dispersion == "gene-cell":
            self.px_r = None
        else:
            rows = {"gene": 1, "gene-batch": self.n_batch, "gene-label": self.n_labels}[dispersion]
            self.px_r = nn.Parameter(torch.randn(rows, n_input))

    # ------------------------------------------------------------------ configuration
    def set_spatial_loss(self, spatial_loss: Callable[..., torch.Tensor] | None, lambda_spatial: float = 0.1,
                         sp_loss_as_kl: bool = False) -> None:
        """Set (or, with ``None``, remove) the spatial loss; see the module docstring for the two forms."""
        if not np.isfinite(lambda_spatial) or lambda_spatial < 0:
            raise ValueError(f"lambda_spatial must be finite and >= 0, got {lambda_spatial!r}.")
        if sp_loss_as_kl and (spatial_loss is None or lambda_spatial <= 0):
            raise ValueError("sp_loss_as_kl=True needs a spatial_loss and lambda_spatial > 0.")
        if spatial_loss is not None and not callable(spatial_loss):
            raise ValueError(f"spatial_loss must be callable, got {type(spatial_loss).__name__}.")
        # plain attributes, not sub-modules: the loss's tensors are not parameters of the model
        object.__setattr__(self, "spatial_loss", spatial_loss)
        object.__setattr__(self, "lambda_spatial", float(lambda_spatial))
        object.__setattr__(self, "sp_loss_as_kl", bool(sp_loss_as_kl))
        object.__setattr__(self, "_precision_diag", None)

    def set_library_prior(self, counts: torch.Tensor, batch_index: torch.Tensor | None = None) -> None:
        """Set the log-library prior of each batch to the mean and variance of the observed log totals.

        Spots with no counts are left out; a batch with fewer than two counted spots gets mean 0, variance 1.
        """
        totals = counts.sum(dim=1).to(torch.float64)
        codes = torch.zeros_like(totals, dtype=torch.long) if batch_index is None else batch_index.reshape(-1).long()
        means = torch.zeros_like(self.library_log_means, dtype=torch.float64)
        variances = torch.ones_like(self.library_log_vars, dtype=torch.float64)
        for b in range(means.shape[0]):
            logs = torch.log(totals[(codes == b) & (totals > 0)])
            if logs.numel() >= 2:
                means[b] = logs.mean()
                variances[b] = logs.var(unbiased=False).clamp_min(1e-6)
        self.library_log_means.copy_(means.to(self.library_log_means))
        self.library_log_vars.copy_(variances.to(self.library_log_vars))

    # ------------------------------------------------------------------ covariates
    @staticmethod
    def _one_hot(codes: torch.Tensor | None, n: int, like: torch.Tensor) -> list[torch.Tensor]:
        if n <= 1:
            return []
        if codes is None:
            raise ValueError(f"the model has {n} levels of a covariate, but none was given.")
        return [F.one_hot(codes.reshape(-1).long(), n).to(like.dtype)]

    def _covariates(self, x: torch.Tensor, batch_index: torch.Tensor | None, cat_covs: torch.Tensor | None,
                    cont_covs: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        rows = x.shape[0]
        enc = self._one_hot(batch_index, self.n_batch, x)
        dec = list(enc)
        for j, n in enumerate(self.n_cats_per_cov):
            dec += self._one_hot(None if cat_covs is None else cat_covs[:, j], n, x)
        if self.n_continuous_cov:
            if cont_covs is None:
                raise ValueError(f"the model has {self.n_continuous_cov} continuous covariates, but none were given.")
            dec.append(cont_covs.reshape(rows, -1).to(x.dtype))
        return (torch.cat(enc, dim=1) if enc else None), (torch.cat(dec, dim=1) if dec else None)

    # ------------------------------------------------------------------ model
    def forward(self, x: torch.Tensor, batch_index: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                cat_covs: torch.Tensor | None = None, cont_covs: torch.Tensor | None = None,
                sample: bool = True) -> dict[str, torch.Tensor | None]:
        """Encode and decode a ``(spots, genes)`` count tensor.

        Parameters
        ----------
        x
            Counts.
        batch_index, labels
            Integer codes per spot (needed when the model has batches, or gene-label dispersion).
        cat_covs
            ``(spots, n_cat_covs)`` integer codes.
        cont_covs
            ``(spots, n_continuous_cov)`` values.
        sample
            Decode a reparameterised sample of ``z`` (and of the library latent); else the posterior means.

        Returns
        -------
        dict
            ``qz_m``, ``qz_v`` (posterior mean and variance of the Gaussian latent), ``z`` (what the
            decoder saw: the sample or mean, through ``softmax`` for ``"ln"``), ``library`` (log scale),
            ``ql_m``, ``ql_v`` (learnt library only, else ``None``), ``px_scale``, ``px_rate``, ``px_r``
            (inverse dispersion, broadcastable to ``x``; ``None`` for Poisson) and ``px_dropout`` (zinb
            logits, else ``None``).
        """
        enc_cov, dec_cov = self._covariates(x, batch_index, cat_covs, cont_covs)
        h = torch.log1p(x)
        qz_m, qz_v = self.z_encoder(h, enc_cov)
        latent = qz_m + qz_v.sqrt() * torch.randn_like(qz_m) if sample else qz_m
        z = torch.softmax(latent, dim=-1) if self.latent_distribution == "ln" else latent
        if self.l_encoder is None:
            ql_m = ql_v = None
            library = torch.log(x.sum(dim=1, keepdim=True).clamp_min(1.0))
        else:
            ql_m, ql_v = self.l_encoder(h, enc_cov)
            library = ql_m + ql_v.sqrt() * torch.randn_like(ql_m) if sample else ql_m
        out = self.generative(z, library, dec_cov, batch_index=batch_index, labels=labels)
        out.update(qz_m=qz_m, qz_v=qz_v, z=z, library=library, ql_m=ql_m, ql_v=ql_v)
        return out

    def generative(self, z: torch.Tensor, library: torch.Tensor, dec_cov: torch.Tensor | None = None, *,
                   batch_index: torch.Tensor | None = None,
                   labels: torch.Tensor | None = None) -> dict[str, torch.Tensor | None]:
        """Decoder outputs from the latent ``z`` and the log library (see :meth:`forward`)."""
        if self.linear_decoder:
            raw_scale = self.px_scale_decoder(z, dec_cov)
            heads = {k: (None if m is None else m(z, dec_cov))
                     for k, m in (("r", self.px_r_decoder), ("dropout", self.px_dropout_decoder))}
        else:
            hidden = self.px_decoder(z, dec_cov)
            raw_scale = self.px_scale_decoder(hidden)
            heads = {k: (None if m is None else m(hidden))
                     for k, m in (("r", self.px_r_decoder), ("dropout", self.px_dropout_decoder))}
        px_scale = torch.softmax(raw_scale, dim=-1)
        px_rate = torch.exp(library) * px_scale
        if self.gene_likelihood == "poisson":
            px_r = None
        elif self.dispersion == "gene-cell":
            px_r = torch.exp(heads["r"])
        elif self.dispersion == "gene":
            px_r = torch.exp(self.px_r[0])
        else:
            codes = batch_index if self.dispersion == "gene-batch" else labels
            if codes is None:
                raise ValueError(f"dispersion={self.dispersion!r} needs "
                                 f"{'batch_index' if self.dispersion == 'gene-batch' else 'labels'}.")
            px_r = torch.exp(self.px_r[codes.reshape(-1).long()])
        return {"px_scale": px_scale, "px_rate": px_rate, "px_r": px_r, "px_dropout": heads["dropout"]}

    def log_likelihood(self, x: torch.Tensor, out: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``log p(x | z, l)`` per spot (summed over genes)."""
        if self.gene_likelihood == "poisson":
            ll = log_poisson(x, out["px_rate"])
        elif self.gene_likelihood == "nb":
            ll = log_nb(x, out["px_rate"], out["px_r"])
        else:
            ll = log_zinb(x, out["px_rate"], out["px_r"], out["px_dropout"])
        return ll.sum(dim=-1)

    def kl_latent(self, out: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``KL(q(z | x) || N(0, I))`` per spot."""
        m, v = out["qz_m"], out["qz_v"]
        return 0.5 * (v + m * m - 1.0 - torch.log(v)).sum(dim=-1)

    def kl_library(self, out: dict[str, torch.Tensor | None], batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """``KL(q(l | x) || N(m_b, v_b))`` per spot (zeros with the observed library)."""
        if out["ql_m"] is None:
            return torch.zeros_like(out["qz_m"][:, 0])
        codes = 0 if self.n_batch <= 1 or batch_index is None else batch_index.reshape(-1).long()
        pm = self.library_log_means[codes].reshape(-1, 1)
        pv = self.library_log_vars[codes].reshape(-1, 1)
        m, v = out["ql_m"], out["ql_v"]
        return 0.5 * (v / pv + (m - pm) ** 2 / pv - 1.0 + torch.log(pv) - torch.log(v)).sum(dim=-1)

    def negative_elbo(self, x: torch.Tensor, out: dict[str, torch.Tensor | None],
                      batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """Per-spot negative ELBO: reconstruction + ``KL(q(z | x) || N(0, I))`` + library KL, no spatial term."""
        return -self.log_likelihood(x, out) + self.kl_latent(out) + self.kl_library(out, batch_index)

    def precision_diagonal(self, n_spots: int) -> torch.Tensor:
        """The spatial loss's ``diag(Q)`` as ``(n_latent, n_spots)`` (cached; :func:`precision_diagonal`)."""
        cached = self._precision_diag
        if cached is None or cached.shape[-1] != n_spots:
            cached = precision_diagonal(self.spatial_loss, n_spots, self.n_latent)
            object.__setattr__(self, "_precision_diag", cached)
        return cached

    def spatial_kl(self, qz_m: torch.Tensor, qz_v: torch.Tensor, index: torch.Tensor | None = None,
                   n_spots: int | None = None) -> torch.Tensor:
        r"""KL of the factorised posterior to the spatial prior ``N(0, (lambda Q)^-1)`` per latent dimension.

        ``1/2 [lambda sum_ik Q_k,ii sigma_ik^2 + lambda L(M') - sum_ik log sigma_ik^2 - m K (1 + log lambda)]``,
        the KL up to the constant ``-1/2 sum_k log det Q_k`` (module docstring).

        Parameters
        ----------
        qz_m, qz_v
            ``(m, n_latent)`` posterior means and variances of the field's spots.
        index
            The spots' indices in the section (a minibatch); ``None``: the rows are all spots.
        n_spots
            Spots in the section (for the precision diagonal; default ``m``).

        Returns
        -------
        torch.Tensor
            Scalar (summed over spots and latent dimensions).
        """
        lam = self.lambda_spatial
        m, k = qz_m.shape
        diag = self.precision_diagonal(n_spots or m)
        if diag.device != qz_m.device or diag.dtype != qz_m.dtype:
            diag = diag.to(device=qz_m.device, dtype=qz_m.dtype)
            object.__setattr__(self, "_precision_diag", diag)  # cached where it is used
        if index is not None:
            diag = diag[:, index.to(diag.device)]
        quad = call_spatial_loss(self.spatial_loss, qz_m.T, index)
        trace = (diag * qz_v.T).sum()
        return 0.5 * (lam * trace + lam * quad - torch.log(qz_v).sum() - m * k * (1.0 + np.log(lam)))

    def loss(self, x: torch.Tensor, out: dict[str, torch.Tensor | None], *, batch_index: torch.Tensor | None = None,
             kl_weight: float = 1.0, index: torch.Tensor | None = None, mask: torch.Tensor | None = None,
             n_spots: int | None = None) -> dict[str, torch.Tensor]:
        """The training objective and its parts.

        Parameters
        ----------
        x, out
            Counts and :meth:`forward`'s outputs for the rows of the spatial field.
        batch_index
            Batch codes of the rows (library prior).
        kl_weight
            Warm-up weight of the latent KL (the library KL is never warmed up, as scVI).
        index
            Section indices of the rows for the spatial loss; ``None``: the rows are the whole section.
        mask
            Rows whose reconstruction and per-spot KLs enter the objective (default all); the
            spatial term covers every row.
        n_spots
            Spots in the section (precision diagonal of the KL form).

        Returns
        -------
        dict
            ``loss`` (scalar objective), ``reconstruction``, ``kl_z``, ``kl_l`` and ``elbo`` (per-row
            negative ELBO against ``N(0, I)`` with weight 1, no spatial term), and ``spatial`` (the scalar
            spatial term as it enters ``loss``, before ``kl_weight`` in the KL form).
        """
        rec = -self.log_likelihood(x, out)
        kl_z = self.kl_latent(out)
        kl_l = self.kl_library(out, batch_index)
        spatial = torch.zeros((), dtype=x.dtype, device=x.device)
        rows = x.shape[0]
        has_spatial = self.spatial_loss is not None and self.lambda_spatial > 0
        if has_spatial and self.sp_loss_as_kl:
            spatial = self.spatial_kl(out["qz_m"], out["qz_v"], index, n_spots) / rows
            per_row = rec + kl_l
            extra = kl_weight * spatial
        else:
            if has_spatial:
                spatial = self.lambda_spatial * call_spatial_loss(self.spatial_loss, out["qz_m"].T, index) / rows
            per_row = rec + kl_l + kl_weight * kl_z
            extra = spatial
        mean = per_row.mean() if mask is None else per_row[mask].mean()
        return {"loss": mean + extra, "reconstruction": rec, "kl_z": kl_z, "kl_l": kl_l,
                "elbo": rec + kl_l + kl_z, "spatial": spatial}

    # ------------------------------------------------------------------ outputs
    def get_loadings(self) -> np.ndarray:
        """Gene loadings of the linear decoder, ``(n_genes, n_latent)`` float64.

        The weights of ``z`` in the decoder's linear map, scaled by the batch norm's
        ``gamma / sqrt(running_var + eps)`` when the decoder has one (as scVI's LDVAE).
        """
        if not self.linear_decoder:
            raise ValueError("get_loadings needs a linear decoder (LDVAE / linear_decoder=True).")
        layer = self.px_scale_decoder.layers[0]
        w = layer.linear.weight.detach().to(torch.float64)[:, : self.n_latent]
        if layer.norm is not None:
            bn = layer.norm
            scale = bn.weight.detach().to(torch.float64) / torch.sqrt(bn.running_var.to(torch.float64) + bn.eps)
            w = scale.reshape(-1, 1) * w
        return w.cpu().numpy()

    def dispersion_values(self, out: dict[str, torch.Tensor | None] | None = None) -> np.ndarray | None:
        """Inverse dispersion ``theta`` as numpy float64.

        ``(n_genes,)`` for ``"gene"``, ``(n_batch, n_genes)`` for ``"gene-batch"``, ``(n_labels, n_genes)``
        for ``"gene-label"``, and for ``"gene-cell"`` the ``(spots, n_genes)`` decoder output in ``out``;
        ``None`` for the Poisson likelihood.
        """
        if self.gene_likelihood == "poisson":
            return None
        if self.dispersion == "gene-cell":
            if out is None:
                raise ValueError("dispersion='gene-cell' is per spot: pass forward()'s outputs.")
            return out["px_r"].detach().to(torch.float64).cpu().numpy()
        theta = torch.exp(self.px_r.detach().to(torch.float64)).cpu().numpy()
        return theta[0] if self.dispersion == "gene" else theta


class LDVAE(VAE):
    """Linearly decoded VAE (scVI's LDVAE): :class:`VAE` with ``linear_decoder=True``.

    The decoder is ``px_scale = softmax(BN(W [z; covariates]))`` (batch norm optional, no bias by
    default), so ``W[:, :n_latent]`` (scaled by the batch norm) are interpretable gene loadings:
    :meth:`VAE.get_loadings`.  Takes :class:`VAE`'s parameters, except ``linear_decoder``.
    """

    def __init__(self, n_input: int, **kwargs: Any) -> None:
        if "linear_decoder" in kwargs:
            raise ValueError("LDVAE always has a linear decoder; do not pass linear_decoder.")
        super().__init__(n_input, linear_decoder=True, **kwargs)
