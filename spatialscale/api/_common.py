"""What every test family shares: planning and running batches, provenance, writing results."""

from __future__ import annotations

import datetime as _dt
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import xarray as xr

from spatialscale._version import __version__
from spatialscale.engine import Batch, execution, fingerprint, plan_batches, run_batches
from spatialscale.errors import InputError
from spatialscale.results import prepare_output, write_dataset
from spatialscale.store import IsoformStore, open_store, read_count_columns

#: Genes are split into at least this many batches (when there are enough) so
#: that every worker gets work.  A constant, not the cluster size, so that a
#: resumed run on a different cluster finds the same batches.
MIN_BATCHES = 16
#: GLMM fits gain most from large batches (one vectorised optimiser run per worker)
MIN_BATCHES_GLMM = 2


def parse_bytes(value: int | float | str) -> int:
    """``"512MB"`` / ``"2GiB"`` / ``1e9`` -> bytes."""
    if isinstance(value, int | float):
        return int(value)
    from dask.utils import parse_bytes as _pb

    return int(_pb(value))


@dataclass
class _Run:
    parts: list[dict[str, np.ndarray]]
    kind: str
    fp: str
    existing: xr.Dataset | None = None


def provenance(store: IsoformStore) -> dict[str, Any]:
    """Attributes every results Dataset carries."""
    kernel = store.kernel_attrs
    return {
        "n_spots": store.n_spots, "n_genes": store.n_genes, "store": str(store.path),
        "spatialscale_version": __version__, "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **{f"kernel_{k}": v for k, v in kernel.items() if k != "power_sums"},
        "kernel_power_sums": list(kernel["power_sums"]),
    }


def execute(store: IsoformStore, *, kind: str, params: dict[str, Any], task: Any, bytes_per_gene: Any,
             batch_memory: int | str, batch_size: int | None, client: Any, scheduler: str | None,
             workers: int | None, device: str, out: str | os.PathLike | None, overwrite: bool, progress: bool,
             label: str, shared: Any = None, fingerprint_extra: Any = None,
             min_batches: int = MIN_BATCHES, with_summary: bool = False) -> _Run:
    """Plan batches, run them where asked (resuming from ``out``), return the per-batch results.

    With ``with_summary`` every task also returns the gene-level feature
    summaries of its genes (see :func:`summary_variables`).
    ``shared`` (an array every task receives as its last argument, sent to the
    workers once) may be a callable, evaluated only if some batch is left to run.
    """
    if with_summary:  # the gene-level feature summaries ride along with each batch's test
        task = functools.partial(_summarised, task, str(store.path.resolve()))
        params = {**params, "with_summary": True}
    fp = fingerprint(kind=kind, store=str(store.path.resolve()), kernel=store.kernel_token,
                     genes=list(store.genes.index), extra=fingerprint_extra, **params)
    partial = None
    if out is not None:
        partial, existing = prepare_output(out, fp, overwrite=overwrite)
        if existing is not None:
            return _Run([], "existing", fp, existing)
    with execution(client, scheduler=scheduler, workers=workers, device=device) as runner:
        budget = batch_budget(batch_memory, runner, device)
        batches = plan_batches(store.genes, store.n_spots, bytes_per_gene=bytes_per_gene, memory_bytes=budget,
                               batch_size=batch_size, min_batches=min_batches)
        if callable(shared):  # computed only when there is something left to run
            shared = shared()
        extra = () if shared is None else (runner.share(shared),)
        parts = run_batches(task, batches, runner, partial=partial, progress=progress, label=label, extra=extra)
    return _Run(parts, runner.kind, fp)


def _summarised(task: Any, store_path: str, batch: Batch, *extra: Any) -> dict[str, np.ndarray]:
    """Run ``task`` on a batch and add the batch's gene-level feature summaries (``gene_*``)."""
    from spatialscale.stats.summary import summary_batch

    out = task(batch, *extra)
    gene, _ = summary_batch(batch_counts(store_path, batch))
    return {**out, **{f"gene_{k}": v for k, v in gene.items()}}


def summary_variables(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The ``gene_*`` summaries gathered from a run's batches (empty without ``with_summary``)."""
    if not parts:
        return {}
    return {k: np.concatenate([r[k] for r in parts]) for k in parts[0] if k.startswith("gene_")}


def batch_budget(batch_memory: int | str, runner: Any, device: str) -> int:
    """Bytes of working memory per task; ``"auto"`` takes half the free GPU memory on GPU workers."""
    if batch_memory == "auto":
        free = runner.device_memory(device) if device != "cpu" else None
        return int(free * 0.5) if free else parse_bytes("256MB")
    return parse_bytes(batch_memory)


def finish(ds: xr.Dataset, out: str | os.PathLike | None, fp: str) -> xr.Dataset:
    if out is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_dataset(ds, out, fp)
    return ds


def batch_counts(store_path: str, batch: Batch) -> np.ndarray:
    """Counts of a batch as ``(n_genes, n_spots, n_isoforms)``."""
    flat = read_count_columns(store_path, batch.col_start, batch.col_stop)
    return flat.reshape(flat.shape[0], batch.n_genes, batch.n_isoforms).transpose(1, 0, 2)


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def as_store(store: IsoformStore | str | os.PathLike) -> IsoformStore:
    """An opened store from a store or its path."""
    return store if isinstance(store, IsoformStore) else open_store(store)
