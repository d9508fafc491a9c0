"""spatialscale.pl: figure contents (artists and their data), label layout, and pixels against baseline images.

The image tests render small figures (4 x 3 in at 72 dpi, matplotlib's default style and DejaVu Sans) and
compare them with the PNGs in tests/baseline_images/pl/ (RMS tolerance ``TOLERANCE``).  After an intended
change of a plot, regenerate the baselines and look at them before committing:

    SPATIALSCALE_UPDATE_BASELINES=1 python -m pytest -q tests/test_pl.py -k image
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import xarray as xr
from conftest import make_adata
from scipy import stats

import spatialscale
from spatialscale import InputError, pl
from spatialscale.results import make_dataset
from spatialscale.stats.combine import combine_pvalues

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
plt = pytest.importorskip("matplotlib.pyplot")
from matplotlib.testing import set_font_settings_for_testing  # noqa: E402
from matplotlib.testing.compare import compare_images  # noqa: E402
from matplotlib.text import Text  # noqa: E402

CHI2_MEDIAN = 0.454936423119572  # chi2(1).ppf(0.5)
BASELINES = Path(__file__).resolve().parent / "baseline_images" / "pl"
UPDATE = os.environ.get("SPATIALSCALE_UPDATE_BASELINES", "") not in ("", "0")
#: RMS difference (0-255 scale) allowed against a baseline: text rendered by another FreeType may differ a little
TOLERANCE = 3.0


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


def _bh(p):
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    out[ok] = stats.false_discovery_control(p[ok], method="bh")
    return out


def _cohort(n_genes: int = 12, seed: int = 1) -> xr.Dataset:
    """SV results of a three-section cohort run with group_by (built by hand, laid out as run_cohort's)."""
    rng = np.random.default_rng(seed)
    sections, genes = ["S01", "S02", "S03"], [f"gene{i:04d}" for i in range(n_genes)]
    p = rng.uniform(size=(3, n_genes))
    p[:, :3] = rng.uniform(1e-6, 1e-3, (3, 3))  # SV in every section
    p[0, 3], p[2, 4] = 1e-5, 2e-5  # in one section only
    stat = -np.log10(p) / 100 + rng.uniform(0, 0.005, p.shape)
    per = [make_dataset(genes, {"sv_pvalue": p[k], "sv_pvalue_adj": _bh(p[k]), "sv_statistic": stat[k],
                                "n_isoforms": np.full(n_genes, 3)}, {}).expand_dims(section=[s])
           for k, s in enumerate(sections)]
    ds = xr.concat(per, dim="section")
    comb = combine_pvalues(p.T, "cauchy")
    groups = {"a": [0, 2], "b": [1]}
    group_comb = np.stack([combine_pvalues(p[cols].T, "cauchy") for cols in groups.values()])
    ds["combined_pvalue"] = ("gene", comb)
    ds["combined_pvalue_adj"] = ("gene", _bh(comb))
    ds["n_sections_tested"] = ("gene", np.full(n_genes, 3))
    ds["group_combined_pvalue"] = (("group", "gene"), group_comb)
    ds["group_combined_pvalue_adj"] = (("group", "gene"), np.stack([_bh(g) for g in group_comb]))
    ds = ds.assign_coords(group=("group", list(groups)), condition=("section", ["a", "b", "a"]))
    ds.attrs.update({"test": "spatial_variability", "method": "hsic-ir", "combine": "cauchy", "n_sections": 3,
                     "group_by": "condition"})
    return ds


@pytest.fixture(scope="module")
def cohort_sv():
    return _cohort()


def _collection(ax, gid):
    found = [c for c in ax.collections if c.get_gid() == gid]
    assert len(found) == 1, [c.get_gid() for c in ax.collections]
    return found[0]


def _lines(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def _texts(ax, gid):
    return [t for t in ax.texts if t.get_gid() == gid]


def _overlaps(a, b) -> bool:
    """Whether two boxes (x0, y0, x1, y1) share an area (touching is not overlapping)."""
    return min(a[2], b[2]) - max(a[0], b[0]) > 1e-6 and min(a[3], b[3]) - max(a[1], b[1]) > 1e-6


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
    """An AnnData is ingested into a temporary store and drawn the same."""
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
    # only spatialscale's own temporary folder (removed when the run ends, or kept for reuse until exit)
    assert all(p.name.startswith("spatialscale-") for p in tmp_path.iterdir())


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
    ds = make_dataset(genes, {"sv_pvalue": p, "sv_statistic": rng.uniform(size=40)},
                      {"test": "spatial_variability", "method": "hsic-ir"})
    ax = pl.qq(ds, show=False)
    (line,) = _lines(ax, "qq")
    finite = np.sort(p[np.isfinite(p)])
    n = finite.size
    np.testing.assert_allclose(line.get_xdata(), -np.log10((np.arange(1, n + 1) - 0.5) / n))
    observed = -np.log10(np.where(finite > 0, finite, finite[finite > 0].min()))  # p = 0 at the smallest p
    np.testing.assert_allclose(line.get_ydata(), observed)
    lam = np.median(stats.chi2.isf(finite, 1)) / CHI2_MEDIAN
    assert lam > 1.2 and line.get_label() == f"$\\lambda_{{GC}}$ = {lam:.3f}"
    assert line.get_label() in [t.get_text() for t in ax.get_legend().get_texts()]
    assert ax.get_title() == "Spatial variability (HSIC-IR)"
    assert ax.get_xlabel() == r"Expected $-\log_{10}$ p-value"
    assert ax.get_ylabel() == r"Observed $-\log_{10}$ p-value"


def test_qq_identity_spans_the_expected_range_with_strong_hits():
    """Hits at p = 1e-300 stretch the y axis only: y = x and the x axis keep to the expected quantiles."""
    n = 200
    p = (np.arange(n) + 0.5) / n
    p[:5] = [1e-300, 1e-200, 1e-120, 1e-80, 1e-40]
    ax = pl.qq(p, show=False)
    (identity,) = _lines(ax, "identity")
    expected = -np.log10((np.arange(1, n + 1) - 0.5) / n)
    np.testing.assert_allclose(identity.get_xdata(), [expected.min(), expected.max()])
    np.testing.assert_allclose(identity.get_ydata(), [expected.min(), expected.max()])
    assert ax.get_xlim()[1] < 1.1 * expected.max()  # not stretched to the observed 300
    assert ax.get_ylim()[1] >= 300


def test_qq_band_is_the_beta_order_statistic_interval():
    n = 50
    expected, lower, upper = pl.qq_band(n, 0.9)
    i = np.arange(1, n + 1)
    np.testing.assert_allclose(expected, -np.log10((i - 0.5) / n))
    np.testing.assert_allclose(lower, -np.log10(stats.beta.ppf(0.95, i, n - i + 1)))
    np.testing.assert_allclose(upper, -np.log10(stats.beta.ppf(0.05, i, n - i + 1)))
    assert np.all(lower < expected) and np.all(expected < upper)
    # by hand: the smallest of n uniforms is Beta(1, n), whose q-quantile is 1 - (1 - q)^(1/n)
    assert upper[0] == pytest.approx(-np.log10(1 - 0.95 ** (1 / n)))
    # drawn: the shaded area between the bounds, at the expected quantiles
    p = (np.arange(n) + 0.5) / n
    ax = pl.qq(p, band=0.9, show=False)
    (band,) = [c for c in ax.collections if c.get_gid() == "band"]
    (path,) = band.get_paths()
    vertices = path.vertices
    for x, lo, hi in zip(expected, lower, upper):
        at = np.isclose(vertices[:, 0], x)
        np.testing.assert_allclose(np.sort(np.unique(vertices[at, 1])), [lo, hi])
    assert "90% band" in [t.get_text() for t in ax.get_legend().get_texts()]
    assert not [c for c in pl.qq(p, band=None, show=False).collections if c.get_gid() == "band"]
    with pytest.raises(InputError, match="between 0 and 1"):
        pl.qq_band(10, 95)


def test_qq_draws_a_series_per_covariate_or_section(cohort_sv):
    rng = np.random.default_rng(1)
    p = np.c_[rng.uniform(size=30), rng.uniform(size=30) ** 3]
    du = make_dataset([f"g{i}" for i in range(30)], {"du_pvalue": p}, {"test": "differential_usage",
                                                                       "method": "hsic-gp"}, covariates=["a", "b"])
    _, ax = plt.subplots()
    assert pl.qq(du, ax=ax) is ax
    lines = _lines(ax, "qq")
    assert len(lines) == 2
    for line, col in zip(lines, p.T):
        np.testing.assert_allclose(line.get_ydata(), -np.log10(np.sort(col)))
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["95% band"] + [f"{c} ($\\lambda_{{GC}}$ = {pl.inflation(col):.3f})" for c, col in zip("ab", p.T)]
    assert len([c for c in ax.collections if c.get_gid() == "band"]) == 1  # one band: both series have 30 genes
    assert ax.get_title() == "Differential usage (HSIC-GP)"
    only_b = pl.qq(du, covariate="b", show=False)
    (line,) = _lines(only_b, "qq")
    np.testing.assert_allclose(line.get_ydata(), -np.log10(np.sort(p[:, 1])))
    assert only_b.get_title() == "Differential usage vs b (HSIC-GP)"
    # cohort results: the combined p-values by default, one series per section or group on request
    ax = pl.qq(cohort_sv, show=False)
    (combined,) = _lines(ax, "qq")
    np.testing.assert_allclose(combined.get_ydata(), -np.log10(np.sort(cohort_sv["combined_pvalue"].values)))
    assert ax.get_title() == "Spatial variability (HSIC-IR)\n3 sections combined (Cauchy)"
    assert ax.get_ylabel() == r"Observed $-\log_{10}$ combined p-value (Cauchy)"
    per = _lines(pl.qq(cohort_sv, variable="sv_pvalue", show=False), "qq")
    assert len(per) == 3
    np.testing.assert_allclose(per[1].get_ydata(), -np.log10(np.sort(cohort_sv["sv_pvalue"].sel(section="S02"))))
    assert pl.qq(cohort_sv, variable="sv_pvalue", section="S02", show=False).get_title().endswith("\nsection S02")
    ax = pl.qq(cohort_sv, variable="group_combined_pvalue", show=False)
    assert [line.get_label().split(" (")[0] for line in _lines(ax, "qq")] == ["condition a", "condition b"]
    assert ax.get_title().endswith("sections combined per condition (Cauchy)")
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
    attrs = {"test": "spatial_variability", "method": "hsic-ir"}
    return make_dataset([f"g{i:02d}" for i in range(n)], data, attrs), p, data["sv_statistic"]


@pytest.mark.parametrize("with_adj", [True, False])
def test_volcano_highlights_the_significant_genes(with_adj):
    ds, p, stat = _sv_results(with_adj=with_adj)
    sig = np.nan_to_num(_bh(p), nan=1.0) < 0.05
    assert 8 <= sig.sum() < 50
    ax = pl.volcano(ds, label_top=3, show=False)
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(), np.c_[stat[sig], -np.log10(p[sig])])
    rest = ~sig & np.isfinite(p)
    np.testing.assert_allclose(_collection(ax, "not significant").get_offsets(), np.c_[stat[rest], -np.log10(p[rest])])
    top3 = [f"g{i:02d}" for i in np.argsort(np.where(np.isfinite(p), p, np.inf))[:3]]
    assert [t.get_text() for t in _texts(ax, "label")] == top3
    (threshold,) = _lines(ax, "threshold")
    assert threshold.get_ydata()[0] == pytest.approx(-np.log10(p[sig].max()))
    assert ax.get_title() == "Spatial variability (HSIC-IR)"
    assert ax.get_xlabel() == "HSIC statistic" and ax.get_ylabel() == r"$-\log_{10}$ p-value"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [f"Not significant ({int(rest.sum())})",
                                                                    f"FDR < 0.05 ({int(sig.sum())})"]
    strict = pl.volcano(ds, fdr=1e-5, show=False)
    assert len(_collection(strict, "significant").get_offsets()) == int((np.nan_to_num(_bh(p), nan=1) < 1e-5).sum())


def test_volcano_alpha_is_the_points_opacity_not_the_fdr():
    ds, p, _ = _sv_results()
    ax = pl.volcano(ds, alpha=0.3, show=False)
    assert _collection(ax, "significant").get_alpha() == 0.3
    assert _collection(ax, "not significant").get_alpha() == 0.3
    assert len(_collection(ax, "significant").get_offsets()) == int((np.nan_to_num(_bh(p), nan=1) < 0.05).sum())
    with pytest.raises(InputError, match="fdr must lie between 0 and 1"):
        pl.volcano(ds, fdr=5)


def test_volcano_labels_only_significant_genes_most_significant_first():
    ds, p, _ = _sv_results()
    sig = np.flatnonzero(np.nan_to_num(_bh(p), nan=1.0) < 0.05)
    ax = pl.volcano(ds, label_top=100, show=False)
    assert [t.get_text() for t in _texts(ax, "label")] == [f"g{i:02d}" for i in sig[np.argsort(p[sig])]]
    for text in _texts(ax, "label"):  # each label points at its gene
        i = int(text.get_text()[1:])
        assert text.xy == pytest.approx((ds["sv_statistic"].values[i], -np.log10(p[i])))


def test_volcano_of_du_results_uses_the_largest_coefficient_when_beta_is_there():
    rng = np.random.default_rng(3)
    genes, n = [f"g{i}" for i in range(20)], 20
    p = rng.uniform(size=(n, 2)) ** 4
    beta = rng.normal(size=(n, 2, 3))
    beta[::2, :, 2] = np.nan  # genes with two isoforms: one contrast
    stat = rng.uniform(size=(n, 2))
    ds = make_dataset(genes, {"du_pvalue": p, "du_statistic": stat}, {"test": "differential_usage",
                                                                      "method": "hsic-gp"}, covariates=["x", "y"])
    with pytest.raises(InputError, match=r"one covariate; pass covariate= one of \['x', 'y'\]"):
        pl.volcano(ds)
    ax = pl.volcano(ds, covariate="y", show=False)
    sig = _bh(p[:, 1]) < 0.05
    assert 0 < sig.sum() < n
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(), np.c_[stat[sig, 1], -np.log10(p[sig, 1])])
    assert ax.get_title() == "Differential usage vs y (HSIC-GP)" and ax.get_xlabel() == "HSIC statistic"
    with_beta = ds.assign(beta=(("gene", "covariate", "contrast"), beta))
    with_beta.attrs["method"] = "glmm-score"
    ax = pl.volcano(with_beta, covariate="y", show=False)
    b = beta[:, 1]
    largest = b[np.arange(n), np.nanargmax(np.abs(b), axis=1)]  # signed
    assert (largest < 0).any() and (largest > 0).any()
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets()[:, 0], largest[sig])
    assert ax.get_xlabel().startswith(r"Effect size $\beta$")
    assert ax.get_xlim()[0] == pytest.approx(-ax.get_xlim()[1]) and ax.get_xlim()[1] > np.abs(largest).max()
    assert ax.get_title() == "Differential usage vs y (GLMM score)"
    ax = pl.volcano(with_beta, covariate="y", x="du_statistic", show=False)
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets()[:, 0], stat[sig, 1])
    assert ax.get_xlabel() == "Score statistic"


