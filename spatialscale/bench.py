"""``spatialscale bench``: SPLISOSM 1.2.0 and spatialscale on the same data, in one run."""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["run_bench", "run_cohort_bench", "run_compat_bench", "run_latent_bench", "compare", "task_stream_stats"]


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


def _splisosm(adata, method: str, null: str) -> tuple[pd.DataFrame, float, float]:
    """SplisosmNP's results, its setup_data time and its test time."""
    from splisosm import SplisosmNP

    t = time.perf_counter()
    model = SplisosmNP()
    model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
    t_setup = time.perf_counter() - t
    res = model.test_spatial_variability(method=method, null_method=null, print_progress=False,
                                         return_results=True)
    t_test = time.perf_counter() - t - t_setup
    names = [str(g) for g in model.gene_names]
    return pd.DataFrame({"statistic": res["statistic"], "pvalue": res["pvalue"]}, index=names), t_setup, t_test


def _gene_subset(adata, k: int):
    """The AnnData of the first ``k`` genes (all their isoforms)."""
    genes = pd.unique(adata.var["gene_symbol"])[:k]
    return adata[:, adata.var["gene_symbol"].isin(genes).to_numpy()].copy()


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


def _import_library() -> bool:
    """Import spatialscale and the libraries its tasks import lazily, in a worker (untimed, as SPLISOSM's
    import is untimed in its runs)."""
    import anndata  # noqa: F401
    import zarr  # noqa: F401

    import spatialscale.families  # noqa: F401
    import spatialscale.worker  # noqa: F401

    return True


def _peak_mb_self() -> float:
    """Peak resident memory of this process so far (MB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextlib.contextmanager
def _stopwatch(owner: Any, name: str, spent: dict[str, float], key: str):
    """Add the time spent in ``owner.name`` to ``spent[key]`` while the block runs (the call is unchanged)."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t

    setattr(owner, name, timed)
    try:
        yield spent
    finally:
        setattr(owner, name, original)


def _spatialscale(adata, client, method: str, null: str, tmp: Path,
                  batch_memory: str) -> tuple[pd.DataFrame, float, dict[str, float]]:
    """spatialscale's results and wall time (ingest + sv_test writing its results to a zarr store), and where
    the time went: ingest (of which the kernel build), the tasks (wall, and the workers' summed read / kernel /
    test seconds) and the final write of the results."""
    import spatialscale.store as store_mod
    from spatialscale.api import sv_test
    from spatialscale.output import Output

    spent: dict[str, float] = {}
    since = time.time()
    t = time.perf_counter()
    with _stopwatch(store_mod, "build_kernel", spent, "kernel_s"):
        store = store_mod.ingest(adata, tmp / "bench.zarr", overwrite=True, progress=False)
    t_ingest = time.perf_counter() - t
    with _stopwatch(Output, "commit", spent, "write_s"):
        ds = sv_test(store, method=method, null=null, client=client, batch_memory=batch_memory, progress=False,
                     out=tmp / "bench-results.zarr", overwrite=True)
    wall = time.perf_counter() - t
    tasks = _task_timings(client, since)
    parts = {"ingest_s": t_ingest, "kernel_s": spent.get("kernel_s", 0.0), "test_s": wall - t_ingest,
             "write_s": spent.get("write_s", 0.0),
             **{f"task_{k}_s": tasks[k] for k in ("read", "kernel", "test") if k in tasks}}
    return (pd.DataFrame({"statistic": ds["sv_statistic"].values, "pvalue": ds["sv_pvalue"].values},
                         index=ds["gene"].values), wall, parts)


#: above this many gene x spots, a bench section is simulated sparsely (:func:`simulate_transcriptome`)
TRANSCRIPTOME_GENES = 5000
#: SPLISOSM runs every gene up to this many gene x spots, else a subset whose test time is extrapolated
SPLISOSM_FULL_MAX = 2 * 10**8


