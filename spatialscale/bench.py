"""``spatialscale bench``: SPLISOSM 1.2.0 and spatialscale on the same data, in one run."""

from __future__ import annotations

import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = ["run_bench", "compare"]


def compare(ref: pd.DataFrame, ours: pd.DataFrame) -> dict[str, float]:
    """Agreement of two per-gene tables with ``statistic`` and ``pvalue``."""
    from scipy.stats import spearmanr

    j = ref.join(ours, lsuffix="_ref", how="inner")
    rel = np.abs(j["pvalue"] - j["pvalue_ref"]) / np.maximum(j["pvalue_ref"], 1e-12)
    k = min(20, len(j))
    top_ref = set(j.nsmallest(k, "pvalue_ref").index)
    top = set(j.nsmallest(k, "pvalue").index)
    return {
        "genes": float(len(j)),
        "p_max_rel_diff": float(rel.max()),
        "p_spearman": float(spearmanr(j["pvalue_ref"], j["pvalue"]).statistic),
        "stat_spearman": float(spearmanr(j["statistic_ref"], j["statistic"]).statistic),
        "top20_overlap": len(top_ref & top) / max(k, 1),
    }


def _splisosm(adata, method: str, null: str) -> tuple[pd.DataFrame, float]:
    from splisosm import SplisosmNP

    t = time.perf_counter()
    model = SplisosmNP()
    model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
    res = model.test_spatial_variability(method=method, null_method=null, print_progress=False,
                                         return_results=True)
    wall = time.perf_counter() - t
    names = [str(g) for g in model.gene_names]
    return pd.DataFrame({"statistic": res["statistic"], "pvalue": res["pvalue"]}, index=names), wall


def _worker_peak_mb() -> float:
    """Peak resident memory of this worker process (MB; Linux ``VmHWM``).

    ``ru_maxrss`` is not used: a forked worker inherits its parent's peak.
    """
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def _spatialscale(adata, client, method: str, null: str, tmp: Path, batch_memory: str) -> tuple[pd.DataFrame, float]:
    from spatialscale.api import sv_test
    from spatialscale.store import ingest

    t = time.perf_counter()
    store = ingest(adata, tmp / "bench.zarr", overwrite=True)
    ds = sv_test(store, method=method, null=null, client=client, batch_memory=batch_memory, progress=False)
    wall = time.perf_counter() - t
    return pd.DataFrame({"statistic": ds["sv_statistic"].values, "pvalue": ds["sv_pvalue"].values},
                        index=ds["gene"].values), wall