def test_volcano_of_cohort_results(cohort_sv):
    ds = cohort_sv
    ax = pl.volcano(ds, show=False)
    comb, adj = ds["combined_pvalue"].values, ds["combined_pvalue_adj"].values
    sig = adj < 0.05
    assert 0 < sig.sum() < ds.sizes["gene"]
    median = np.median(ds["sv_statistic"].transpose("gene", "section").values, axis=1)
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(), np.c_[median[sig], -np.log10(comb[sig])])
    assert ax.get_xlabel() == "Median HSIC statistic over sections"
    assert ax.get_ylabel() == r"$-\log_{10}$ combined p-value (Cauchy)"
    ax = pl.volcano(ds, section="S03", show=False)
    one = ds.sel(section="S03")
    sig = one["sv_pvalue_adj"].values < 0.05
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(),
                               np.c_[one["sv_statistic"].values[sig], -np.log10(one["sv_pvalue"].values[sig])])
    assert ax.get_title() == "Spatial variability (HSIC-IR)\nsection S03"
    with pytest.raises(InputError, match="no section dimension"):
        pl.volcano(_sv_results()[0], section="S01")


# --------------------------------------------------------------------------- gene labels
def _boxes(centres, sizes):
    return np.c_[centres - sizes / 2, centres + sizes / 2]


