"""Covariates from expression on the engine: one Dask task per section (or per cohort) trains a model.

The models (:mod:`spatialscale.expression`) see every gene of a section at once,
so they are not gene batches: :func:`fit_model` plans one task that reads the
store's gene-level counts on the worker (never on the client), builds the
spatial loss there from the store's graph (:class:`spatialscale.losses.SpatialLoss`,
the same prior code as the kernels), trains on the worker's device (a GPU
worker's ``cuda:0`` with ``device="cuda"`` / ``"auto"``) and returns small host
arrays.  The client then writes them into each store as a named covariate set
(:meth:`spatialscale.store.IsoformStore.write_covariate_set`) with provenance.

A model is registered once in :data:`MODELS` (its options, defaults and
checks); the API functions (:func:`spatialscale.deconvolve`,
:func:`spatialscale.latent_factors`) and the CLI commands are fronts over it,
with the same :class:`~spatialscale.options.ExecutionOptions` as the tests.

A set is reused, not retrained, when the store already holds one of that name
from the same content (the stores' content tokens, the reference's values)
and the same options and seed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from spatialscale._version import __version__
from spatialscale.errors import InputError
from spatialscale.options import ExecutionOptions
from spatialscale.store import IsoformStore

log = logging.getLogger(__name__)

#: spatial losses a model may add (``None``: none)
SPATIAL_LOSSES = ("car", "icar", "sar", "isar", "sma", "splisosm", "kl", "contrastive")


@dataclass(frozen=True)
class Model:
    """A model that learns covariates from expression.

    Attributes
    ----------
    name
        Its ``model=`` / ``method=`` name.
    key
        The covariate set it writes by default (``key_added``).
    defaults
        Its options and their defaults (every option it accepts).
    check
        Validates the options on the client before anything runs (one-line
        :class:`InputError`); gets the options, number of genes and sections.
    fit
        Runs on the worker: ``fit(counts, context, options) -> Fitted``.
    description
        One line for ``--help``.
    """

    name: str
    key: str
    defaults: dict[str, Any]
    check: Callable[[dict[str, Any], int, int], None]
    fit: Callable[..., Fitted]
    description: str


@dataclass
class Fitted:
    """What a worker returns: the covariates, the model's other outputs, a summary of the training."""

    values: np.ndarray
    columns: list[str]
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What a model's ``fit`` gets besides the counts (built on the worker)."""

    genes: list[str]
    spatial_loss: Any
    batch: np.ndarray | None
    labels: np.ndarray | None
    reference: np.ndarray | None
    reference_names: list[str] | None
    device: str
    progress: bool


# --------------------------------------------------------------------------- shared options
#: options every model takes: the spatial loss and the training seed
COMMON = {"spatial_loss": None, "lambda_spatial": 1.0, "spatial_rho": None, "spatial_standardize": False,
          "seed": 0}


def _check_common(opts: dict[str, Any]) -> None:
    loss = opts["spatial_loss"]
    if loss is not None and loss not in SPATIAL_LOSSES:
        raise InputError(f"unknown spatial_loss {loss!r}; choose one of {', '.join(SPATIAL_LOSSES)} (or none).")
    lam = opts["lambda_spatial"]
    if not isinstance(lam, int | float) or isinstance(lam, bool) or not math.isfinite(lam) or lam < 0:
        raise InputError(f"lambda_spatial must be a finite number >= 0 (got {lam!r}).")
    rho = opts["spatial_rho"]
    if rho is not None and (not isinstance(rho, int | float) or isinstance(rho, bool) or not math.isfinite(rho)):
        raise InputError(f"spatial_rho must be a number (got {rho!r}).")
    seed = opts["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be an integer >= 0 (got {seed!r}).")


def _positive_int(opts: dict[str, Any], name: str, low: int = 1) -> None:
    v = opts[name]
    if v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise InputError(f"{name} must be an integer >= {low} (got {v!r}).")


def _fraction(opts: dict[str, Any], name: str) -> None:
    v = opts[name]
    if not isinstance(v, int | float) or isinstance(v, bool) or not 0 <= v < 1:
        raise InputError(f"{name} must be in [0, 1) (got {v!r}).")


