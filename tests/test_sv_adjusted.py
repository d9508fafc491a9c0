"""Covariate-adjusted SV tests: ``sv_test(covariates=...)`` / ``spatialscale sv --covariates``.

Sections where isoform usage depends on a spatially clustered cell type only
(no pattern within types) are spatially variable for the plain test; adjusted
for the cell type they are null.  Genes with a pattern within the cell types
stay detected.  The adjusted statistic and null moments equal a dense
brute-force computation.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import spatialscale
from spatialscale.errors import InputError


def typed_section(n: int = 400, n_null: int = 300, n_sv: int = 0, *, seed: int = 0, depth: float = 25.0,
                  n_types: int = 3, n_isoforms: int = 3, effect: float = 1.0, sv_effect: float = 0.6) -> ad.AnnData:
    """A grid section whose cell types sit in spatial blobs (Voronoi cells of random centres).

    The first ``n_null`` genes' isoform logits depend on the cell type only;
    the last ``n_sv`` add a pattern that varies within every blob.
    """
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n)))
    xy = np.stack(np.meshgrid(np.arange(side), np.arange(side)), -1).reshape(-1, 2)[:n].astype(float)
    centres = rng.uniform(0, side, (2 * n_types, 2))
    label = np.argmin(((xy[:, None] - centres[None]) ** 2).sum(-1), 1) % n_types
    pattern = np.sin(xy[:, 0] / 2.0) * np.cos(xy[:, 1] / 2.0)
    blocks, genes = [], []
    for g in range(n_null + n_sv):
        eta = rng.normal(0, effect, (n_types, n_isoforms))[label] + rng.normal(0, 0.3, n_isoforms)
        if g >= n_null:
            eta = eta + sv_effect * np.outer(pattern, rng.normal(0, 1, n_isoforms))
        prob = np.exp(eta) / np.exp(eta).sum(1, keepdims=True)
        total = rng.poisson(depth, n)
        blocks.append(np.stack([rng.multinomial(t, pr) for t, pr in zip(total, prob)]))
        genes += [f"g{g:04d}"] * n_isoforms
    counts = sp.csr_matrix(np.concatenate(blocks, 1).astype(np.float32))
    var = pd.DataFrame({"gene_symbol": genes}, index=[f"{g}-t{i}" for i, g in enumerate(genes)])
    obs = pd.DataFrame({"celltype": pd.Categorical([f"T{t}" for t in label]),
                        "score": label + rng.normal(0, 0.1, n), "flat": np.ones(n)},
                       index=[f"s{i:04d}" for i in range(n)])
    a = ad.AnnData(X=counts.copy(), obs=obs, var=var)
    a.layers["counts"] = counts
    a.obsm["spatial"] = xy
    return a


RUN = {"scheduler": "threads", "progress": False}


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    a = typed_section(n=64, n_null=5, n_sv=3, seed=3, n_isoforms=4)
    return spatialscale.ingest(a, tmp_path_factory.mktemp("tiny") / "s.zarr")


def test_adjusted_equals_dense_brute_force(tiny_store):
    from spatialscale.covariates import encode_covariates
    from spatialscale.stats.nulls import liu_pvalue
    from spatialscale.stats.responses import ratio_response

    store = tiny_store
    n = store.n_spots
    ds = spatialscale.sv_test(store, covariates=["celltype", "score"], **RUN)
    assert ds.attrs["covariates"] == ["celltype[T1]", "celltype[T2]", "score"]
    h = np.eye(n) - 1.0 / n
    kc = h @ np.linalg.inv(store.precision().toarray()) @ h
    z = encode_covariates(store.obs(), ["celltype", "score"]).z
    z1 = np.column_stack([np.ones(n), z])
    m = np.eye(n) - z1 @ np.linalg.solve(z1.T @ z1, z1.T)
    lam = np.linalg.eigvalsh(m @ kc @ m)
    u = np.linalg.matrix_rank(z1) - 1  # the joint encoding keeps every level: rank 3, not 4
    counts = _dense_counts(store)
    y, _ = ratio_response(counts, "none")
    for g in range(counts.shape[0]):
        r = m @ y[g]
        q = np.trace(r.T @ m @ kc @ m @ r)
        mu = np.linalg.eigvalsh(r.T @ r)
        mu = mu[mu > 1e-8]
        c = np.array([np.sum(lam**k) * np.sum(mu**k) / (n - 1 - u) ** k for k in range(1, 5)])
        assert ds["sv_statistic"].values[g] * (n - 1) ** 2 == pytest.approx(q, rel=1e-8)
        assert ds["sv_pvalue"].values[g] == pytest.approx(liu_pvalue(np.array([q]), c[None])[0], rel=1e-8,
                                                          abs=1e-300)


def _dense_counts(store) -> np.ndarray:
    """``(G, n, p)`` counts of a store whose genes all have the same isoform count."""
    from spatialscale.engine import plan_batches
    from spatialscale.families.common import batch_counts

    path = str(store.path.resolve())
    batches = plan_batches(store.genes, store.n_spots, bytes_per_gene=lambda p: 1.0, memory_bytes=1 << 40,
                           batch_size=None, min_batches=1)
    return np.concatenate([batch_counts(path, b) for b in batches])


def test_projected_power_sums_equal_the_dense_eigenvalues(tiny_store):
    from spatialscale.stats.adjust import covariate_basis, projected_kernel_sums
    from spatialscale.worker import kernel_operator

    store = tiny_store
    n = store.n_spots
    op, sums = kernel_operator(str(store.path.resolve()), store.kernel_token)
    z = store.obs()[["score"]].to_numpy()
    basis = covariate_basis(np.column_stack([z, z ** 2, 2 * z + 1]))  # rank 2: the dependent column is dropped
    assert basis.shape[1] == 2 and np.allclose(basis.T @ basis, np.eye(2)) and np.allclose(basis.sum(0), 0)
    h = np.eye(n) - 1.0 / n
    kc = h @ np.linalg.inv(store.precision().toarray()) @ h
    m = h - basis @ basis.T
    lam = np.linalg.eigvalsh(m @ kc @ m)
    np.testing.assert_allclose(projected_kernel_sums(op, sums, basis), [np.sum(lam**k) for k in range(1, 5)],
                               rtol=1e-8)


def test_adjusted_sv_is_calibrated_and_keeps_power(tmp_path):
    """Usage depends on blob-shaped cell types only: plain SV finds it, SV adjusted for the type does not; a
    pattern within types is still found.  4 sections of 400 spots, 300 null + 60 within-type SV genes each."""
    null_p, sv_p, plain_null_p = [], [], []
    for seed in range(4):
        store = spatialscale.ingest(typed_section(n_null=300, n_sv=60, seed=seed), tmp_path / f"s{seed}.zarr")
        plain = spatialscale.sv_test(store, **RUN)["sv_pvalue"].values
        adj = spatialscale.sv_test(store, covariates="celltype", **RUN)["sv_pvalue"].values
        plain_null_p.append(plain[:300])
        null_p.append(adj[:300])
        sv_p.append(adj[300:])
    plain_rate = np.mean(np.concatenate(plain_null_p) < 0.05)
    rate = np.mean(np.concatenate(null_p) < 0.05)
    power = np.mean(np.concatenate(sv_p) < 0.05)
    print(f"plain SV on type-only genes: {plain_rate:.3f}; adjusted: {rate:.4f} (1200 genes); "
          f"adjusted power within types: {power:.3f} (240 genes)")
    assert plain_rate > 0.9
    assert 0.035 <= rate <= 0.065
    assert power > 0.8


def test_other_methods_nulls_and_batching(tiny_store):
    store = tiny_store
    a = spatialscale.sv_test(store, covariates="celltype", **RUN)
    b = spatialscale.sv_test(store, covariates="celltype", batch_size=3, **RUN)
    np.testing.assert_array_equal(a["sv_pvalue"].values, b["sv_pvalue"].values)
    np.testing.assert_array_equal(a["sv_statistic"].values, b["sv_statistic"].values)
    for method in ("hsic-ic", "hsic-gc"):
        ds = spatialscale.sv_test(store, method=method, covariates="celltype", **RUN)
        assert np.isfinite(ds["sv_pvalue"].values).all() and ds.attrs["covariates"] == ["celltype[T1]",
                                                                                         "celltype[T2]"]
    ds = spatialscale.sv_test(store, covariates="celltype", null="perm", n_perms=49, **RUN)
    p = ds["sv_pvalue"].values
    assert ((p >= 1 / 50) & (p <= 1)).all()
    welch = spatialscale.sv_test(store, covariates="celltype", null="welch", **RUN)["sv_pvalue"].values
    assert np.corrcoef(np.log(welch), np.log(a["sv_pvalue"].values))[0, 1] > 0.9


def test_fingerprint_follows_the_covariate_values(tiny_store):
    from spatialscale.families import family_for
    from spatialscale.families.base import resolve_options
    from spatialscale.families.common import run_spec

    store = tiny_store
    fam = family_for("sv", "hsic-ir")
    opts = resolve_options(fam, "hsic-ir", {})
    fp = {name: run_spec(store, fam.prepare_for(store, "hsic-ir", opts, cov, "cpu")).fp
          for name, cov in {"none": None, "type": "celltype", "score": "score",
                            "score2": pd.DataFrame({"score": store.obs()["score"] * 2})}.items()}
    assert len(set(fp.values())) == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"covariates": "flat"}, "constant"),
    ({"covariates": "nope"}, "not found in obs"),
    ({"covariates": np.full(64, np.nan)}, "NaN"),
    ({"covariates": "celltype", "nan_filling": "none"}, "nan_filling='mean'"),
    ({"covariates": "celltype", "null": "liu-perm"}, "liu-perm"),
])
def test_bad_covariates_are_one_line_errors(tiny_store, kwargs, message):
    with pytest.raises(InputError, match=message) as info:
        spatialscale.sv_test(tiny_store, **kwargs, **RUN)
    assert "\n" not in str(info.value)


def test_cli_covariates(tiny_store, tmp_path, capsys):
    from spatialscale.cli import main

    with pytest.raises(SystemExit):
        main(["sv", "--help"])
    assert "--covariates" in capsys.readouterr().out
    out = tmp_path / "adj.zarr"
    assert main(["sv", str(tiny_store.path), "--out", str(out), "--covariates", "celltype,score", "--scheduler",
                 "threads", "--no-progress"]) == 0
    import xarray as xr

    assert xr.open_zarr(out).attrs["covariates"] == ["celltype[T1]", "celltype[T2]", "score"]
    assert main(["sv", str(tiny_store.path), "--out", str(tmp_path / "bad.zarr"), "--covariates", "nope",
                 "--scheduler", "threads", "--no-progress"]) == 2
    assert "not found in obs" in capsys.readouterr().err


def test_glmm_llr_takes_the_covariates_as_fixed_effects(tiny_store):
    store = tiny_store
    ds = spatialscale.sv_test(store, method="glmm-llr", covariates="celltype", **RUN)
    assert ds.attrs["covariates"] == ["celltype[T1]", "celltype[T2]"]
    assert np.isfinite(ds["sv_statistic"].values).all()
    # the effect is the likelihood-ratio R^2 of each gene's statistic
    stat = np.clip(ds["sv_statistic"].values, 0, None)
    np.testing.assert_allclose(ds["sv_effect"].values, 1 - np.exp(-stat / store.n_spots), rtol=1e-12)
    assert ((ds["sv_effect"].values >= 0) & (ds["sv_effect"].values < 1)).all()
    with pytest.raises(InputError, match="null='chi2' only"):
        spatialscale.sv_test(store, method="glmm-llr", covariates="celltype", null="perm", **RUN)


def test_cohort_sections_are_adjusted_each_by_its_own_covariates(tmp_path, capsys):
    from spatialscale.cli import main

    for i in range(2):
        a = typed_section(n=100, n_null=6, n_sv=2, seed=20 + i)
        a.obs["lab"] = f"L{i}"  # constant within each section: nothing to adjust for in any of them
        a.write_h5ad(tmp_path / f"s{i}.h5ad")
    (tmp_path / "m.csv").write_text("section,path\nA,s0.h5ad\nB,s1.h5ad\n")
    cohort = spatialscale.ingest_cohort(tmp_path / "m.csv", tmp_path / "co", **RUN)
    ds = spatialscale.sv_test(cohort, covariates="celltype", **RUN)
    assert ds.sizes["section"] == 2 and np.isfinite(ds["combined_pvalue"].values).all()
    for s in ("A", "B"):
        one = spatialscale.sv_test(cohort.store(s), covariates="celltype", **RUN)
        np.testing.assert_allclose(ds["sv_pvalue"].sel(section=s).values, one["sv_pvalue"].values, rtol=1e-6)
    out = tmp_path / "never.zarr"
    code = main(["sv", str(tmp_path / "co"), "--covariates", "lab", "--out", str(out), "--scheduler", "threads",
                 "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "section 'A': covariate 'lab' takes one value ('L0') on every spot" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_covariates_learnt_from_expression(tmp_path):
    """SV adjusted for cell-type proportions from ``deconvolve`` (a covariate set named by its key)."""
    from spatialscale.simulate import simulate_mixture

    adata, reference = simulate_mixture(400, 60, 3, seed=2)
    store = spatialscale.ingest(adata, tmp_path / "m.zarr")
    spatialscale.deconvolve(store, reference, progress=False, scheduler="threads")
    plain = spatialscale.sv_test(store, **RUN)
    adj = spatialscale.sv_test(store, covariates="props", **RUN)
    assert adj.attrs["covariates"] == ["props_type_1", "props_type_2", "props_type_3"]
    truth = adata.var.groupby("gene_symbol", observed=True)["du_truth"].first().reindex(plain.gene.values).values
    type_p, adj_type_p = plain["sv_pvalue"].values[truth], adj["sv_pvalue"].values[truth]
    print(f"type-dependent usage, SV at 5%: plain {np.mean(type_p < 0.05):.2f}, adjusted for the proportions "
          f"{np.mean(adj_type_p < 0.05):.2f} ({truth.sum()} genes); other genes adjusted "
          f"{np.mean(adj['sv_pvalue'].values[~truth] < 0.05):.2f}")
    # the proportions explain part of the type-driven pattern (usage mixes by expression share, not linearly)
    assert np.median(-np.log10(adj_type_p)) < 0.5 * np.median(-np.log10(type_p))
    assert np.mean(adj["sv_pvalue"].values[~truth] < 0.05) < 0.15
