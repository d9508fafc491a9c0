"""Training the expression VAEs (:mod:`spatialscale.expression.vae`): :func:`train_model` and :func:`fit_vae`.

Plain torch on one device; no Dask and no store.

Data and the held-out spots
---------------------------
A fraction ``validation_fraction`` of the spots (drawn with the seed) is held out: their counts
never enter the reconstruction or per-spot KL terms of the objective, and early stopping
watches their negative ELBO (reconstruction + KL to ``N(0, I)`` + library KL, KL weight 1, so
the warm-up does not move it).  Every spot, held out or not, gets a latent at the end.

Held-out spots are out of the training passes altogether, the spatial term included: were
they encoded with the training spots, the batch-norm statistics would let their (unpenalised)
latents steer the training spots' outputs.  So

* Full batch (``batch_size=None``): every step encodes the training spots; the objective is their
  mean per-spot loss plus the spatial term over their posterior means, with ``index`` the
  training spots (the conditional precision of the training field given the held-out spots).
  With ``validation_fraction=0`` the field is the whole section and the loss is called with
  ``index=None``: use that for a spatial fit of every spot (early stopping then watches the
  training objective).  Full batch is required when the spatial loss couples all spots.
* Minibatches (``batch_size=b``): an epoch visits the training spots in a seeded random order,
  ``b`` at a time (a last batch of one spot joins the previous one, as batch norm needs two);
  the spatial term of a batch is computed on its spots with ``index=`` (the conditional precision
  of the batch).

The validation loss never contains a spatial term (it couples spots); with a standardised prior
covariance and ``lambda_spatial = 1``, ``N(0, I)`` is also the per-spot marginal of the spatial
prior of the KL form.

Batch norm runs with scVI's momentum (0.01) on minibatches and with momentum 1 in full-batch
training (each step sees the whole section, so the running statistics are the last step's
exactly); after training its statistics are recomputed over the training spots, with dropout
off, and the outputs are computed in evaluation mode at the posterior means.

Reproducibility: the seed fixes the split, the minibatch order and (through
``torch.manual_seed`` inside :func:`torch.random.fork_rng`, which leaves the caller's global
generator as it was) dropout and the reparameterisation noise; :func:`fit_vae` also seeds the
initial weights.  The same seed gives bit-identical results on the same machine and thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse
import torch
from torch import nn
from tqdm.auto import tqdm

from spatialscale.expression.vae import DISPERSIONS, LATENT_DISTRIBUTIONS, LDVAE, LIKELIHOODS, VAE

__all__ = ["TrainResult", "train_model", "fit_vae", "MODELS"]

#: Models of :func:`fit_vae`.
MODELS = ("vae", "ldvae")

#: Rows per forward pass when computing validation losses and the outputs.
EVAL_CHUNK = 4096

#: Adam's epsilon (scVI's training plan).
ADAM_EPS = 0.01


@dataclass
class TrainResult:
    """What :func:`train_model` returns (numpy arrays on the host, float64).

    Attributes
    ----------
    latent_mean
        ``(n_spots, n_latent)`` posterior means of the Gaussian latent (before the ``softmax`` of
        ``latent_distribution="ln"``).
    latent_var
        ``(n_spots, n_latent)`` posterior variances.
    library
        ``(n_spots,)`` library sizes: the observed totals (at least 1), or the log-normal posterior
        mean ``exp(m + v / 2)`` of the learnt library.
    dispersion
        Inverse dispersion ``theta``: ``(n_genes,)``, ``(n_batch, n_genes)``, ``(n_labels, n_genes)`` or,
        for ``"gene-cell"``, ``(n_spots, n_genes)``; ``None`` for the Poisson likelihood.
    loadings
        ``(n_genes, n_latent)`` gene loadings of a linear decoder (LDVAE), else ``None``.
    history
        ``{"train": [...], "validation": [...]}`` per epoch: the objective (mean over the epoch's
        batches, weighted by size) and the held-out negative ELBO per spot (empty without held-out spots).
    final_loss
        The last epoch's training objective.
    epochs
        Epochs run.
    stopped_early
        Whether early stopping ended the training.
    validation_index
        Indices of the held-out spots (sorted).
    model
        The trained module (on ``device``, in evaluation mode).
    """

    latent_mean: np.ndarray
    latent_var: np.ndarray
    library: np.ndarray
    dispersion: np.ndarray | None
    loadings: np.ndarray | None
    history: dict[str, list[float]]
    final_loss: float
    epochs: int
    stopped_early: bool
    validation_index: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    model: VAE | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------- input checks
def _dense_counts(counts: Any) -> np.ndarray:
    if isinstance(counts, torch.Tensor):
        counts = counts.detach().cpu().numpy()
    if scipy.sparse.issparse(counts):
        counts = counts.toarray()
    try:
        arr = np.asarray(counts, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"counts must be a numeric (spots, genes) matrix: {exc}") from None
    if arr.ndim != 2 or arr.shape[0] < 2 or arr.shape[1] < 1:
        raise ValueError(f"counts must be a (spots, genes) matrix with at least 2 spots, got shape {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ValueError(f"counts hold {int((~np.isfinite(arr)).sum())} NaN or infinite values.")
    if (arr < 0).any():
        raise ValueError(f"counts hold {int((arr < 0).sum())} negative values.")
    return arr


def _codes(values: Any, name: str, n: int, n_levels: int | None = None) -> np.ndarray | None:
    """Integer codes of a per-spot vector, checked against ``n`` spots and ``n_levels`` levels."""
    if values is None:
        return None
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.shape[0] != n:
        raise ValueError(f"{name} must have one entry per spot ({n}), got shape {arr.shape}.")
    if n_levels is None:
        return np.unique(arr, return_inverse=True)[1].astype(np.int64)
    if arr.dtype.kind not in "iub" or (arr.size and (arr.min() < 0 or arr.max() >= n_levels)):
        raise ValueError(f"{name} must be integer codes in [0, {n_levels}) for this model.")
    return arr.astype(np.int64)


def _cat_matrix(cat_covs: Any, n: int) -> list[np.ndarray]:
    """Categorical covariates as a list of per-spot columns: a sequence of vectors or a (spots, k) array."""
    if cat_covs is None:
        return []
    if isinstance(cat_covs, np.ndarray) and cat_covs.ndim == 2:
        cols = [cat_covs[:, j] for j in range(cat_covs.shape[1])]
    elif isinstance(cat_covs, np.ndarray) and cat_covs.ndim == 1:
        cols = [cat_covs]
    else:
        cols = [np.asarray(c) for c in cat_covs]
    for j, col in enumerate(cols):
        if col.ndim != 1 or col.shape[0] != n:
            raise ValueError(f"cat_covs[{j}] must have one entry per spot ({n}), got shape {col.shape}.")
    return cols


def _cont_matrix(cont_covs: Any, n: int) -> np.ndarray | None:
    if cont_covs is None:
        return None
    arr = np.asarray(cont_covs, dtype=np.float64)
    arr = arr.reshape(-1, 1) if arr.ndim == 1 else arr
    if arr.ndim != 2 or arr.shape[0] != n:
        raise ValueError(f"cont_covs must be (spots, k) with {n} spots, got shape {np.shape(cont_covs)}.")
    if not np.isfinite(arr).all():
        raise ValueError("cont_covs hold NaN or infinite values.")
    return arr


# ---------------------------------------------------------------------------- training
def _batch_norms(model: nn.Module) -> list[nn.BatchNorm1d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _recalibrate_batch_norm(model: VAE, run: Callable[[torch.Tensor], None], rows: torch.Tensor,
                            chunk: int) -> None:
    """Recompute batch-norm statistics over ``rows`` (cumulative average over chunks), dropout off."""
    norms = _batch_norms(model)
    if not norms:
        return
    momenta = [bn.momentum for bn in norms]
    model.train()
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.eval()
    for bn in norms:
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        pieces = list(torch.split(rows, chunk))
        if len(pieces) > 1 and pieces[-1].numel() < 2:
            pieces = pieces[:-2] + [torch.cat(pieces[-2:])]
        for piece in pieces:
            run(piece)
    for bn, momentum in zip(norms, momenta):
        bn.momentum = momentum
    model.eval()


def _minibatches(rows: torch.Tensor, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    order = rows[torch.randperm(rows.numel(), generator=generator)]
    pieces = list(torch.split(order, batch_size))
    if len(pieces) > 1 and pieces[-1].numel() < 2:
        pieces = pieces[:-2] + [torch.cat(pieces[-2:])]
    return pieces


def train_model(
    model: VAE,
    counts: Any,
    *,
    batch_index: Any = None,
    labels: Any = None,
    cat_covs: Any = None,
    cont_covs: Any = None,
    spatial_loss: Callable[..., torch.Tensor] | None = None,
    lambda_spatial: float = 0.1,
    sp_loss_as_kl: bool = False,
    max_epochs: int | None = None,
    lr: float = 1e-3,
    weight_decay: float = 1e-6,
    batch_size: int | None = None,
    validation_fraction: float = 0.1,
    early_stopping: bool = True,
    patience: int = 45,
    min_delta: float = 0.0,
    kl_warmup_epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> TrainResult:
    """Train a :class:`~spatialscale.expression.vae.VAE` (or LDVAE) on a count matrix with Adam.

    The module docstring describes the held-out spots, the full-batch and minibatch modes, batch
    norm and reproducibility.

    Parameters
    ----------
    model
        The model (``n_input`` genes; its batches, labels and covariates fix what must be passed).
    counts
        ``(spots, genes)`` non-negative counts: numpy, scipy sparse (densified) or torch.
    batch_index, labels
        Integer codes per spot in ``[0, model.n_batch)`` / ``[0, model.n_labels)``.
    cat_covs
        Categorical covariates: integer codes, a ``(spots, k)`` array or a sequence of ``k`` vectors.
    cont_covs
        ``(spots, k)`` (or ``(spots,)``) continuous covariates.
    spatial_loss, lambda_spatial, sp_loss_as_kl
        When ``spatial_loss`` is given, set on the model (:meth:`VAE.set_spatial_loss`) with these
        weight and form; otherwise the model's own spatial loss (if any) is used as it is.  A loss
        that is a torch module is moved to ``device`` (``.to(device)``, in place); another callable
        must work on tensors on ``device``.
    max_epochs
        Epochs at most; default scVI's ``min(400, round(400 * 20000 / n_spots))``, at least 1.
    lr, weight_decay
        Adam's learning rate and weight decay (epsilon 0.01, as scVI).
    batch_size
        Spots per minibatch (at least 2); ``None``: full batch (one step per epoch).
    validation_fraction
        Fraction of spots held out for early stopping, in ``[0, 1)``; 0 watches the training objective.
    early_stopping
        Stop once the watched loss has not improved by more than ``min_delta`` for ``patience`` epochs.
    patience, min_delta
        Early-stopping settings.
    kl_warmup_epochs
        The latent KL weight grows linearly from 0 at the first epoch to 1 at this epoch; default
        ``min(400, max_epochs)`` (scVI's 400); 0 for no warm-up.
    seed
        Seed of the split, minibatch order, dropout and sampling.
    device
        Torch device of the training; outputs come back as numpy on the host.
    progress
        Show a tqdm progress bar with the losses.

    Returns
    -------
    TrainResult
        Latents, library sizes, dispersion, loadings and the training history.
    """
    x_np = _dense_counts(counts)
    n, n_genes = x_np.shape
    if n_genes != model.n_input:
        raise ValueError(f"counts have {n_genes} genes, the model {model.n_input}.")
    batch = _codes(batch_index, "batch_index", n, max(model.n_batch, 1))
    if model.n_batch > 1 and batch is None:
        raise ValueError(f"the model has {model.n_batch} batches: pass batch_index.")
    lab = _codes(labels, "labels", n, max(model.n_labels, 1))
    if model.dispersion == "gene-label" and lab is None:
        raise ValueError("dispersion='gene-label' needs labels.")
    cats = _cat_matrix(cat_covs, n)
    if len(cats) != len(model.n_cats_per_cov):
        raise ValueError(f"the model has {len(model.n_cats_per_cov)} categorical covariates, got {len(cats)}.")
    cats = [_codes(c, f"cat_covs[{j}]", n, max(k, 1)) for j, (c, k) in enumerate(zip(cats, model.n_cats_per_cov))]
    cont = _cont_matrix(cont_covs, n)
    if (0 if cont is None else cont.shape[1]) != model.n_continuous_cov:
        raise ValueError(f"the model has {model.n_continuous_cov} continuous covariates, "
                         f"got {0 if cont is None else cont.shape[1]}.")
    if max_epochs is None:
        max_epochs = max(1, min(400, round(400 * 20000 / n)))
    if int(max_epochs) != max_epochs or max_epochs < 1:
        raise ValueError(f"max_epochs must be an integer >= 1, got {max_epochs!r}.")
    if batch_size is not None and (int(batch_size) != batch_size or batch_size < 2):
        raise ValueError(f"batch_size must be None (full batch) or an integer >= 2, got {batch_size!r}.")
    if not 0 <= validation_fraction < 1:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}.")
    if int(patience) != patience or patience < 1:
        raise ValueError(f"patience must be an integer >= 1, got {patience!r}.")
    if not (lr > 0 and math.isfinite(lr)) or not weight_decay >= 0:
        raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={lr!r}, weight_decay={weight_decay!r}.")
    kl_warmup = min(400, int(max_epochs)) if kl_warmup_epochs is None else int(kl_warmup_epochs)
    if kl_warmup < 0:
        raise ValueError(f"kl_warmup_epochs must be >= 0, got {kl_warmup_epochs!r}.")
    n_val = int(round(validation_fraction * n))
    if n - n_val < 2:
        raise ValueError(f"validation_fraction={validation_fraction} leaves {n - n_val} training spots; need 2.")
    if spatial_loss is not None:
        model.set_spatial_loss(spatial_loss, lambda_spatial, sp_loss_as_kl)
    elif sp_loss_as_kl and not model.sp_loss_as_kl:
        raise ValueError("sp_loss_as_kl=True needs a spatial_loss.")

    device = torch.device(device)
    model.to(device)
    if isinstance(model.spatial_loss, nn.Module):
        model.spatial_loss.to(device)
    x = torch.as_tensor(x_np, dtype=torch.float32, device=device)

    def per_spot(values: np.ndarray | None, dtype: torch.dtype) -> torch.Tensor | None:
        return None if values is None else torch.as_tensor(values, dtype=dtype, device=device)

    t_batch = per_spot(batch, torch.long)
    t_labels = per_spot(lab, torch.long)
    t_cats = per_spot(np.stack(cats, axis=1), torch.long) if cats else None
    t_cont = per_spot(cont, torch.float32)

    def run(rows: torch.Tensor | None, sample: bool = True) -> tuple[dict[str, Any], torch.Tensor | None]:
        """Forward pass on ``rows`` (``None``: all spots); returns outputs and the rows' batch codes."""
        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return t if (t is None or rows is None) else t[rows]
        b = take(t_batch)
        out = model(take(x), b, take(t_labels), take(t_cats), take(t_cont), sample=sample)
        return out, b

    if not model.use_observed_lib_size:
        model.set_library_prior(x, t_batch)

    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=generator)
    val_rows = torch.sort(perm[:n_val]).values
    train_rows = torch.sort(perm[n_val:]).values
    full_rows = train_rows.to(device) if n_val else None  # the field of full-batch steps; None: all spots
    norms = _batch_norms(model)
    momenta = [bn.momentum for bn in norms]
    if batch_size is None:
        for bn in norms:
            bn.momentum = 1.0
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=ADAM_EPS, weight_decay=weight_decay)
    history: dict[str, list[float]] = {"train": [], "validation": []}
    best, wait, stopped_early, epochs = math.inf, 0, False, 0
    fork_devices = [device] if device.type == "cuda" else []

    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(int(seed))
        bar = tqdm(range(int(max_epochs)), desc="VAE" if not model.linear_decoder else "LDVAE",
                   disable=not progress, leave=False)
        for epoch in bar:
            kl_weight = 1.0 if kl_warmup == 0 else min(1.0, epoch / kl_warmup)
            model.train()
            if batch_size is None:
                out, b = run(full_rows)
                terms = model.loss(x if full_rows is None else x[full_rows], out, batch_index=b, kl_weight=kl_weight,
                                   index=full_rows, n_spots=n)
                optimizer.zero_grad(set_to_none=True)
                terms["loss"].backward()
                optimizer.step()
                train_loss = float(terms["loss"].detach())
            else:
                total, count = 0.0, 0
                for rows in _minibatches(train_rows, int(batch_size), generator):
                    rows_dev = rows.to(device)
                    out, b = run(rows_dev)
                    terms = model.loss(x[rows_dev], out, batch_index=b, kl_weight=kl_weight, index=rows_dev,
                                       n_spots=n)
                    optimizer.zero_grad(set_to_none=True)
                    terms["loss"].backward()
                    optimizer.step()
                    total += float(terms["loss"].detach()) * rows.numel()
                    count += rows.numel()
                train_loss = total / count
            if not math.isfinite(train_loss):
                raise FloatingPointError(f"the training loss is {train_loss} at epoch {epoch + 1}; lower lr.")
            history["train"].append(train_loss)
            epochs = epoch + 1
            watched = train_loss
            if n_val:
                model.eval()
                with torch.no_grad():
                    val_sum = 0.0
                    for rows in torch.split(val_rows, EVAL_CHUNK):
                        rows_dev = rows.to(device)
                        out, b = run(rows_dev)
                        val_sum += float(model.negative_elbo(x[rows_dev], out, b).sum())
                watched = val_sum / n_val
                history["validation"].append(watched)
                bar.set_postfix(loss=f"{train_loss:.4g}", val=f"{watched:.4g}")
            else:
                bar.set_postfix(loss=f"{train_loss:.4g}")
            if watched < best - min_delta:
                best, wait = watched, 0
            else:
                wait += 1
            if early_stopping and wait >= patience:
                stopped_early = True
                break
        bar.close()

        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        _recalibrate_batch_norm(model, lambda rows: run(rows.to(device)), train_rows,
                                train_rows.numel() if batch_size is None else int(batch_size))

    model.eval()
    means, variances, libraries, thetas = [], [], [], []
    with torch.no_grad():
        for rows in torch.split(torch.arange(n), EVAL_CHUNK):
            out, _ = run(rows.to(device), sample=False)
            means.append(out["qz_m"].double().cpu())
            variances.append(out["qz_v"].double().cpu())
            if out["ql_m"] is None:
                libraries.append(torch.exp(out["library"].double()).reshape(-1).cpu())
            else:
                libraries.append(torch.exp(out["ql_m"].double() + 0.5 * out["ql_v"].double()).reshape(-1).cpu())
            if model.dispersion == "gene-cell" and model.gene_likelihood != "poisson":
                thetas.append(out["px_r"].double().cpu())
    if model.gene_likelihood == "poisson":
        dispersion = None
    elif model.dispersion == "gene-cell":
        dispersion = torch.cat(thetas).numpy()
    else:
        dispersion = model.dispersion_values()
    return TrainResult(
        latent_mean=torch.cat(means).numpy(),
        latent_var=torch.cat(variances).numpy(),
        library=torch.cat(libraries).numpy(),
        dispersion=dispersion,
        loadings=model.get_loadings() if model.linear_decoder else None,
        history=history,
        final_loss=history["train"][-1],
        epochs=epochs,
        stopped_early=stopped_early,
        validation_index=val_rows.numpy().astype(np.int64),
        model=model,
    )