def _positive(opts: dict[str, Any], name: str) -> None:
    v = opts[name]
    if v is None:
        return
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
        raise InputError(f"{name} must be a number > 0 (got {v!r}).")


def _choice(opts: dict[str, Any], name: str, choices: tuple[str, ...]) -> None:
    if opts[name] not in choices:
        raise InputError(f"unknown {name} {opts[name]!r}; choose one of {', '.join(choices)}.")


# --------------------------------------------------------------------------- the models
def _training_summary(result: Any) -> dict[str, Any]:
    out = {}
    for key in ("epochs", "final_loss", "converged", "stopped_early"):
        value = getattr(result, key, None)
        if value is not None:
            out[key] = value.item() if hasattr(value, "item") else value
    return out


def _check_nnls(opts: dict[str, Any], n_genes: int, n_sections: int) -> None:
    _check_common(opts)
    _positive_int(opts, "max_epochs")
    _positive(opts, "lr")


def _fit_nnls(counts: np.ndarray, ctx: Context, opts: dict[str, Any]) -> Fitted:
    from spatialscale.expression.nnls import nnls_deconvolve

    res = nnls_deconvolve(counts, ctx.reference, spatial_loss=ctx.spatial_loss, lambda_spatial=opts["lambda_spatial"],
                          max_epochs=opts["max_epochs"], lr=opts["lr"], seed=opts["seed"], device=ctx.device,
                          progress=ctx.progress)
    return Fitted(values=np.asarray(res.proportions, dtype=np.float64), columns=list(ctx.reference_names or []),
                  extras={"coefficients": np.asarray(res.coefficients, dtype=np.float64)},
                  summary=_training_summary(res))


#: VAE / LDVAE choices (as scVI's)
LIKELIHOODS = ("zinb", "nb", "poisson")
DISPERSIONS = ("gene", "gene-batch", "gene-label", "gene-cell")
LATENT_DISTRIBUTIONS = ("normal", "ln")


def _check_latent(opts: dict[str, Any], n_genes: int, n_sections: int) -> None:
    _check_common(opts)
    _positive_int(opts, "n_latent")
    if opts["n_latent"] > n_genes:
        raise InputError(f"n_latent={opts['n_latent']} is more than the {n_genes} genes.")
    _positive_int(opts, "max_epochs")
    _positive(opts, "lr")


def _check_vae(opts: dict[str, Any], n_genes: int, n_sections: int) -> None:
    _check_latent(opts, n_genes, n_sections)
    _positive_int(opts, "n_hidden")
    _positive_int(opts, "n_layers")
    _fraction(opts, "dropout_rate")
    _fraction(opts, "validation_fraction")
    _positive_int(opts, "minibatch_size")
    _positive_int(opts, "kl_warmup_epochs", 0)
    _choice(opts, "gene_likelihood", LIKELIHOODS)
    _choice(opts, "dispersion", DISPERSIONS)
    _choice(opts, "latent_distribution", LATENT_DISTRIBUTIONS)
    if opts["minibatch_size"] is not None and opts["spatial_loss"] is not None:
        log.info("minibatches with a spatial loss: each batch uses its spots' conditional precision")


def _fit_pca(counts: np.ndarray, ctx: Context, opts: dict[str, Any]) -> Fitted:
    from spatialscale.expression.pca import spatial_pca

    data = np.log1p(counts / np.maximum(counts.sum(axis=1, keepdims=True), 1e-12) * 1e4)
    res = spatial_pca(data, opts["n_latent"], spatial_loss=ctx.spatial_loss, lambda_spatial=opts["lambda_spatial"],
                      max_epochs=opts["max_epochs"], lr=opts["lr"], seed=opts["seed"], device=ctx.device,
                      progress=ctx.progress)
    return Fitted(values=np.asarray(res.latent, dtype=np.float64), columns=[],
                  extras={"loadings": np.asarray(res.loadings, dtype=np.float64)}, summary=_training_summary(res))


