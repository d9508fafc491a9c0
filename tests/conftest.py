"""Shared fixtures: small AnnData sections and a real Dask LocalCluster."""

from __future__ import annotations

import contextlib
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

warnings.filterwarnings("ignore", message="zarr v3 autosharding")


def coords_for(geometry: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Square grid, hexagonal lattice or random coordinates for ``n`` spots."""
    side = int(np.ceil(np.sqrt(n)))
    if geometry == "grid":
        xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)
    elif geometry == "hex":
        ii, jj = np.meshgrid(np.arange(side), np.arange(side))
        xy = np.stack([jj + 0.5 * (ii % 2), ii * np.sqrt(3) / 2], -1).reshape(-1, 2)
    else:
        xy = rng.uniform(0, side, (n, 2))
    return xy[:n].astype(float)


def make_adata(
    n: int = 400,
    n_genes: int = 24,
    *,
    geometry: str = "grid",
    isoforms: tuple[int, int] = (2, 6),
    sparse: bool = True,
    zero_spots: float = 0.1,
    sv_frac: float = 0.3,
    depth: float = 4.0,
    seed: int = 0,
) -> ad.AnnData:
    """Section with genes of 2-6 isoforms and zero-coverage spots.

    The first ``sv_frac`` of genes have spatially varying isoform ratios, the last
    ``sv_frac / 2`` spatially varying totals.
    """
    rng = np.random.default_rng(seed)
    xy = coords_for(geometry, n, rng)
    pattern = (xy[:, 0] - xy[:, 0].mean()) / (xy[:, 0].std() + 1e-9)
    blocks, genes = [], []
    for g in range(n_genes):
        p = int(rng.integers(isoforms[0], isoforms[1] + 1))
        eta = rng.normal(0, 0.5, p)[None, :] + (g < sv_frac * n_genes) * np.outer(pattern, rng.normal(0, 1, p))
        prob = np.exp(eta) / np.exp(eta).sum(1, keepdims=True)
        level = depth * rng.lognormal(0, 0.3) * (np.exp(0.7 * pattern) if g >= (1 - sv_frac / 2) * n_genes else 1.0)
        tot = rng.poisson(level, n) * (rng.random(n) > zero_spots)
        blocks.append(np.stack([rng.multinomial(t, pr) for t, pr in zip(tot, prob)]))
        genes += [f"gene{g:03d}"] * p
    counts = np.concatenate(blocks, axis=1).astype(np.float32)
    var = pd.DataFrame({"gene_symbol": genes}, index=[f"{g}-t{i}" for i, g in enumerate(genes)])
    obs = pd.DataFrame(
        {"region": pd.Categorical(np.where(xy[:, 0] > np.median(xy[:, 0]), "A", "B"))},
        index=[f"spot{i:05d}" for i in range(n)],
    )
    x = sp.csr_matrix(counts) if sparse else counts
    a = ad.AnnData(X=x.copy(), obs=obs, var=var)
    a.layers["counts"] = x
    a.obsm["spatial"] = xy
    return a


@pytest.fixture(scope="session")
def client():
    """A real two-worker LocalCluster shared by the session.

    Not the default client: a test that omits ``client=`` / ``scheduler=``
    runs in local threads whatever ran before it (pass ``client=client`` or
    use ``client.as_current()`` to run on the cluster).
    """
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as c:
        yield c


@pytest.fixture
def small_adata() -> ad.AnnData:
    return make_adata()


@pytest.fixture
def small_store(tmp_path, small_adata):
    import spatialscale

    return spatialscale.ingest(small_adata, tmp_path / "small.zarr")


@contextlib.contextmanager
def lock_held_elsewhere(path, *, shared: bool = False):
    """Another process holding spatialscale's lock on ``path`` (a writer's, or a reader's with ``shared``)."""
    import subprocess
    import sys

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from spatialscale.output import FileLock; "
         f"FileLock(Path(sys.argv[1]), shared={shared}).acquire(); print('locked', flush=True); time.sleep(120)",
         str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
