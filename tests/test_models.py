"""Covariates from expression on the engine: covariate sets in the store, deconvolve / latent_factors end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import spatialscale
from spatialscale import InputError
from spatialscale.simulate import simulate_mixture


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """A 900-spot section of four cell types (a fifth of the genes with type-dependent usage), its reference."""
    adata, reference = simulate_mixture(n_spots=900, n_genes=80, n_types=4, noise=0.3, seed=3)
    folder = tmp_path_factory.mktemp("mixture")
    adata.write_h5ad(folder / "mix.h5ad")
    reference.write_h5ad(folder / "mix.reference.h5ad")
    return folder, adata, reference


def _store(mixture, tmp_path, name="s.zarr"):
    folder, adata, _ = mixture
    return spatialscale.ingest(folder / "mix.h5ad", tmp_path / name, progress=False)


def _truth(adata, store) -> np.ndarray:
    return adata.obsm["proportions"].loc[store.obs().index].to_numpy()


# --------------------------------------------------------------------------- covariate sets in the store
def test_a_covariate_set_is_kept_checksummed_and_taken_by_name(mixture, tmp_path):
    store = _store(mixture, tmp_path)
    z = np.random.default_rng(0).normal(size=(store.n_observed, 3))
    store.write_covariate_set("latent", z, extras={"latent_var": z ** 2}, provenance={"model": "test", "seed": 1})
    assert store.covariate_sets() == {"latent": {"columns": ["latent_1", "latent_2", "latent_3"],
                                                 "provenance": {"model": "test", "seed": 1}}}
    values, extras, _ = spatialscale.open_store(store.path).covariate_set("latent")
    np.testing.assert_array_equal(values.to_numpy(), z)
    np.testing.assert_array_equal(extras["latent_var"], z ** 2)
    obs = store.obs()
    assert list(obs.columns[-3:]) == ["latent_1", "latent_2", "latent_3"]
    # the name stands for its columns: the same statistics as the columns given as a DataFrame
    by_name = spatialscale.du_test(store, "latent", method="hsic", progress=False)
    by_frame = spatialscale.du_test(store, pd.DataFrame(z, index=obs.index, columns=values.columns), method="hsic",
                                    progress=False)
    assert list(by_name.covariate.values) == ["latent_1", "latent_2", "latent_3"]
    np.testing.assert_array_equal(by_name.du_statistic.values, by_frame.du_statistic.values)
    # a second set of that name is refused unless overwrite; bad sets are refused before anything is written
    with pytest.raises(InputError, match="already holds covariate set 'latent'"):
        store.write_covariate_set("latent", z)
    for bad, match in [(("celltype", z), "already name obs columns"), (("x y", z), "letters, digits"),
                       (("w", z[:10]), "has shape"), (("w", np.full_like(z, np.nan)), "NaN")]:
        with pytest.raises(InputError, match=match):
            store.write_covariate_set(*bad)
    # a folder there that spatialscale did not write (no mark) is never replaced, even with overwrite
    foreign = store.path / "uns" / "spatialscale_covariates" / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("user data")
    with pytest.raises(InputError, match="not a covariate set spatialscale wrote"):
        store.write_covariate_set("mine", z, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "user data"
    import shutil

    shutil.rmtree(foreign)  # the test's own folder
    store.write_covariate_set("latent", 2 * z, overwrite=True)
    np.testing.assert_array_equal(store.covariate_set("latent")[0].to_numpy(), 2 * z)
    assert sorted(p.name for p in (store.path / "uns" / "spatialscale_covariates").iterdir()) == ["latent",
                                                                                                   "zarr.json"]
    # the store is still an AnnData zarr, and a damaged set is named
    import anndata

    assert "spatialscale_covariates" in anndata.read_zarr(store.path).uns
    # a damaged set is named (files are verified when first read in a process, for their recorded digest)
    store.write_covariate_set("other", z[:, :1], overwrite=True)
    values_file = next(f for f in (store.path / "uns" / "spatialscale_covariates" / "other" / "values" / "c").rglob("*")
                       if f.is_file())
    values_file.write_bytes(values_file.read_bytes()[:-1] + b"\0")
    with pytest.raises(InputError, match="does not match its checksum"):
        spatialscale.open_store(store.path).obs()


# --------------------------------------------------------------------------- deconvolution end to end
def test_deconvolve_recovers_proportions_reuses_and_replaces_only_when_asked(mixture, tmp_path):
    folder, adata, reference = mixture
    store = _store(mixture, tmp_path)
    ds = spatialscale.deconvolve(store, reference, progress=False)
    props = ds["props"].to_numpy()
    assert props.shape == (store.n_observed, 4) and (props >= 0).all()
    np.testing.assert_allclose(props.sum(axis=1), 1.0, atol=1e-9)
    rmse = float(np.sqrt(((props - _truth(adata, store)) ** 2).mean()))
    assert rmse < 0.2, rmse  # measured 0.141: noisy counts (overdispersion 0.3), a reference from 50 cells
    assert list(ds.column.values) == [f"props_type_{i}" for i in range(1, 5)]
    prov = json.loads(ds.attrs["provenance"])
    assert prov["model"] == "nnls" and prov["seed"] == 0 and np.isfinite(prov["final_loss"])
    assert prov["epochs"] == 0 and prov["converged"]  # without a spatial loss every spot is solved exactly
    # the same content and options: reused, not retrained (the stored bytes are returned)
    again = spatialscale.deconvolve(spatialscale.open_store(store.path), reference, progress=False)
    assert again.attrs["reused"] == 1
    np.testing.assert_array_equal(again["props"].to_numpy(), props)
    # other options: refused without overwrite, nothing written
    with pytest.raises(InputError, match="already holds covariate set 'props'"):
        spatialscale.deconvolve(store, reference, spatial_loss="icar", progress=False)
    np.testing.assert_array_equal(store.covariate_set("props")[0].to_numpy(), props)
    # the spatial loss lowers the error on these noisy, smooth mixtures
    smooth = spatialscale.deconvolve(store, reference, spatial_loss="icar", lambda_spatial=1.0, overwrite=True,
                                     progress=False)
    rmse_sp = float(np.sqrt(((smooth["props"].to_numpy() - _truth(adata, store)) ** 2).mean()))
    assert rmse_sp < 0.8 * rmse, (rmse_sp, rmse)  # measured 0.090 against 0.141
    # a reference file, single cells with celltype_key
    from_file = spatialscale.deconvolve(store, folder / "mix.reference.h5ad", key_added="props2", progress=False)
    np.testing.assert_allclose(from_file["props2"].to_numpy(), props, atol=1e-10)
    import anndata

    cells = anndata.AnnData(np.repeat(np.asarray(reference.X), 3, axis=0) * np.array([0.5, 1.0, 1.5] * 4)[:, None],
                            obs=pd.DataFrame({"type": np.repeat(reference.obs_names, 3)},
                                             index=[f"c{i}" for i in range(12)]), var=reference.var)
    from_cells = spatialscale.deconvolve(store, cells, celltype_key="type", key_added="props3", progress=False)
    np.testing.assert_allclose(from_cells["props3"].to_numpy(), props, atol=1e-8)  # each type's mean: its row


def test_deconvolve_on_a_local_cluster_equals_local_threads(mixture, tmp_path, client):
    _, _, reference = mixture
    store = _store(mixture, tmp_path)
    threads = spatialscale.deconvolve(store, reference, key_added="a", scheduler="threads", progress=False)
    dask = spatialscale.deconvolve(store, reference, key_added="b", client=client, progress=False)
    np.testing.assert_allclose(dask["b"].to_numpy(), threads["a"].to_numpy(), rtol=0, atol=1e-9)


def test_bad_model_input_is_one_line_and_writes_nothing(mixture, tmp_path):
    _, adata, reference = mixture
    store = _store(mixture, tmp_path)
    other = reference.copy()
    other.var_names = [f"x{g}" for g in other.var_names]
    nan = reference.copy()
    nan.X = np.asarray(nan.X, dtype=float)
    nan.X[0, 0] = np.nan
    cases = [
        (lambda: spatialscale.deconvolve(store, other), "no genes in common"),
        (lambda: spatialscale.deconvolve(store, nan), "NaN"),
        (lambda: spatialscale.deconvolve(store, reference[:1]), "at least 2"),
        (lambda: spatialscale.deconvolve(store, reference, lambda_spatial=-1), "lambda_spatial"),
        (lambda: spatialscale.deconvolve(store, reference, spatial_loss="nope"), "unknown spatial_loss"),
        (lambda: spatialscale.deconvolve(store, reference, out=tmp_path / "o.zarr"), "out does not apply"),
        (lambda: spatialscale.latent_factors(store, n_latent=0), "n_latent must be an integer >= 1"),
        (lambda: spatialscale.latent_factors(store, gene_likelihood="gauss"), "unknown gene_likelihood"),
        (lambda: spatialscale.latent_factors(store, dispersion="gene-spot"), "unknown dispersion"),
        (lambda: spatialscale.latent_factors(store, model="umap"), "unknown latent model"),
        (lambda: spatialscale.latent_factors(store, batch_key="celltype_one"), "not an obs column"),
        (lambda: spatialscale.latent_factors(store, dispersion="gene-batch"), "needs batches"),
        (lambda: spatialscale.latent_factors(store, key_added="celltype"), "obs column"),
    ]
    for call, match in cases:
        with pytest.raises(InputError, match=match):
            call()
    assert store.covariate_sets() == {}
    # a batch key with one level
    import anndata

    one = anndata.read_h5ad(mixture[0] / "mix.h5ad")
    one.obs["batch"] = "a"
    st1 = spatialscale.ingest(one, tmp_path / "one.zarr", progress=False)
    with pytest.raises(InputError, match="one level"):
        spatialscale.latent_factors(st1, batch_key="batch")
    with pytest.raises(InputError, match="needs labels"):
        spatialscale.latent_factors(st1, dispersion="gene-label")
    with pytest.raises(InputError, match="takes no batch_key"):
        spatialscale.latent_factors(st1, model="pca", batch_key="celltype")
    assert st1.covariate_sets() == {}
    # gene-label dispersion with labels from obs: one dispersion per label and gene
    ds = spatialscale.latent_factors(st1, n_latent=2, max_epochs=5, dispersion="gene-label", labels_key="celltype",
                                     progress=False)
    assert ds["dispersion"].shape == (4, st1.n_genes)
    # the CLI: exit 2, one line, nothing written
    run = subprocess.run([sys.executable, "-m", "spatialscale.cli", "latent", str(store.path), "--n-latent", "0"],
                         capture_output=True, text=True)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "n_latent" in run.stderr, run.stderr
    assert store.covariate_sets() == {}


def test_du_on_deconvolved_proportions_is_calibrated_on_null_genes_and_finds_du_genes(mixture, tmp_path):
    """Genes whose usage is the same in every cell type (null) against the learnt proportions: uniform p-values;
    genes whose usage differs by type: found."""
    _, adata, reference = mixture
    store = _store(mixture, tmp_path)
    spatialscale.deconvolve(store, reference, progress=False)
    ds = spatialscale.du_test(store, "props", method="hsic", progress=False)
    du_gene = adata.var.groupby("gene_symbol", observed=True)["du_truth"].first()
    is_du = du_gene.reindex(ds.gene.values).to_numpy(dtype=bool)
    p = ds["du_pvalue"].to_numpy()  # gene x covariate (the four proportions)
    null = p[~is_du].ravel()
    assert (~is_du).sum() >= 50 and is_du.sum() >= 10
    # calibration: the fraction below 0.05 within binomial noise (columns are correlated: a generous bound)
    assert 0.0 <= (null < 0.05).mean() <= 0.10, np.sort(null)[:10]
    assert 0.4 < np.mean(null) < 0.6
    power = (ds["du_pvalue_adj"].to_numpy()[is_du].min(axis=1) < 0.05).mean()
    assert power >= 0.8, power


# --------------------------------------------------------------------------- latent factors end to end
def _canonical_correlations(z: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Canonical correlations of the latents with the true proportions (all but one: they sum to 1)."""
    q1, _ = np.linalg.qr(z - z.mean(axis=0))
    q2, _ = np.linalg.qr(truth[:, 1:] - truth[:, 1:].mean(axis=0))
    return np.linalg.svd(q1.T @ q2, compute_uv=False)