def _fit_vae(counts: np.ndarray, ctx: Context, opts: dict[str, Any], linear: bool) -> Fitted:
    from spatialscale.expression.training import fit_vae

    keys = ("n_latent", "n_hidden", "n_layers", "dropout_rate", "gene_likelihood", "dispersion",
            "latent_distribution", "use_observed_lib_size", "max_epochs", "lr",
            "validation_fraction", "early_stopping", "kl_warmup_epochs", "sp_loss_as_kl")
    kwargs = {k: opts[k] for k in keys}
    kwargs["batch_size"] = opts["minibatch_size"]
    if kwargs["batch_size"] is None and ctx.spatial_loss is None and counts.shape[0] > FULL_BATCH_MAX_SPOTS:
        kwargs["batch_size"] = AUTO_MINIBATCH  # full batch would hold every spot's activations at once
    res = fit_vae(counts, model="ldvae" if linear else "vae", batch_index=ctx.batch, labels=ctx.labels,
                  spatial_loss=ctx.spatial_loss, lambda_spatial=opts["lambda_spatial"], seed=opts["seed"],
                  device=ctx.device, progress=ctx.progress, **kwargs)
    extras = {"latent_var": res.latent_var, "library": res.library, "dispersion": res.dispersion}
    if getattr(res, "loadings", None) is not None:
        extras["loadings"] = res.loadings
    extras = {k: np.asarray(v, dtype=np.float64) for k, v in extras.items() if v is not None}
    return Fitted(values=np.asarray(res.latent_mean, dtype=np.float64), columns=[], extras=extras,
                  summary={**_training_summary(res), "minibatch_size": kwargs["batch_size"]})


#: VAE / LDVAE without a spatial loss: above this many spots ``minibatch_size=None`` trains on minibatches of
#: ``AUTO_MINIBATCH`` spots (full batch at 10^5 spots x 500 genes peaks at ~6 GB on CPU, ``bench --test latent``)
FULL_BATCH_MAX_SPOTS = 50_000
AUTO_MINIBATCH = 1024

_VAE_DEFAULTS = {"n_latent": 10, "n_hidden": 128, "n_layers": 1, "dropout_rate": 0.1, "gene_likelihood": "nb",
                 "dispersion": "gene", "latent_distribution": "normal", "use_observed_lib_size": True,
                 "max_epochs": None, "lr": 1e-3, "minibatch_size": None, "validation_fraction": 0.1,
                 "early_stopping": True, "kl_warmup_epochs": None, "sp_loss_as_kl": False, **COMMON,
                 "lambda_spatial": 0.1}

#: the registry: every model that writes covariates into a store
MODELS: dict[str, Model] = {
    "nnls": Model("nnls", "props", {"max_epochs": 2000, "lr": None, **COMMON}, _check_nnls, _fit_nnls,
                  "cell-type proportions by (spatially regularised) non-negative least squares on a reference"),
    "pca": Model("pca", "latent", {"n_latent": 10, "max_epochs": 1000, "lr": None, **COMMON,
                                   "lambda_spatial": 0.1}, _check_latent,
                 _fit_pca, "SpatialPCA: principal components of log-normalised expression, spatially smoothed"),
    "vae": Model("vae", "latent", _VAE_DEFAULTS, _check_vae, lambda c, x, o: _fit_vae(c, x, o, False),
                 "scVI-style VAE: latent factors of the counts"),
    "ldvae": Model("ldvae", "latent", _VAE_DEFAULTS, _check_vae, lambda c, x, o: _fit_vae(c, x, o, True),
                   "LDVAE: a VAE with a linear decoder, whose loadings are kept"),
}


def model_options(model: str, given: dict[str, Any]) -> dict[str, Any]:
    """The model's options: its defaults updated by ``given`` (``None`` keeps a default); unknown names refused."""
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}.")
    spec = MODELS[model]
    unknown = sorted(set(given) - set(spec.defaults))
    if unknown:
        raise InputError(f"option(s) {', '.join(unknown)} do not apply to model {model!r} (its options: "
                         f"{', '.join(sorted(spec.defaults))}).")
    return {**spec.defaults, **{k: v for k, v in given.items() if v is not None}}