def run_bench(spots: list[int], genes: list[int], *, method: str = "hsic-ir", null: str = "liu",
              workers: int = 2, seed: int = 0, batch_memory: str = "256MB") -> pd.DataFrame:
    """Time SplisosmNP (setup_data + test_spatial_variability) against spatialscale
    (ingest + sv_test, kernel build included) on the same simulated AnnData.

    The LocalCluster is started before timing (it is started once per
    session in practice); its start-up time is printed separately.  Workers
    are restarted before each size, so ``worker_peak_MB`` is that run's peak
    resident memory of the busiest worker.
    """
    from distributed import Client

    from spatialscale.engine import local_cluster
    from spatialscale.simulate import simulate_section

    warnings.filterwarnings("ignore")
    rows = []
    t = time.perf_counter()
    with local_cluster(workers) as cluster, \
            Client(cluster) as client, tempfile.TemporaryDirectory() as tmpdir:
        print(f"LocalCluster with {workers} workers started in {time.perf_counter() - t:.1f}s (not timed below)")
        for n in spots:
            for g in genes:
                adata = simulate_section(n, g, n_sv=max(1, g // 5), seed=seed)
                ref, t_ref = _splisosm(adata, method, null)
                client.restart()  # fresh worker processes: the peak memory below is this run's
                ours, t_ours = _spatialscale(adata, client, method, null, Path(tmpdir), batch_memory)
                peak = max(client.run(_worker_peak_mb).values())
                row = {"spots": n, "genes": g, "splisosm_s": t_ref, "spatialscale_s": t_ours,
                       "speedup": t_ref / t_ours, "worker_peak_MB": peak, **compare(ref, ours)}
                rows.append(row)
                print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table = pd.DataFrame(rows)
    print(f"\n{method} / {null}: SPLISOSM 1.2.0 SplisosmNP (setup_data + test_spatial_variability) vs "
          f"spatialscale (ingest + sv_test on {workers} workers)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


def _splisosm_glmm(adata, batch_size: int, n_jobs: int) -> tuple[pd.DataFrame, float]:
    from splisosm import SplisosmGLMM

    t = time.perf_counter()
    model = SplisosmGLMM(model_type="glmm-full")
    model.setup_data(adata, design_mtx=["rbp"], group_iso_by="gene_symbol")
    model.fit(n_jobs=n_jobs, batch_size=batch_size, print_progress=False)
    model.test_differential_usage(method="score", print_progress=False)
    wall = time.perf_counter() - t
    res = model._du_test_results
    names = [str(g) for g in model.gene_names]
    loss = []
    import torch

    with torch.no_grad():
        for m in model.get_fitted_models():
            loss.extend((-m()).tolist())
    return pd.DataFrame({"statistic": np.asarray(res["statistic"])[:, 0], "pvalue": np.asarray(res["pvalue"])[:, 0],
                         "loss": loss}, index=names), wall


def run_glmm_bench(spots: list[int], genes: list[int], *, workers: int = 2, seed: int = 0,
                   splisosm_batch_size: int = 20) -> pd.DataFrame:
    """Time SplisosmGLMM (glmm-full joint_gd fit + DU score test, ``fit(n_jobs=workers,
    batch_size=20)``) against spatialscale's ``du_test(model="glmm-full")`` on genes of 3 isoforms."""
    from distributed import Client

    from spatialscale.api import du_test, glmm_fit
    from spatialscale.engine import local_cluster
    from spatialscale.simulate import simulate_section
    from spatialscale.store import ingest

    warnings.filterwarnings("ignore")
    rows = []
    with local_cluster(workers) as cluster, \
            Client(cluster) as client, tempfile.TemporaryDirectory() as tmpdir:
        # import torch on the workers first, as it already is in the process that runs SPLISOSM
        client.run(lambda: __import__("spatialscale.glmm.glmm") and __import__("torch") and None)
        for n in spots:
            for g in genes:
                adata = simulate_section(n, g, n_sv=g // 5, n_du=g // 5, isoforms=(3, 3), seed=seed)
                ref, t_ref = _splisosm_glmm(adata, splisosm_batch_size, workers)
                t = time.perf_counter()
                store = ingest(adata, Path(tmpdir) / "glmm.zarr", overwrite=True)
                ds = du_test(store, ["rbp"], method="glmm-score", model="glmm-full", client=client, progress=False)
                t_ours = time.perf_counter() - t
                fit = glmm_fit(store, model="glmm-full", client=client, progress=False)
                ours = pd.DataFrame({"statistic": ds["du_statistic"].values[:, 0],
                                     "pvalue": ds["du_pvalue"].values[:, 0], "loss": fit["loss"].values},
                                    index=ds["gene"].values)
                j = ref.join(ours, lsuffix="_ref", how="inner")
                from scipy.stats import spearmanr

                rows.append({
                    "spots": n, "genes": g, "splisosm_s": t_ref, "spatialscale_s": t_ours,
                    "genes_per_s_ratio": t_ref / t_ours,
                    "loss_not_worse": float(np.mean(j["loss"] <= j["loss_ref"] * (1 + 1e-3))),
                    "p_spearman": float(spearmanr(-np.log10(np.maximum(j["pvalue"], 1e-300)),
                                                  -np.log10(np.maximum(j["pvalue_ref"], 1e-300))).statistic),
                })
                print(pd.DataFrame([rows[-1]]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table = pd.DataFrame(rows)
    print(f"\nglmm-full joint_gd + DU score test: SplisosmGLMM fit(n_jobs={workers}, batch_size={splisosm_batch_size}) "
          f"vs spatialscale du_test on {workers} workers (ingest and eigenpairs included)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


def _du_covariates(adata, n_covariates: int, seed: int) -> pd.DataFrame:
    """``n_covariates`` continuous covariates: smooth spatial fields plus noise, a few tied to celltype."""
    rng = np.random.default_rng(seed + 1)
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    xy = (xy - xy.mean(0)) / xy.std(0)
    cols = {}
    ct1 = (adata.obs["celltype"] == "ct1").to_numpy(float)
    for j in range(n_covariates):
        w = rng.normal(0, 1.0, 2)
        field = np.sin(xy @ w + rng.uniform(0, 2 * np.pi))
        cols[f"cov{j:03d}"] = field + rng.normal(0, 1.0, len(xy)) + (0.8 * ct1 if j % 5 == 0 else 0.0)
    return pd.DataFrame(cols, index=adata.obs_names)


def _splisosm_du(adata, covs: list[str], method: str) -> tuple[pd.DataFrame, float, float]:
    """SPLISOSM's DU results and its (setup_data, test_differential_usage) wall times."""
    from splisosm import SplisosmNP

    t = time.perf_counter()
    model = SplisosmNP()
    model.setup_data(adata, layer="counts", group_iso_by="gene_symbol", design_mtx=covs)
    t_setup = time.perf_counter() - t
    t = time.perf_counter()
    model.test_differential_usage(method=method, print_progress=False)
    t_test = time.perf_counter() - t
    res = model._du_test_results
    names = [str(g) for g in model.gene_names]
    idx = pd.MultiIndex.from_product([names, list(model.covariate_names)], names=["gene", "covariate"])
    return pd.DataFrame({"statistic": np.asarray(res["statistic"], dtype=float).ravel(),
                         "pvalue": np.asarray(res["pvalue"], dtype=float).ravel()}, index=idx), t_setup, t_test


def _du_agreement(ref: pd.DataFrame, ours: pd.DataFrame) -> dict[str, float]:
    """Ranking agreement of two (gene, covariate) tables: all pairs, and the pairs that matter."""
    from scipy.stats import spearmanr

    from spatialscale.stats.multitest import bh_adjust

    j = ref.join(ours, lsuffix="_ref", how="inner")
    lp, lp_ref = (-np.log10(np.maximum(j[c], 1e-300)) for c in ("pvalue", "pvalue_ref"))
    # top 1% of pairs; SPLISOSM's float32 p-values underflow to 0, so ties break on the statistic
    k = max(1, len(j) // 100)
    top = set(j.sort_values(["pvalue", "statistic"], ascending=[True, False]).index[:k])
    top_ref = set(j.sort_values(["pvalue_ref", "statistic_ref"], ascending=[True, False]).index[:k])
    sig, sig_ref = bh_adjust(j["pvalue"].to_numpy()) < 0.05, bh_adjust(j["pvalue_ref"].to_numpy()) < 0.05
    either = sig | sig_ref
    return {
        "pairs_compared": len(j),
        "p_spearman": float(spearmanr(lp, lp_ref).statistic),
        "p_spearman_significant": float(spearmanr(lp[either], lp_ref[either]).statistic) if either.sum() > 2
        else float("nan"),
        "bh_hits": int(sig.sum()), "bh_hits_ref": int(sig_ref.sum()),
        "bh_jaccard": float((sig & sig_ref).sum() / max(either.sum(), 1)),
        "top1pct_overlap": len(top & top_ref) / k,
    }


def run_du_bench(spots: list[int], genes: list[int], *, covariates: int = 50,
                 methods: tuple[str, ...] = ("hsic", "hsic-gp"), workers: int = 2, seed: int = 0,
                 splisosm_gp_covariates: int | None = None,
                 gp_backends: tuple[str, ...] = ("auto",)) -> pd.DataFrame:
    """Time SplisosmNP.test_differential_usage (default sklearn GP backend for hsic-gp) against
    spatialscale's du_test on the same AnnData, for every gene x covariate pair.

    ``speedup`` compares the tests (test_differential_usage vs du_test, GP fits included);
    ``speedup_with_setup`` adds SPLISOSM's setup_data and spatialscale's ingest.

    SPLISOSM's hsic-gp fits one exact (or, above 5,000 spots, subset-of-data) GP per covariate, minutes
    each at 10,000 spots.  With ``splisosm_gp_covariates=k`` (default: all covariates up to 2,000
    spots, else 2) its hsic-gp is run on the first ``k - 1`` and the first ``k`` covariates and its time
    for all of them extrapolated linearly from those two runs (``T(F) = T(k) + (F - k) (T(k) - T(k-1))``);
    the table says so (``splisosm_extrapolated``), and the agreement columns use the covariates it ran.
    """
    from distributed import Client

    from spatialscale.api import du_test
    from spatialscale.engine import local_cluster
    from spatialscale.simulate import simulate_section
    from spatialscale.store import ingest

    warnings.filterwarnings("ignore")
    rows = []
    t = time.perf_counter()
    with local_cluster(workers) as cluster, \
            Client(cluster) as client, tempfile.TemporaryDirectory() as tmpdir:
        print(f"LocalCluster with {workers} workers started in {time.perf_counter() - t:.1f}s (not timed below)")
        for n in spots:
            for g in genes:
                adata = simulate_section(n, g, n_sv=g // 5, n_du=g // 5, seed=seed)
                cov = _du_covariates(adata, covariates, seed)
                for c in cov.columns:
                    adata.obs[c] = cov[c].to_numpy()
                names = list(cov.columns)
                for method in methods:
                    k = len(names)
                    if method == "hsic-gp":
                        k = splisosm_gp_covariates or (len(names) if n <= 2000 else 2)
                        k = max(2, min(k, len(names)))
                    extrapolated = k < len(names)
                    if extrapolated:
                        _, _, t_prev = _splisosm_du(adata, names[:k - 1], method)
                    ref, t_setup, t_ref = _splisosm_du(adata, names[:k], method)
                    if extrapolated:
                        t_ref = t_ref + (len(names) - k) * max(t_ref - t_prev, 0.0)
                    t = time.perf_counter()
                    store = ingest(adata, Path(tmpdir) / "du.zarr", overwrite=True, progress=False)
                    t_ingest = time.perf_counter() - t
                    for backend in (gp_backends if method == "hsic-gp" else ("-",)):
                        gp = {"backend": backend} if method == "hsic-gp" else None
                        t = time.perf_counter()
                        ds = du_test(store, names, method=method, gp=gp, client=client, progress=False)
                        t_ours = time.perf_counter() - t
                        ours = ds[["du_statistic", "du_pvalue"]].to_dataframe().rename(
                            columns={"du_statistic": "statistic", "du_pvalue": "pvalue"})
                        rows.append({
                            "method": method, "gp_backend": backend, "spots": n, "genes": g,
                            "covariates": covariates, "splisosm_test_s": t_ref, "extrapolated": extrapolated,
                            "spatialscale_du_test_s": t_ours, "speedup": t_ref / t_ours,
                            "splisosm_setup_s": t_setup, "spatialscale_ingest_s": t_ingest,
                            "speedup_with_setup": (t_ref + t_setup) / (t_ours + t_ingest),
                            **_du_agreement(ref, ours),
                        })
                        print(pd.DataFrame([rows[-1]]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table = pd.DataFrame(rows)
    print(f"\nDU: SPLISOSM 1.2.0 SplisosmNP.test_differential_usage (sklearn GP backend) vs spatialscale du_test "
          f"on {workers} workers (GP backend auto); with_setup adds setup_data / ingest")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table
