"""Spatial variability by Moran's I and Geary's C (moran, geary) on the section's spot graph.

CAR stores use their stored graph (``obsp/spatialscale_adjacency``); raster
(``kernel="fft"``) stores, which keep none, the grid neighbours of their
observed bins (the raster kernel's ``neighbor_degree`` rule, without
wrap-around), and only those bins enter the test.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import xarray as xr

from spatialscale.engine import Batch
from spatialscale.errors import InputError
from spatialscale.families.base import Family, Option, Prepared
from spatialscale.families.common import batch_counts, provenance, summary_variables
from spatialscale.results import make_dataset
from spatialscale.stats.autocorr import AUTOCORR_METHODS, RESPONSES, WEIGHTINGS, autocorr_batch
from spatialscale.stats.multitest import bh_adjust
from spatialscale.store import IsoformStore
from spatialscale.worker import autocorr_weights

__all__ = ["FAMILY"]


#: method -> what sv_statistic and sv_effect hold (the registry's descriptions are the HSIC tests')
_DESCRIPTIONS = {
    "moran": ("Moran's I of the gene's responses on the spot graph, (n / S0) tr(Y'WY) / tr(Y'Y)",
              "Moran's I (about -1 / (n - 1) without SV)"),
    "geary": ("Geary's C of the gene's responses on the spot graph, (n - 1) sum_ij w_ij |y_i - y_j|^2 / "
              "(2 S0 tr(Y'Y))", "1 - Geary's C (about 0 without SV)"),
}


def _autocorr_task(store_path: str, token: str, params: dict[str, Any], batch: Batch) -> dict[str, np.ndarray]:
    """One Dask task: Moran's I or Geary's C of the genes of ``batch`` (runs on a worker).

    A raster's counts are read for its observed bins only (the rows of its graph).
    """
    weights = autocorr_weights(store_path, token, params["weighting"])
    counts = batch_counts(store_path, batch, grid=not params["raster"])
    return autocorr_batch(counts, weights, method=params["method"], response=params["response"])


def _prepare(store: IsoformStore, method: str, opts: dict[str, Any], covariates: Any, device: str) -> Prepared:
    if covariates is not None:  # resolve_family refuses them already; a direct caller gets the same message
        raise InputError(f"sv {method} takes no covariates (use hsic-ir, hsic-ic or hsic-gc for adjusted tests).")
    for name, choices in (("response", RESPONSES), ("weighting", WEIGHTINGS)):
        if opts[name] not in choices:
            raise InputError(f"unknown {name} {opts[name]!r}; choose one of {', '.join(choices)}.")
    raster = store.kernel_kind == "fft"
    n = store.n_observed if raster else store.n_spots
    if n < 4:
        raise InputError(f"sv {method} needs at least 4 spots ({store.path} has {n}).")
    params = {"method": method, "response": opts["response"], "weighting": opts["weighting"], "raster": raster}
    graph = (f"grid neighbours of the observed bins (neighbor_degree {store.kernel_attrs['neighbor_degree']}, no "
             "wrap-around)" if raster else "obsp/spatialscale_adjacency")
    attrs = {"test": "spatial_variability", "method": method, "null": "normal", "response": opts["response"],
             "weighting": opts["weighting"], "graph": graph}

    def bytes_per_gene(p: int) -> float:
        d = 1 if opts["response"] == "gene-counts" else p
        return 8.0 * n * (2 * p + 6 * d)  # counts (float and copy), responses, stacked, W Y, squares

    def assemble(run: Any) -> xr.Dataset:
        data = {k: np.concatenate([r[k] for r in run.parts]) for k in ("statistic", "pvalue", "effect",
                                                                        "n_spots_used")}
        ds = make_dataset(
            store.genes.index.to_numpy(),
            {"sv_statistic": data["statistic"], "sv_pvalue": data["pvalue"],
             "sv_pvalue_adj": bh_adjust(data["pvalue"]), "sv_effect": data["effect"],
             "n_isoforms": store.genes["n_isoforms"].to_numpy(), "n_spots_used": data["n_spots_used"],
             **summary_variables(run.parts)},
            {**attrs, **provenance(store), "execution": run.kind},
        )
        ds["sv_statistic"].attrs["description"] = _DESCRIPTIONS[method][0]
        ds["sv_effect"].attrs["description"] = _DESCRIPTIONS[method][1]
        return ds

    # the graph's weights are checked once on the client (and cached for thread runs)
    weights = autocorr_weights(str(store.path.resolve()), store.content_token, opts["weighting"])
    if weights.s0 <= 0:
        raise InputError(f"the spot graph of {store.path} has no edges between spots: sv {method} needs neighbours "
                         "(re-ingest with more k_neighbors or neighbor_degree, or another adjacency).")
    task = functools.partial(_autocorr_task, str(store.path.resolve()), store.content_token, params)
    return Prepared(kind="sv-autocorr", params=params, task=task, bytes_per_gene=bytes_per_gene,
                    label=f"sv {method}", assemble=assemble)


FAMILY = Family(
    name="sv-autocorr",
    command="sv",
    methods=AUTOCORR_METHODS,
    description="Moran's I (moran) and Geary's C (geary) of isoform ratios, isoform counts or gene counts on the "
                "section's spot graph, one-sided normal-approximation p-values",
    options=(
        Option("response", "isoform-ratios", "what moran / geary test per gene (ratios mean-filled at spots "
               "without counts)", choices=RESPONSES),
        Option("weighting", "row", "spatial weights of moran / geary: row-standardised graph (squidpy's default) "
               "or 1 per edge", choices=WEIGHTINGS),
    ),
    prepare=_prepare,
    variables=("sv_statistic", "sv_pvalue", "sv_pvalue_adj", "sv_effect", "n_isoforms", "n_spots_used"),
    covariates="none",
    kernels=("car", "fft"),
)