@pytest.mark.parametrize("case", ["one point", "corner", "cluster", "row at the top"])
def test_repel_leaves_no_label_box_overlapping_another(case):
    rng = np.random.default_rng(7)
    n = {"one point": 8, "corner": 15, "cluster": 25, "row at the top": 12}[case]
    sizes = np.c_[rng.uniform(25, 55, n), np.full(n, 10.0)]
    anchors = {"one point": np.tile([[100.0, 100.0]], (n, 1)),
               "corner": np.c_[rng.uniform(285, 300, n), rng.uniform(190, 200, n)],
               "cluster": np.c_[rng.uniform(100, 120, n), rng.uniform(100, 120, n)],
               "row at the top": np.c_[np.linspace(10, 290, n), np.full(n, 199.0)]}[case]
    bounds = (0.0, 0.0, 300.0, 200.0)
    centres, placed = pl._repel(sizes, anchors, bounds, pad=1.0, point_radius=2.0)
    assert placed
    boxes = _boxes(centres, sizes)
    for a, b in itertools.combinations(boxes, 2):
        assert not _overlaps(a, b)
    assert (boxes[:, :2] >= -1e-9).all() and (boxes[:, 2] <= 300 + 1e-9).all() and (boxes[:, 3] <= 200 + 1e-9).all()
    for box in boxes:  # no label covers a labelled point
        assert not ((anchors > box[:2]) & (anchors < box[2:])).all(1).any()
    again, _ = pl._repel(sizes, anchors, bounds, pad=1.0, point_radius=2.0)
    np.testing.assert_array_equal(again, centres)  # deterministic