def fit_vae(
    counts: Any,
    *,
    model: str = "vae",
    n_latent: int = 10,
    n_hidden: int = 128,
    n_layers: int = 1,
    dropout_rate: float = 0.1,
    gene_likelihood: str = "nb",
    dispersion: str = "gene",
    latent_distribution: str = "normal",
    use_observed_lib_size: bool = True,
    batch_index: Any = None,
    labels: Any = None,
    cat_covs: Any = None,
    cont_covs: Any = None,
    use_batch_norm_decoder: bool = True,
    decoder_bias: bool = False,
    seed: int = 0,
    **train_options: Any,
) -> TrainResult:
    """Build a VAE or LDVAE for a count matrix, check the options, and train it (:func:`train_model`).

    Batches, labels and categorical covariates may be any per-spot labels (coded in sorted order);
    ``seed`` also fixes the initial weights.

    Parameters
    ----------
    counts
        ``(spots, genes)`` non-negative counts (numpy, scipy sparse or torch).
    model
        ``"vae"`` (MLP decoder) or ``"ldvae"`` (linear decoder, with loadings).
    n_latent, n_hidden, n_layers, dropout_rate
        Architecture (:class:`~spatialscale.expression.vae.VAE`).
    gene_likelihood, dispersion, latent_distribution, use_observed_lib_size
        Model options (:class:`~spatialscale.expression.vae.VAE`).
    batch_index
        Batch of each spot (at least two levels), or ``None``.
    labels
        Label of each spot, for ``dispersion="gene-label"``.
    cat_covs, cont_covs
        Categorical covariates (a sequence of per-spot vectors or a ``(spots, k)`` array) and
        continuous ones (``(spots, k)``), injected into the decoder.
    use_batch_norm_decoder, decoder_bias
        Batch norm in the decoder; bias of the linear decoder.
    seed
        Seed of the weights and of the training.
    **train_options
        :func:`train_model`'s keywords (``spatial_loss``, ``lambda_spatial``, ``sp_loss_as_kl``,
        ``max_epochs``, ``lr``, ``batch_size``, ``validation_fraction``, ``device``, ...).

    Returns
    -------
    TrainResult
    """
    if model not in MODELS:
        raise ValueError(f"model must be one of {', '.join(map(repr, MODELS))}, got {model!r}.")
    for name, value, valid in (("gene_likelihood", gene_likelihood, LIKELIHOODS),
                               ("dispersion", dispersion, DISPERSIONS),
                               ("latent_distribution", latent_distribution, LATENT_DISTRIBUTIONS)):
        if value not in valid:
            raise ValueError(f"{name} must be one of {', '.join(map(repr, valid))}, got {value!r}.")
    if isinstance(n_latent, bool) or int(n_latent) != n_latent or n_latent < 1:
        raise ValueError(f"n_latent must be an integer >= 1, got {n_latent!r}.")
    x = _dense_counts(counts)
    n = x.shape[0]
    batch = _codes(batch_index, "batch_index", n)
    n_batch = 0 if batch is None else int(batch.max()) + 1
    if batch is not None and n_batch < 2:
        raise ValueError(f"batch_index has a single level ({np.asarray(batch_index)[0]!r}); "
                         "pass batch_index=None for one batch.")
    if dispersion == "gene-batch" and batch is None:
        raise ValueError("dispersion='gene-batch' needs batch_index with at least two levels.")
    lab = _codes(labels, "labels", n)
    if dispersion == "gene-label" and lab is None:
        raise ValueError("dispersion='gene-label' needs labels.")
    n_labels = 0 if lab is None else int(lab.max()) + 1
    cats = [_codes(c, f"cat_covs[{j}]", n) for j, c in enumerate(_cat_matrix(cat_covs, n))]
    cont = _cont_matrix(cont_covs, n)
    options = {"n_hidden": n_hidden, "n_latent": int(n_latent), "n_layers": n_layers, "dropout_rate": dropout_rate,
               "gene_likelihood": gene_likelihood, "dispersion": dispersion,
               "latent_distribution": latent_distribution, "use_observed_lib_size": use_observed_lib_size,
               "n_batch": n_batch, "n_labels": n_labels, "n_cats_per_cov": [int(c.max()) + 1 for c in cats],
               "n_continuous_cov": 0 if cont is None else cont.shape[1],
               "use_batch_norm_decoder": use_batch_norm_decoder, "decoder_bias": decoder_bias}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        module = LDVAE(x.shape[1], **options) if model == "ldvae" else VAE(x.shape[1], **options)
    return train_model(module, x, batch_index=batch, labels=lab, cat_covs=cats or None, cont_covs=cont,
                       seed=seed, **train_options)
