"""Spatial variability by HSIC (hsic-ir, hsic-ic, hsic-gc): every gene of a section against the spatial kernel."""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.covariates import CovariateDesign, encode_covariates
from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import Family, Option, Prepared
from spatialscale.families.common import batch_counts, provenance, summary_variables
from spatialscale.families.du_kernel import design_fingerprint
from spatialscale.results import make_dataset
from spatialscale.stats.adjust import covariate_basis, projected_kernel_sums
from spatialscale.stats.multitest import bh_adjust
from spatialscale.stats.nulls import NULLS
from spatialscale.stats.responses import TRANSFORMS, response_width
from spatialscale.stats.sv import NAN_FILLINGS, SV_METHODS, sv_batch, sv_batch_dense_ratios, sv_batch_sparse_ratios
from spatialscale.store import IsoformStore
from spatialscale.worker import kernel_diag_sq, kernel_operator, log_timing, resolve_device

__all__ = ["FAMILY", "KernelSpec", "parse_kernel_spec", "parse_kernel_specs", "STORE_KERNEL"]


def _sv_task(store_path: str, token: str, device: str, params: dict[str, Any], batch: Batch,
             adjust: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """One Dask task: test the genes of ``batch`` (runs on a worker).

    ``adjust`` (covariate-adjusted runs, computed once on the client): the
    covariates' orthonormal ``basis`` and the projected kernel's power ``sums``.
    """
    t0 = time.perf_counter()
    op, sums = kernel_operator(store_path, token, device)
    t1 = time.perf_counter()
    if adjust is not None:
        counts = batch_counts(store_path, batch)
        return sv_batch(counts, op, adjust["sums"], covariate_basis=adjust["basis"], **params)
    if _sparse_ratios(op, params, batch):
        from spatialscale.store import _grid_index, read_sparse_columns

        data, rows, ptr = read_sparse_columns(store_path, batch.col_start, batch.col_stop)
        return sv_batch_sparse_ratios(data, rows, ptr, _grid_index(store_path), batch.n_genes, batch.n_isoforms,
                                      op, sums, null=params["null"])
    if _dense_ratios(op, params, batch):
        from spatialscale.store import read_count_columns

        flat = read_count_columns(store_path, batch.col_start, batch.col_stop, dtype=None)
        t2 = time.perf_counter()
        out = sv_batch_dense_ratios(flat, batch.n_isoforms, op, sums, null=params["null"])
        log_timing(task="sv", kernel=t1 - t0, read=t2 - t1, test=time.perf_counter() - t2, genes=batch.n_genes)
        return out
    counts = batch_counts(store_path, batch)
    t2 = time.perf_counter()
    if params["null"] == "liu-perm":
        params = {**params, "kernel_diag_sq": kernel_diag_sq(store_path, token)}
    out = sv_batch(counts, op, sums, **params)
    log_timing(task="sv", kernel=t1 - t0, read=t2 - t1, test=time.perf_counter() - t2, genes=batch.n_genes)
    return out


def _sparse_options(params: dict[str, Any]) -> bool:
    """Whether the options allow the raster fast path (hsic-ir ratios built from the stored non-zero counts)."""
    return (params["method"] == "hsic-ir" and params["transformation"] == "none"
            and params["nan_filling"] == "mean" and params["null"] in ("liu", "welch"))


def _sparse_ratios(op: Any, params: dict[str, Any], batch: Batch) -> bool:
    """Whether a batch runs on the raster fast path: the options, an FFT kernel, >= 2 isoforms, numba."""
    from spatialscale.raster import FFTKernelOperator
    from spatialscale.stats._numba import compiled_available

    return (isinstance(op, FFTKernelOperator) and batch.n_isoforms >= 2 and _sparse_options(params)
            and compiled_available())


def _dense_ratios(op: Any, params: dict[str, Any], batch: Batch) -> bool:
    """Whether a batch runs on the sparse kernel's fast path: the options, a compiled factor, >= 2 isoforms."""
    return getattr(op, "row_order", None) is not None and batch.n_isoforms >= 2 and _sparse_options(params)


def _prepare(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str) -> Prepared:
    null, n_perms = opts["null"], 1000 if opts["n_perms"] is None else opts["n_perms"]
    if null == "perm" and n_perms < 1:
        raise InputError("n_perms must be >= 1 for null='perm'.")
    if null != "perm" and opts["n_perms"] is not None:
        raise InputError("n_perms applies to null='perm' only.")
    if null == "liu-perm" and opts["nan_filling"] != "mean":
        raise InputError("null='liu-perm' needs nan_filling='mean' (every spot in the test).")
    n = store.n_spots
    transformation = opts.get("transformation", "none")
    params = {"method": method, "transformation": transformation, "nan_filling": opts["nan_filling"],
              "null": null, "n_perms": int(n_perms), "perm_seed": int(opts["perm_seed"])}
    attrs = {"test": "spatial_variability", "method": method, "null": null, "transformation": transformation,
             "nan_filling": opts["nan_filling"],
             **({"n_perms": int(n_perms), "perm_seed": int(opts["perm_seed"])} if null == "perm" else {})}

    if opts.get("kernels") is not None:
        return _prepare_ensemble(store, method, opts, covariates, device, params, attrs)
    adjust, fingerprint_extra = None, None
    if covariates is not None:
        adjust, design = _covariate_adjustment(store, covariates, opts, null)
        attrs["covariates"] = design.columns
        fingerprint_extra = design_fingerprint(design)
    sparse = store.kernel_kind == "fft" and _sparse_options(params) and adjust is None

    def bytes_per_gene(p: int) -> float:
        if sparse and p >= 2:  # the raster fast path: p - 1 grid columns and their half spectra
            return 8.0 * n * (2 * (p - 1) + 1)
        d = response_width(method, p, transformation)
        perm = 2 * 32 * d if null == "perm" else 0
        return 8.0 * n * (p + 5 * d + perm + (d if adjust is not None else 0))

    def assemble(run: Any) -> xr.Dataset:
        data = {k: np.concatenate([r[k] for r in run.parts])
                for k in ("statistic", "pvalue", "n_spots_used", "effect")}
        return make_dataset(
            store.genes.index.to_numpy(),
            {"sv_statistic": data["statistic"], "sv_pvalue": data["pvalue"],
             "sv_pvalue_adj": bh_adjust(data["pvalue"]), "sv_effect": data["effect"],
             "n_isoforms": store.genes["n_isoforms"].to_numpy(), "n_spots_used": data["n_spots_used"],
             **summary_variables(run.parts)},
            {**attrs, **provenance(store), "execution": run.kind},
        )

    task = functools.partial(_sv_task, str(store.path.resolve()), store.kernel_token, device, params)
    return Prepared(kind="sv", params=params, task=task, bytes_per_gene=bytes_per_gene, label=f"sv {method}",
                    assemble=assemble, shared=adjust, fingerprint_extra=fingerprint_extra)


def _covariate_adjustment(store: IsoformStore, covariates: Any, opts: dict[str, Any],
                          null: str) -> tuple[Callable[[], dict[str, np.ndarray]], CovariateDesign]:
    """Validate the covariates of an adjusted HSIC run; the (lazy) basis and projected power sums, and the design.

    The power sums of ``M K_c M`` are computed once, on the client, from
    ``2u`` products with the section's kernel operator
    (:func:`spatialscale.stats.adjust.projected_kernel_sums`), only when some
    batch is left to run.
    """
    if store.kernel_kind == "fft":
        raise InputError("covariate-adjusted sv does not run on raster (fft) stores yet; use a store ingested with "
                         "kernel='car'.")
    if opts["nan_filling"] != "mean":
        raise InputError("covariate-adjusted sv needs nan_filling='mean' (every spot in the projection).")
    if null == "liu-perm":
        raise InputError("covariate-adjusted sv takes null='liu', 'welch' or 'perm', not 'liu-perm'.")
    design = encode_covariates(store.obs(), covariates, drop_reference=True)
    basis = covariate_basis(design.z)
    n = store.n_spots
    if basis.shape[1] == 0:
        raise InputError(f"covariates {design.columns} are constant across spots: nothing to adjust for.")
    if basis.shape[1] > n - 4:
        raise InputError(f"covariates {design.columns} span {basis.shape[1]} directions on {n} spots: too few "
                         "spots left for the test.")
    store_path, token = str(store.path.resolve()), store.kernel_token

    def compute() -> dict[str, np.ndarray]:
        op, sums = kernel_operator(store_path, token, "cpu")
        return {"basis": basis, "sums": projected_kernel_sums(op, sums, basis)}

    return compute, design


# --------------------------------------------------------------------------- kernel ensembles
#: the ensemble member that is the store's own kernel
STORE_KERNEL = "store"
#: what a kernel spec may set; the rest (power-sum settings, and the graph unless set) comes from the store's kernel
SPEC_KEYS = ("rho", "k_neighbors", "weights", "radius", "bandwidth", "scale_coords", "row_scale", "standardize_cov")
#: keys of a spec that change the spot graph (refused on a store whose graph is a user adjacency)
_GRAPH_KEYS = ("k_neighbors", "weights", "radius", "bandwidth", "scale_coords")
#: kernel settings a spec inherits from the store's kernel
_INHERITED = ("k_neighbors", "standardize_cov", "exact_threshold", "n_probes", "probe_seed", "power_sums", "n_sketch",
              "n_cv_probes", "weights", "radius", "bandwidth", "scale_coords")
_SPEC_TYPES: dict[str, tuple[type, ...]] = {"rho": (int, float), "k_neighbors": (int,), "weights": (str,),
                                            "radius": (int, float), "bandwidth": (int, float), "scale_coords": (bool,),
                                            "row_scale": (bool,), "standardize_cov": (bool,)}
_SPEC_FORM = "'store' or PRIOR[:KEY=VALUE[,KEY=VALUE...]], e.g. 'car:rho=0.2'"


def _valid_priors() -> tuple[str, ...]:
    from spatialscale.priors import PRIORS

    return (STORE_KERNEL, *PRIORS)


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One kernel of an ensemble: the store's own (``prior="store"``), or a prior with settings.

    Attributes
    ----------
    prior
        ``"store"`` or one of :data:`spatialscale.priors.PRIORS`.
    settings
        ``(key, value)`` pairs of :data:`SPEC_KEYS`, sorted by key; what is not set comes
        from the store's kernel (graph, standardisation, power-sum settings) or from
        :class:`spatialscale.kernel.KernelParams`' defaults (``rho``, ``row_scale``).
    """

    prior: str
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """The compact form, which :func:`parse_kernel_spec` reads back (``car:rho=0.2``)."""
        if not self.settings:
            return self.prior
        return self.prior + ":" + ",".join(f"{k}={_format_value(v)}" for k, v in self.settings)

    def params(self, store: IsoformStore) -> Any:
        """The :class:`~spatialscale.kernel.KernelParams` of this kernel on ``store`` (``InputError`` if invalid)."""
        from spatialscale.kernel import POWER_SUM_METHODS, KernelParams

        attrs = store.kernel_attrs
        given = dict(self.settings)
        base = {k: attrs[k] for k in _INHERITED if k in attrs and k != "power_sums"}
        if attrs.get("power_sum_method") in POWER_SUM_METHODS:  # as the store's kernel got them (same size)
            base["power_sums"] = attrs["power_sum_method"]
        if "weights" in given:  # another graph: none of the store's distance-band settings
            base = {k: v for k, v in base.items() if k not in ("weights", "radius", "bandwidth", "scale_coords")}
        try:
            return KernelParams(**{**base, **given, "prior": self.prior})
        except (TypeError, ValueError) as exc:
            raise InputError(f"kernel {self.label!r}: {exc}") from None


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _spec_value(key: str, value: Any, where: str) -> Any:
    """A spec's value checked against its key's type (numbers as float where the key is a number)."""
    types = _SPEC_TYPES[key]
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        want = {bool: "true or false", int: "a whole number", str: "text"}.get(types[-1], "a number")
        raise InputError(f"kernel spec {where!r}: {key}={value!r} must be {want}.")
    return float(value) if float in types else value


def parse_kernel_spec(spec: str | dict[str, Any] | KernelSpec) -> KernelSpec:
    """Read one kernel of an ensemble from its compact string or its dict.

    Parameters
    ----------
    spec
        ``"store"`` (the store's own kernel), ``"PRIOR"`` or ``"PRIOR:KEY=VALUE,..."``
        (``"car:rho=0.2"``, ``"sar:rho=0.5,row_scale=true"``; values read as JSON numbers
        and booleans where they parse, else as text), or a dict such as
        ``{"prior": "car", "rho": 0.2}`` (``prior`` defaults to ``"splisosm"``).  Keys:
        :data:`SPEC_KEYS`.

    Returns
    -------
    KernelSpec

    Raises
    ------
    InputError
        An unknown prior (the message names the valid ones), an unknown key, a value of the
        wrong type, or a malformed string.
    """
    if isinstance(spec, KernelSpec):
        return spec
    if isinstance(spec, str):
        where = spec
        head, sep, tail = spec.strip().partition(":")
        prior = head.strip().lower()
        given: dict[str, Any] = {}
        if sep and not tail.strip():
            raise InputError(f"malformed kernel spec {spec!r}: nothing after ':'; use {_SPEC_FORM}.")
        for item in tail.split(",") if sep else ():
            key, eq, text = item.partition("=")
            key = key.strip()
            if not eq or not key or not text.strip():
                raise InputError(f"malformed kernel spec {spec!r}: expected KEY=VALUE, got {item.strip()!r}; "
                                 f"use {_SPEC_FORM}.")
            if key in given:
                raise InputError(f"malformed kernel spec {spec!r}: {key} given twice.")
            try:
                given[key] = json.loads(text.strip())
            except ValueError:
                given[key] = text.strip()
    elif isinstance(spec, dict):
        given = dict(spec)
        prior = given.pop("prior", "splisosm")
        where = json.dumps(spec, default=str)
        if not isinstance(prior, str):
            raise InputError(f"kernel spec {where}: prior must be text, got {prior!r}.")
        prior = prior.strip().lower()
    else:
        raise InputError(f"a kernel spec is a string ({_SPEC_FORM}) or a dict such as {{'prior': 'car', 'rho': 0.2}}, "
                         f"got {type(spec).__name__}.")
    if prior not in _valid_priors():
        raise InputError(f"unknown prior {prior!r} in kernel spec {where!r}; choose one of "
                         f"{', '.join(_valid_priors())} ({_SPEC_FORM}).")
    unknown = sorted(set(given) - set(SPEC_KEYS))
    if unknown:
        raise InputError(f"kernel spec {where!r}: unknown key(s) {', '.join(unknown)}; a spec may set "
                         f"{', '.join(SPEC_KEYS)}.")
    if prior == STORE_KERNEL and given:
        raise InputError(f"kernel spec {where!r}: 'store' is the store's own kernel and takes no settings.")
    settings = tuple(sorted((k, _spec_value(k, v, where)) for k, v in given.items()))
    return KernelSpec(prior, settings)


def parse_kernel_specs(specs: Sequence[str | dict[str, Any]] | str | dict[str, Any]) -> list[KernelSpec]:
    """Read an ensemble's kernels (:func:`parse_kernel_spec` each): at least 2, no two alike.

    The one parser of the API's ``kernels=[...]`` and the CLI's ``--kernels SPEC [SPEC ...]``.
    """
    if isinstance(specs, str | dict):
        specs = [specs]
    if not isinstance(specs, list | tuple):
        raise InputError(f"kernels must be a list of kernel specs ({_SPEC_FORM}, or dicts), got "
                         f"{type(specs).__name__}.")
    parsed = [parse_kernel_spec(s) for s in specs]
    if len(parsed) < 2:
        raise InputError(f"a kernel ensemble needs at least 2 kernels, got {len(parsed)}; for one kernel, ingest the "
                         "store with it and run without kernels.")
    labels = [p.label for p in parsed]
    twice = sorted({x for x in labels if labels.count(x) > 1})
    if twice:
        raise InputError(f"kernel {twice[0]!r} is given twice in the ensemble.")
    return parsed


def _store_graph(store: IsoformStore) -> tuple[np.ndarray | None, Any]:
    """The store's coordinates (kNN / distance-band kernels), or its user adjacency (``adj_key`` stores)."""
    if store.kernel_attrs.get("source") == "adjacency":
        from spatialscale.store import ADJACENCY_KEY

        return None, store._read_elem(f"obsp/{ADJACENCY_KEY}")
    coords = store.coords()
    if coords is None:
        raise InputError(f"{store.path} keeps neither coordinates nor a user graph: no kernel can be built on it.")
    return np.asarray(coords, dtype=np.float64), None


#: ensemble kernels built on this client, by (store content token, kernel parameters): a re-run builds none again
_BUILT_KERNELS: OrderedDict[tuple[str, str], dict[str, Any]] = OrderedDict()
_BUILT_LOCK = threading.Lock()
_MAX_BUILT_KERNELS = 8


def _ensemble_members(store: IsoformStore, specs: list[KernelSpec]) -> tuple[list[Any], Callable[[], list]]:
    """Each member's parameters (``None`` for the store's own), checked on the store's graph, and a builder.

    The checks (parameters, ``rho`` against the prior's range on the graph, ``sma``'s size) run
    now; the kernels themselves (precision, power sums) are built by the returned function, on the
    client, only when some batch is left to run.
    """
    from spatialscale.kernel import build_kernel, spatial_weights, symmetrise_adjacency
    from spatialscale.priors import check_rho

    attrs = store.kernel_attrs
    coords, adjacency = _store_graph(store)
    own = None
    try:
        settings = (("rho", float(attrs["rho"])), ("row_scale", bool(attrs.get("row_scale", False))))
        own = KernelSpec(str(attrs.get("prior", "splisosm")), settings).params(store)
    except (InputError, KeyError, TypeError, ValueError):
        pass
    params: list[Any] = []
    graphs: dict[tuple, Any] = {}
    for spec in specs:
        if spec.prior == STORE_KERNEL:
            params.append(None)
            continue
        if adjacency is not None and any(k in _GRAPH_KEYS for k, _ in spec.settings):
            raise InputError(f"kernel {spec.label!r}: the store's graph is a user adjacency (adj_key); a spec cannot "
                             f"set {', '.join(_GRAPH_KEYS)} there.")
        p = spec.params(store)
        if own is not None and p == own and attrs.get("source") in ("knn", "distance", "adjacency"):
            raise InputError(f"kernel {spec.label!r} is the store's own kernel; give it once, as 'store'.")
        params.append(p)
        if (store.content_token, json.dumps(p.to_dict(), sort_keys=True)) in _BUILT_KERNELS:
            continue  # built (hence checked) on this client before
        key = (p.weights, p.k_neighbors, p.radius, p.bandwidth, p.scale_coords)
        if key not in graphs:
            graphs[key] = symmetrise_adjacency(adjacency) if adjacency is not None else spatial_weights(coords, p)
        n = store.n_spots
        try:
            if p.prior == "sma" and n > p.exact_threshold:
                raise ValueError(f"prior='sma' has a dense precision ({n} x {n}); it is allowed up to "
                                 f"exact_threshold={p.exact_threshold} spots; use 'sar' or 'isar' (sparse).")
            if p.prior != "splisosm":
                check_rho(graphs[key], p.prior, p.rho, row_scale=p.row_scale)
        except ValueError as exc:
            raise InputError(f"kernel {spec.label!r}: {exc}") from None

    def build() -> list[dict[str, Any] | None]:
        out: list[dict[str, Any] | None] = []
        for spec, p in zip(specs, params):
            if p is None:
                out.append(None)
                continue
            key = (store.content_token, json.dumps(p.to_dict(), sort_keys=True))
            with _BUILT_LOCK:
                member = _BUILT_KERNELS.get(key)
            if member is None:
                try:
                    k = (build_kernel(adjacency=adjacency, params=p) if adjacency is not None
                         else build_kernel(coords, params=p))
                except ValueError as exc:
                    raise InputError(f"kernel {spec.label!r}: {exc}") from None
                member = {"precision": k.precision, "power_sums": np.asarray(k.power_sums, dtype=np.float64),
                          "token": k.token, "power_sum_method": k.power_sum_method}
                with _BUILT_LOCK:
                    _BUILT_KERNELS[key] = member
                    while len(_BUILT_KERNELS) > _MAX_BUILT_KERNELS:
                        _BUILT_KERNELS.popitem(last=False)
            out.append(member)
        return out

    return params, build


def _prepare_ensemble(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str,
                      params: dict[str, Any], attrs: dict[str, Any]) -> Prepared:
    """The kernel-ensemble run of :func:`_prepare`: checks, members, task and assembly."""
    from spatialscale.stats.ensemble import ENSEMBLE_NULLS

    specs = parse_kernel_specs(opts["kernels"])
    if params["null"] not in ENSEMBLE_NULLS:
        raise InputError(f"a kernel ensemble takes null='liu', 'welch' or 'liu-perm' (each kernel's own mixture), not "
                         f"{params['null']!r}.")
    if params["nan_filling"] != "mean":
        raise InputError("a kernel ensemble needs nan_filling='mean' (every spot in every kernel's test).")
    if store.kernel_kind == "fft":
        raise InputError("a kernel ensemble does not run on raster (fft) stores: the priors need a spot graph; use a "
                         "store ingested with kernel='car'.")
    adjust, fingerprint_extra = None, None
    if covariates is not None:
        adjust, design = _covariate_adjustment(store, covariates, opts, params["null"])
        attrs = {**attrs, "covariates": design.columns}
        fingerprint_extra = design_fingerprint(design)
    members, build = _ensemble_members(store, specs)
    labels = [s.label for s in specs]
    resolved = [STORE_KERNEL if p is None else p.to_dict() for p in members]
    n = store.n_spots
    task_params = {"method": method, "transformation": params["transformation"], "null": params["null"]}
    run_params = {**params, "kernels": labels, "kernel_params": resolved}
    run_attrs = {**attrs, "kernels": labels, "kernel_combination": "cauchy",
                 "kernel_params": json.dumps(resolved, sort_keys=True)}

    def bytes_per_gene(p: int) -> float:
        d = response_width(method, p, params["transformation"])
        return 8.0 * n * (p + 6 * d + (d if adjust is not None else 0)) + 24.0 * len(specs)

    def shared() -> dict[str, Any]:
        """What the tasks need, built when some batch is left to run: the kernels (and the adjustment)."""
        kernels = build()
        if params["null"] == "liu-perm":  # each built kernel's sum_i (K_c)_ii^2, once (kept with the kernel)
            from spatialscale.kernel import centred_diag_sq

            for k in kernels:
                if k is not None and "diag_sq" not in k:
                    k["diag_sq"] = centred_diag_sq(k["precision"])
        if adjust is None:
            return {"kernels": kernels, "sums": [None] * len(kernels), "basis": None}
        from spatialscale.kernel import SparseCAROperator

        own = adjust()  # the store kernel's projected sums, and the basis
        basis = own["basis"]
        sums = [own["sums"] if k is None else
                projected_kernel_sums(SparseCAROperator(k["precision"]), k["power_sums"], basis) for k in kernels]
        return {"kernels": kernels, "sums": sums, "basis": basis}

    def assemble(run: Any) -> xr.Dataset:
        keys = ("statistic", "pvalue", "effect", "best", "n_spots_used", "kernel_statistic", "kernel_pvalue",
                "kernel_effect")
        data = {k: np.concatenate([r[k] for r in run.parts]) for k in keys}
        return make_dataset(
            store.genes.index.to_numpy(),
            {"sv_statistic": data["statistic"], "sv_pvalue": data["pvalue"],
             "sv_pvalue_adj": bh_adjust(data["pvalue"]), "sv_effect": data["effect"], "sv_kernel": data["best"],
             "kernel_statistic": data["kernel_statistic"], "kernel_pvalue": data["kernel_pvalue"],
             "kernel_effect": data["kernel_effect"],
             "n_isoforms": store.genes["n_isoforms"].to_numpy(), "n_spots_used": data["n_spots_used"],
             **summary_variables(run.parts)},
            {**run_attrs, **provenance(store), "execution": run.kind},
            extra_coords={"kernel": np.asarray(labels, dtype=str)},
        )

    task = functools.partial(_ensemble_task, str(store.path.resolve()), store.kernel_token, device, task_params)
    return Prepared(kind="sv", params=run_params, task=task, bytes_per_gene=bytes_per_gene,
                    label=f"sv {method} x {len(specs)} kernels", assemble=assemble, shared=shared,
                    fingerprint_extra=fingerprint_extra)


def _ensemble_task(store_path: str, token: str, device: str, params: dict[str, Any], batch: Batch,
                   ensemble: dict[str, list]) -> dict[str, np.ndarray]:
    """One Dask task of a kernel ensemble: the batch's counts read once, tested against every kernel.

    ``ensemble["kernels"]`` holds, per member, ``None`` (the store's own kernel, from the
    worker's cache) or the precision, power sums and token of a kernel built on the client
    (its operator factorised once per worker process and cached by token).  With covariates,
    ``ensemble["basis"]`` is their orthonormal basis and ``ensemble["sums"]`` each projected
    kernel's power sums (``None`` entries: the kernel's own).
    """
    from spatialscale.stats.ensemble import ensemble_batch

    perm = params["null"] == "liu-perm"
    kernels = []
    for member, sums in zip(ensemble["kernels"], ensemble["sums"]):
        op, own = (kernel_operator(store_path, token, device) if member is None
                   else (_member_operator(member, device), member["power_sums"]))
        kernels.append((op, own if sums is None else sums))
        if perm:  # the exact permutation moments need the kernel's sum_i (K_c)_ii^2
            kernels[-1] += (kernel_diag_sq(store_path, token) if member is None else member["diag_sq"],)
    return ensemble_batch(batch_counts(store_path, batch), kernels, covariate_basis=ensemble["basis"], **params)


#: operators of ensemble kernels built in this process, by (token, device); the least recently used dropped first
_MEMBER_OPERATORS: OrderedDict[tuple[str, str], Any] = OrderedDict()
_MEMBER_LOCK = threading.Lock()
_MAX_MEMBER_OPERATORS = 8


def _member_operator(member: dict[str, Any], device: str) -> Any:
    """The operator of an ensemble kernel on this worker (as the store's kernel gets: dense on a GPU, else sparse)."""
    from spatialscale.kernel import DenseKernelOperator, SparseCAROperator, SparseCGOperator
    from spatialscale.worker import DENSE_GPU_MAX_SPOTS

    dev = resolve_device(device)
    key = (str(member["token"]), dev)
    with _MEMBER_LOCK:
        op = _MEMBER_OPERATORS.get(key)
        if op is not None:
            _MEMBER_OPERATORS.move_to_end(key)
            return op
        precision = member["precision"]
        if dev.startswith("cuda"):
            op = (DenseKernelOperator(precision, device=dev) if precision.shape[0] <= DENSE_GPU_MAX_SPOTS
                  else SparseCGOperator(precision, device=dev))
        else:
            op = SparseCAROperator(precision)
        _MEMBER_OPERATORS[key] = op
        while len(_MEMBER_OPERATORS) > _MAX_MEMBER_OPERATORS:
            _MEMBER_OPERATORS.popitem(last=False)
        return op


FAMILY = Family(
    name="sv-hsic",
    command="sv",
    methods=SV_METHODS,
    description="HSIC spatial-variability tests: isoform ratios (hsic-ir), isoform counts (hsic-ic) or gene "
                "counts (hsic-gc) against the section's CAR kernel",
    options=(
        Option("null", "liu", "null distribution of the HSIC statistic", choices=NULLS),
        Option("transformation", "none", "transformation of the isoform ratios", choices=TRANSFORMS,
               methods=("hsic-ir",)),
        Option("nan_filling", "mean", "spots where a gene has no counts: mean ratio, or left out",
               choices=NAN_FILLINGS),
        Option("n_perms", None, "permutations for null='perm' (1000)", kind="int", low=1),
        Option("perm_seed", 0, "seed of the permutations (one set shared by all genes)", kind="int", low=0),
        Option("kernels", None, "a kernel ensemble, Cauchy-combined: 'store' (the store's kernel) or PRIOR[:KEY=VALUE,"
               "...] over the store's graph (e.g. store splisosm:rho=0.5 sar:rho=0.2; keys rho, k_neighbors, weights, "
               "radius, bandwidth, scale_coords, row_scale, standardize_cov)", kind="list"),
    ),
    prepare=_prepare,
    variables=("sv_statistic", "sv_pvalue", "sv_pvalue_adj", "sv_effect", "n_isoforms", "n_spots_used", "sv_kernel",
               "kernel_statistic", "kernel_pvalue", "kernel_effect"),
    covariates="optional",
    kernels=("car", "fft"),
)