def test_repel_keeps_labels_that_do_not_collide_beside_their_points():
    sizes = np.array([[30.0, 10.0], [30.0, 10.0]])
    anchors = np.array([[10.0, 10.0], [10.0, 100.0]])
    centres, placed = pl._repel(sizes, anchors, (0, 0, 200, 200), gap=4.0, pad=2.0)
    assert placed
    np.testing.assert_allclose(centres, anchors + [4.0 + 16.0, 0.0])  # gap + half width (with half the pad)


def test_volcano_labels_do_not_overlap_after_layout():
    """Twelve significant genes in a tight clump: their labels are pushed apart, with leader lines."""
    n = 80
    p = np.r_[10 ** -np.linspace(8.0, 8.4, 12), np.linspace(0.05, 1, n - 12)]
    stat = np.r_[np.linspace(0.50, 0.52, 12), np.linspace(0, 0.3, n - 12)]
    ds = make_dataset([f"GENE{i:03d}" for i in range(n)], {"sv_pvalue": p, "sv_statistic": stat},
                      {"test": "spatial_variability", "method": "hsic-ir"})
    fig, ax = plt.subplots(figsize=(4, 3), dpi=72)
    pl.volcano(ds, label_top=12, ax=ax)
    fig.canvas.draw()
    labels = _texts(ax, "label")
    assert len(labels) == 12
    boxes = [Text.get_window_extent(t).extents for t in labels]  # the text, not its leader line
    for a, b in itertools.combinations(boxes, 2):
        assert not _overlaps(a, b)
    frame = ax.get_window_extent().extents
    assert all(b[0] >= frame[0] - 0.5 and b[2] <= frame[2] + 0.5 and b[1] >= frame[1] - 0.5 and b[3] <= frame[3] + 0.5
               for b in boxes)
    assert any(t.arrow_patch is not None for t in labels)  # moved labels have leader lines
    # placed in points from their genes, with room for hinted text: apart at other resolutions too
    for dpi in (100, 300):
        fig.set_dpi(dpi)
        fig.canvas.draw()
        for a, b in itertools.combinations([Text.get_window_extent(t).extents for t in labels], 2):
            assert not _overlaps(a, b), dpi