def run_bench(spots: list[int], genes: list[int], *, method: str = "hsic-ir", null: str = "liu",
              workers: int = 2, seed: int = 0, batch_memory: str = "256MB", splisosm: bool = True,
              splisosm_genes: int | None = None, umis_per_spot: float = 2000.0) -> pd.DataFrame:
    """Time SplisosmNP (setup_data + test_spatial_variability) against spatialscale
    (ingest + sv_test writing its results to a zarr store, kernel build included) on the same simulated
    AnnData.

    Sections of up to :data:`TRANSCRIPTOME_GENES` genes are drawn by
    :func:`~spatialscale.simulate.simulate_section` (dense draws, 8 counts
    per gene and spot); larger ones by
    :func:`~spatialscale.simulate.simulate_transcriptome` (sparse, a whole
    transcriptome of ``umis_per_spot`` counts per spot).

    SPLISOSM runs every gene while ``spots x genes`` is at most
    :data:`SPLISOSM_FULL_MAX`; above, it runs ``splisosm_genes`` genes
    (default 1,000) and its time is extrapolated: ``setup + test * G / k``
    (its setup builds the kernel once; its test is a loop over genes), and
    the table marks ``splisosm_extrapolated``; the agreement columns then
    compare those ``k`` genes.

    Where spatialscale's time goes: ``ingest_s`` (of which ``kernel_s``, the
    kernel build), ``test_s`` (sv_test's wall time, of which ``write_s``,
    the final write of the results), and the workers' summed ``task_read_s``,
    ``task_kernel_s`` (loading the shared kernel) and ``task_test_s``.
    Above 5,000 spots spatialscale's null moments are ``selected`` (exact
    ``k_1, k_2``) where SplisosmNP's are a 60-probe Hutchinson estimate, so
    their p-values differ by that estimate's noise (the agreement columns
    show it). ``splisosm=False`` times spatialscale alone.

    The LocalCluster is started before timing (it is started once per
    session in practice); its start-up time is printed separately.  Workers
    are restarted before each size, so ``worker_peak_MB`` is that run's peak
    resident memory of the busiest worker; ``client_peak_MB`` is this
    process's peak so far (it holds the simulated AnnData and SPLISOSM).
    """
    from distributed import Client

    from spatialscale.engine import local_cluster
    from spatialscale.simulate import simulate_section, simulate_transcriptome

    warnings.filterwarnings("ignore")
    rows = []
    t = time.perf_counter()
    with local_cluster(workers) as cluster, \
            Client(cluster) as client, tempfile.TemporaryDirectory() as tmpdir:
        print(f"LocalCluster with {workers} workers started in {time.perf_counter() - t:.1f}s (not timed below)")
        for n in spots:
            for g in genes:
                t = time.perf_counter()
                if g > TRANSCRIPTOME_GENES:
                    adata = simulate_transcriptome(n, g, umis_per_spot=umis_per_spot, seed=seed)
                    how = f"simulate_transcriptome, {umis_per_spot:g} counts per spot"
                else:
                    adata = simulate_section(n, g, n_sv=max(1, g // 5), seed=seed)
                    how = "simulate_section"
                x = adata.layers["counts"]
                print(f"{n} spots x {g} genes ({adata.n_vars} isoforms, {x.nnz / x.shape[0] / x.shape[1]:.1%} "
                      f"non-zero) by {how} in {time.perf_counter() - t:.0f}s (not timed)", flush=True)
                row: dict[str, Any] = {"spots": n, "genes": g}
                if splisosm:
                    k = g if n * g <= SPLISOSM_FULL_MAX else min(g, splisosm_genes or 1000)
                    if k < g and splisosm_genes is None:
                        print(f"  SplisosmNP: {k} of {g} genes, its test time extrapolated", flush=True)
                    ref, t_setup, t_test = _splisosm(adata if k == g else _gene_subset(adata, k), method, null)
                    t_ref = t_setup + t_test * g / k
                    row.update({"splisosm_s": t_ref, "splisosm_setup_s": t_setup, "splisosm_extrapolated": k < g})
                client.restart()  # fresh worker processes: the peak memory below is this run's
                client.run(_import_library)
                ours, t_ours, parts = _spatialscale(adata, client, method, null, Path(tmpdir), batch_memory)
                del adata
                peak = max(client.run(_worker_peak_mb).values())
                row.update({"spatialscale_s": t_ours, **parts, "worker_peak_MB": peak,
                            "client_peak_MB": _peak_mb_self()})
                if splisosm:
                    agreement = compare(ref, ours)
                    agreement["genes_compared"] = agreement.pop("genes")
                    row.update({"speedup": row["splisosm_s"] / t_ours, **agreement})
                rows.append(row)
                print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{method} / {null}: SPLISOSM 1.2.0 SplisosmNP (setup_data + test_spatial_variability) vs "
          f"spatialscale (ingest + sv_test on {workers} workers, results written to zarr)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


def _splisosm_glmm(adata, batch_size: int, n_jobs: int, method: str) -> tuple[pd.DataFrame, float]:
    """SplisosmGLMM's glmm-full fit and its DU score test (``glmm-score``) or LLR SV test (``glmm-llr``, the
    pair fitted ``from_null`` as SPLISOSM's LLR needs); per-gene statistic, p-value and the fit's loss."""
    import torch
    from splisosm import SplisosmGLMM

    t = time.perf_counter()
    model = SplisosmGLMM(model_type="glmm-full")
    model.setup_data(adata, design_mtx=["rbp"] if method == "glmm-score" else None, group_iso_by="gene_symbol")
    if method == "glmm-score":
        model.fit(n_jobs=n_jobs, batch_size=batch_size, print_progress=False)
        model.test_differential_usage(method="score", print_progress=False)
        res = {k: np.asarray(v)[:, 0] for k, v in model._du_test_results.items() if k in ("statistic", "pvalue")}
    else:
        model.fit(n_jobs=n_jobs, batch_size=batch_size, print_progress=False, from_null=True, refit_null=True)
        model.test_spatial_variability(method="llr", print_progress=False)
        res = {k: np.asarray(model._sv_test_results[k]) for k in ("statistic", "pvalue")}
    wall = time.perf_counter() - t
    with torch.no_grad():
        loss = [float(v) for m in model.get_fitted_models() for v in (-m()).reshape(-1)]
    return pd.DataFrame({**res, "loss": loss}, index=[str(g) for g in model.gene_names]), wall


def gemm_rate(n: int, k: int, dtype: str = "float32") -> float:
    """Flops per second of one thread on the GLMM's kernel product: ``(n x n) @ (n x k)`` in torch."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a = torch.randn(n, n, dtype=getattr(torch, dtype))
        b = torch.randn(n, k, dtype=a.dtype)
        a @ b
        reps, t = 0, time.perf_counter()
        while time.perf_counter() - t < 0.3:
            a @ b
            reps += 1
        return 2.0 * n * n * k * reps / (time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)


def _task_timings(client, since: float) -> dict[str, float]:
    """Sums of the timing events (:func:`spatialscale.worker.log_timing`) that tasks logged after ``since``."""
    from spatialscale.worker import TIMING_TOPIC

    out: dict[str, float] = {}
    for stamp, ev in client.get_events(TIMING_TOPIC):
        if stamp >= since:
            for k, v in ev.items():
                if isinstance(v, (int, float)):
                    out[k] = out.get(k, 0.0) + float(v)
    return out


def run_glmm_bench(spots: list[int], genes: list[int], *, method: str = "glmm-score", workers: int = 2,
                   seed: int = 0, splisosm_batch_size: int = 20) -> pd.DataFrame:
    """SplisosmGLMM against spatialscale on the same genes (3 isoforms each), timed end to end.

    ``glmm-score``: the glmm-full fit and DU score test of ``rbp`` (SPLISOSM:
    ``fit(n_jobs=workers, batch_size=20)``, ``test_differential_usage("score")``;
    spatialscale: ``du_test(method="glmm-score", model="glmm-full")`` with its
    defaults, ingest and eigenpairs included).  ``glmm-llr``: the LLR SV test
    (SPLISOSM: ``fit(from_null=True, refit_null=True)``,
    ``test_spatial_variability("llr")``; spatialscale: ``sv_test(method="glmm-llr")``).
    Agreement is measured on untimed runs with SPLISOSM's variance (``variance="model"``; glmm-score):
    the share of genes whose objective is at least as good as SPLISOSM's (1e-3 relative), the median
    relative objective gain over SPLISOSM's and the Spearman correlation of the p-values (which differ
    where SPLISOSM's 500 Adam epochs stop short of the optimum).  The time split comes from the tasks'
    timing events; the flop floor is one product with the kernel's eigenbasis (``4 n r q`` flops) per
    epoch and gene at this machine's measured one-thread GEMM rate, spread over the workers.
    """
    from distributed import Client
    from scipy.stats import spearmanr

    from spatialscale.api import du_test, glmm_fit, sv_test
    from spatialscale.engine import local_cluster
    from spatialscale.errors import InputError
    from spatialscale.kernel import default_rank, kernel_eigenpairs
    from spatialscale.simulate import simulate_section
    from spatialscale.store import ingest

    if method not in ("glmm-score", "glmm-llr"):
        raise InputError(f"bench --test glmm times glmm-score or glmm-llr (got {method!r}).")
    warnings.filterwarnings("ignore")
    rows = []
    with local_cluster(workers) as cluster, \
            Client(cluster) as client, tempfile.TemporaryDirectory() as tmpdir:
        # import torch on the workers first, as it already is in the process that runs SPLISOSM
        client.run(lambda: __import__("spatialscale.glmm.glmm") and __import__("torch") and None)
        # start-up, once per cluster and not per section, measured apart: ingest's imports and compiled kernels
        # here (numba's cache load), the workers' first reads and torch calls on a small section
        t = time.perf_counter()
        warm = ingest(simulate_section(64, 4, n_sv=0, n_du=0, seed=seed), Path(tmpdir) / "warm.zarr", eigenpairs=True)
        _ = (du_test(warm, ["rbp"], method="glmm-score", model="glmm-full", client=client, progress=False)
             if method == "glmm-score" else sv_test(warm, method="glmm-llr", client=client, progress=False))
        print(f"start-up (imports, first reads and torch calls on a 64-spot section): {time.perf_counter() - t:.2f} s",
              flush=True)
        for n in spots:
            rate = gemm_rate(n, 64)
            for g in genes:
                adata = simulate_section(n, g, n_sv=g // 5, n_du=g // 5, isoforms=(3, 3), seed=seed)
                ref, t_ref = _splisosm_glmm(adata, splisosm_batch_size, workers, method)
                client.run(_clear_worker_caches)
                since = time.time()
                t = time.perf_counter()
                # the eigenpairs at ingest: the power sums come from the same decomposition
                store = ingest(adata, Path(tmpdir) / f"glmm-{n}-{g}.zarr", overwrite=True, eigenpairs=True)
                t_ingest = time.perf_counter() - t
                rank = default_rank(store.n_spots)
                kw = {"client": client, "progress": False}
                if method == "glmm-score":
                    ds = du_test(store, ["rbp"], method="glmm-score", model="glmm-full", **kw)
                else:
                    ds = sv_test(store, method="glmm-llr", **kw)
                t_ours = time.perf_counter() - t
                parts = _task_timings(client, since)
                if method == "glmm-score":  # untimed: SPLISOSM's variance, for agreement
                    ds = du_test(store, ["rbp"], method="glmm-score", model="glmm-full", glmm={"variance": "model"},
                                 **kw)
                    pvalue = ds["du_pvalue"].values[:, 0]
                else:
                    pvalue = ds["sv_pvalue"].values
                t = time.perf_counter()  # untimed: the eigendecomposition's share of ingest_s
                kernel_eigenpairs(store.precision(), rank)
                t_eig = time.perf_counter() - t
                # the objective is compared for the DU fit only: SPLISOSM's LLR models are the pair fitted from_null
                loss = (glmm_fit(store, model="glmm-full", **kw)["loss"].values if method == "glmm-score"
                        else np.full(len(pvalue), np.nan))
                j = ref.join(pd.DataFrame({"pvalue": pvalue, "loss": loss}, index=ds["gene"].values),
                             lsuffix="_ref", how="inner")
                epochs = parts.get("epochs", float("nan"))
                compute = sum(parts.get(k, 0.0) for k in ("read", "eigenpairs", "fit", "test"))
                floor = epochs * 4.0 * n * rank * 2 / rate / workers
                rows.append({
                    "spots": n, "genes": g, "splisosm_s": t_ref, "spatialscale_s": t_ours,
                    "genes_per_s_ratio": t_ref / t_ours,
                    "epochs_per_gene": epochs / max(parts.get("genes", 0.0), 1.0),
                    "ingest_s": t_ingest, "eigenpairs_s": t_eig,  # part of ingest_s
                    "fit_s": parts.get("fit", float("nan")) / workers,
                    "test_s": parts.get("test", float("nan")) / workers,
                    "io_s": (parts.get("read", 0.0) + parts.get("eigenpairs", 0.0)) / workers,
                    "scheduling_s": t_ours - t_ingest - compute / workers,
                    "flop_floor_frac": floor / max(parts.get("fit", 0.0) / workers, 1e-12),
                    "loss_not_worse": float(np.mean(j["loss"] <= j["loss_ref"] + 1e-3 * np.abs(j["loss_ref"])))
                    if method == "glmm-score" else float("nan"),
                    "loss_gain_median": float(np.median((j["loss_ref"] - j["loss"]) / np.abs(j["loss_ref"]))),
                    "p_spearman": float(spearmanr(j["pvalue"], j["pvalue_ref"]).statistic),
                })
                print(pd.DataFrame([rows[-1]]).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    table = pd.DataFrame(rows)
    what = "glmm-full fit + DU score test" if method == "glmm-score" else "glmm-null/glmm-full pair + LLR SV test"
    print(f"\n{what}: SplisosmGLMM fit(n_jobs={workers}, batch_size={splisosm_batch_size}) vs spatialscale on "
          f"{workers} workers (defaults; ingest and eigenpairs included). fit_s / test_s / io_s: task seconds per "
          "worker (glmm-llr: test_s is the Laplace log-determinants); scheduling_s: the rest of the wall; "
          "flop_floor_frac: one eigenbasis product per epoch and gene at the measured GEMM rate, over fit_s; "
          "eigenpairs_s: the decomposition's share of ingest_s (stores ingested with eigenpairs=True: the exact "
          "power sums come from it)")
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


# --------------------------------------------------------------------------- cohort: one graph vs a loop
def task_stream_stats(records: list[dict], wall: float, n_threads: int) -> dict[str, float]:
    """Figures of one timed run from its Dask task stream (``distributed.get_task_stream().data``).

    Parameters
    ----------
    records
        One record per finished task: ``startstops`` (``action``, ``start``,
        ``stop``) and ``worker``.
    wall
        Wall-clock seconds of the run, as the client saw it.
    n_threads
        Worker threads of the cluster.

    Returns
    -------
    dict
        ``tasks``; ``compute_s``: summed ``compute`` intervals of the tasks;
        ``idle_fraction = 1 - compute_s / (wall * n_threads)``: the share of
        the threads' time not spent computing (client-side planning and
        assembly, scheduling, transfers, waiting at the end);
        ``overhead_ms_per_task = (wall * n_threads - compute_s) / tasks``: that
        time charged to each task; ``gap_ms``: median gap between one task's
        end and the next task's start on the same worker (the scheduler's
        dispatch latency while work is queued).
    """
    compute = 0.0
    spans: dict[str, list[tuple[float, float]]] = {}
    for rec in records:
        for ss in rec.get("startstops", ()):
            if ss["action"] == "compute":
                compute += ss["stop"] - ss["start"]
                spans.setdefault(str(rec.get("worker")), []).append((ss["start"], ss["stop"]))
    gaps = []
    for s in spans.values():
        s.sort()
        gaps.extend(b[0] - a[1] for a, b in zip(s[:-1], s[1:]))
    n = len(records)
    capacity = wall * max(n_threads, 1)
    return {
        "tasks": n,
        "compute_s": compute,
        "idle_fraction": min(max(1.0 - compute / capacity, 0.0), 1.0) if capacity > 0 else float("nan"),
        "overhead_ms_per_task": 1e3 * (capacity - compute) / n if n else float("nan"),
        "gap_ms": 1e3 * float(np.median(gaps)) if gaps else float("nan"),
    }


def _clear_worker_caches() -> None:
    """Runs on a worker: forget cached kernels (every cache of :mod:`spatialscale.worker`), so that every
    timed run loads them itself."""
    from spatialscale import worker

    for fn in list(vars(worker).values()):
        if hasattr(fn, "cache_clear") and fn is not worker.tune_allocator:
            fn.cache_clear()


def _import_on_worker() -> None:
    """Runs on a worker: import what the SV tasks use (module import is start-up, not test time)."""
    import spatialscale.families.sv_hsic  # noqa: F401
    import spatialscale.kernel  # noqa: F401
    import spatialscale.stats.sv  # noqa: F401


def _cpu_seconds() -> float:
    """CPU seconds of this process so far, all threads (on a worker: its tasks, event loop and I/O threads)."""
    return time.process_time()


def _timed(client, fn):
    """``fn()``, its wall seconds, the task stream of the tasks it ran, and CPU seconds used meanwhile.

    The CPU seconds are those of this process (the client, and the
    scheduler of a LocalCluster, which runs in it) and of the workers.
    """
    from distributed import get_task_stream

    before = client.run(_cpu_seconds)
    with get_task_stream(client=client) as ts:
        c, t = time.process_time(), time.perf_counter()
        out = fn()
        wall, c = time.perf_counter() - t, time.process_time() - c
    after = client.run(_cpu_seconds)
    cpu = {"client_cpu_s": c, "worker_cpu_s": sum(after[w] - before[w] for w in after if w in before)}
    return out, wall, ts.data, cpu


def _walls(walls: list[float]) -> str:
    """``"2.31s (median of 2.29, 2.31, 2.50)"``."""
    med = sorted(walls)[len(walls) // 2]
    return f"{med:.2f}s" + (f" (median of {', '.join(f'{w:.2f}' for w in walls)})" if len(walls) > 1 else "")


def _timed_median(client, fn, repeats: int):
    """:func:`_timed` ``repeats`` times (worker caches emptied before each); the run of median wall, all walls."""
    runs = []
    for _ in range(max(1, int(repeats))):
        client.run(_clear_worker_caches)
        runs.append(_timed(client, fn))
    walls = [r[1] for r in runs]
    median = sorted(range(len(runs)), key=lambda i: walls[i])[len(runs) // 2]
    return (*runs[median], walls)


def _warm(client, cohort, method: str, null: str, batch_memory: str) -> None:
    """Start-up a timed run should not pay: imports and one section's run on every worker; then empty caches."""
    from spatialscale.api import sv_test

    client.run(_import_on_worker)
    sv_test(cohort.store(cohort.section_ids[0]), method=method, null=null, client=client,
            batch_memory=batch_memory, progress=False)
    client.run(_clear_worker_caches)