# --------------------------------------------------------------------------- references (deconvolution)
def reference_matrix(reference: Any, genes: list[str], celltype_key: str | None = None,
                     ) -> tuple[np.ndarray, list[str], list[str]]:
    """A deconvolution reference as ``(n_types, n_shared_genes)``, its type names and the shared genes.

    ``reference`` is an AnnData of cell types x genes (the signatures), or of
    single cells x genes with ``celltype_key`` naming their type in ``obs``
    (the mean of each type's cells is its signature), or a DataFrame of cell
    types x genes (a genes x types frame whose index holds the store's genes
    is transposed).  Genes are matched to the store's by name.

    Raises
    ------
    InputError
        No genes in common, NaN / infinite or negative values, fewer than two
        cell types, duplicate names, a missing ``celltype_key``.
    """
    import scipy.sparse

    if isinstance(reference, str | Path):
        path = Path(reference)
        if not path.exists():
            raise InputError(f"reference {path} does not exist.")
        import anndata

        try:
            reference = anndata.read_h5ad(path) if path.suffix == ".h5ad" else anndata.read_zarr(path)
        except Exception as exc:  # noqa: BLE001 - one line naming the file
            raise InputError(f"cannot read reference {path} as an AnnData ({type(exc).__name__}: {exc}).") from None
    if isinstance(reference, pd.DataFrame):
        frame = reference
        if celltype_key is not None:
            raise InputError("celltype_key applies to an AnnData reference of single cells, not a DataFrame.")
        if frame.index.astype(str).isin(genes).mean() > frame.columns.astype(str).isin(genes).mean():
            frame = frame.T  # genes x types
        values, types, ref_genes = frame.to_numpy(), list(map(str, frame.index)), list(map(str, frame.columns))
        try:
            values = np.asarray(values, dtype=np.float64)
        except (TypeError, ValueError):
            raise InputError("the reference DataFrame has non-numeric values.") from None
    elif hasattr(reference, "obs") and hasattr(reference, "X"):
        x = reference.X
        x = x.toarray() if scipy.sparse.issparse(x) else np.asarray(x)
        ref_genes = list(map(str, reference.var_names))
        if celltype_key is None:
            values, types = np.asarray(x, dtype=np.float64), list(map(str, reference.obs_names))
        else:
            if celltype_key not in reference.obs:
                raise InputError(f"celltype_key {celltype_key!r} is not an obs column of the reference (it has "
                                 f"{list(reference.obs.columns)}).")
            labels = reference.obs[celltype_key].astype(str).to_numpy()
            types = sorted(set(labels))
            values = np.stack([np.asarray(x[labels == t], dtype=np.float64).mean(axis=0) for t in types])
    else:
        raise InputError(f"reference must be an AnnData (cell types or cells x genes), a DataFrame or a path, not "
                         f"{type(reference).__name__}.")
    if len(set(types)) != len(types) or len(set(ref_genes)) != len(ref_genes):
        raise InputError("the reference has duplicate cell-type or gene names.")
    if len(types) < 2:
        raise InputError(f"the reference has {len(types)} cell type(s); deconvolution needs at least 2.")
    if not np.isfinite(values).all():
        raise InputError("the reference has NaN or infinite values; fill or drop them first.")
    if (values < 0).any():
        raise InputError("the reference has negative values (expected expression levels).")
    position = {g: i for i, g in enumerate(ref_genes)}
    shared = [g for g in genes if g in position]
    if not shared:
        raise InputError(f"the reference has no genes in common with the store (e.g. store {genes[:3]}, reference "
                         f"{ref_genes[:3]}).")
    return values[:, [position[g] for g in shared]], types, shared


# --------------------------------------------------------------------------- the task
#: rho of a spatial loss when none is given: the Laplacian (icar / isar, Smoother's default), the kernel's
#: default (splisosm), or 0.9 of the largest admissible value (car, sar, sma: it depends on the graph)
DEFAULT_RHO = {"icar": 1.0, "isar": 1.0, "splisosm": 0.99, "contrastive": 1.0}