# --------------------------------------------------------------------------- cohorts
def test_sections_plots_best_single_section_against_combined(cohort_sv):
    ds = cohort_sv.copy(deep=True)
    ds["sv_pvalue"].loc[{"section": "S01", "gene": "gene0000"}] = np.nan  # not tested in one section
    per = ds["sv_pvalue"].transpose("gene", "section").values
    best = np.nanmin(per, axis=1)
    comb = ds["combined_pvalue"].values
    sig = ds["combined_pvalue_adj"].values < 0.05
    assert best[0] == np.nanmin(per[0, 1:]) and 0 < sig.sum() < len(sig)
    ax = pl.sections(ds, show=False)
    np.testing.assert_allclose(_collection(ax, "highlighted").get_offsets(),
                               np.c_[-np.log10(best[sig]), -np.log10(comb[sig])])
    np.testing.assert_allclose(_collection(ax, "other").get_offsets(),
                               np.c_[-np.log10(best[~sig]), -np.log10(comb[~sig])])
    assert len(_lines(ax, "identity")) == 1 and "(Cauchy)" in ax.get_ylabel()
    assert ax.get_title() == "Spatial variability (HSIC-IR)\n3 sections combined (Cauchy)"
    assert ax.get_xlabel() == r"Best single-section $-\log_{10}$ p-value"
    chosen = ["gene0003", "gene0007", "not-a-gene"]
    ax = pl.sections(ds, highlight=chosen, highlight_label="truth", show=False)
    mark = np.isin(ds["gene"].values, chosen)
    np.testing.assert_allclose(_collection(ax, "highlighted").get_offsets()[:, 1], -np.log10(comb[mark]))
    assert "truth (2)" in [t.get_text() for t in ax.get_legend().get_texts()]
    # one group: its combined p-values against its own sections (S01 and S03 are condition a)
    ax = pl.sections(ds, group="a", show=False)
    best_a = np.nanmin(ds["sv_pvalue"].sel(section=["S01", "S03"]).transpose("gene", "section").values, axis=1)
    comb_a = ds["group_combined_pvalue"].sel(group="a").values
    sig_a = ds["group_combined_pvalue_adj"].sel(group="a").values < 0.05
    np.testing.assert_allclose(_collection(ax, "highlighted").get_offsets(),
                               np.c_[-np.log10(best_a[sig_a]), -np.log10(comb_a[sig_a])])
    assert ax.get_title().endswith("\ncondition a: 2 sections combined (Cauchy)")
    ax = pl.sections(ds, fdr=1e-12, alpha=0.5, show=False)  # alpha: the points' opacity
    assert len(_collection(ax, "highlighted").get_offsets()) == 0 and _collection(ax, "other").get_alpha() == 0.5
    with pytest.raises(InputError, match="cohort results"):
        pl.sections(_sv_results()[0])


