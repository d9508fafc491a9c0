"""spatialscale.pl: figure contents (artists and their data), not pixels."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from conftest import make_adata
from scipy import stats

import spatialscale
from spatialscale import InputError, pl
from spatialscale.results import make_dataset

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")

CHI2_MEDIAN = 0.454936423119572  # chi2(1).ppf(0.5)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def points(tmp_path_factory):
    """A small point store (some spots without counts of each gene) and the AnnData it came from."""
    adata = make_adata(n=120, n_genes=4, zero_spots=0.25, seed=3)
    return adata, spatialscale.ingest(adata, tmp_path_factory.mktemp("pl") / "points.zarr")


@pytest.fixture(scope="module")
def raster(tmp_path_factory):
    from spatialscale.simulate import simulate_raster

    adata = simulate_raster((10, 14), 3, n_sv=1, mean_depth=1.5, seed=4)
    return adata, spatialscale.ingest(adata, tmp_path_factory.mktemp("pl") / "raster.zarr", kernel="fft",
                                      min_counts=1)


@pytest.fixture(scope="module")
def cohort_sv(tmp_path_factory):
    """SV results of a real three-section cohort run with group_by."""
    from spatialscale.simulate import simulate_cohort

    root = tmp_path_factory.mktemp("pl-cohort")
    manifest, _ = simulate_cohort(root / "in", n_sections=3, n_genes=12, n_shared=3, n_specific=2, spots=(80, 120),
                                  effect=1.0, seed=1)
    table = pd.read_csv(manifest)
    table["condition"] = ["a", "b", "a"]
    table.to_csv(manifest, index=False)
    cohort = spatialscale.ingest_cohort(manifest, root / "cohort", scheduler="threads", progress=False)
    return spatialscale.sv_test(cohort, group_by="condition", scheduler="threads", progress=False)


def _collection(ax, gid):
    found = [c for c in ax.collections if c.get_gid() == gid]
    assert len(found) == 1, [c.get_gid() for c in ax.collections]
    return found[0]


def _lines(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def _bh(p):
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


# --------------------------------------------------------------------------- isoform ratios
def test_isoform_ratios_of_points_are_the_counts_over_the_gene_total(points):
    adata, store = points
    gene = store.genes["n_isoforms"].idxmax()
    names = list(store.isoforms.index[store.isoforms["gene"] == gene])
    assert len(names) >= 3
    counts = sp.csr_matrix(adata.layers["counts"])[:, adata.var_names.get_indexer(names)].toarray().astype(float)
    counts = counts[adata.obs_names.get_indexer(store.obs().index)]
    xy = adata.obsm["spatial"][adata.obs_names.get_indexer(store.obs().index)]
    total = counts.sum(1)
    covered = total > 0
    assert 0 < (~covered).sum() < len(total)  # some spots without counts: missing ones are drawn apart

    axes = pl.isoform_ratios(store, gene)
    assert isinstance(axes, np.ndarray) and axes.shape == (len(names),)
    assert [ax.get_title() for ax in axes] == names
    for k, ax in enumerate(axes):
        ratio = _collection(ax, "ratio")
        np.testing.assert_array_equal(ratio.get_offsets(), xy[covered])
        np.testing.assert_allclose(ratio.get_array(), counts[covered, k] / total[covered], rtol=1e-12)
        assert (ratio.norm.vmin, ratio.norm.vmax) == (0.0, 1.0)
        np.testing.assert_array_equal(_collection(ax, "no counts").get_offsets(), xy[~covered])
    figure = axes[0].figure
    colorbars = [a for a in figure.axes if a not in list(axes)]
    assert len(colorbars) == 1 and colorbars[0].get_ylim() == (0.0, 1.0)  # one shared colour scale


def test_isoform_ratios_of_an_anndata_equal_those_of_its_store(points, tmp_path, monkeypatch):
    """An AnnData is ingested into a temporary store (removed afterwards) and drawn the same."""
    adata, store = points
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    gene = store.genes.index[0]
    a = adata.copy()
    a.X = a.layers["counts"]
    del a.layers["counts"]
    want = [_collection(ax, "ratio").get_array() for ax in pl.isoform_ratios(store, gene)]
    got = [_collection(ax, "ratio").get_array() for ax in pl.isoform_ratios(a, gene, ingest={"layer": "X"})]
    assert len(got) == len(want) >= 2
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert list(tmp_path.iterdir()) == []


def test_isoform_ratios_of_a_raster_are_an_image_of_its_grid(raster):
    adata, store = raster
    gene = store.genes.index[0]
    names = list(store.isoforms.index[store.isoforms["gene"] == gene])
    ny, nx = int(adata.obs["array_row"].max()) + 1, int(adata.obs["array_col"].max()) + 1
    counts = np.zeros((ny, nx, len(names)))
    cols = adata.var_names.get_indexer(names)
    counts[adata.obs["array_row"], adata.obs["array_col"]] = sp.csr_matrix(adata.layers["counts"])[:, cols].toarray()
    observed = np.zeros((ny, nx), bool)
    observed[adata.obs["array_row"], adata.obs["array_col"]] = True
    total = counts.sum(-1)
    covered = total > 0
    assert (observed & ~covered).any() and (~observed).any() and covered.any()

    axes = pl.isoform_ratios(store, gene, point_size=3)
    assert [ax.get_title() for ax in axes] == names
    for k, ax in enumerate(axes):
        (image,) = [im for im in ax.images if im.get_gid() == "ratio"]
        data = image.get_array()
        np.testing.assert_array_equal(np.ma.getmaskarray(data), ~covered)
        np.testing.assert_allclose(data[covered], counts[covered, k] / total[covered], rtol=1e-12)
        assert tuple(image.get_extent()) == (-0.5, nx - 0.5, -0.5, ny - 0.5)
        assert image.origin == "lower"  # row 0 at the bottom, as the store's coordinates (y = row)
        (empty,) = [im for im in ax.images if im.get_gid() == "no counts"]
        np.testing.assert_array_equal(~np.ma.getmaskarray(empty.get_array()), observed & ~covered)


def test_isoform_ratios_draw_on_given_axes_and_subsets(points, tmp_path):
    _, store = points
    gene = store.genes["n_isoforms"].idxmax()
    names = list(store.isoforms.index[store.isoforms["gene"] == gene])
    fig, given = plt.subplots(1, 2)
    axes = pl.isoform_ratios(str(store.path), gene, isoforms=[names[-1], 0], axes=given, missing_color=None,
                             colorbar=False)
    assert list(axes) == list(given) and [ax.get_title() for ax in axes] == [names[-1], names[0]]
    assert all([c.get_gid() for c in ax.collections] == ["ratio"] for ax in axes)  # missing spots left out
    assert len(fig.axes) == 2  # no colorbar
    _, one = plt.subplots()
    assert list(pl.isoform_ratios(store, gene, isoforms=names[1], ax=one)) == [one]
    with pytest.raises(InputError, match=r"2 isoform panel\(s\) need 2 Axes; got 1"):
        pl.isoform_ratios(store, gene, isoforms=[0, 1], ax=one)
    with pytest.raises(InputError, match="has no isoform 'nope'"):
        pl.isoform_ratios(store, gene, isoforms=["nope"])
    with pytest.raises(InputError, match="ax= or axes="):
        pl.isoform_ratios(store, gene, ax=one, axes=[one])


def test_isoform_ratios_of_an_unknown_gene_names_close_matches(points):
    _, store = points
    known = str(store.genes.index[0])
    with pytest.raises(InputError, match=rf"gene '{known[:-2]}' is not in the store .*Close matches: \[.*'{known}'"):
        pl.isoform_ratios(store, known[:-2])
    with pytest.raises(InputError, match="'zzz' is not in the store") as info:
        pl.isoform_ratios(store, "zzz")
    assert "Close matches" not in str(info.value)


# --------------------------------------------------------------------------- inflation and QQ
def test_inflation_factor():
    n = 2001
    uniform = (np.arange(1, n + 1) - 0.5) / n
    assert pl.inflation(uniform) == pytest.approx(1.0, abs=1e-12)
    inflated = stats.chi2.sf(1.5 * stats.chi2.isf(uniform, 1), 1)  # every chi-square quantile x 1.5
    assert pl.inflation(inflated) == pytest.approx(1.5, rel=1e-9)
    # by hand: the median p-value is 0.05, whose chi2(1) quantile is 3.841458820694124
    assert pl.inflation([0.05, 0.01, 0.05, 0.5, 0.9, np.nan]) == pytest.approx(3.841458820694124 / CHI2_MEDIAN)
    assert np.isnan(pl.inflation([np.nan]))
    with pytest.raises(InputError, match="outside"):
        pl.inflation([0.2, 1.5])


def test_qq_of_sv_results_plots_sorted_p_against_uniform_quantiles():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=40) ** 2
    p[3], p[7] = np.nan, 0.0
    genes = [f"g{i}" for i in range(40)]
    ds = make_dataset(genes, {"sv_pvalue": p, "sv_statistic": rng.uniform(size=40)}, {})
    ax = pl.qq(ds)
    (line,) = _lines(ax, "qq")
    finite = np.sort(p[np.isfinite(p)])
    n = finite.size
    np.testing.assert_allclose(line.get_xdata(), -np.log10((np.arange(1, n + 1) - 0.5) / n))
    observed = -np.log10(np.where(finite > 0, finite, finite[finite > 0].min()))  # p = 0 at the smallest p
    np.testing.assert_allclose(line.get_ydata(), observed)
    lam = np.median(stats.chi2.isf(finite, 1)) / CHI2_MEDIAN
    assert lam > 1.2 and f"{lam:.3f}" in ax.get_title() and "sv_pvalue" in ax.get_title()
    (identity,) = _lines(ax, "identity")
    top = max(line.get_xdata().max(), line.get_ydata().max())
    np.testing.assert_allclose(identity.get_xydata(), [[0, 0], [top, top]])


def test_qq_draws_a_series_per_covariate_or_section(cohort_sv):
    rng = np.random.default_rng(1)
    p = np.c_[rng.uniform(size=30), rng.uniform(size=30) ** 3]
    du = make_dataset([f"g{i}" for i in range(30)], {"du_pvalue": p}, {}, covariates=["a", "b"])
    _, ax = plt.subplots()
    assert pl.qq(du, ax=ax) is ax
    lines = _lines(ax, "qq")
    assert len(lines) == 2
    for line, col in zip(lines, p.T):
        np.testing.assert_allclose(line.get_ydata(), -np.log10(np.sort(col)))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{c} ($\\lambda_{{GC}}$ = {pl.inflation(col):.3f})" for c, col in zip("ab", p.T)]
    (only_b,) = _lines(pl.qq(du, covariate="b"), "qq")
    np.testing.assert_allclose(only_b.get_ydata(), -np.log10(np.sort(p[:, 1])))
    # cohort results: the combined p-values by default, one series per section on request
    (combined,) = _lines(pl.qq(cohort_sv), "qq")
    np.testing.assert_allclose(combined.get_ydata(), -np.log10(np.sort(cohort_sv["combined_pvalue"].values)))
    per = _lines(pl.qq(cohort_sv, variable="sv_pvalue"), "qq")
    assert len(per) == 3
    np.testing.assert_allclose(per[1].get_ydata(), -np.log10(np.sort(cohort_sv["sv_pvalue"].sel(section="S02"))))
    with pytest.raises(InputError, match="covariate \\['c'\\] not in the results"):
        pl.qq(du, covariate="c")
    with pytest.raises(InputError, match="none of"):
        pl.qq(make_dataset(["g"], {"n_isoforms": [2]}, {}))


# --------------------------------------------------------------------------- volcano
def _sv_results(n=60, with_adj=True, seed=2):
    rng = np.random.default_rng(seed)
    p = np.r_[rng.uniform(0, 1e-4, 8), rng.uniform(size=n - 8)]
    p[10] = np.nan
    data = {"sv_pvalue": p, "sv_statistic": rng.uniform(size=n)}
    if with_adj:
        data["sv_pvalue_adj"] = _bh(p)
    return make_dataset([f"g{i:02d}" for i in range(n)], data, {}), p, data["sv_statistic"]


@pytest.mark.parametrize("with_adj", [True, False])
def test_volcano_highlights_the_significant_genes(with_adj):
    ds, p, stat = _sv_results(with_adj=with_adj)
    sig = np.nan_to_num(_bh(p), nan=1.0) < 0.05
    assert 8 <= sig.sum() < 50
    ax = pl.volcano(ds, label_top=3)
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(), np.c_[stat[sig], -np.log10(p[sig])])
    rest = ~sig & np.isfinite(p)
    np.testing.assert_allclose(_collection(ax, "not significant").get_offsets(), np.c_[stat[rest], -np.log10(p[rest])])
    top3 = [f"g{i:02d}" for i in np.argsort(np.where(np.isfinite(p), p, np.inf))[:3]]
    assert [t.get_text() for t in ax.texts] == top3
    assert ax.get_xlabel() == "sv_statistic"
    strict = pl.volcano(ds, alpha=1e-5)
    assert len(_collection(strict, "significant").get_offsets()) == int((np.nan_to_num(_bh(p), nan=1) < 1e-5).sum())


def test_volcano_of_du_results_uses_the_largest_coefficient_when_beta_is_there():
    rng = np.random.default_rng(3)
    genes, n = [f"g{i}" for i in range(20)], 20
    p = rng.uniform(size=(n, 2)) ** 4
    beta = rng.normal(size=(n, 2, 3))
    beta[::2, :, 2] = np.nan  # genes with two isoforms: one contrast
    stat = rng.uniform(size=(n, 2))
    ds = make_dataset(genes, {"du_pvalue": p, "du_statistic": stat}, {}, covariates=["x", "y"])
    with pytest.raises(InputError, match=r"one covariate; pass covariate= one of \['x', 'y'\]"):
        pl.volcano(ds)
    ax = pl.volcano(ds, covariate="y")
    sig = _bh(p[:, 1]) < 0.05
    assert 0 < sig.sum() < n
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(), np.c_[stat[sig, 1], -np.log10(p[sig, 1])])
    with_beta = ds.assign(beta=(("gene", "covariate", "contrast"), beta))
    ax = pl.volcano(with_beta, covariate="y")
    b = beta[:, 1]
    largest = b[np.arange(n), np.nanargmax(np.abs(b), axis=1)]  # signed
    assert (largest < 0).any() and (largest > 0).any()
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets()[:, 0], largest[sig])
    assert ax.get_xlabel().startswith("beta")
    ax = pl.volcano(with_beta, covariate="y", x="du_statistic")
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets()[:, 0], stat[sig, 1])


def test_volcano_of_cohort_results(cohort_sv):
    ds = cohort_sv
    ax = pl.volcano(ds)
    comb, adj = ds["combined_pvalue"].values, ds["combined_pvalue_adj"].values
    sig = adj < 0.05
    assert 0 < sig.sum() < ds.sizes["gene"]
    median = np.median(ds["sv_statistic"].transpose("gene", "section").values, axis=1)
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(), np.c_[median[sig], -np.log10(comb[sig])])
    ax = pl.volcano(ds, section="S03")
    one = ds.sel(section="S03")
    sig = one["sv_pvalue_adj"].values < 0.05
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(),
                               np.c_[one["sv_statistic"].values[sig], -np.log10(one["sv_pvalue"].values[sig])])
    with pytest.raises(InputError, match="no section dimension"):
        pl.volcano(_sv_results()[0], section="S01")


# --------------------------------------------------------------------------- cohorts
def test_sections_plots_best_single_section_against_combined(cohort_sv):
    ds = cohort_sv.copy(deep=True)
    ds["sv_pvalue"].loc[{"section": "S01", "gene": "gene0000"}] = np.nan  # not tested in one section
    per = ds["sv_pvalue"].transpose("gene", "section").values
    best = np.nanmin(per, axis=1)
    comb = ds["combined_pvalue"].values
    sig = ds["combined_pvalue_adj"].values < 0.05
    assert best[0] == np.nanmin(per[0, 1:]) and 0 < sig.sum() < len(sig)
    ax = pl.sections(ds)
    np.testing.assert_allclose(_collection(ax, "highlighted").get_offsets(),
                               np.c_[-np.log10(best[sig]), -np.log10(comb[sig])])
    np.testing.assert_allclose(_collection(ax, "other").get_offsets(),
                               np.c_[-np.log10(best[~sig]), -np.log10(comb[~sig])])
    assert len(_lines(ax, "identity")) == 1 and "cauchy" in ax.get_ylabel()
    chosen = ["gene0003", "gene0007", "not-a-gene"]
    ax = pl.sections(ds, highlight=chosen, highlight_label="truth")
    mark = np.isin(ds["gene"].values, chosen)
    np.testing.assert_allclose(_collection(ax, "highlighted").get_offsets()[:, 1], -np.log10(comb[mark]))
    assert "truth (2)" in [t.get_text() for t in ax.get_legend().get_texts()]
    # one group: its combined p-values against its own sections (S01 and S03 are condition a)
    ax = pl.sections(ds, group="a")
    best_a = np.nanmin(ds["sv_pvalue"].sel(section=["S01", "S03"]).transpose("gene", "section").values, axis=1)
    comb_a = ds["group_combined_pvalue"].sel(group="a").values
    sig_a = ds["group_combined_pvalue_adj"].sel(group="a").values < 0.05
    np.testing.assert_allclose(_collection(ax, "highlighted").get_offsets(),
                               np.c_[-np.log10(best_a[sig_a]), -np.log10(comb_a[sig_a])])
    with pytest.raises(InputError, match="cohort results"):
        pl.sections(_sv_results()[0])


def test_section_counts_are_the_genes_found_per_section_and_combined(cohort_sv):
    ds = cohort_sv
    genes = ["gene0001", "gene0004", "gene0005", "gene0009", "gene0011"]
    ax = pl.section_counts(ds, genes=genes, groups=True)
    adj = ds["sv_pvalue_adj"].sel(gene=genes)
    expected = [int((adj.sel(section=s) < 0.05).sum()) for s in ("S01", "S02", "S03")]
    expected.append(int((ds["combined_pvalue_adj"].sel(gene=genes) < 0.05).sum()))
    expected += [int((ds["group_combined_pvalue_adj"].sel(group=g, gene=genes) < 0.05).sum()) for g in "ab"]
    assert sum(expected) > 0
    assert [patch.get_height() for patch in ax.patches] == expected
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S01", "S02", "S03", "combined", "combined: a",
                                                            "combined: b"]
    assert "(of 5)" in ax.get_ylabel()
    everything = pl.section_counts(ds)
    assert everything.patches[3].get_height() == int((ds["combined_pvalue_adj"] < 0.05).sum())
    assert len(everything.patches) == 4


# --------------------------------------------------------------------------- matplotlib is optional
def test_without_matplotlib_the_plots_say_how_to_install_it(monkeypatch, points):
    for name in ("matplotlib", "matplotlib.pyplot", "matplotlib.colors"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r"pip install spatialscale\[plot\]"):
        pl.qq(np.array([0.1, 0.5]))
    with pytest.raises(ImportError, match=r"pip install spatialscale\[plot\]"):
        pl.isoform_ratios(points[1], points[1].genes.index[0])


def test_the_module_imports_without_importing_matplotlib():
    code = ("import sys; import spatialscale; import spatialscale.pl; from spatialscale import pl; "
            "assert abs(pl.inflation([0.5]) - 1) < 1e-12; assert 'matplotlib' not in sys.modules, 'imported'")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr


def test_cohort_plots_of_du_results_draw_one_covariate(cohort_sv):
    names = {"sv_pvalue": "du_pvalue", "sv_pvalue_adj": "du_pvalue_adj", "sv_statistic": "du_statistic"}
    du = cohort_sv[[*names, "combined_pvalue", "combined_pvalue_adj"]].rename(names)
    du = du.expand_dims(covariate=["c1", "c2"]).transpose("section", "gene", "covariate", ...).copy(deep=True)
    for name in ("du_pvalue", "du_pvalue_adj", "combined_pvalue", "combined_pvalue_adj"):
        du[name].loc[{"covariate": "c1"}] = 1.0  # c1: nothing anywhere; c2: the SV results
    with pytest.raises(InputError, match="one covariate"):
        pl.sections(du)
    sv_ax, du_ax = pl.sections(cohort_sv), pl.sections(du, covariate="c2")
    for gid in ("highlighted", "other"):
        np.testing.assert_array_equal(_collection(du_ax, gid).get_offsets(), _collection(sv_ax, gid).get_offsets())
    assert [patch.get_height() for patch in pl.section_counts(du, covariate="c1").patches] == [0, 0, 0, 0]
    assert ([patch.get_height() for patch in pl.section_counts(du, covariate="c2").patches]
            == [patch.get_height() for patch in pl.section_counts(cohort_sv).patches])
    ax = pl.volcano(du, covariate="c2", section="S02")
    one = cohort_sv.sel(section="S02")
    sig = one["sv_pvalue_adj"].values < 0.05
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(),
                               np.c_[one["sv_statistic"].values[sig], -np.log10(one["sv_pvalue"].values[sig])])
