"""Comparing conditions across a cohort's sections, and replicability across sections (partial conjunction).

The calibration and power tests simulate each section's counts and run the
per-section HSIC test (:func:`spatialscale.stats.sv.sv_batch`) on a small
CAR kernel, so every section effect is the one a cohort run would give;
the end-to-end tests then run real cohorts through ``sv_test`` / ``du_test``
and the CLI.  The measured numbers are printed (``pytest -s``).
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import spatialscale
from spatialscale import InputError
from spatialscale.cli import main
from spatialscale.kernel import SparseCAROperator, build_kernel
from spatialscale.stats.combine import cauchy_combine, fisher_combine, partial_conjunction
from spatialscale.stats.compare import (
    cell_means,
    compare_design,
    compare_effects,
    group_means,
    level_codes,
    linear_f_test,
)
from spatialscale.stats.multitest import bh_adjust
from spatialscale.stats.sv import sv_batch


# ------------------------------------------------------------------ simulated sections through sv_batch
class Sections:
    """A pool of small section geometries (kernels) and genes whose parameters are fixed across sections.

    Each gene has a baseline usage and a direction of spatial change shared
    by every section; a section draws its own counts (and uses one of the
    pool's geometries, each with its own smooth pattern), so sections are
    independent replicates of the same biology.
    """

    def __init__(self, n_genes: int, sizes=(90, 110, 130), n_isoforms: int = 3, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.kernels = []
        for n in sizes:
            xy = rng.uniform(0, 10, (n, 2))
            k = build_kernel(xy)
            pattern = np.sin(xy[:, 0] * 2 * np.pi / 10) + np.cos(xy[:, 1] * 2 * np.pi / 10)
            pattern = (pattern - pattern.mean()) / pattern.std()
            self.kernels.append((SparseCAROperator(k.precision), k.power_sums, pattern))
        self.base = rng.normal(0, 0.5, (n_genes, 1, n_isoforms))
        self.direction = rng.normal(0, 1, (n_genes, 1, n_isoforms))
        self.depth = rng.lognormal(np.log(8), 0.3, n_genes)
        self.n_genes = n_genes
        self.calls = 0

    def section(self, strength: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """One section: ``strength`` ``(G,)`` of each gene's spatial effect; sv_batch's results."""
        op, sums, pattern = self.kernels[self.calls % len(self.kernels)]
        self.calls += 1
        eta = self.base + np.asarray(strength)[:, None, None] * pattern[None, :, None] * self.direction
        prob = np.exp(eta - eta.max(-1, keepdims=True))
        prob /= prob.sum(-1, keepdims=True)
        totals = rng.poisson(self.depth[:, None], (self.n_genes, len(pattern)))
        counts = rng.multinomial(totals, prob).astype(np.float64)
        return sv_batch(counts, op, sums)

    def cohort(self, strengths: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``(G, S)`` effects and p-values of sections with ``strengths`` ``(S, G)``."""
        rng = np.random.default_rng(seed)
        res = [self.section(s, rng) for s in strengths]
        return np.stack([r["effect"] for r in res], 1), np.stack([r["pvalue"] for r in res], 1)


def _rate(p: np.ndarray, alpha: float = 0.05) -> float:
    p = p[np.isfinite(p)]
    return float((p < alpha).mean())


# ------------------------------------------------------------------ pure functions
def test_anova_and_blocked_f_tests_match_their_closed_forms():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(50, 9))
    codes, names = level_codes(["b", "a", "c", "a", "b", "c", "a", "b", "c"])
    assert names == ["a", "b", "c"] and codes.tolist() == [1, 0, 2, 0, 1, 2, 0, 1, 2]
    res = compare_effects(y, compare_design(codes, 3))
    want = stats.f_oneway(*[y[:, codes == k] for k in range(3)], axis=1)
    np.testing.assert_allclose(res["statistic"], want.statistic, rtol=1e-10)
    np.testing.assert_allclose(res["pvalue"], want.pvalue, rtol=1e-8)
    np.testing.assert_allclose(res["effect"], np.stack([y[:, codes == k].mean(1) for k in range(3)]), rtol=1e-12)
    # balanced two-way additive model: F = (SS_levels / (a - 1)) / (SS_error / ((a - 1)(b - 1)))
    a, b = 2, 5
    lev, don = np.tile(np.arange(a), b), np.repeat(np.arange(b), a)
    y = rng.normal(size=(40, a * b)) + rng.normal(0, 3, (40, b))[:, don]
    design = compare_design(lev, a, don, b)
    assert design.test == "blocked" and (design.df1, design.df2) == (a - 1, (a - 1) * (b - 1))
    grand = y.mean(1, keepdims=True)
    la = np.stack([y[:, lev == k].mean(1) for k in range(a)], 1)
    db = np.stack([y[:, don == k].mean(1) for k in range(b)], 1)
    ss_a = b * ((la - grand) ** 2).sum(1)
    ss_e = ((y - la[:, lev] - db[:, don] + grand) ** 2).sum(1)
    f = (ss_a / (a - 1)) / (ss_e / ((a - 1) * (b - 1)))
    got = compare_effects(y, design)
    np.testing.assert_allclose(got["statistic"], f, rtol=1e-9)
    np.testing.assert_allclose(got["pvalue"], stats.f.sf(f, a - 1, (a - 1) * (b - 1)), rtol=1e-8)
    # nested donors: each donor's sections averaged, donors compared by one-way ANOVA
    lev, don = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1]), np.array([0, 0, 1, 2, 3, 3, 4, 4, 5])
    design = compare_design(lev, 2, don, 6)
    assert design.test == "donor-means" and (design.df1, design.df2) == (1, 4)
    y = rng.normal(size=(30, 9))
    means = group_means(y, don, 6)
    want = stats.f_oneway(means[:, :3], means[:, 3:], axis=1)
    got = compare_effects(y, design)
    np.testing.assert_allclose(got["statistic"], want.statistic, rtol=1e-10)
    np.testing.assert_allclose(got["effect"], np.stack([means[:, :3].mean(1), means[:, 3:].mean(1)]), rtol=1e-12)


