"""spatialscale: a Dask-distributed engine for spatial isoform statistics.

Ingest an AnnData of isoform counts into an isoform store, then test every
gene for spatial variability and differential usage on a laptop,
a GPU or a cluster::

    import spatialscale
    store = spatialscale.ingest("sample.h5ad", "sample.zarr")
    ds = spatialscale.sv_test(store, method="hsic-ir", null="liu")
    spatialscale.to_anndata(ds, adata)      # results into adata.var / adata.uns
    spatialscale.pl.qq(ds)                  # plots (matplotlib)

``spatialscale.pl`` (plots) and ``spatialscale.compat`` (SPLISOSM's classes on
the engine) are imported on first use.
"""

import importlib
from typing import Any

from spatialscale import remote as _remote  # noqa: F401 - registers the URL handlers (spatialscale.locations)
from spatialscale._version import __version__
from spatialscale.api import (
    deconvolve,
    du_test,
    feature_summary,
    fitted_ratios,
    glmm_fit,
    latent_factors,
    merge_summary,
    sv_test,
)
from spatialscale.cohort import Cohort, ingest_cohort, open_cohort
from spatialscale.errors import InputError
from spatialscale.results import input_order, open_results, to_anndata
from spatialscale.store import IsoformStore, ingest, open_store

__all__ = [
    "__version__",
    "Cohort",
    "InputError",
    "IsoformStore",
    "deconvolve",
    "du_test",
    "feature_summary",
    "fitted_ratios",
    "glmm_fit",
    "ingest",
    "ingest_cohort",
    "input_order",
    "latent_factors",
    "merge_summary",
    "open_cohort",
    "open_results",
    "open_store",
    "sv_test",
    "to_anndata",
]

#: submodules imported on first use (they need optional packages, such as matplotlib)
_LAZY = ("pl", "compat", "losses")


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(f"spatialscale.{name}")
    raise AttributeError(f"module 'spatialscale' has no attribute {name!r}")
