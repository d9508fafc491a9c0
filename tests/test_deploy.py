"""deploy/ recipes: the SLURM job script and the manifests are well formed."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DEPLOY / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_slurm_job_script():
    pytest.importorskip("dask_jobqueue")
    mod = _load("slurm_sv")
    args = mod.parse_args(["s.zarr", "--out", "o.zarr", "--cores", "4", "--memory", "8GB", "--partition", "short"])
    cluster = mod.make_cluster(args)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p short" in script
    assert "OMP_NUM_THREADS=1" in script
    assert "--nworkers 4" in script and "--nthreads 1" in script


def test_sbatch_script_parses():
    assert subprocess.run(["bash", "-n", str(DEPLOY / "slurm_sv.sbatch")]).returncode == 0


def test_manifests_parse():
    yaml = pytest.importorskip("yaml")
    kinds = {doc["kind"] for f in (DEPLOY / "kubernetes").glob("*.yaml") for doc in yaml.safe_load_all(f.read_text())}
    assert kinds == {"DaskCluster", "Job", "DaskWorkerGroup"}