def test_missing_sections_are_left_out_per_gene():
    rng = np.random.default_rng(1)
    codes = np.array([0, 0, 0, 1, 1, 1])
    y = rng.normal(size=(6, 6))
    y[1, 0] = np.nan  # gene 1 lacks a section: ANOVA on the other five
    y[2, :2] = np.nan  # gene 2 has one section in level 0: still df2 = 2
    y[3, :3] = np.nan  # gene 3 has no section in level 0: no test
    res = compare_effects(y, compare_design(codes, 2))
    for g in range(3):
        ok = np.isfinite(y[g])
        want = stats.f_oneway(y[g, ok & (codes == 0)], y[g, ok & (codes == 1)])
        assert res["pvalue"][g] == pytest.approx(want.pvalue, rel=1e-8)
    assert res["df2"].tolist()[:4] == [4, 3, 2, 2] and res["df1"][3] == 0 and np.isnan(res["pvalue"][3])
    assert np.isnan(res["effect"][0, 3]) and res["effect"][1, 3] == pytest.approx(y[3, 3:].mean())
    # no variation at all: no test; no residual variation but a level difference: p = 0
    flat = compare_effects(np.array([[1.0] * 6, [1, 1, 1, 2, 2, 2]]), compare_design(codes, 2))
    assert np.isnan(flat["pvalue"][0]) and flat["pvalue"][1] == 0.0
    stat, p, df1, df2 = linear_f_test(np.zeros((0, 6)), np.ones((6, 1)), np.ones((6, 1)))
    assert stat.shape == (0,)
    with pytest.raises(ValueError, match="not among the levels"):
        level_codes(["a", "b"], ["a"])