def test_section_counts_are_the_genes_found_per_section_and_combined(cohort_sv):
    ds = cohort_sv
    genes = ["gene0001", "gene0003", "gene0004", "gene0009", "gene0011"]
    ax = pl.section_counts(ds, genes=genes, groups=True, show=False)
    adj = ds["sv_pvalue_adj"].sel(gene=genes)
    expected = [int((adj.sel(section=s) < 0.05).sum()) for s in ("S01", "S02", "S03")]
    expected.append(int((ds["combined_pvalue_adj"].sel(gene=genes) < 0.05).sum()))
    expected += [int((ds["group_combined_pvalue_adj"].sel(group=g, gene=genes) < 0.05).sum()) for g in "ab"]
    assert sum(expected) > 0
    assert [patch.get_height() for patch in ax.patches] == expected
    assert [t.get_text() for t in ax.get_xticklabels()] == ["S01", "S02", "S03", "combined", "combined: condition a",
                                                            "combined: condition b"]
    assert [t.get_text() for t in ax.texts] == [str(v) for v in expected]  # each bar labelled with its count
    assert ax.get_ylabel() == "Genes at FDR < 0.05 (of 5)"
    everything = pl.section_counts(ds, show=False)
    assert everything.patches[3].get_height() == int((ds["combined_pvalue_adj"] < 0.05).sum())
    assert len(everything.patches) == 4
    loose = pl.section_counts(ds, fdr=0.5, alpha=0.4, show=False)  # alpha: the bars' opacity
    assert loose.patches[3].get_height() == int((ds["combined_pvalue_adj"] < 0.5).sum())
    assert loose.patches[0].get_alpha() == 0.4


def test_cohort_plots_of_du_results_draw_one_covariate(cohort_sv):
    names = {"sv_pvalue": "du_pvalue", "sv_pvalue_adj": "du_pvalue_adj", "sv_statistic": "du_statistic"}
    du = cohort_sv[[*names, "combined_pvalue", "combined_pvalue_adj"]].rename(names)
    du = du.expand_dims(covariate=["c1", "c2"]).transpose("section", "gene", "covariate", ...).copy(deep=True)
    du.attrs.update(test="differential_usage", method="t-fisher")
    for name in ("du_pvalue", "du_pvalue_adj", "combined_pvalue", "combined_pvalue_adj"):
        du[name].loc[{"covariate": "c1"}] = 1.0  # c1: nothing anywhere; c2: the SV results
    with pytest.raises(InputError, match="one covariate"):
        pl.sections(du)
    sv_ax, du_ax = pl.sections(cohort_sv, show=False), pl.sections(du, covariate="c2", show=False)
    for gid in ("highlighted", "other"):
        np.testing.assert_array_equal(_collection(du_ax, gid).get_offsets(), _collection(sv_ax, gid).get_offsets())
    assert du_ax.get_title() == "Differential usage vs c2 (t-test, Fisher)\n3 sections combined (Cauchy)"
    counts = pl.section_counts(du, covariate="c1", show=False)
    assert [patch.get_height() for patch in counts.patches] == [0, 0, 0, 0]
    assert counts.get_title().startswith("Differential usage vs c1 (t-test, Fisher)")
    assert ([patch.get_height() for patch in pl.section_counts(du, covariate="c2", show=False).patches]
            == [patch.get_height() for patch in pl.section_counts(cohort_sv, show=False).patches])
    ax = pl.volcano(du, covariate="c2", section="S02", show=False)
    one = cohort_sv.sel(section="S02")
    sig = one["sv_pvalue_adj"].values < 0.05
    np.testing.assert_allclose(_collection(ax, "significant").get_offsets(),
                               np.c_[one["sv_statistic"].values[sig], -np.log10(one["sv_pvalue"].values[sig])])
    assert ax.get_title() == "Differential usage vs c2 (t-test, Fisher)\nsection S02"
    assert ax.get_xlabel() == "Fisher statistic"


# --------------------------------------------------------------------------- nothing to draw
def test_plots_without_data_draw_a_message_and_warn(cohort_sv):
    nan = _sv_results()[0].assign(sv_pvalue=lambda d: d["sv_pvalue"] * np.nan)
    cases = {
        "No genes with finite p-values": [lambda: pl.qq(np.array([np.nan, np.nan]), show=False),
                                          lambda: pl.qq(nan, show=False),
                                          lambda: pl.volcano(nan, label_top=3, show=False),
                                          lambda: pl.sections(cohort_sv.assign(combined_pvalue=lambda d:
                                                                               d["combined_pvalue"] * np.nan),
                                                              show=False)],
        "No genes in the results": [lambda: pl.volcano(_sv_results()[0].isel(gene=slice(0, 0)), show=False),
                                    lambda: pl.section_counts(cohort_sv.isel(gene=slice(0, 0)), show=False)],
        "None of the given genes is in the results": [lambda: pl.section_counts(cohort_sv, genes=["x"], show=False)],
    }
    for message, plots in cases.items():
        for plot in plots:
            with pytest.warns(UserWarning, match=message):
                ax = plot()
            (text,) = _texts(ax, "message")
            assert text.get_text() == message
            assert not ax.collections and not ax.get_lines() and not ax.patches
            ax.figure.canvas.draw()  # and it draws
    # labels asked for, none significant: the points and a note
    ds, _, _ = _sv_results()
    with pytest.warns(UserWarning, match="No genes at FDR < 1e-12 to label"):
        ax = pl.volcano(ds, fdr=1e-12, label_top=5, show=False)
    assert len(_collection(ax, "not significant").get_offsets()) == 59 and not _texts(ax, "label")
    assert [t.get_text() for t in _texts(ax, "message")] == ["No genes at FDR < 1e-12 to label"]


