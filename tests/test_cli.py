"""The command line, run as a user would (separate processes, real files)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr
from conftest import make_adata

import spatialscale


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spatialscale.cli", *args], capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("cmd", ["ingest", "sv", "du", "glmm", "summary", "demo", "bench"])
def test_help(cmd):
    r = cli(cmd, "--help")
    assert r.returncode == 0 and "usage: spatialscale" in r.stdout


def test_ingest_then_sv_on_local_cluster(tmp_path):
    adata = make_adata(n=300, n_genes=12, seed=4)
    adata.write_h5ad(tmp_path / "sample.h5ad")
    r = cli("ingest", str(tmp_path / "sample.h5ad"), str(tmp_path / "sample.zarr"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "n_spots=300" in r.stdout
    r = cli("sv", str(tmp_path / "sample.zarr"), "--out", str(tmp_path / "sv.zarr"), "--method", "hsic-ir",
            "--null", "liu", "--workers", "2", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert "12 genes tested" in r.stdout
    assert "sv hsic-ir: 100%" in r.stderr  # the progress bar reached the end
    ds = xr.open_zarr(tmp_path / "sv.zarr")
    ref = spatialscale.sv_test(spatialscale.open_store(tmp_path / "sample.zarr"), scheduler="threads",
                               progress=False)
    np.testing.assert_allclose(ds["sv_pvalue"].values, ref["sv_pvalue"].values, rtol=1e-12)
    r = cli("du", str(tmp_path / "sample.zarr"), "--covariates", "region", "--out", str(tmp_path / "du.zarr"),
            "--workers", "2", "--top", "2")
    assert r.returncode == 0, r.stderr
    assert "12 genes x 1 covariates tested (hsic-gp)" in r.stdout  # a two-level covariate is one test
    du = xr.open_zarr(tmp_path / "du.zarr")
    assert du["du_pvalue"].shape == (12, 1) and du.attrs["method"] == "hsic-gp"
    ref = spatialscale.du_test(spatialscale.open_store(tmp_path / "sample.zarr"), "region", scheduler="threads",
                               progress=False)
    np.testing.assert_allclose(du["du_pvalue"].values, ref["du_pvalue"].values, rtol=1e-9)
    r = cli("du", str(tmp_path / "sample.zarr"), "--covariates", "region", "--out", str(tmp_path / "t.zarr"),
            "--method", "t-fisher", "--with-summary", "--no-progress")
    assert r.returncode == 0, r.stderr
    t = xr.open_zarr(tmp_path / "t.zarr")
    assert t.attrs["method"] == "t-fisher" and t["gene_perplexity"].shape == (12,)
    r = cli("summary", str(tmp_path / "sample.zarr"), "--out", str(tmp_path / "sum.zarr"), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "summaries of 12 genes" in r.stdout
    np.testing.assert_allclose(xr.open_zarr(tmp_path / "sum.zarr")["gene_perplexity"].values,
                               t["gene_perplexity"].values, rtol=1e-12)
    r = cli("glmm", str(tmp_path / "sample.zarr"), "--out", str(tmp_path / "fit.zarr"), "--model", "glmm-null",
            "--glmm", "max_epochs=20", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "fitted glmm-null for 12 genes" in r.stdout
    assert xr.open_zarr(tmp_path / "fit.zarr")["loss"].shape == (12,)


def test_errors_are_named_with_exit_code_2(tmp_path):
    adata = make_adata(n=100, n_genes=5)
    adata.write_h5ad(tmp_path / "a.h5ad")
    r = cli("ingest", str(tmp_path / "a.h5ad"), str(tmp_path / "s.zarr"), "--layer", "raw")
    assert r.returncode == 2
    assert "layer 'raw' not found" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "s.zarr").exists()
    cli("ingest", str(tmp_path / "a.h5ad"), str(tmp_path / "s.zarr"), "--no-progress")
    r = cli("ingest", str(tmp_path / "a.h5ad"), str(tmp_path / "s.zarr"), "--no-progress")  # same input: reused
    assert r.returncode == 0 and r.stdout.startswith("reused IsoformStore(")
    r = cli("ingest", str(tmp_path / "a.h5ad"), str(tmp_path / "s.zarr"), "--k-neighbors", "6")
    assert r.returncode == 2 and "holds an isoform store of another input or other ingest options" in r.stderr
    assert "--overwrite" in r.stderr and "Traceback" not in r.stderr
    r = cli("sv", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o.zarr"), "--method", "nope")
    assert r.returncode == 2 and "invalid choice: 'nope'" in r.stderr
    assert not (tmp_path / "o.zarr").exists()
    r = cli("du", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "o.zarr"), "--covariates", "nope")
    assert r.returncode == 2 and "not found in obs" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o.zarr").exists()


def test_sv_llr_with_permutation_null(tmp_path):
    from spatialscale.simulate import simulate_section

    spatialscale.ingest(simulate_section(81, 6, n_sv=2, isoforms=(2, 3), seed=8), tmp_path / "s.zarr")
    r = cli("sv", str(tmp_path / "s.zarr"), "--out", str(tmp_path / "llr.zarr"), "--method", "glmm-llr",
            "--null", "perm", "--n-perms", "2", "--scheduler", "threads", "--no-progress", "--top", "2")
    assert r.returncode == 0, r.stderr
    assert "6 genes tested (glmm-llr, perm null)" in r.stdout
    ds = xr.open_zarr(tmp_path / "llr.zarr")
    assert ds.attrs["null"] == "perm" and ds.attrs["n_perms"] == 2
    p = ds["sv_pvalue"].values
    assert ((p > 0) & (p <= 1)).all()
    assert np.allclose(p * (1 + 2 * np.bincount(ds["n_isoforms"].values)[ds["n_isoforms"].values]) % 1, 0)
