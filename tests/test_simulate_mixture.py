"""simulate_mixture: spots as smooth mixtures of cell types with type-dependent isoform usage."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial import cKDTree
from scipy.stats import chi2_contingency

from spatialscale.simulate import simulate_mixture, write_example


def knn_weights(xy: np.ndarray, k: int = 6) -> sp.csr_matrix:
    """Symmetric binary kNN graph."""
    _, idx = cKDTree(xy).query(xy, k + 1)
    n = len(xy)
    w = sp.csr_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), idx[:, 1:].ravel())), shape=(n, n))
    return ((w + w.T) > 0).astype(float).tocsr()


def gene_totals(adata) -> np.ndarray:
    """Spots x genes counts (genes in order of first appearance, as the reference)."""
    genes, codes = np.unique(adata.var["gene_symbol"].to_numpy(), return_inverse=True)
    agg = sp.csr_matrix((np.ones(adata.n_vars), (np.arange(adata.n_vars), codes)), shape=(adata.n_vars, len(genes)))
    return (adata.layers["counts"] @ agg).toarray()


def morans_i(x: np.ndarray, w: sp.csr_matrix) -> float:
    z = x - x.mean()
    return float(len(x) / w.sum() * (z @ (w @ z)) / (z @ z))


@pytest.fixture(scope="module")
def mixture():
    return simulate_mixture(900, 120, 4, seed=3)


def test_shapes_and_layout(mixture):
    adata, ref = mixture
    assert adata.n_obs == 900
    assert adata.var["gene_symbol"].nunique() == 120
    counts = adata.layers["counts"]
    assert sp.isspmatrix_csr(counts) and counts.dtype == np.int32 and counts.min() >= 0
    assert adata.var_names.is_unique
    per_gene = adata.var.groupby("gene_symbol").size()
    assert per_gene.between(2, 4).all()
    assert adata.obsm["spatial"].shape == (900, 2)
    props = adata.obsm["proportions"]
    assert list(props.columns) == ["type_1", "type_2", "type_3", "type_4"] == adata.uns["cell_types"]
    assert (props.index == adata.obs_names).all()
    assert np.allclose(props.to_numpy().sum(1), 1.0) and (props.to_numpy() > 0).all()
    assert list(adata.obs["celltype"].cat.categories) == list(props.columns)
    assert (adata.obs["celltype"].to_numpy() == props.columns[props.to_numpy().argmax(1)]).all()
    # the reference: types x genes, gene names of the adata, close to (not equal to) the true profiles' scale
    assert ref.shape == (4, 120)
    assert list(ref.obs_names) == list(props.columns)
    assert list(ref.var_names) == list(adata.var["gene_symbol"].unique())
    assert (ref.X >= 0).all() and np.isfinite(ref.X).all()
    # the spots' mean gene expression is the proportion-weighted reference (x size factor)
    gene_counts = gene_totals(adata)
    expected = props.to_numpy() @ ref.X * adata.obs["size_factor"].to_numpy()[:, None]
    rel = np.abs(gene_counts.sum(0) - expected.sum(0)) / expected.sum(0)
    assert np.median(rel) < 0.05, np.median(rel)


def test_proportions_spatially_smooth(mixture):
    adata, _ = mixture
    w = knn_weights(adata.obsm["spatial"])
    moran = [morans_i(adata.obsm["proportions"][c].to_numpy(), w) for c in adata.uns["cell_types"]]
    assert min(moran) > 0.5, moran
    # a shorter length scale is rougher
    rough, _ = simulate_mixture(900, 20, 4, smoothness=0.02, seed=3)
    moran_rough = [morans_i(rough.obsm["proportions"][c].to_numpy(), w) for c in rough.uns["cell_types"]]
    assert max(moran_rough) < min(moran), (moran_rough, moran)


def test_du_truth_fraction(mixture):
    adata, _ = mixture
    by_gene = adata.var.groupby("gene_symbol", observed=True)["du_truth"]
    assert (by_gene.nunique() == 1).all()
    assert by_gene.first().sum() == 24  # 0.2 x 120
    usage = adata.varm["type_usage"]
    spread = (usage.max(axis=1) - usage.min(axis=1)).groupby(adata.var["gene_symbol"]).max()
    du = by_gene.first()
    assert np.allclose(spread[~du], 0.0)
    assert (spread[du] > 0.05).all()
    assert np.allclose(usage.groupby(adata.var["gene_symbol"]).sum(), 1.0)


def test_usage_is_expression_weighted_mixture(mixture):
    """Null genes: the same ratios in spots of every dominant type; DU genes: the mixture of the types' usages."""
    adata, ref = mixture
    counts = adata.layers["counts"].toarray()
    props = adata.obsm["proportions"].to_numpy()
    usage = adata.varm["type_usage"].to_numpy()
    groups = adata.obs["celltype"].cat.codes.to_numpy()
    genes = adata.var["gene_symbol"].to_numpy()
    p_null, p_du, z_mix, z_dominant = [], [], [], []
    for g, gi in enumerate(ref.var_names):
        cols = np.flatnonzero(genes == gi)
        table = np.stack([counts[groups == t][:, cols].sum(0) for t in range(4)])
        pval = chi2_contingency(table[table.sum(1) > 0] + 0.5)[1]
        is_du = adata.var["du_truth"].iloc[cols[0]]
        (p_du if is_du else p_null).append(pval)
        if not is_du:
            continue
        # the spot's usage: expression-weighted mixture of the types' usages (the reference as the weights)
        weight = props * ref.X[:, g]
        spot_usage = weight @ usage[cols].T / weight.sum(1, keepdims=True)
        for t in range(4):  # pooled ratios of the spots a type dominates, as z-scores (multinomial given totals)
            c = counts[groups == t][:, cols]
            n = c.sum()
            predicted = (spot_usage[groups == t] * c.sum(1, keepdims=True)).sum(0) / n
            sd = np.sqrt(predicted * (1 - predicted) / n)
            z_mix.append(np.abs((c.sum(0) / n - predicted) / sd).max())
            z_dominant.append(np.abs((c.sum(0) / n - usage[cols, t]) / sd).max())
    p_null, p_du = np.array(p_null), np.array(p_du)
    assert (p_null < 0.01).mean() < 0.05, np.sort(p_null)[:10]
    assert (p_du < 0.01).mean() > 0.9, np.sort(p_du)[-10:]
    # the mixture explains the DU genes' ratios up to sampling noise; the dominant type's usage alone does not
    assert np.median(z_mix) < 2.0 and np.percentile(z_mix, 95) < 3.5, np.percentile(z_mix, [50, 95])
    assert np.median(z_dominant) > 5.0, np.median(z_dominant)