def _planned_tasks(cohort, method: str, null: str, batch_memory: str) -> dict[str, dict[str, int]]:
    """Batches (tasks) the engine plans for each section, run alone (``single``) and in the cohort (``cohort``)."""
    from spatialscale.families import family_for
    from spatialscale.families.base import resolve_options
    from spatialscale.families.common import COHORT_BUNDLE, parse_bytes, run_plan, run_spec

    family = family_for("sv", method)
    opts = resolve_options(family, method, {"null": null})
    out: dict[str, dict[str, int]] = {"single": {}, "cohort": {}, "cohort_tasks": {}}
    for sid in cohort.section_ids:
        store = cohort.store(sid)
        spec = run_spec(store, family.prepare_for(store, method, opts, None, "cpu"))
        out["single"][sid] = len(run_plan(spec, parse_bytes(batch_memory)))
        out["cohort"][sid] = len(run_plan(spec, parse_bytes(batch_memory), n_runs=len(cohort.section_ids)))
        out["cohort_tasks"][sid] = -(-out["cohort"][sid] // COHORT_BUNDLE)  # a section's batches, 8 to a task
    return out


def _splisosm_parts(adata, method: str, null: str) -> tuple[pd.DataFrame, float, float]:
    """SplisosmNP's SV results and its (setup_data, test_spatial_variability) wall times."""
    from splisosm import SplisosmNP

    t = time.perf_counter()
    model = SplisosmNP()
    model.setup_data(adata, layer="counts", group_iso_by="gene_symbol")
    t_setup = time.perf_counter() - t
    t = time.perf_counter()
    res = model.test_spatial_variability(method=method, null_method=null, print_progress=False,
                                         return_results=True)
    t_test = time.perf_counter() - t
    names = [str(g) for g in model.gene_names]
    return (pd.DataFrame({"statistic": res["statistic"], "pvalue": res["pvalue"]}, index=names),
            t_setup, t_test)


def _section_frame(ds, sid: str | None = None) -> pd.DataFrame:
    """A section's tested genes as ``statistic``, ``pvalue`` (one section of a cohort result, or a section's)."""
    if sid is not None:
        ds = ds.sel(section=sid)
    df = pd.DataFrame({"statistic": ds["sv_statistic"].values, "pvalue": ds["sv_pvalue"].values},
                      index=ds["gene"].values)
    return df[np.isfinite(df["pvalue"])]


#: cohort and single-section runs plan different batches, which round differently in the last bits
AGREEMENT_RTOL = 1e-10


def _max_rel_diff(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Largest relative difference of two per-gene tables (``inf`` unless they hold the same genes)."""
    if len(a) != len(b) or not a.index.isin(b.index).all():
        return float("inf")
    x, y = a.to_numpy(), b.reindex(a.index).to_numpy()
    return float(np.max(np.abs(x - y) / np.maximum(np.abs(y), 1e-300), initial=0.0))


def _time_comparison(ds: Any, repeats: int) -> float:
    """Seconds (best of ``repeats``) that ``compare=`` and ``min_sections=2`` add to a cohort run's finalize.

    The sections are split into two levels in turn (the cost does not depend
    on the labels): the ANOVA of the sections' ``sv_effect`` with its BH
    adjustment and level means (what ``run_cohort`` adds), and the partial
    conjunction of the sections' p-values.
    """
    from spatialscale.designs.cohort_run import _add_comparison
    from spatialscale.stats.combine import partial_conjunction
    from spatialscale.stats.compare import compare_design
    from spatialscale.stats.multitest import bh_adjust

    n = ds.sizes["section"]
    design = compare_design(np.arange(n) % 2, 2)
    p = ds["sv_pvalue"].transpose("gene", "section").values
    best = float("inf")
    for _ in range(max(repeats, 1)):
        out = ds.copy()
        t = time.perf_counter()
        _add_comparison(out, "sv", ["gene"], design, ["a", "b"])
        bh_adjust(partial_conjunction(p, min(2, n)))
        best = min(best, time.perf_counter() - t)
    return best


def run_cohort_bench(n_sections: int = 24, spots: tuple[int, int] = (1500, 3000), n_genes: int = 300, *,
                     method: str = "hsic-ir", null: str = "liu", workers: int = 2, seed: int = 0,
                     splisosm: bool = True, scaling: bool = True, batch_memory: str = "256MB",
                     out_dir: str | Path | None = None, verbose: bool = True, repeats: int = 3) -> dict:
    """Time a cohort's one-graph SV run against a loop of single-section runs, SplisosmNP and fewer workers.

    A cohort of ``n_sections`` simulated sections (``spots`` = inclusive
    range of spots per section, ``n_genes`` genes of 2-4 isoforms) is
    ingested once (timed and reported, not part of the comparisons).  On a
    fresh LocalCluster of ``workers`` single-threaded processes, after a warm-up
    (imports and one section's run; kernel caches emptied before every
    timed run), it times

    - ``cohort``: ``sv_test(cohort, client=client)``, all sections x batches
      as one set of tasks;
    - ``loop``: ``sv_test(cohort.store(sid), client=client)`` for every section in turn;

    and checks that every section's ``sv_statistic`` and ``sv_pvalue`` agree
    in both to :data:`AGREEMENT_RTOL` (the cohort plans fewer, larger
    batches).  With ``scaling`` (and ``workers > 1``) the cohort run is
    repeated on a fresh LocalCluster of one worker: efficiency =
    ``(t_1 / t_workers) / workers``.  With ``splisosm``, SPLISOSM 1.2.0's
    SplisosmNP (``setup_data`` + ``test_spatial_variability``) runs section by
    section on the same h5ad files (reading them is not timed), and its
    results are compared with the cohort's (:func:`compare`).

    Idle fraction and per-task overhead come from the task stream (see
    :func:`task_stream_stats`); each run also records the CPU seconds of the
    client process (where a LocalCluster's scheduler runs) and of the
    workers.

    Parameters
    ----------
    n_sections, spots, n_genes
        Cohort size.
    method, null
        SV test (as in :func:`spatialscale.sv_test`).
    workers
        LocalCluster workers (one thread each).
    seed
        Seed of the simulation.
    splisosm, scaling
        Run the SplisosmNP reference / the one-worker run.
    batch_memory
        spatialscale's per-task memory budget.
    out_dir
        Where the simulated cohort and its stores go (default: a temporary folder, removed).
    verbose
        Print the steps and the table.
    repeats
        Each spatialscale run is timed this many times (worker caches
        emptied before each) and the run of median wall time is reported
        (walls of a few seconds vary by 10-20% on a busy 2-core machine).

    Returns
    -------
    dict
        Times (seconds), ratios, the task-stream figures of each run
        (``runs``: name -> dict), the planned tasks, ``max_rel_diff`` and
        ``identical`` (cohort agrees with the loop), and SPLISOSM's agreement when run;
        ``compare_s`` / ``compare_overhead``: what ``compare=`` and
        ``min_sections=`` add to the cohort run (:func:`_time_comparison`),
        in seconds and as a fraction of its wall time.
    """
    from distributed import Client

    from spatialscale.api import sv_test
    from spatialscale.cohort import ingest_cohort
    from spatialscale.engine import local_cluster
    from spatialscale.simulate import simulate_cohort

    warnings.filterwarnings("ignore")
    say = print if verbose else (lambda *a, **k: None)
    lo, hi = int(spots[0]), int(spots[1])
    fig: dict = {"n_sections": n_sections, "spots": (lo, hi), "n_genes": n_genes, "method": method, "null": null,
                 "workers": workers, "runs": {}, "load_average_start": os.getloadavg()[0]}
    with contextlib.ExitStack() as stack:
        root = Path(out_dir) if out_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        t = time.perf_counter()
        manifest, _ = simulate_cohort(root / "input", n_sections, n_genes, n_shared=min(20, n_genes // 5),
                                      n_specific=min(10, n_genes // 10), spots=(lo, hi), seed=seed)
        fig["simulate_s"] = time.perf_counter() - t
        sizes = pd.read_csv(manifest)
        fig["total_spots"] = int(sizes["n_spots"].sum())
        say(f"simulated {n_sections} sections of {sizes['n_spots'].min()}-{sizes['n_spots'].max()} spots "
            f"({fig['total_spots']:,} in all) x {n_genes} genes in {fig['simulate_s']:.1f}s")

        def cohort_run(client, cohort):
            return sv_test(cohort, method=method, null=null, client=client, batch_memory=batch_memory,
                           progress=False)

        def loop_run(client, cohort):
            return {sid: sv_test(cohort.store(sid), method=method, null=null, client=client,
                                 batch_memory=batch_memory, progress=False) for sid in cohort.section_ids}

        def record(name, client, wall, stream, cpu, walls):
            threads = sum(client.nthreads().values())
            fig["runs"][name] = {"wall_s": wall, "threads": threads, **task_stream_stats(stream, wall, threads), **cpu,
                                 "walls": walls}

        with local_cluster(workers) as cluster, Client(cluster) as client:
            t = time.perf_counter()
            cohort = ingest_cohort(manifest, root / "cohort", client=client, progress=False)
            fig["ingest_s"] = time.perf_counter() - t
        say(f"cohort ingested (kernels of {n_sections} sections, in parallel on {workers} workers) in "
            f"{fig['ingest_s']:.1f}s; not timed below")
        # timed runs on fresh clusters (the ingest's workers hold its memory), started the same way for 1 and n
        t = time.perf_counter()
        with local_cluster(workers) as cluster, Client(cluster) as client:
            fig["cluster_start_s"] = time.perf_counter() - t
            say(f"LocalCluster of {workers} worker(s) started in {fig['cluster_start_s']:.1f}s (not timed)")
            fig["planned_tasks"] = _planned_tasks(cohort, method, null, batch_memory)
            _warm(client, cohort, method, null, batch_memory)
            ds, wall, stream, cpu, walls = _timed_median(client, lambda: cohort_run(client, cohort), repeats)
            record("cohort", client, wall, stream, cpu, walls)
            say(f"cohort, one graph: {_walls(walls)}")
            loop, wall, stream, cpu, walls = _timed_median(client, lambda: loop_run(client, cohort), repeats)
            record("loop", client, wall, stream, cpu, walls)
            say(f"loop of {n_sections} single-section runs: {_walls(walls)}")
        fig["max_rel_diff"] = max(_max_rel_diff(_section_frame(ds, sid), _section_frame(one))
                                  for sid, one in loop.items())
        fig["identical"] = fig["max_rel_diff"] <= AGREEMENT_RTOL
        fig["pairs_tested"] = int(np.isfinite(ds["sv_pvalue"].values).sum())
        fig["compare_s"] = _time_comparison(ds, repeats)

        if scaling and workers > 1:
            with local_cluster(1) as cluster, Client(cluster) as client:
                _warm(client, cohort, method, null, batch_memory)
                one, wall, stream, cpu, walls = _timed_median(client, lambda: cohort_run(client, cohort), repeats)
                record("cohort_1_worker", client, wall, stream, cpu, walls)
            say(f"cohort, one graph, 1 worker: {_walls(walls)}")
            fig["identical_1_worker"] = bool(np.allclose(one["sv_pvalue"].values, ds["sv_pvalue"].values,
                                                         rtol=AGREEMENT_RTOL, atol=0.0, equal_nan=True))
            fig["scaling_speedup"] = fig["runs"]["cohort_1_worker"]["wall_s"] / fig["runs"]["cohort"]["wall_s"]
            fig["scaling_efficiency"] = fig["scaling_speedup"] / workers

        if splisosm:
            import anndata as ad

            t_setup = t_test = 0.0
            agree = []
            paths = pd.read_csv(manifest).set_index("section")["path"]
            for sid in cohort.section_ids:
                adata = ad.read_h5ad(Path(manifest).parent / paths[sid])
                ref, ts, tt = _splisosm_parts(adata, method, null)
                t_setup, t_test = t_setup + ts, t_test + tt
                agree.append(compare(ref, _section_frame(ds, sid)))
            fig["splisosm_setup_s"], fig["splisosm_test_s"] = t_setup, t_test
            fig["splisosm_s"] = t_setup + t_test
            agree_df = pd.DataFrame(agree)
            fig["splisosm_agreement"] = {
                "p_max_rel_diff": float(agree_df["p_max_rel_diff"].max()),
                "p_spearman_min": float(agree_df["p_spearman"].min()),
                "stat_spearman_min": float(agree_df["stat_spearman"].min()),
                "top20_overlap_min": float(agree_df["top20_overlap"].min()),
            }
            say(f"SplisosmNP, {n_sections} sections one by one: {fig['splisosm_s']:.1f}s")

    fig["load_average_end"] = os.getloadavg()[0]
    runs = fig["runs"]
    fig["loop_over_cohort"] = runs["loop"]["wall_s"] / runs["cohort"]["wall_s"]
    fig["compare_overhead"] = fig["compare_s"] / runs["cohort"]["wall_s"]
    if splisosm:
        fig["splisosm_over_cohort"] = fig["splisosm_s"] / runs["cohort"]["wall_s"]
        fig["splisosm_over_ingest_cohort"] = fig["splisosm_s"] / (fig["ingest_s"] + runs["cohort"]["wall_s"])
    if verbose:
        _print_cohort_bench(fig)
    return fig


def _print_cohort_bench(fig: dict) -> None:
    runs = fig["runs"]
    pairs = fig["pairs_tested"]
    lo, hi = fig["spots"]
    w = f"{fig['workers']} worker{'s' if fig['workers'] != 1 else ''}"
    names = {"cohort": f"cohort: one graph, {w}", "loop": f"loop: {fig['n_sections']} single-section runs, {w}",
             "cohort_1_worker": "cohort: one graph, 1 worker"}
    rows = [{"run": names[k], "wall_s": r["wall_s"], "gene_sections_per_s": pairs / r["wall_s"],
             "tasks": r["tasks"], "compute_s": r["compute_s"], "idle_fraction": r["idle_fraction"],
             "overhead_ms_per_task": r["overhead_ms_per_task"], "gap_ms": r["gap_ms"],
             "client_cpu_s": r["client_cpu_s"], "worker_cpu_s": r["worker_cpu_s"]} for k, r in runs.items()]
    if "splisosm_s" in fig:
        rows.append({"run": "SplisosmNP: section by section", "wall_s": fig["splisosm_s"],
                     "gene_sections_per_s": pairs / fig["splisosm_s"]})
    print(f"\n{fig['method']} / {fig['null']} on a cohort of {fig['n_sections']} sections ({lo}-{hi} spots, "
          f"{fig['total_spots']:,} in all) x {fig['n_genes']} genes; {pairs:,} gene x section tests")
    print(f"(ingest: {fig['ingest_s']:.1f}s for all sections' kernels, not included; "
          f"batches planned: {sum(fig['planned_tasks']['cohort'].values())} in the cohort (in "
          f"{sum(fig['planned_tasks']['cohort_tasks'].values())} tasks), "
          f"{sum(fig['planned_tasks']['single'].values())} for the single-section runs)")
    print(pd.DataFrame(rows).to_string(index=False, na_rep="", float_format=lambda v: f"{v:.4g}"))
    print(f"\nloop / cohort: {fig['loop_over_cohort']:.2f}x (target >= 1.5)")
    if "compare_s" in fig:
        print(f"compare= (2 levels) + min_sections=2 on the stacked sections: {1e3 * fig['compare_s']:.1f} ms, "
              f"{100 * fig['compare_overhead']:.2f}% of the cohort run (target < 10%)")
    if "splisosm_s" in fig:
        a = fig["splisosm_agreement"]
        print(f"SplisosmNP (setup_data {fig['splisosm_setup_s']:.1f}s + test {fig['splisosm_test_s']:.1f}s) / cohort: "
              f"{fig['splisosm_over_cohort']:.2f}x (target >= 3); / (ingest + cohort): "
              f"{fig['splisosm_over_ingest_cohort']:.2f}x")
        print(f"vs SplisosmNP, worst section: p max relative difference {a['p_max_rel_diff']:.2g}, p Spearman "
              f"{a['p_spearman_min']:.4f}, statistic Spearman {a['stat_spearman_min']:.4f}, top-20 overlap "
              f"{a['top20_overlap_min']:.2f}")
    if "scaling_efficiency" in fig:
        print(f"1 -> {fig['workers']} workers: speed-up {fig['scaling_speedup']:.2f}x, efficiency "
              f"{fig['scaling_efficiency']:.2f} (target >= 0.8)")
    print(f"machine load average (1 min; this bench's own processes included): {fig['load_average_start']:.2f} at "
          f"the start, {fig['load_average_end']:.2f} at the end; other work on the machine slows every run, "
          "SplisosmNP most")
    print(f"cohort vs loop (sv_statistic, sv_pvalue of every section): max relative difference "
          f"{fig['max_rel_diff']:.2g}, within {AGREEMENT_RTOL:g}: {fig['identical']} (a cohort plans fewer, larger "
          "batches per section, which round differently)"
          + (f"; 1-worker cohort = {fig['workers']}-worker cohort within {AGREEMENT_RTOL:g}: "
             f"{fig['identical_1_worker']}" if "identical_1_worker" in fig else ""))
    print("idle_fraction = 1 - sum(task compute) / (wall x worker threads); overhead_ms_per_task = "
          "(wall x threads - sum(task compute)) / tasks; gap_ms = median time between a task's end and the next "
          "task's start on a worker (from distributed's task stream); client_cpu_s: CPU of the client process, "
          "scheduler included; worker_cpu_s: CPU of the worker processes, tasks included")


# --------------------------------------------------------------------------- kernel build at scale
def _kernel_case(n: int, geometry: str, seed: int, splisosm: bool) -> dict:
    """One kernel build (runs in its own process, so its peak memory is its own)."""
    import resource

    from spatialscale import kernel as K
    from spatialscale.simulate import grid_coords

    warnings.filterwarnings("ignore")
    xy = grid_coords(n, geometry, seed)
    out: dict = {"geometry": geometry, "spots": n}
    t = time.perf_counter()
    w = K.knn_adjacency(xy, 4)
    m = K.car_precision(w, 0.99)
    out["graph_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ms = K.standardised_precision(m)
    out["standardise_s"] = time.perf_counter() - t
    params = K.KernelParams()
    out["power_sums"] = params.power_sum_method(n)
    t = time.perf_counter()
    if out["power_sums"] == "exact":
        sums, se = K.exact_power_sums(ms), np.zeros(4)
    else:
        sums, se = K.selected_power_sums(ms, unit_diagonal=True, n_sketch=params.n_sketch,
                                         n_probes=params.n_cv_probes, seed=params.probe_seed)
    out["power_sums_s"] = time.perf_counter() - t
    out["total_s"] = out["graph_s"] + out["standardise_s"] + out["power_sums_s"]
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out["se_k2"], out["se_k3"], out["se_k4"] = (se[1:] / sums[1:]).tolist()
    if splisosm:
        from splisosm.kernel import SpatialCovKernel

        t = time.perf_counter()
        SpatialCovKernel.from_coordinates(xy, k_neighbors=4, rho=0.99, standardize_cov=True)
        out["splisosm_kernel_s"] = time.perf_counter() - t
    return out


def run_kernel_bench(spots: list[int], geometries: tuple[str, ...] = ("hex", "random", "grid"), *, seed: int = 0,
                     splisosm_max_spots: int = 20_000, verbose: bool = True) -> pd.DataFrame:
    """Time the kernel build of large sections: graph, standardisation, power sums, peak memory.

    Each case runs in a fresh process (so ``peak_mb`` is that case's own
    peak resident memory).  Where ``spots <= splisosm_max_spots``,
    SPLISOSM 1.2.0's ``SpatialCovKernel.from_coordinates(standardize_cov=True)``
    is timed in the same process after spatialscale's build (its
    standardisation does one sparse solve per spot).

    Parameters
    ----------
    spots
        Section sizes.
    geometries
        ``hex`` (Visium-like lattice), ``random`` (Slide-seq / Xenium-like) and
        ``grid`` (a square mesh whose mutual 4-NN graph is fully connected: the
        hardest case for sparse factors).
    seed
        Seed of the random layout.
    splisosm_max_spots
        Largest size at which SPLISOSM's kernel is built too.
    verbose
        Print the table.

    Returns
    -------
    pandas.DataFrame
        One row per case: seconds per step, ``peak_mb``, the power-sum
        method and the relative standard errors of ``k_2..k_4``.
    """
    import multiprocessing as mp

    rows = []
    for n in spots:
        for geometry in geometries:
            with mp.get_context("spawn").Pool(1) as pool:
                row = pool.apply(_kernel_case, (int(n), geometry, seed, int(n) <= splisosm_max_spots))
            rows.append(row)
            if verbose:
                print(f"{geometry} {n:,} spots: {row['total_s']:.1f}s, peak {row['peak_mb']:.0f} MB", flush=True)
    df = pd.DataFrame(rows)
    if verbose:
        with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
            print(df.to_string(index=False))
        print("graph_s: mutual 4-NN graph and CAR precision; standardise_s: diag(M^-1) by selected inversion; "
              "power_sums_s: k1..k4 of the centred kernel (exact up to 5,000 spots, else 'selected': k1, k2 exact, "
              "k3, k4 from a deflated probe estimate; se_k*: its standard error relative to the value; a nonzero "
              "se_k2 means k2 was estimated too); peak_mb: the case's peak resident memory")
    return df


# --------------------------------------------------------------------------- raster (fft) sections
def raster_spatialdata(adata, bins: str = "bins", table: str = "bins_table"):
    """A SpatialData object holding a binned AnnData as Visium HD readers do: square bin polygons and a table
    annotating them (what SPLISOSM's ``SplisosmFFT.setup_data`` takes)."""
    import geopandas as gpd
    import shapely
    import spatialdata as sd
    from spatialdata.models import ShapesModel, TableModel

    t = adata.copy()
    r, c = t.obs["array_row"].to_numpy(), t.obs["array_col"].to_numpy()
    shapes = ShapesModel.parse(gpd.GeoDataFrame(geometry=shapely.box(c, r, c + 1, r + 1), index=np.arange(t.n_obs)))
    t.obs["region"] = pd.Categorical([bins] * t.n_obs)
    t.obs["instance_id"] = np.arange(t.n_obs)
    t.X = t.layers["counts"]
    t = TableModel.parse(t, region=bins, region_key="region", instance_key="instance_id")
    return sd.SpatialData(shapes={bins: shapes}, tables={table: t})


def _raster_data(shape: tuple[int, int], genes: int, seed: int):
    """Simulated bins under the ellipse inscribed in the grid (about 78.5% of the bins, the tissue reaching every
    edge, so the bounding grid is ``shape``); above 10^6 bins the depth per bin falls (smaller bins: 0.2 per gene
    at 10^6, 0.02 at 10^7), so the non-zero counts stay near 3 x 10^7 for 200 genes."""
    from spatialscale.simulate import simulate_raster

    depth = 0.2 * min(1.0, 1e6 / (shape[0] * shape[1]))
    return simulate_raster(shape, genes, n_sv=max(1, genes // 5), mean_depth=depth, seed=seed,
                           tissue_frac=np.pi / 4)


def _splisosm_fft_case(shape: tuple[int, int], genes: int, seed: int, method: str) -> dict:
    """SplisosmFFT on the simulated raster, in its own process (its peak memory is its own)."""
    from splisosm import SplisosmFFT

    warnings.filterwarnings("ignore")
    sdata = raster_spatialdata(_raster_data(shape, genes, seed))
    t = time.perf_counter()
    model = SplisosmFFT(rho=0.99, neighbor_degree=1)
    model.setup_data(sdata, bins="bins", table_name="bins_table", col_key="array_col", row_key="array_row",
                     layer="counts", group_iso_by="gene_symbol")
    setup = time.perf_counter() - t
    t = time.perf_counter()
    res = model.test_spatial_variability(method=method, return_results=True, print_progress=False)
    test = time.perf_counter() - t
    ref = pd.DataFrame({"statistic": res["statistic"], "pvalue": res["pvalue"]},
                       index=[str(g) for g in model.gene_names])
    return {"ref": ref, "setup_s": setup, "test_s": test, "peak_mb": _peak_mb_self()}


def run_raster_bench(shapes: list[tuple[int, int]], genes: list[int], *, method: str = "hsic-ir",
                     workers: int = 2, seed: int = 0, batch_memory: str = "256MB",
                     splisosm: bool = True) -> pd.DataFrame:
    """Raster sections: spatialscale (ingest with ``kernel="fft"`` + ``sv_test``
    on a LocalCluster) against SPLISOSM 1.2.0's ``SplisosmFFT`` (``setup_data``,
    which rasterises the SpatialData table, + ``test_spatial_variability``) on
    the same simulated bins (:func:`spatialscale.simulate.simulate_raster`,
    about 70% of each grid under tissue, sparse counts).

    SplisosmFFT runs in its own process (its ``peak_MB`` is its own); building
    its SpatialData object is not timed, as loading a user's data is not.
    """
    import multiprocessing as mp

    from distributed import Client

    from spatialscale.api import sv_test
    from spatialscale.engine import local_cluster
    from spatialscale.store import ingest

    warnings.filterwarnings("ignore")
    rows = []
    with local_cluster(workers) as cluster, Client(cluster) as client, \
            tempfile.TemporaryDirectory() as tmpdir:
        for shape in shapes:
            for g in genes:
                adata = _raster_data(shape, g, seed)
                # the grid is the tissue's bounding box (what SplisosmFFT rasterises too)
                ny, nx = int(np.ptp(adata.obs["array_row"])) + 1, int(np.ptp(adata.obs["array_col"])) + 1
                row = {"grid": f"{ny}x{nx}", "bins": ny * nx, "tissue_bins": adata.n_obs,
                       "genes": g}
                client.restart()  # fresh workers (their peak memory is this run's), the library imported
                client.run(_import_library)
                t = time.perf_counter()
                store = ingest(adata, Path(tmpdir) / "raster.zarr", kernel="fft", overwrite=True)
                row["ingest_s"] = time.perf_counter() - t
                t = time.perf_counter()
                ds = sv_test(store, method=method, client=client, batch_memory=batch_memory, progress=False)
                row["test_s"] = time.perf_counter() - t
                row["spatialscale_s"] = row["ingest_s"] + row["test_s"]
                row["worker_peak_MB"] = max(client.run(_worker_peak_mb).values())
                row["client_peak_MB"] = _peak_mb_self()
                ours = pd.DataFrame({"statistic": ds["sv_statistic"].values, "pvalue": ds["sv_pvalue"].values},
                                    index=ds["gene"].values)
                del adata, ds
                if splisosm:
                    with mp.get_context("spawn").Pool(1) as pool:
                        ref = pool.apply(_splisosm_fft_case, (tuple(shape), g, seed, method))
                    row.update({"splisosm_setup_s": ref["setup_s"], "splisosm_test_s": ref["test_s"],
                                "splisosm_s": ref["setup_s"] + ref["test_s"], "splisosm_peak_MB": ref["peak_mb"]})
                    row["speedup"] = row["splisosm_s"] / row["spatialscale_s"]
                    row.update(compare(ref["ref"], ours))
                rows.append(row)
                print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
    table = pd.DataFrame(rows)
    print(f"\n{method}: SPLISOSM 1.2.0 SplisosmFFT (setup_data + test_spatial_variability) vs spatialscale "
          f"(ingest kernel='fft' + sv_test on {workers} workers)")
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


def _compat_case(module: Any, adata: Any, kind: str) -> tuple[dict[str, pd.DataFrame], float]:
    """One class of ``module`` (``splisosm`` or ``spatialscale.compat``) through the same calls, timed."""
    t = time.perf_counter()
    if kind == "np":
        model = module.SplisosmNP()
        model.setup_data(adata, layer="counts", group_iso_by="gene_symbol", design_mtx=["rbp"])
        model.test_spatial_variability(method="hsic-ir", print_progress=False)
        model.test_differential_usage(method="hsic", print_progress=False)
        tables = {"sv": model.get_formatted_test_results("sv"), "du": model.get_formatted_test_results("du")}
    else:
        model = module.SplisosmGLMM(model_type="glmm-full")
        model.setup_data(adata, layer="counts", group_iso_by="gene_symbol", design_mtx=["rbp"])
        model.fit(n_jobs=2, batch_size=20, print_progress=False)
        model.test_differential_usage(method="score", print_progress=False)
        tables = {"du": model.get_formatted_test_results("du")}
    wall = time.perf_counter() - t
    with contextlib.suppress(AttributeError):
        model.close()  # the compat object's temporary store
    return tables, wall


def run_compat_bench(spots: list[int], genes: list[int], *, model: str = "np", workers: int = 2,
                     seed: int = 0) -> pd.DataFrame:
    """Time SPLISOSM 1.2.0's classes against :mod:`spatialscale.compat`'s, the same calls on the same AnnData.

    ``model="np"``: ``SplisosmNP`` setup, ``hsic-ir`` SV and ``hsic`` DU against the covariate
    ``rbp``; ``model="glmm"``: ``SplisosmGLMM`` glmm-full ``fit`` (SPLISOSM: ``n_jobs=2,
    batch_size=20``) and the DU score test (genes of 3 isoforms). The compat classes run on a
    LocalCluster of ``workers`` (the active client), started before timing. Printed per size: both
    walls, the ratio, and how far the DataFrames are apart (largest p-value difference; GLMM:
    p-value Spearman, since both are optimisation results).
    """
    import splisosm
    from distributed import Client
    from scipy.stats import spearmanr

    from spatialscale import compat
    from spatialscale.engine import local_cluster
    from spatialscale.simulate import simulate_section

    warnings.filterwarnings("ignore")
    rows = []
    with local_cluster(workers) as cluster, Client(cluster) as client:
        client.run(_import_library)
        for n in spots:
            for g in genes:
                adata = simulate_section(n, g, n_sv=max(1, g // 5), n_du=max(1, g // 10), seed=seed,
                                         isoforms=(3, 3) if model == "glmm" else (2, 4))
                ref, t_ref = _compat_case(splisosm, adata, model)
                ours, t_ours = _compat_case(compat, adata, model)
                row = {"spots": n, "genes": g, "splisosm_s": t_ref, "compat_s": t_ours, "speedup": t_ref / t_ours,
                       "same_frames": all(list(ref[k].columns) == list(ours[k].columns)
                                          and list(ref[k].index) == list(ours[k].index) for k in ref)}
                for k in ref:
                    p0, p1 = ref[k]["pvalue"].to_numpy(float), ours[k]["pvalue"].to_numpy(float)
                    row[f"{k}_p_max_abs_diff"] = float(np.nanmax(np.abs(p0 - p1)))
                    if model == "glmm":
                        row[f"{k}_p_spearman"] = float(spearmanr(p0, p1, nan_policy="omit").statistic)
                rows.append(row)
                print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table = pd.DataFrame(rows)
    what = "SplisosmNP (setup + hsic-ir SV + hsic DU)" if model == "np" else "SplisosmGLMM (fit + score DU)"
    print(f"\n{what}: SPLISOSM 1.2.0 vs spatialscale.compat on {workers} workers, the same calls")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


# --------------------------------------------------------------------------- covariates from expression
class _PeakRSS:
    """Peak resident memory above the start of the block (MB), sampled every 20 ms in a thread; on CUDA the
    peak of torch's allocator instead."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self) -> _PeakRSS:
        import threading

        import psutil

        self._proc = psutil.Process()
        self._base = self._proc.memory_info().rss
        self._max = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.02):
                self._max = max(self._max, self._proc.memory_info().rss)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._max = max(self._max, self._proc.memory_info().rss)
        if self.device.startswith("cuda"):
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.peak_mb = (self._max - self._base) / 2**20


def _mixture_counts(n: int, genes: int, types: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                                          np.ndarray]:
    """Gene-level counts of spots that mix ``types`` cell types (the simulator's model, without isoforms)."""
    from spatialscale.simulate import grid_coords, smooth_fields

    rng = np.random.default_rng(seed)
    xy = grid_coords(n, "grid", seed)
    f = smooth_fields(xy, types, 0.15, rng)
    props = np.exp(2.0 * f)
    props /= props.sum(axis=1, keepdims=True)
    profile = rng.lognormal(0.0, 1.0, (types, genes))
    profile[np.arange(types), rng.choice(genes, types, replace=False)] *= 20.0
    profile /= profile.sum(axis=1, keepdims=True) / genes
    mu = 2.0 * props @ profile
    counts = rng.negative_binomial(5.0, 5.0 / (5.0 + mu)).astype(np.float64)
    reference = profile * (1.0 + 0.05 * rng.standard_normal(profile.shape)).clip(0.5)
    return counts, props, reference, xy


def _time_to(history: list[float], walls: list[float], target: float) -> float:
    """Seconds until the training loss first reached ``target`` (NaN if never)."""
    for loss, wall in zip(history, walls):
        if loss <= target:
            return wall
    return float("nan")


def run_latent_bench(spots: list[int], genes: int = 500, *, types: int = 10, vae_epochs: int = 20,
                     minibatch: int = 1024, device: str = "cpu", seed: int = 0,
                     smoother: bool = True) -> pd.DataFrame:
    """Covariates from expression at scale: the VAE's training speed and memory, NNLS deconvolution.

    For each size: spatialscale's VAE (gene counts of simulated mixtures, ``zinb``, 10 latents) for
    ``vae_epochs`` epochs on minibatches and full batch with the ``icar`` spatial loss (epochs per second,
    peak memory, seconds to within 1% of the last epoch's loss); NNLS deconvolution into ``types`` cell
    types without and with the ``icar`` spatial loss, and Smoother 1.1.0's NNLS (``smoother.models.deconv``,
    Adam, its own SpatialLoss on the same kNN graph) on the same library-normalised inputs, in the same run
    (its time, and the largest difference between the two proportion matrices).  Smoother's SpatialVAE
    builds on scvi-tools, which is not installed (nor a dependency): it is reported as not run.
    """
    import torch

    from spatialscale.expression.nnls import nnls_deconvolve, normalize_expression
    from spatialscale.expression.training import fit_vae
    from spatialscale.kernel import knn_adjacency
    from spatialscale.losses import SpatialLoss

    warnings.filterwarnings("ignore")
    rows = []
    for n in spots:
        counts, props, reference, xy = _mixture_counts(n, genes, types, seed)
        graph = knn_adjacency(xy, 4)
        for mode in ("minibatch", "full+icar"):
            loss = SpatialLoss("icar", graph, device=device) if mode == "full+icar" else None
            t0 = time.perf_counter()
            with _PeakRSS(device) as mem:
                res = fit_vae(counts, model="vae", n_latent=10, gene_likelihood="zinb", max_epochs=vae_epochs,
                              batch_size=minibatch if mode == "minibatch" else None, spatial_loss=loss,
                              early_stopping=False, validation_fraction=0.0, seed=seed, device=device,
                              progress=False)
            wall = time.perf_counter() - t0
            train = list(res.history["train"])
            walls = list(np.linspace(wall / len(train), wall, len(train)))
            rows.append({"what": f"vae {mode}", "spots": n, "genes": genes, "device": device, "epochs": res.epochs,
                         "seconds": wall, "epochs_per_s": res.epochs / wall, "peak_mb": mem.peak_mb,
                         "final_loss": res.final_loss,
                         "s_to_1pct_of_final": _time_to(train, walls, res.final_loss * 1.01)})
            print(pd.DataFrame([rows[-1]]).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
        y = normalize_expression(counts, "library")
        x = normalize_expression(reference, "library")
        for lam in (0.0, 1.0):
            loss = SpatialLoss("icar", graph, device=device) if lam else None
            t0 = time.perf_counter()
            with _PeakRSS(device) as mem:
                res = nnls_deconvolve(y, x, spatial_loss=loss, lambda_spatial=lam, normalize="none", seed=seed,
                                      device=device, progress=False)
            wall = time.perf_counter() - t0
            row = {"what": f"nnls lambda={lam:g}", "spots": n, "genes": genes, "device": device,
                   "epochs": res.epochs, "seconds": wall, "peak_mb": mem.peak_mb, "final_loss": res.final_loss,
                   "rmse_vs_truth": float(np.sqrt(((res.proportions - props) ** 2).mean()))}
            if smoother and lam:
                row.update(_smoother_nnls(y, x, graph, lam, res.proportions, props))
                row["speedup_vs_smoother"] = row["smoother_s"] / wall
            rows.append(row)
            print(pd.DataFrame([rows[-1]]).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)
        del counts
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    print("\nSmoother 1.1.0's SpatialVAE: not run (it builds on scvi-tools, which is not installed; see "
          "docs/latent.md)")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


def _smoother_nnls(y: np.ndarray, x: np.ndarray, graph: Any, lam: float, ours: np.ndarray,
                   truth: np.ndarray) -> dict[str, float]:
    """Smoother 1.1.0's NNLS (Adam, its default schedule) with its icar SpatialLoss on the same graph."""
    try:
        import torch
        from smoother.losses import SpatialLoss as SmootherLoss
        from smoother.models.deconv import NNLS
        from smoother.weights import SpatialWeightMatrix
    except ImportError:
        return {"smoother_s": float("nan")}
    swm = SpatialWeightMatrix()
    swm.swm = torch.sparse_coo_tensor(np.vstack(graph.nonzero()), graph.data, graph.shape).float().coalesce()
    swm.swm_scaled = swm.swm
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(open(os.devnull, "w")):
        loss = SmootherLoss("icar", swm, rho=1.0, use_sparse=True, standardize_cov=False)
        model = NNLS(bias=False)
        model.deconv(x.T, y.T, spatial_loss=loss, lambda_spatial_loss=lam, quiet=True)
    wall = time.perf_counter() - t0
    theirs = model.get_props().detach().double().numpy()  # (spots, types), rows scaled to sum 1
    return {"smoother_s": wall, "smoother_rmse_vs_truth": float(np.sqrt(((theirs - truth) ** 2).mean())),
            "max_abs_diff_vs_smoother": float(np.abs(theirs - ours).max())}


# --------------------------------------------------------------------------- covariate-adjusted SV
def run_adjusted_bench(spots: list[int], genes: int = 300, *, workers: int = 2, repeats: int = 3, seed: int = 0,
                       method: str = "hsic-ir", batch_memory: str = "256MB") -> pd.DataFrame:
    """Time ``sv_test`` adjusted for covariates against the same run unadjusted, on the same store.

    Each section (``simulate_section``: ``celltype`` of 3 levels, plus a
    numeric covariate ``score``) is ingested once (not timed); then the
    unadjusted and the adjusted run (``covariates=["celltype", "score"]``,
    3 directions) alternate ``repeats`` times on the path a user takes by
    default (no client: local threads) and on a LocalCluster of ``workers``
    processes (after one untimed run that loads the kernel), and the medians
    and their ratio are printed.  The adjusted
    run's extra work is the projected power sums (``2u`` kernel products,
    once per run on the client) and the ``n x u`` projection of every batch's
    responses.
    """
    from distributed import Client

    from spatialscale.api import sv_test
    from spatialscale.engine import local_cluster
    from spatialscale.simulate import simulate_section
    from spatialscale.store import ingest

    warnings.filterwarnings("ignore")
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir, local_cluster(workers) as cluster, Client(cluster) as client:
        for n in spots:
            adata = simulate_section(n, genes, n_sv=max(1, genes // 5), seed=seed)
            adata.obs["score"] = np.random.default_rng(seed).normal(size=n)
            t = time.perf_counter()
            store = ingest(adata, Path(tmpdir) / f"adjusted_{n}.zarr")
            t_ingest = time.perf_counter() - t
            for where, kw in (("threads", {}), (f"{workers} workers", {"client": client})):
                times: dict[str, list[float]] = {"plain": [], "adjusted": []}
                sv_test(store, method=method, batch_memory=batch_memory, progress=False, **kw)  # warm the caches
                for _ in range(repeats):
                    for kind, cov in (("plain", None), ("adjusted", ["celltype", "score"])):
                        t = time.perf_counter()
                        sv_test(store, method=method, covariates=cov, batch_memory=batch_memory, progress=False,
                                **kw)
                        times[kind].append(time.perf_counter() - t)
                plain, adjusted = float(np.median(times["plain"])), float(np.median(times["adjusted"]))
                row = {"spots": n, "genes": genes, "scheduler": where, "ingest_s": t_ingest, "plain_s": plain,
                       "adjusted_s": adjusted, "ratio": adjusted / plain}
                rows.append(row)
                print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table = pd.DataFrame(rows)
    print(f"\n{method}: sv_test adjusted for celltype + score (3 directions) vs unadjusted, median of {repeats}")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table


#: the kernel ensemble ``spatialscale bench --test ensemble`` times: the store's kernel and two shorter-range ones
ENSEMBLE_BENCH_KERNELS = ("store", "splisosm:rho=0.9", "sar:rho=0.2")


def run_ensemble_bench(spots: list[int], genes: int = 300, *, repeats: int = 3, seed: int = 0,
                       method: str = "hsic-ir", batch_memory: str = "256MB") -> pd.DataFrame:
    """Time one kernel-ensemble ``sv_test`` of k = 3 kernels against k single-kernel runs of the same data.

    Each section (``simulate_section``) is ingested once per kernel of
    :data:`ENSEMBLE_BENCH_KERNELS` (not timed): the default store and stores
    ingested with ``rho=0.9`` and with ``prior="sar", rho=0.2``.  Then, on the
    default path (local threads), after one run of each that loads the
    kernels, the k single runs (one per store) and the ensemble run on the
    default store (``kernels=[...]``: counts read once) alternate ``repeats``
    times, and the medians of wall and CPU seconds (this process: the local
    threads run here, so CPU time is robust to other load on the machine) and
    their ratios are printed.  The first ensemble
    run (``ensemble_first_s``) builds the two extra kernels on the client
    (``build_extra_kernels_s`` alone), as ingest built the single runs'
    kernels (``ingest_k_stores_s``); later runs find them in the client's
    cache.
    """
    from spatialscale.api import sv_test
    from spatialscale.families.sv_hsic import parse_kernel_specs
    from spatialscale.kernel import build_kernel
    from spatialscale.simulate import simulate_section
    from spatialscale.store import ingest

    warnings.filterwarnings("ignore")
    specs = parse_kernel_specs(list(ENSEMBLE_BENCH_KERNELS))
    rows = []
    with tempfile.TemporaryDirectory() as tmpdir:
        for n in spots:
            adata = simulate_section(n, genes, n_sv=max(1, genes // 5), seed=seed)
            t = time.perf_counter()
            stores = [ingest(adata, Path(tmpdir) / f"ensemble_{n}_0.zarr")]
            for j, spec in enumerate(specs[1:], start=1):
                stores.append(ingest(adata, Path(tmpdir) / f"ensemble_{n}_{j}.zarr", prior=spec.prior,
                                     **dict(spec.settings)))
            t_ingest = time.perf_counter() - t
            t = time.perf_counter()
            coords = stores[0].coords()
            for spec in specs[1:]:
                build_kernel(coords, params=spec.params(stores[0]))
            t_build = time.perf_counter() - t
            kw = {"method": method, "batch_memory": batch_memory, "progress": False}
            for store in stores:  # warm the kernel caches
                sv_test(store, **kw)
            t = time.perf_counter()  # the first ensemble run builds the extra kernels (cached for the next ones)
            sv_test(stores[0], kernels=list(ENSEMBLE_BENCH_KERNELS), **kw)
            t_first = time.perf_counter() - t
            times: dict[str, list[float]] = {"singles": [], "ensemble": []}
            cpu: dict[str, list[float]] = {"singles": [], "ensemble": []}
            for _ in range(repeats):
                t, c = time.perf_counter(), _cpu_seconds()
                for store in stores:
                    sv_test(store, **kw)
                times["singles"].append(time.perf_counter() - t)
                cpu["singles"].append(_cpu_seconds() - c)
                t, c = time.perf_counter(), _cpu_seconds()
                sv_test(stores[0], kernels=list(ENSEMBLE_BENCH_KERNELS), **kw)
                times["ensemble"].append(time.perf_counter() - t)
                cpu["ensemble"].append(_cpu_seconds() - c)
            singles, ensemble = float(np.median(times["singles"])), float(np.median(times["ensemble"]))
            cpu_singles, cpu_ensemble = float(np.median(cpu["singles"])), float(np.median(cpu["ensemble"]))
            row = {"spots": n, "genes": genes, "k": len(specs), "ingest_k_stores_s": t_ingest,
                   "build_extra_kernels_s": t_build, "ensemble_first_s": t_first, "k_singles_s": singles,
                   "ensemble_s": ensemble, "ratio": ensemble / singles, "k_singles_cpu_s": cpu_singles,
                   "ensemble_cpu_s": cpu_ensemble, "cpu_ratio": cpu_ensemble / cpu_singles}
            rows.append(row)
            print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    table = pd.DataFrame(rows)
    print(f"\n{method}: one ensemble run of {', '.join(ENSEMBLE_BENCH_KERNELS)} vs {len(specs)} single runs "
          f"(local threads, median of {repeats})")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return table