def _spatial_loss(paths: list[str], opts: dict[str, Any], device: str) -> Any:
    """The model's spatial loss on the stores' graphs (block diagonal for several), built on the worker."""
    if opts["spatial_loss"] is None or opts["lambda_spatial"] == 0:
        return None
    from spatialscale.losses import ContrastiveSpatialLoss, SpatialLoss, loss_weights
    from spatialscale.priors import rho_range

    prior = opts["spatial_loss"]
    try:
        graph, _ = loss_weights(paths[0] if len(paths) == 1 else list(paths))
        rho = opts["spatial_rho"]
        if rho is None and prior in ("car", "sar", "sma"):
            rho = 0.9 * rho_range(graph, prior)[1]
        kwargs: dict[str, Any] = {"standardize_cov": bool(opts["spatial_standardize"]), "device": device,
                                  "rho": float(DEFAULT_RHO.get(prior, 1.0) if rho is None else rho)}
        if prior == "contrastive":
            return ContrastiveSpatialLoss(weights=graph, seed=opts["seed"], **kwargs)
        return SpatialLoss(prior, graph, **kwargs)
    except ValueError as exc:  # e.g. a rho outside the prior's range on this graph: one line
        raise InputError(f"spatial_loss={prior!r}: {exc}") from None


def fit_task(model: str, paths: list[str], tokens: list[str], genes: list[str], opts: dict[str, Any],
             reference: np.ndarray | None, reference_names: list[str] | None,
             groups: tuple[np.ndarray | None, np.ndarray | None],
             device: str, progress: bool) -> Fitted:
    """The worker's part: read the sections' gene counts, build the spatial loss, train, return host arrays."""
    from spatialscale.checksums import pinned
    from spatialscale.store import read_gene_expression
    from spatialscale.worker import resolve_device

    dev = resolve_device(device)
    with contextlib.ExitStack() as stack:
        for path, token in zip(paths, tokens):
            stack.enter_context(pinned(path, token))
        parts = [read_gene_expression(path, genes)[0] for path in paths]
        counts = np.concatenate(parts, axis=0)
        ctx = Context(genes=genes, spatial_loss=_spatial_loss(paths, opts, dev), batch=groups[0], labels=groups[1],
                      reference=reference,
                      reference_names=reference_names, device=dev, progress=progress)
        try:
            return MODELS[model].fit(counts, ctx, opts)
        except ValueError as exc:  # a model's own check of its input: one line, not a traceback
            raise InputError(f"{model}: {exc}") from None


