"""3-D spot coordinates (serial sections, 3-D data): graphs, every prior's kernel, the tests, cohorts and the CLI."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.sparse as sp

import spatialscale
from spatialscale import kernel as K
from spatialscale import priors as P
from spatialscale.errors import InputError
from spatialscale.simulate import simulate_section, simulate_stack

#: (prior, row_scale) pairs: car and icar need symmetric weights.
PRIORS = [("splisosm", False), ("car", False), ("icar", False), ("sar", False), ("sar", True), ("isar", False),
          ("sma", False), ("sma", True)]


def _points(n: int, seed: int) -> np.ndarray:
    """Distinct random 3-D points (float32-exact, so the graph's rounding changes nothing)."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0, [8.0, 6.0, 3.0], (n, 3)).astype(np.float32).astype(np.float64)


def _mutual_knn_dense(x: np.ndarray, k: int) -> np.ndarray:
    """Mutual kNN graph from scikit-learn's neighbour lists; a spot without edges gets a self loop."""
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(x).kneighbors(x, return_distance=False)
    n = len(x)
    listed = np.zeros((n, n), dtype=bool)
    for i, row in enumerate(idx):
        listed[i, [j for j in row if j != i]] = True
    w = (listed & listed.T).astype(np.float64)
    lonely = w.sum(axis=1) == 0
    w[lonely, lonely] = 1.0
    return w


def _band_dense(x: np.ndarray, radius: float, bandwidth: float, scale_coords: bool) -> np.ndarray:
    """Gaussian distance band from its definition, on all pairs."""
    s = float(np.ptp(x, axis=0).max()) if scale_coords else 1.0
    d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
    w = np.where((d <= radius) & ~np.eye(len(x), dtype=bool), np.exp(-((d / s) ** 2) / (2 * bandwidth**2)), 0.0)
    lonely = w.sum(axis=1) == 0
    w[lonely, lonely] = 1.0
    return w


def _precision(w: np.ndarray, prior: str, rho: float, row_scale: bool) -> np.ndarray:
    """Each prior's precision written out from its formula (the 2-D tests' dense construction)."""
    from test_priors import _dense_precision

    return _dense_precision(w, prior, rho, row_scale)


def _unit_diagonal_cov(q: np.ndarray) -> np.ndarray:
    k = np.linalg.inv(q)
    s = 1.0 / np.sqrt(np.diag(k))
    return k * np.outer(s, s)


def _as_3d(adata, z: float = 7.0):
    out = adata.copy()
    out.obsm["spatial"] = np.c_[adata.obsm["spatial"], np.full(adata.n_obs, z)]
    return out


def _by_pattern(adata, pvalues) -> dict[str, np.ndarray]:
    pattern = adata.var.groupby("gene_symbol", observed=True)["pattern"].first()
    p = pvalues.to_series() if hasattr(pvalues, "to_series") else pvalues
    return {k: p.reindex(pattern.index[pattern == k]).dropna().to_numpy() for k in ("none", "z", "xyz", "du")}


# --------------------------------------------------------------------------- graphs and kernels
@pytest.mark.parametrize("k", [4, 6])
def test_knn_graph_in_3d_is_sklearns_mutual_graph(k):
    x = _points(300, seed=k)
    w = K.knn_adjacency(x, k)
    expected = _mutual_knn_dense(x, k)
    np.testing.assert_array_equal(w.toarray(), expected)
    assert sp.issparse(w) and (abs(w - w.T)).max() == 0
    # a stack of sections sharing one layout: the same graph as the definition
    stack = simulate_stack(3, 49, 2, n_z=0, n_xyz=0, geometry="random", z_spacing=0.7, seed=1).obsm["spatial"]
    np.testing.assert_array_equal(K.knn_adjacency(stack, k).toarray(), _mutual_knn_dense(stack, k))
    # Smoother's losses take 3-D coordinates to the same graph
    from spatialscale.losses import loss_weights

    lw, sizes = loss_weights(coords=x, k_neighbors=k)
    assert sizes == (300,)
    np.testing.assert_array_equal(lw.toarray(), expected)


@pytest.mark.parametrize("scale_coords", [True, False])
def test_distance_band_in_3d_matches_its_definition(scale_coords):
    x = _points(250, seed=3)
    radius, bandwidth = 1.5, (0.1 if scale_coords else 0.8)
    w = P.distance_weights(x, radius, bandwidth, scale_coords=scale_coords)
    np.testing.assert_allclose(w.toarray(), _band_dense(x, radius, bandwidth, scale_coords), rtol=1e-14, atol=0)


@pytest.mark.parametrize("weights", ["knn", "distance"])
@pytest.mark.parametrize(("prior", "row_scale"), PRIORS)
def test_kernel_from_3d_coordinates_is_the_dense_construction(weights, prior, row_scale):
    """Every prior on a 3-D graph: the kernel is the unit-diagonal inverse of the formula's precision."""
    x = _points(150, seed=11)
    w = _mutual_knn_dense(x, 4) if weights == "knn" else _band_dense(x, 1.8, 0.12, True)
    rho = 0.9 * min(P.rho_range(sp.csr_matrix(w), prior, row_scale=row_scale)[1], 1.0)
    extra = {"radius": 1.8, "bandwidth": 0.12} if weights == "distance" else {}
    kern = K.build_kernel(x, params=K.KernelParams(prior=prior, rho=rho, row_scale=row_scale, weights=weights,
                                                   **extra))
    np.testing.assert_allclose(kern.adjacency.toarray(), w, rtol=1e-14, atol=0)
    expected = _unit_diagonal_cov(_precision(w, prior, rho, row_scale))
    np.testing.assert_allclose(np.linalg.inv(kern.precision.toarray()), expected, rtol=0, atol=1e-9)
    h = np.eye(len(x)) - 1.0 / len(x)
    ev = np.linalg.eigvalsh(h @ expected @ h)
    ev = ev[ev > 1e-10]
    np.testing.assert_allclose(kern.power_sums, [np.sum(ev**r) for r in range(1, 5)], rtol=1e-9)


# --------------------------------------------------------------------------- a 2-D section given in 3-D
@pytest.mark.parametrize(("geometry", "options"), [
    ("grid", {}),
    ("hex", {"prior": "sar", "rho": 0.2, "row_scale": True}),
    ("random", {"prior": "icar", "rho": 0.9, "weights": "distance", "radius": 2.5, "bandwidth": 0.1}),
])
def test_constant_z_gives_exactly_the_2d_results(geometry, options):
    a = simulate_section(150, 12, n_sv=4, geometry=geometry, seed=3)
    two = spatialscale.sv_test(a, progress=False, ingest=options)
    three = spatialscale.sv_test(_as_3d(a), progress=False, ingest=options)
    np.testing.assert_array_equal(three["sv_statistic"].values, two["sv_statistic"].values)
    np.testing.assert_array_equal(three["sv_pvalue"].values, two["sv_pvalue"].values)


def test_constant_z_du_hsic_gp_equals_2d(tmp_path):
    """The GP of hsic-gp z-scores each axis: a constant z is a zero column, so the DU test is the 2-D one."""
    a = simulate_section(120, 10, n_sv=0, n_du=4, geometry="hex", seed=4)
    s2 = spatialscale.ingest(a, tmp_path / "two.zarr")
    s3 = spatialscale.ingest(_as_3d(a), tmp_path / "three.zarr")
    assert s3.coords().shape == (a.n_obs, 3)
    two = spatialscale.du_test(s2, ["celltype"], method="hsic-gp", gp={"backend": "lowrank"}, progress=False)
    three = spatialscale.du_test(s3, ["celltype"], method="hsic-gp", gp={"backend": "lowrank"}, progress=False)
    np.testing.assert_array_equal(three["du_pvalue"].values, two["du_pvalue"].values)


# --------------------------------------------------------------------------- a simulated stack
def test_stack_3d_test_finds_z_only_genes_and_stays_calibrated():
    """4 sections x 100 spots, 300 null genes, 30 genes varying along z only, 30 varying in 3-D."""
    a = simulate_stack(4, 100, 360, n_z=30, n_xyz=30, effect=0.6, seed=1)
    assert a.obsm["spatial"].shape == (400, 3) and np.unique(a.obsm["spatial"][:, 2]).size == 4
    p3 = _by_pattern(a, spatialscale.sv_test(a, progress=False)["sv_pvalue"])
    one = a[a.obs["section"] == "Z01"].copy()
    one.obsm["spatial"] = one.obsm["spatial"][:, :2]
    p2 = _by_pattern(one, spatialscale.sv_test(one, progress=False)["sv_pvalue"])
    null_rate = float(np.mean(p3["none"] < 0.05))
    power_z, power_xyz = float(np.mean(p3["z"] < 0.05)), float(np.mean(p3["xyz"] < 0.05))
    power_z_2d = float(np.mean(p2["z"] < 0.05))
    print(f"null p<0.05: {null_rate:.3f} of {p3['none'].size}; 3-D power z-only {power_z:.2f}, xyz {power_xyz:.2f}; "
          f"one 2-D section, z-only {power_z_2d:.2f}")
    assert p3["none"].size >= 300 and 0.02 <= null_rate <= 0.08
    assert power_z >= 0.5 and power_xyz >= 0.7
    assert power_z_2d <= 0.2  # constant within a section: invisible to a 2-D test of one section


def test_du_hsic_gp_on_a_stack():
    """The coordinate GP (exact basis at this size) residualises in 3-D; cell-type DU genes are found."""
    a = simulate_stack(3, 64, 30, n_z=0, n_xyz=0, n_du=10, effect=1.0, seed=2)
    ds = spatialscale.du_test(a, ["celltype"], method="hsic-gp", progress=False)
    p = _by_pattern(a, ds["du_pvalue"].to_pandas().iloc[:, 0])
    assert np.mean(p["du"] < 0.05) >= 0.8 and np.mean(p["none"] < 0.05) <= 0.15


def test_anndata_inputs_take_three_obs_columns():
    """sv_test given an AnnData and spatial_key=("x", "y", "z") equals the n x 3 obsm array; the GLMM fits in 3-D."""
    a = simulate_stack(2, 36, 6, n_z=2, n_xyz=2, seed=1)
    by_columns = spatialscale.sv_test(a, spatial_key=("x", "y", "z"), progress=False)
    by_obsm = spatialscale.sv_test(a, progress=False)
    np.testing.assert_array_equal(by_columns["sv_pvalue"].values, by_obsm["sv_pvalue"].values)
    fit = spatialscale.glmm_fit(a, model="glmm-full", progress=False)
    assert np.isfinite(fit["loss"].values).all()


# --------------------------------------------------------------------------- cohorts, refusals, the CLI
def test_cohort_of_3d_stacks(tmp_path):
    import anndata as ad

    blocks = [simulate_stack(2, 36, 6, n_z=2, n_xyz=2, seed=s) for s in (1, 2)]
    both = ad.concat(blocks, label="block", keys=["B1", "B2"], index_unique="-", merge="first")
    cohort = spatialscale.ingest_cohort(both, tmp_path / "lib", library_key="block", spatial_key=("x", "y", "z"),
                                        scheduler="threads", progress=False)
    assert cohort.section_ids == ["B1", "B2"]
    for sid, block in zip(cohort.section_ids, blocks):
        np.testing.assert_array_equal(cohort.store(sid).coords(), block.obsm["spatial"])
    for s, block in enumerate(blocks):
        block.write_h5ad(tmp_path / f"b{s}.h5ad")
    (tmp_path / "manifest.csv").write_text("section,path\nB1,b0.h5ad\nB2,b1.h5ad\n")
    files = spatialscale.ingest_cohort(tmp_path / "manifest.csv", tmp_path / "files", scheduler="threads",
                                       progress=False)
    sv = spatialscale.sv_test(files, progress=False, scheduler="threads")
    assert np.isfinite(sv["sv_pvalue"].values).any()


def test_bad_coordinate_shapes_are_one_line_errors(tmp_path):
    a = simulate_stack(2, 36, 4, n_z=1, n_xyz=1, seed=3)
    cases = [
        ({"spatial_key": "s4"}, "expected (72, 2) or (72, 3)"),
        ({"spatial_key": "s1"}, "1-D positions"),
        ({"spatial_key": ("x", "y", "z", "section")}, "two or three obs column names"),
        ({"spatial_key": "x,y,z", "kernel": "fft"}, "3-D coordinates (x, y, z) take kernel='car'"),
    ]
    a.obsm["s4"] = np.c_[a.obsm["spatial"], np.arange(a.n_obs)]
    a.obsm["s1"] = a.obsm["spatial"][:, :1]
    for options, message in cases:
        with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
            spatialscale.ingest(a, tmp_path / "s.zarr", **options)
        assert "\n" not in str(err.value)
    with pytest.raises(InputError, match="3-D coordinates"):
        spatialscale.ingest(a, tmp_path / "g.zarr", kernel="fft", grid_keys=("x", "y", "z"))
    assert not any(tmp_path.iterdir())


def test_plots_refuse_3d_stores(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    from spatialscale import pl

    a = simulate_stack(2, 36, 3, n_z=1, n_xyz=1, seed=4)
    store = spatialscale.ingest(a, tmp_path / "s.zarr")
    with pytest.raises(InputError, match="3-D coordinates; plots draw one 2-D section"):
        pl.isoform_ratios(store, store.genes.index[0], show=False)


def test_cli_ingest_3d_and_bad_input(tmp_path, capsys):
    from spatialscale.cli import main

    a = simulate_stack(2, 36, 4, n_z=1, n_xyz=1, seed=5)
    del a.obsm["spatial"]  # coordinates in obs columns x, y, z only
    a.write_h5ad(tmp_path / "in.h5ad")
    assert main(["ingest", str(tmp_path / "in.h5ad"), str(tmp_path / "ok.zarr"), "--spatial-key", "x,y,z",
                 "--no-progress"]) == 0
    store = spatialscale.open_store(tmp_path / "ok.zarr")
    np.testing.assert_array_equal(store.coords(), a.obs[["x", "y", "z"]].to_numpy())
    capsys.readouterr()

    a.obsm["four"] = np.c_[a.obs[["x", "y", "z"]].to_numpy(), np.arange(a.n_obs)]
    a.write_h5ad(tmp_path / "four.h5ad")
    b = a.copy()
    b.obs.loc[b.obs_names[3], "z"] = np.nan
    b.write_h5ad(tmp_path / "nan.h5ad")
    for name, key, message in [("four", "four", "expected (72, 2) or (72, 3)"),
                               ("nan", "x,y,z", "NaN or infinite coordinates")]:
        out = tmp_path / f"{name}.zarr"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rc = main(["ingest", str(tmp_path / f"{name}.h5ad"), str(out), "--spatial-key", key, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