# --------------------------------------------------------------------------- show, save, AnnData
def test_show_and_save_like_scanpy(tmp_path, monkeypatch):
    ds, _, _ = _sv_results()
    shown = []
    monkeypatch.setattr(plt, "show", lambda *a, **k: shown.append(True))
    # not interactive (Agg, scripts): nothing shown, the Axes returned
    assert not matplotlib.is_interactive()
    ax = pl.qq(ds)
    assert ax is not None and not shown
    # interactive: a new figure is shown (and None returned), a given Axes is not
    monkeypatch.setattr(matplotlib, "is_interactive", lambda: True)
    assert pl.volcano(ds) is None and shown == [True]
    _, given = plt.subplots()
    assert pl.volcano(ds, ax=given) is given and shown == [True]
    assert pl.qq(ds, show=False) is not None and shown == [True]
    assert pl.qq(ds, ax=given, show=True) is None and shown == [True, True]
    # save: the whole figure, format from the suffix
    for suffix, magic in ((".png", b"\x89PNG"), (".svg", b"<?xml")):
        path = tmp_path / f"volcano{suffix}"
        assert pl.volcano(ds, label_top=2, save=path, show=False) is not None
        assert path.read_bytes().startswith(magic)
    path = tmp_path / "sub-figure.png"
    fig, (a, b) = plt.subplots(1, 2)
    pl.qq(ds, ax=a, save=str(path))
    assert path.exists()


def test_key_picks_results_of_an_anndata(monkeypatch):
    """AnnData input goes through spatialscale.results.dataset_from_anndata with the key given."""
    ds, _, _ = _sv_results()
    calls = []

    def rebuild(adata, key=None):
        calls.append((adata, key))
        return ds

    monkeypatch.setattr(spatialscale.results, "dataset_from_anndata", rebuild, raising=False)

    class Annotated:  # anything with .uns and .var is taken for an AnnData
        uns: dict = {}
        var = None

    adata = Annotated()
    want = _collection(pl.volcano(ds, show=False), "significant").get_offsets()
    np.testing.assert_array_equal(_collection(pl.volcano(adata, key="sv", show=False), "significant").get_offsets(),
                                  want)
    pl.qq(adata, show=False)
    assert calls == [(adata, "sv"), (adata, None)]
    with pytest.raises(InputError, match="key= picks results stored in an AnnData"):
        pl.qq(ds, key="sv")


def _annotated(adata, ds, key):
    """``adata`` annotated with ``ds`` under ``key`` by spatialscale.to_anndata."""
    return spatialscale.to_anndata(ds, adata, key_added=key)


def test_plots_of_an_annotated_anndata_equal_those_of_its_results():
    adata = make_adata(n=30, n_genes=12, seed=5)
    genes = list(dict.fromkeys(adata.var["gene_symbol"]))
    rng = np.random.default_rng(4)
    p = np.r_[rng.uniform(0, 1e-4, 4), rng.uniform(size=len(genes) - 4)]
    sv = make_dataset(genes, {"sv_pvalue": p, "sv_pvalue_adj": _bh(p), "sv_statistic": rng.uniform(size=len(genes)),
                              "n_isoforms": np.full(len(genes), 2)},
                      {"test": "spatial_variability", "method": "hsic-ir", "gene_key": "gene_symbol"})
    annotated = _annotated(adata.copy(), sv, "sv")
    for plot in (pl.volcano, pl.qq):
        want, got = plot(sv, show=False), plot(annotated, show=False)
        assert got.get_title() == want.get_title()
        for a, b in zip(want.collections + want.get_lines(), got.collections + got.get_lines()):
            if hasattr(a, "get_offsets"):
                np.testing.assert_allclose(np.sort(b.get_offsets(), 0), np.sort(a.get_offsets(), 0))
            else:
                np.testing.assert_allclose(b.get_xydata(), a.get_xydata())
    du_p = np.c_[p[::-1], p]
    du = make_dataset(genes, {"du_pvalue": du_p, "du_pvalue_adj": _bh(du_p), "du_statistic": du_p * 0},
                      {"test": "differential_usage", "method": "hsic-gp", "gene_key": "gene_symbol"},
                      covariates=["region", "depth"])
    both = _annotated(annotated, du, "du")
    ax = pl.volcano(both, key="du", covariate="region", show=False)
    assert ax.get_title() == "Differential usage vs region (HSIC-GP)"
    with pytest.raises(InputError, match="du"):  # two results: key= must say which
        pl.qq(both)