def test_partial_conjunction_is_the_combination_of_the_largest_pvalues():
    p = np.array([[0.001, 0.2, np.nan, 0.5], [0.3, 0.001, 0.002, np.nan], [0.01, np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(partial_conjunction(p, 1), cauchy_combine(p))
    np.testing.assert_allclose(partial_conjunction(p, 2)[:2], cauchy_combine(np.array([[0.2, 0.5], [0.002, 0.3]])))
    assert np.isnan(partial_conjunction(p, 2)[2])  # tested in one section only
    np.testing.assert_allclose(partial_conjunction(p, 3)[:2], [0.5, 0.3])  # r = k: the largest
    np.testing.assert_allclose(partial_conjunction(p, 2, "fisher")[:2],
                               fisher_combine(np.array([[0.2, 0.5], [0.002, 0.3]])))
    w = np.array([1.0, 2.0, 3.0, 4.0])  # weights follow their sections
    want = spatialscale.stats.combine.stouffer_combine(np.array([[0.2, 0.5]]), np.array([2.0, 4.0]))
    np.testing.assert_allclose(partial_conjunction(p[:1], 2, "stouffer", w), want)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="r must be"):
            partial_conjunction(p, bad)


# ------------------------------------------------------------------ calibration and power on simulated cohorts
@pytest.fixture(scope="module")
def sim():
    return Sections(1500, seed=3)


def test_compare_is_calibrated_on_null_cohorts(sim):
    g = sim.n_genes
    strength = np.where(np.arange(g) < g // 2, 0.7, 0.0)  # half the genes SV, equally in every section
    rates, pooled = {}, []
    for per, seed in ((3, 11), (6, 12)):
        effects, _ = sim.cohort(np.tile(strength, (2 * per, 1)), seed)
        codes = np.repeat([0, 1], per)
        p = compare_effects(effects, compare_design(codes, 2))["pvalue"]
        rates[per] = (_rate(p), _rate(p[: g // 2]), _rate(p[g // 2:]))
        pooled.append(p)
    overall = _rate(np.concatenate(pooled))
    print(f"\ncompare null level at 0.05: 2x3 sections {rates[3][0]:.4f} (SV genes {rates[3][1]:.4f}, non-SV "
          f"{rates[3][2]:.4f}); 2x6 sections {rates[6][0]:.4f} (SV {rates[6][1]:.4f}, non-SV {rates[6][2]:.4f}); "
          f"all {2 * g} gene tests {overall:.4f}")
    assert 0.035 <= overall <= 0.065
    for per in (3, 6):
        assert 0.025 <= rates[per][0] <= 0.075, (per, rates[per])


def test_compare_detects_genes_sv_in_one_condition_only(sim):
    g = sim.n_genes
    both = np.where(np.arange(g) < g // 3, 0.7, 0.0)
    differ = np.arange(g) >= g - g // 5  # SV in condition B only
    results = {}
    for per, seed in ((3, 21), (6, 22)):
        a = np.tile(both, (per, 1))
        b = np.tile(np.where(differ, 0.7, both), (per, 1))
        effects, _ = sim.cohort(np.vstack([a, b]), seed)
        res = compare_effects(effects, compare_design(np.repeat([0, 1], per), 2))
        hit = bh_adjust(res["pvalue"]) < 0.05
        results[per] = (hit[differ].mean(), (hit & ~differ).sum() / max(hit.sum(), 1))
        assert (res["effect"][1, differ] > res["effect"][0, differ]).mean() > 0.95
    print(f"\ncompare power at BH 0.05 (SV in one condition only, strength 0.7): 2x3 sections "
          f"{results[3][0]:.3f} (FDP {results[3][1]:.3f}); 2x6 sections {results[6][0]:.3f} "
          f"(FDP {results[6][1]:.3f})")
    assert results[3][0] > 0.5 and results[6][0] > 0.8
    assert results[3][1] < 0.1 and results[6][1] < 0.1


@pytest.fixture(scope="module")
def donors():
    """Genes SV in every section whose strength varies by donor (log-normal factor per gene x donor)."""
    sections = Sections(1000, seed=5)
    rng = np.random.default_rng(6)
    strength = rng.uniform(0.5, 0.9, sections.n_genes)
    factor = np.exp(rng.normal(0, 0.5, (sections.n_genes, 6)))
    return sections, strength, factor


def test_blocking_crossed_donors_keeps_the_level_and_gains_power(donors):
    sections, strength, factor = donors
    lev, don = np.tile([0, 1], 6), np.repeat(np.arange(6), 2)  # every donor has a section in both conditions
    blocked, plain = compare_design(lev, 2, don, 6), compare_design(lev, 2)
    assert blocked.test == "blocked"
    null = (strength[:, None] * factor[:, don]).T
    effects, _ = sections.cohort(null, 31)
    level = {k: _rate(compare_effects(effects, d)["pvalue"]) for k, d in (("blocked", blocked), ("anova", plain))}
    shift = np.where(np.arange(sections.n_genes) < 300, 1.5, 1.0)  # 300 genes 1.5x stronger in condition 1
    effects, _ = sections.cohort(null * np.where(lev[:, None] == 1, shift, 1.0), 32)
    power, power_bh = {}, {}
    for k, d in (("blocked", blocked), ("anova", plain)):
        p = compare_effects(effects, d)["pvalue"]
        power[k], power_bh[k] = _rate(p[:300]), float((bh_adjust(p)[:300] < 0.05).mean())
    print(f"\ncrossed donors (6 donors x 2 conditions, donor-varying SV): null level blocked {level['blocked']:.4f}, "
          f"unblocked {level['anova']:.4f}; power at p < 0.05 (1.5x stronger SV) blocked {power['blocked']:.3f}, "
          f"unblocked {power['anova']:.3f} (at BH 0.05: {power_bh['blocked']:.3f}, {power_bh['anova']:.3f})")
    assert 0.025 <= level["blocked"] <= 0.075
    assert level["anova"] < 0.025  # donors' variation inflates the residual: conservative...
    assert power["blocked"] > power["anova"] + 0.15  # ...and blind where blocking sees


def test_nested_donors_are_the_replicates(donors):
    sections, strength, factor = donors
    lev, don = np.repeat([0, 1], 6), np.repeat(np.arange(6), 2)  # 3 donors per condition, 2 sections each
    nested = compare_design(lev, 2, don, 6)
    assert nested.test == "donor-means" and (nested.df1, nested.df2) == (1, 4)
    effects, _ = sections.cohort((strength[:, None] * factor[:, don]).T, 41)
    res = compare_effects(effects, nested)
    level = {"donor-means": _rate(res["pvalue"]),
             "sections": _rate(compare_effects(effects, compare_design(lev, 2))["pvalue"])}
    np.testing.assert_allclose(res["effect"], cell_means(effects, nested))
    print(f"\nnested donors (3 per condition, 2 sections each): null level donor means {level['donor-means']:.4f}, "
          f"sections as replicates {level['sections']:.4f}")
    assert 0.025 <= level["donor-means"] <= 0.075
    assert level["sections"] > 0.1  # pseudo-replication: a donor's two sections counted as two replicates


def test_partial_conjunction_calibration_and_power():
    sections = Sections(1200, seed=8)
    g, k = sections.n_genes, 4
    kind = np.arange(g) % 3  # 0: SV in one section only, 1: SV nowhere, 2: SV in every section
    strengths = np.zeros((k, g))
    strengths[np.arange(g) % k, np.arange(g)] = np.where(kind == 0, 1.2, 0.0)  # its one section rotates
    strengths[:, kind == 2] = 0.7
    _, p = sections.cohort(strengths, 51)
    pc2 = partial_conjunction(p, 2)
    level = _rate(pc2[kind == 0]), _rate(pc2[kind == 1])
    single = _rate(cauchy_combine(p)[kind == 0])  # the ordinary combination calls them
    power = {r: float((bh_adjust(partial_conjunction(p, r))[kind == 2] < 0.05).mean()) for r in (2, 4)}
    print(f"\npartial conjunction r=2 of {k} sections: level {level[0]:.4f} (SV in one section), {level[1]:.4f} "
          f"(SV nowhere); combined p < 0.05 for SV-in-one genes {single:.3f}; power at BH 0.05 (SV in all): "
          f"r=2 {power[2]:.3f}, r=4 {power[4]:.3f}")
    assert level[0] <= 0.05 and level[1] <= 0.05 and single > 0.5
    assert power[2] > 0.8 and power[4] > 0.5


# ------------------------------------------------------------------ real cohorts, end to end
@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    from spatialscale.simulate import simulate_section

    root = tmp_path_factory.mktemp("compare")
    rows = []
    for i in range(8):
        adata = simulate_section(60 + 8 * i, 10, n_sv=4, n_du=2, geometry=("grid", "hex", "random")[i % 3],
                                 seed=40 + i)
        adata.write_h5ad(root / f"s{i}.h5ad")
        # donors crossed with the conditions (d1-d3 have a section in each); patients and labs nested in them
        rows.append({"section": f"S{i}", "path": f"s{i}.h5ad", "condition": "ctrl" if i < 4 else "treated",
                     "donor": ["d1", "d2", "d3", "d4", "d1", "d2", "d3", "d5"][i],
                     "patient": ["p1", "p1", "p2", "p3", "p4", "p4", "p5", "p6"][i],
                     "lab": "l1" if i < 4 else "l2", "batch": "one"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return spatialscale.ingest_cohort(root / "manifest.csv", root / "cohort", scheduler="threads", progress=False)


def test_sv_compare_end_to_end_equals_the_pure_functions(cohort):
    ds = spatialscale.sv_test(cohort, compare="condition", min_sections=2, scheduler="threads", progress=False)
    assert ds.attrs["compare"] == "condition" and ds.attrs["compare_test"] == "anova"
    assert ds.attrs["compare_block"] == "none" and ds.attrs["min_sections"] == 2
    assert list(ds["level"].values) == ["ctrl", "treated"]
    e = ds["sv_effect"].transpose("gene", "section").values
    want = compare_effects(e, compare_design(np.repeat([0, 1], 4), 2))
    np.testing.assert_array_equal(ds["compare_statistic"].values, want["statistic"])
    np.testing.assert_array_equal(ds["compare_pvalue"].values, want["pvalue"])
    np.testing.assert_array_equal(ds["compare_pvalue_adj"].values, bh_adjust(want["pvalue"]))
    np.testing.assert_array_equal(ds["compare_effect"].transpose("level", "gene").values, want["effect"])
    p = ds["sv_pvalue"].transpose("gene", "section").values
    np.testing.assert_array_equal(ds["replicated_pvalue"].values, partial_conjunction(p, 2))
    np.testing.assert_array_equal(ds["replicated_pvalue_adj"].values, bh_adjust(partial_conjunction(p, 2)))
    assert np.isfinite(ds["compare_pvalue"].values).all()
    # blocked by donor (d1, d2 crossed with the conditions), levels in the order given
    bl = spatialscale.sv_test(cohort, compare="condition", compare_levels=["treated", "ctrl"], block="donor",
                              scheduler="threads", progress=False)
    assert bl.attrs["compare_test"] == "blocked" and bl.attrs["compare_block"] == "donor"
    assert list(bl["level"].values) == ["treated", "ctrl"]
    d = compare_design(np.repeat([1, 0], 4), 2, level_codes(["d1", "d2", "d3", "d4", "d1", "d2", "d3", "d5"])[0], 5)
    want = compare_effects(e, d)
    np.testing.assert_array_equal(bl["compare_pvalue"].values, want["pvalue"])
    np.testing.assert_array_equal(bl["compare_effect"].transpose("level", "gene").values, want["effect"])
    assert "replicated_pvalue" not in bl
    # patients nested in the conditions: each patient's sections averaged, patients compared
    ne = spatialscale.sv_test(cohort, compare="condition", block="patient", scheduler="threads", progress=False)
    assert ne.attrs["compare_test"] == "donor-means"
    d = compare_design(np.repeat([0, 1], 4), 2, level_codes(["p1", "p1", "p2", "p3", "p4", "p4", "p5", "p6"])[0], 6)
    np.testing.assert_array_equal(ne["compare_pvalue"].values, compare_effects(e, d)["pvalue"])


def test_du_compare_end_to_end(cohort):
    ds = spatialscale.du_test(cohort, "celltype", method="hsic", compare="condition", min_sections=3,
                              scheduler="threads", progress=False)
    assert ds["du_effect"].dims == ("section", "gene", "covariate")
    assert ds["compare_pvalue"].dims == ("gene", "covariate")
    assert ds["compare_effect"].dims == ("level", "gene", "covariate")
    e = ds["du_effect"].transpose("gene", "covariate", "section").values
    assert np.nanmin(e) >= -0.2 and np.nanmax(e) <= 1
    want = compare_effects(e, compare_design(np.repeat([0, 1], 4), 2))
    np.testing.assert_array_equal(ds["compare_pvalue"].values, want["pvalue"])
    np.testing.assert_array_equal(ds["compare_pvalue_adj"].values, bh_adjust(want["pvalue"], axis=0))
    p = ds["du_pvalue"].transpose("gene", "covariate", "section").values
    np.testing.assert_array_equal(ds["replicated_pvalue"].values, partial_conjunction(p, 3))
    # du_effect is the RV coefficient of the ratios and the covariate, less its mean under independence
    from spatialscale.covariates import encode_covariates
    from spatialscale.stats.du import du_responses, hsic_du

    store = cohort.store("S1")
    counts = np.stack([store.gene_counts(gname) for gname in store.genes.index[:2]])
    design = encode_covariates(store.obs(), "celltype")  # a categorical's levels: one joint test
    z = design.z
    y, used = du_responses(counts)
    _, _, rv = hsic_du(y, used, z, design.column_groups, effect=True)
    zc = z - z.mean(0)
    n = len(zc)
    for b in range(2):
        scale = np.sqrt(np.sum((y[b].T @ y[b]) ** 2) * np.sum((zc.T @ zc) ** 2))
        floor = np.trace(y[b].T @ y[b]) * np.trace(zc.T @ zc) / (n - 1)
        want_rv = (np.sum((y[b].T @ zc) ** 2) - floor) / scale
        assert rv[b, 0] == pytest.approx(want_rv, rel=1e-10)
    got = ds["du_effect"].sel(section="S1", gene=list(store.genes.index[:2])).values[:, 0]
    np.testing.assert_allclose(got, rv[:, 0], rtol=1e-8)
    with pytest.raises(InputError, match=r"compare needs per-section effect sizes.*hsic, hsic-gp"):
        spatialscale.du_test(cohort, "celltype", method="t-fisher", compare="condition", scheduler="threads")


def test_cli_compare_and_min_sections(cohort, tmp_path, capsys):
    out = tmp_path / "cli.zarr"
    assert main(["sv", str(cohort.path), "--compare", "condition", "--min-sections", "2", "--out", str(out),
                 "--scheduler", "threads", "--no-progress", "--top", "0"]) == 0
    text = capsys.readouterr().out
    assert "condition (ctrl, treated; anova):" in text and "replicated in >= 2 sections:" in text
    ds = spatialscale.open_results(out)
    assert "compare_pvalue" in ds and "replicated_pvalue" in ds and ds.attrs["compare"] == "condition"


def _tree(root) -> dict:
    out = {}
    for base, _, names in os.walk(root):
        for n in names:
            path = os.path.join(base, n)
            out[path] = os.stat(path).st_mtime_ns
    return out


@pytest.mark.parametrize("args, words", [
    (["--compare", "tissue"], "compare 'tissue' is not a column"),
    (["--compare", "batch"], "has one level ('one')"),
    (["--compare", "condition", "--compare-levels", "ctrl,treated,sham"], "compare_levels ['sham'] have no sections"),
    (["--compare", "condition", "--compare-levels", "ctrl"], "are not among compare_levels"),
    (["--compare", "condition", "--block", "lab"], "leaves 0 residual degrees of freedom (2 levels, 2 donors)"),
    (["--compare", "condition", "--block", "tissue"], "block 'tissue' is not a column"),
    (["--block", "donor"], "block applies with compare="),
    (["du", "--covariates", "celltype", "--method", "t-fisher", "--compare", "condition"],
     "compare needs per-section effect sizes, which du t-fisher does not give; methods that give them: hsic, hsic-gp"),
    (["--min-sections", "0"], "min_sections must be between 1 and the cohort's 8 sections"),
    (["--min-sections", "9"], "min_sections must be between 1 and the cohort's 8 sections"),
    (["--min-sections", "2", "--combine", "pooled"], "min_sections combines the largest"),
])
def test_bad_compare_inputs_exit_2_and_write_nothing(cohort, tmp_path, capsys, args, words):
    before = _tree(cohort.path)
    out = tmp_path / "out.zarr"
    command, args = (args[0], args[1:]) if args[0] == "du" else ("sv", args)
    assert main([command, str(cohort.path), *args, "--out", str(out), "--scheduler", "threads", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
    assert not out.exists() and _tree(cohort.path) == before


def test_bad_compare_inputs_in_python(cohort, tmp_path):
    with pytest.raises(InputError, match="compare applies to cohorts"):
        spatialscale.sv_test(cohort.store("S0"), compare="condition", scheduler="threads")
    with pytest.raises(InputError, match="min_sections applies to cohorts"):
        spatialscale.sv_test(cohort.store("S0"), min_sections=1, scheduler="threads")
    with pytest.raises(InputError, match="du glmm-score does not give; methods that give them: hsic, hsic-gp"):
        spatialscale.du_test(cohort, "celltype", method="glmm-score", compare="condition", scheduler="threads")
    with pytest.raises(InputError, match="min_sections must be a whole number"):
        spatialscale.sv_test(cohort, min_sections=1.5, scheduler="threads")
    # patients blocked by donors: 8 sections, rank 7, 1 residual degree of freedom: refused
    with pytest.raises(InputError, match="leaves 1 residual degrees of freedom"):
        spatialscale.sv_test(cohort, compare="patient", block="donor", scheduler="threads")
    with pytest.raises(InputError, match="block 'condition' is the compare column itself"):
        spatialscale.sv_test(cohort, compare="condition", block="condition", scheduler="threads")


def test_du_effect_of_the_gp_null_is_the_rv_coefficient_of_the_residuals():
    from spatialscale.stats.du import GPNull, du_responses, hsic_du, hsic_du_gp_null

    rng = np.random.default_rng(4)
    counts = rng.poisson(3.0, (5, 40, 3)).astype(np.float64)
    y, used = du_responses(counts, nan_filling="none")  # each gene its own spots
    z = rng.normal(size=(40, 2))
    vectors = np.linalg.qr(rng.normal(size=(40, 4)))[0]
    null = GPNull(z=z, vectors=vectors, shrink=rng.uniform(0, 0.5, (2, 4)), noise=np.array([0.5, 1.0]))
    stat, p, rv = hsic_du_gp_null(y, used, null, effect=True)
    want = hsic_du(y, used, z, effect=True)
    np.testing.assert_allclose(stat, want[0], rtol=1e-12)
    np.testing.assert_allclose(rv, want[2], rtol=1e-10)
    assert np.all(rv <= 1)