# --------------------------------------------------------------------------- the client's part
def _shared_genes(stores: list[IsoformStore], genes: Any) -> list[str]:
    if genes is not None:
        genes = [genes] if isinstance(genes, str) else [str(g) for g in genes]
        for st in stores:
            missing = [g for g in genes if g not in st.genes.index]
            if missing:
                raise InputError(f"{len(missing)} of the genes given are not in {st.path} (e.g. {missing[:3]}).")
        return genes
    common = list(stores[0].genes.index.astype(str))
    for st in stores[1:]:
        have = set(st.genes.index.astype(str))
        common = [g for g in common if g in have]
    if not common:
        raise InputError("the sections share no gene.")
    return common


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def fit_model(sections: list[str], stores: list[IsoformStore], model: str, options: dict[str, Any],
              execution: ExecutionOptions, *, key_added: str | None = None, reference: Any = None,
              celltype_key: str | None = None, genes: Any = None, batch_key: str | None = None,
              labels_key: str | None = None) -> xr.Dataset:
    """Train ``model`` on a store (or on every section of a cohort) as one task; write the covariate set.

    ``sections`` and ``stores``: the section ids and opened stores to train
    on, ``[""]`` and one store for a single store (a cohort is resolved by
    the caller, :func:`spatialscale.cohort.section_stores`; the families do
    not know cohorts).

    Everything is validated before the task starts (options, reference, the
    target name in every store); the set is written only once training has
    finished, into every section; an existing set of that name is reused when
    it came from the same content, options and seed, and replaced only with
    ``execution.overwrite``.

    Returns
    -------
    xarray.Dataset
        The covariates (``key_added`` over ``spot`` x ``column``) and the
        model's other outputs, with the provenance in ``attrs``; for a cohort,
        the sections' spots one after another (coordinate ``section``).
    """
    from spatialscale.engine import execution as runner_for
    from spatialscale.output import FileLock

    spec = MODELS.get(model)
    opts = model_options(model, options)
    key = key_added or (spec.key if spec else model)
    if len(sections) != len(stores) or not stores:
        raise ValueError(f"fit_model needs one section id per store, got {len(sections)} ids and {len(stores)} stores.")
    gene_list = _shared_genes(stores, genes)
    spec.check(opts, len(gene_list), len(stores))
    ref, ref_names = None, None
    if model == "nnls":
        if reference is None:
            raise InputError("deconvolution needs a reference (cell types x genes).")
        ref, ref_names, gene_list = reference_matrix(reference, gene_list, celltype_key)
    elif reference is not None:
        raise InputError(f"model {model!r} takes no reference.")
    if (batch_key is not None or labels_key is not None) and model not in ("vae", "ldvae"):
        raise InputError(f"model {model!r} takes no batch_key or labels_key; use vae or ldvae.")
    batch, batch_levels = _batches(stores, sections, batch_key, model)
    labels, label_levels = (None, None) if labels_key is None else _obs_codes(stores, labels_key, "labels_key")
    if opts.get("dispersion") == "gene-batch" and batch is None:
        raise InputError("dispersion='gene-batch' needs batches: give batch_key (an obs column with at least two "
                         "levels) or train on a cohort (its sections are the batches).")
    if opts.get("dispersion") == "gene-label" and labels is None:
        raise InputError("dispersion='gene-label' needs labels: give labels_key (an obs column, e.g. a cell type "
                         "annotation, with at least two levels).")
    fp = _digest({"model": model, "options": opts, "content": [s.content_token for s in stores], "genes": gene_list,
                  "batch_key": batch_key, "batch_levels": batch_levels, "labels_key": labels_key,
                  "label_levels": label_levels,
                  "reference": None if ref is None else hashlib.sha256(ref.tobytes()).hexdigest(),
                  "reference_names": ref_names})
    existing = [st.covariate_sets().get(key) for st in stores]
    if all(e is not None and e["provenance"].get("fingerprint") == fp for e in existing):
        log.info("%s: reusing covariate set %r (same content, options and seed)", model, key)
        return _dataset(key, [st.covariate_set(key) for st in stores], sections, stores, gene_list, reused=True)
    for st, e in zip(stores, existing):
        if getattr(st, "url", None):  # read through replicas: nothing is written into a store at a URL
            raise InputError(f"covariate set {key!r}: {st.url} is a store at a URL (read through local replicas); "
                             "write covariate sets into a local store (ingest it to a local path) instead.")
        if e is not None and not execution.overwrite:
            raise InputError(f"{st.path} already holds covariate set {key!r} from other data or options; pass "
                             "overwrite=True (--overwrite) to replace it, or another key_added.")
        # the set's name and columns must be free in every store before training (checked again when writing)
        obs = st.obs(covariate_sets=False)
        if key in obs.columns:
            raise InputError(f"{key!r} is an obs column of {st.path}; choose another key_added.")
    paths = [str(st.path) for st in stores]
    tokens = [st.content_token for st in stores]
    with contextlib.ExitStack() as held:
        for path in paths:
            held.enter_context(FileLock(Path(path), shared=True, hint="wait for it to finish"))
        with runner_for(execution.client, scheduler=execution.scheduler, workers=execution.workers,
                        device=execution.device) as runner:
            local = runner.kind == "threads"
            fut = runner.submit(fit_task, model, paths, tokens, gene_list, opts, ref, ref_names, (batch, labels),
                                execution.device, execution.progress and local,
                                key=f"{model}-{uuid.uuid4().hex[:8]}")
            fitted = None
            for _, value, error in runner.completion([fut]):
                if error is not None:
                    raise error
                fitted = value
    columns = fitted.columns or [f"{key}_{i + 1}" for i in range(fitted.values.shape[1])]
    if model == "nnls":
        columns = [f"{key}_{c}" for c in fitted.columns]
    provenance = {"model": model, "options": opts, "seed": opts["seed"], "fingerprint": fp, "batch_key": batch_key,
                  "labels_key": labels_key,
                  "n_genes": len(gene_list), "sections": sections if len(stores) > 1 else None,
                  "device": execution.device, "spatialscale_version": __version__, **fitted.summary}
    bounds = np.cumsum([0] + [st.n_observed for st in stores])
    per_spot = {k: v for k, v in fitted.extras.items() if v.ndim >= 1 and v.shape[0] == bounds[-1]}
    shared = {k: v for k, v in fitted.extras.items() if k not in per_spot}
    for i, st in enumerate(stores):
        lo, hi = bounds[i], bounds[i + 1]
        st.write_covariate_set(key, fitted.values[lo:hi], columns=columns,
                               extras={**{k: v[lo:hi] for k, v in per_spot.items()}, **shared},
                               provenance=provenance, overwrite=True)
    return _dataset(key, [st.covariate_set(key) for st in stores], sections, stores, gene_list, reused=False)