def _roughness(z: np.ndarray, store) -> float:
    """Mean squared difference of the standardised latents over the store's graph edges."""
    from spatialscale.losses import loss_weights

    w, _ = loss_weights(store)
    i, j = w.nonzero()
    zz = (z - z.mean(axis=0)) / z.std(axis=0)
    return float(((zz[i] - zz[j]) ** 2).mean())


@pytest.fixture(scope="module")
def section2000(tmp_path_factory):
    adata, _ = simulate_mixture(n_spots=2000, n_genes=200, n_types=4, seed=1)
    store = spatialscale.ingest(adata, tmp_path_factory.mktemp("s2000") / "s.zarr", progress=False)
    return adata, store


def test_vae_latents_recover_the_cell_type_layout_and_the_spatial_loss_smooths_them(section2000):
    adata, store = section2000
    truth = adata.obsm["proportions"].loc[store.obs().index].to_numpy()
    plain = spatialscale.latent_factors(store, model="vae", max_epochs=100, progress=False)
    cc = _canonical_correlations(plain["latent"].to_numpy(), truth)
    assert cc.min() >= 0.9, cc  # measured 0.94-0.97
    assert set(plain.data_vars) == {"latent", "latent_var", "library", "dispersion"}
    assert plain["latent_var"].shape == (2000, 10) and (plain["latent_var"] > 0).all()
    prov = json.loads(plain.attrs["provenance"])
    assert prov["epochs"] == 100 and prov["options"]["gene_likelihood"] == "nb" and np.isfinite(prov["final_loss"])
    # the same seed retrains to the same latents; another seed does not
    same = spatialscale.latent_factors(store, model="vae", max_epochs=100, key_added="again", progress=False)
    np.testing.assert_array_equal(same["again"].to_numpy(), plain["latent"].to_numpy())
    other = spatialscale.latent_factors(store, model="vae", max_epochs=100, seed=1, key_added="seed1", progress=False)
    assert np.abs(other["seed1"].to_numpy() - plain["latent"].to_numpy()).max() > 1e-3
    smooth = spatialscale.latent_factors(store, model="vae", max_epochs=100, spatial_loss="icar", lambda_spatial=1.0,
                                         key_added="smooth", progress=False)
    z = smooth["smooth"].to_numpy()
    assert _canonical_correlations(z, truth).min() >= 0.9
    assert _roughness(z, store) < 0.8 * _roughness(plain["latent"].to_numpy(), store), (
        _roughness(z, store), _roughness(plain["latent"].to_numpy(), store))
    # LDVAE keeps its loadings (genes x factors); the covariates are usable by name in du_test
    ld = spatialscale.latent_factors(store, model="ldvae", n_latent=4, max_epochs=100, key_added="ld",
                                     progress=False)
    assert ld["loadings"].dims == ("gene", "column") and ld["loadings"].shape == (store.n_genes, 4)
    ds = spatialscale.du_test(store, "ld", method="hsic", progress=False)
    assert list(ds.covariate.values) == ["ld_1", "ld_2", "ld_3", "ld_4"]