def test_reproducible_and_noise():
    a1, r1 = simulate_mixture(200, 30, 3, seed=7)
    a2, r2 = simulate_mixture(200, 30, 3, seed=7)
    a3, _ = simulate_mixture(200, 30, 3, seed=8)
    assert (a1.layers["counts"] != a2.layers["counts"]).nnz == 0
    assert np.array_equal(r1.X, r2.X)
    assert np.array_equal(a1.obsm["proportions"], a2.obsm["proportions"])
    assert not np.allclose(a1.obsm["proportions"], a3.obsm["proportions"])
    # overdispersion: noisy gene totals vary more around their means than Poisson ones
    ratios = []
    for noise in (0.0, 0.5):
        a, ref = simulate_mixture(400, 30, 3, noise=noise, depth=20.0, seed=1)
        tot = gene_totals(a)
        mu = a.obsm["proportions"].to_numpy() @ ref.X * a.obs["size_factor"].to_numpy()[:, None]
        ratios.append(float(np.mean((tot - mu) ** 2 / mu)))
    assert ratios[0] < 1.3 < 3.0 < ratios[1], ratios


def test_bad_arguments():
    with pytest.raises(ValueError, match="at least 2 cell types"):
        simulate_mixture(100, 10, 1)
    with pytest.raises(ValueError, match="du_fraction"):
        simulate_mixture(100, 10, 3, du_fraction=1.5)
    with pytest.raises(ValueError, match="noise"):
        simulate_mixture(100, 10, 3, noise=-1.0)


def test_ingests_into_a_store(mixture, tmp_path):
    import spatialscale

    adata, _ = mixture
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    assert store.n_spots == 900
    assert store.n_genes >= 110  # nearly every gene keeps two or more isoforms
    assert store.n_genes <= 120


def test_write_example_mixture(tmp_path):
    import anndata as ad

    out = write_example(tmp_path / "mix.h5ad", "mixture", n_spots=100, n_genes=20)
    assert out == tmp_path / "mix.h5ad"
    adata = ad.read_h5ad(out)
    ref = ad.read_h5ad(tmp_path / "mix.reference.h5ad")
    assert adata.n_obs == 100 and ref.shape == (4, 20)
    assert np.allclose(adata.obsm["proportions"].to_numpy().sum(1), 1.0)
    assert adata.var["du_truth"].dtype == bool