def _obs_codes(stores: list[IsoformStore], key: str, what: str) -> tuple[np.ndarray, list[str]]:
    """Integer codes (sorted levels) of an obs column over the stores' spots, refused with one level."""
    labels = []
    for st in stores:
        obs = st.obs(covariate_sets=False)
        if key not in obs.columns:
            raise InputError(f"{what} {key!r} is not an obs column of {st.path} (it has {list(obs.columns)}).")
        col = obs[key]
        if col.isna().any():
            raise InputError(f"{what} {key!r} has missing values.")
        labels.append(col.astype(str).to_numpy())
    values = np.concatenate(labels)
    levels = sorted(set(values))
    if len(levels) < 2:
        raise InputError(f"{what} {key!r} has one level ({levels[0]!r}); it needs at least two.")
    return np.searchsorted(levels, values), levels


def _batches(stores: list[IsoformStore], sections: list[str], batch_key: str | None, model: str,
             ) -> tuple[np.ndarray | None, list[str] | None]:
    """The batch of every spot: ``batch_key``'s levels, else a cohort's sections (VAE / LDVAE), else none."""
    if batch_key is not None:
        return _obs_codes(stores, batch_key, "batch_key")
    if len(stores) == 1 or model not in ("vae", "ldvae"):
        return None, None
    return np.repeat(np.arange(len(stores)), [st.n_observed for st in stores]), list(sections)


def _dataset(key: str, parts: list[tuple[pd.DataFrame, dict[str, np.ndarray], dict]], sections: list[str],
             stores: list[IsoformStore], genes: list[str], *, reused: bool) -> xr.Dataset:
    """The covariate sets of the stores as one Dataset (spots of the sections one after another)."""
    values = pd.concat([p[0] for p in parts], axis=0)
    spot = np.asarray(values.index.astype(str))
    coords: dict[str, Any] = {"spot": spot, "column": list(values.columns)}
    if len(stores) > 1:
        coords["section"] = ("spot", np.repeat(sections, [len(p[0]) for p in parts]))
    data = {key: (("spot", "column"), values.to_numpy())}
    k = values.shape[1]
    for name in parts[0][1]:
        arrays = [p[1][name] for p in parts]
        if all(a.ndim >= 1 and a.shape[0] == len(p[0]) for a, p in zip(arrays, parts)):
            arr = np.concatenate(arrays, axis=0)
            dims = ("spot", "column") if arr.ndim == 2 and arr.shape[1] == k else (
                ("spot",) + tuple(f"{name}_dim_{i}" for i in range(1, arr.ndim)))
        else:
            arr = arrays[0]
            dims = ("gene", "column") if arr.ndim == 2 and arr.shape == (len(genes), k) else tuple(
                f"{name}_dim_{i}" for i in range(arr.ndim))
            if "gene" in dims:
                coords["gene"] = genes
        data[name] = (dims, arr)
    ds = xr.Dataset(data, coords=coords)
    prov = parts[0][2]
    ds.attrs.update({"covariate_set": key, "model": prov.get("model", ""), "reused": int(reused),
                     "provenance": json.dumps(prov, sort_keys=True, default=str),
                     "stores": json.dumps([str(s.path) for s in stores])})
    return ds