def test_one_latent_model_over_a_cohort_writes_each_section_with_the_section_as_batch(tmp_path, client):
    """A cohort: one VAE over both sections (section = batch, block-diagonal spatial loss), trained on a
    Dask LocalCluster worker; each section's store gets its own spots' latents, and per-section DU takes them by
    name."""
    rows = []
    for i in range(2):
        adata, _ = simulate_mixture(n_spots=500 + 100 * i, n_genes=60, n_types=3, seed=10 + i)
        adata.write_h5ad(tmp_path / f"s{i}.h5ad")
        rows.append({"section": f"s{i}", "path": str(tmp_path / f"s{i}.h5ad"), "condition": "ab"[i]})
    cohort = spatialscale.ingest_cohort(pd.DataFrame(rows), tmp_path / "cohort", scheduler="threads",
                                        progress=False)
    ds = spatialscale.latent_factors(cohort, model="vae", n_latent=3, max_epochs=30, dispersion="gene-batch",
                                     spatial_loss="icar", client=client, progress=False)
    sizes = [cohort.store(s).n_observed for s in cohort.section_ids]
    assert ds.sizes["spot"] == sum(sizes) and list(np.unique(ds["section"].values)) == ["s0", "s1"]
    assert ds["dispersion"].shape == (2, 60)  # one per batch (section) and gene
    prov = json.loads(ds.attrs["provenance"])
    assert prov["sections"] == ["s0", "s1"] and prov["options"]["spatial_loss"] == "icar"
    for sid, n in zip(cohort.section_ids, sizes):
        values, _, p = cohort.store(sid).covariate_set("latent")
        assert values.shape == (n, 3) and p["fingerprint"] == prov["fingerprint"]
        np.testing.assert_array_equal(values.to_numpy(), ds["latent"].values[ds["section"].values == sid])
    du = spatialscale.du_test(cohort, "latent", method="hsic", progress=False, scheduler="threads")
    assert set(du["covariate"].values) == {"latent_1", "latent_2", "latent_3"}
    # again: reused in every section, not retrained
    again = spatialscale.latent_factors(cohort, model="vae", n_latent=3, max_epochs=30, dispersion="gene-batch",
                                        spatial_loss="icar", progress=False)
    assert again.attrs["reused"] == 1