# --------------------------------------------------------------------------- pixels
@pytest.fixture
def image_style():
    """Matplotlib's default style, DejaVu Sans as in matplotlib's own image tests, 4 x 3 in at 72 dpi."""
    with matplotlib.rc_context():
        matplotlib.style.use("default")
        set_font_settings_for_testing()
        matplotlib.rcParams.update({"figure.figsize": (4.0, 3.0), "figure.dpi": 72, "savefig.dpi": 72})
        yield


def _spread(n: int, k: int) -> np.ndarray:
    """``n`` values in (0, 1), evenly spread and shuffled without a random generator (the same everywhere).

    ``frac(i sqrt(q))`` for the ``k``-th prime ``q``: sequences of different ``k`` look independent.
    """
    q = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29)[k]
    return ((np.arange(1, n + 1) * np.sqrt(q)) % 1.0) * 0.98 + 0.01


def _image_sv(n: int = 150) -> xr.Dataset:
    p = _spread(n, 1) ** 1.3
    p[:10] = 10.0 ** -np.linspace(4, 30, 10)
    stat = -np.log10(p) / 150 + _spread(n, 2) / 60
    return make_dataset([f"GENE{i}" for i in range(n)], {"sv_pvalue": p, "sv_pvalue_adj": _bh(p),
                                                          "sv_statistic": stat},
                        {"test": "spatial_variability", "method": "hsic-ir"})


def _image_du(n: int = 120) -> xr.Dataset:
    p = np.c_[_spread(n, 3), _spread(n, 4) ** 3]
    beta = np.stack([(_spread(n, k) - 0.5) * 4 for k in range(6)], -1).reshape(n, 2, 3)
    return make_dataset([f"GENE{i}" for i in range(n)], {"du_pvalue": p, "du_pvalue_adj": _bh(p)},
                        {"test": "differential_usage", "method": "glmm-score"},
                        covariates=["region", "depth"]).assign(beta=(("gene", "covariate", "contrast"), beta))


IMAGES = {
    "qq_sv": lambda: pl.qq(_image_sv(), show=False),
    "qq_du": lambda: pl.qq(_image_du(), show=False),
    "volcano_sv": lambda: pl.volcano(_image_sv(), label_top=8, show=False),
    "volcano_du_beta": lambda: pl.volcano(_image_du(), covariate="depth", label_top=5, show=False),
    "sections": lambda: pl.sections(_cohort(40, seed=2), show=False),
    "section_counts": lambda: pl.section_counts(_cohort(40, seed=2), groups=True, show=False),
    "empty": lambda: pl.volcano(_image_sv().assign(sv_pvalue=lambda d: d["sv_pvalue"] * np.nan), show=False),
}


def _compare(figure, name: str, tmp_path: Path) -> None:
    """Save ``figure`` (its own size, no tight box) and compare it with the baseline ``name``.png."""
    actual = tmp_path / f"{name}.png"
    figure.savefig(actual)
    baseline = BASELINES / f"{name}.png"
    if UPDATE:
        BASELINES.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(actual, baseline)
        return
    if not baseline.exists():
        pytest.fail(f"no baseline image {baseline}; create it with SPATIALSCALE_UPDATE_BASELINES=1")
    error = compare_images(str(baseline), str(actual), tol=TOLERANCE)
    assert error is None, error


@pytest.mark.filterwarnings("ignore:No genes with finite p-values:UserWarning")
@pytest.mark.parametrize("name", list(IMAGES))
def test_image(name, image_style, tmp_path):
    ax = IMAGES[name]()
    _compare(ax.figure, name, tmp_path)


def test_image_isoform_ratios(points, image_style, tmp_path):
    _, store = points
    gene = store.genes["n_isoforms"].idxmax()
    axes = pl.isoform_ratios(store, gene, isoforms=[0, 1], panel_size=1.6, show=False)
    _compare(axes[0].figure, "isoform_ratios", tmp_path)


def test_the_image_comparison_sees_a_wrong_plot(image_style, tmp_path):
    """The tolerance is not so loose that a missing band or a moved line passes."""
    if UPDATE:
        pytest.skip("regenerating baselines")
    for ax in (pl.qq(_image_sv(), band=None, show=False), pl.qq(_image_sv(), band=0.5, show=False)):
        with pytest.raises(AssertionError, match="Image files did not match"):
            _compare(ax.figure, "qq_sv", tmp_path)


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
