"""Combining per-section evidence: Cauchy (ACAT), Fisher, Stouffer and the pooled HSIC (Liu) test."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from spatialscale.stats.combine import (
    cauchy_combine,
    combine_pvalues,
    fisher_combine,
    n_tested,
    pooled_liu,
    stouffer_combine,
)
from spatialscale.stats.nulls import liu_pvalue


@pytest.fixture
def pvals():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=(200, 6)) ** rng.uniform(0.5, 3.0, size=(200, 1))
    p[::7, 2] = np.nan  # genes absent from a section
    p[5] = np.nan  # a gene tested nowhere
    return p


def test_fisher_and_stouffer_equal_scipy(pvals):
    w = np.array([30.0, 40.0, 35.0, 50.0, 45.0, 38.0]) ** 0.5
    fisher, stouffer = fisher_combine(pvals), stouffer_combine(pvals, w)
    for g in range(len(pvals)):
        ok = np.isfinite(pvals[g])
        if not ok.any():
            assert np.isnan(fisher[g]) and np.isnan(stouffer[g])
            continue
        ref_f = stats.combine_pvalues(pvals[g, ok], method="fisher").pvalue
        ref_s = stats.combine_pvalues(pvals[g, ok], method="stouffer", weights=w[ok]).pvalue
        np.testing.assert_allclose(fisher[g], ref_f, rtol=1e-12)
        np.testing.assert_allclose(stouffer[g], ref_s, rtol=1e-10)
    np.testing.assert_array_equal(n_tested(pvals)[:8], [5, 6, 6, 6, 6, 0, 6, 5])


def test_cauchy_matches_its_closed_form(pvals):
    w = np.array([1.0, 2.0, 1.0, 3.0, 1.0, 2.0])
    got = cauchy_combine(pvals, w)
    for g in range(len(pvals)):
        ok = np.isfinite(pvals[g])
        if not ok.any():
            assert np.isnan(got[g])
            continue
        ww = w[ok] / w[ok].sum()
        t = np.sum(ww * np.tan((0.5 - pvals[g, ok]) * np.pi))
        np.testing.assert_allclose(got[g], 0.5 - np.arctan(t) / np.pi, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("p", [1e-300, 1e-100, 1e-17, 1e-8, 0.3, 0.5, 0.9, 1 - 1e-9, 1 - 1e-15])
def test_cauchy_keeps_precision_near_0_and_1(p):
    # ACAT of equal p-values is that p-value, whatever the weights and the number of sections
    for k in (1, 2, 5):
        got = cauchy_combine(np.full((1, k), p), np.arange(1.0, k + 1))[0]
        np.testing.assert_allclose(got, p, rtol=1e-9 if p < 0.5 else 1e-6)
    assert np.isfinite(cauchy_combine(np.array([[0.0, 1.0]]))).all()


def test_pooled_liu_is_exact_for_chi_square_sections():
    # sections whose null is a sum of k_s chi2(1) terms: the pooled null is chi2(sum k_s), which Liu matches exactly
    rng = np.random.default_rng(1)
    k = np.array([3.0, 5.0, 8.0])
    t = rng.chisquare(k, size=(50, 3))
    c = np.broadcast_to(k[None, :, None], (50, 3, 4)).copy()
    np.testing.assert_allclose(pooled_liu(t, c), stats.chi2.sf(t.sum(1), k.sum()), rtol=1e-6)
    # one section: the single-section Liu p-value, exactly
    np.testing.assert_array_equal(pooled_liu(t[:, :1], c[:, :1]), liu_pvalue(t[:, 0], c[:, 0]))
    # a section where the gene is missing leaves the pool
    t[:, 1] = np.nan
    np.testing.assert_allclose(pooled_liu(t, c), stats.chi2.sf(t[:, [0, 2]].sum(1), k[[0, 2]].sum()), rtol=1e-6)


def _mixture_section(rng, n_genes: int, lam: np.ndarray, shift: float = 0.0):
    """Statistics of a weighted chi-square mixture null (plus a shift), and its mixture sums."""
    t = (rng.chisquare(1.0, size=(n_genes, lam.size)) * lam).sum(1) + shift
    c = np.array([np.sum(lam**r) for r in range(1, 5)])
    return t, np.broadcast_to(c, (n_genes, 4))


def test_combinations_are_calibrated_on_null_cohorts():
    rng = np.random.default_rng(2)
    n_genes, n_sections = 4000, 8
    stat, cum = [], []
    for s in range(n_sections):
        lam = np.sort(rng.gamma(0.5, size=30 + 5 * s))[::-1]
        t, c = _mixture_section(rng, n_genes, lam)
        stat.append(t)
        cum.append(c)
    stat, cum = np.stack(stat, 1), np.stack(cum, 1)
    p = np.stack([liu_pvalue(stat[:, s], cum[:, s]) for s in range(n_sections)], 1)
    spots = np.sqrt(np.linspace(1500, 3000, n_sections))
    rates = {m: float((combine_pvalues(p, m, spots if m != "fisher" else None) < 0.05).mean())
             for m in ("cauchy", "fisher", "stouffer")}
    rates["pooled"] = float((pooled_liu(stat, cum) < 0.05).mean())
    for method, rate in rates.items():
        assert 0.035 <= rate <= 0.065, (method, rate)


def test_pooling_finds_weak_signals_that_single_sections_miss():
    rng = np.random.default_rng(3)
    n_genes, n_sections = 2000, 8
    lam = np.sort(rng.gamma(0.5, size=40))[::-1]
    stat, cum = [], []
    for _ in range(n_sections):
        t, c = _mixture_section(rng, n_genes, lam, shift=0.9 * np.sqrt(2 * np.sum(lam**2)))  # ~1 null sd
        stat.append(t)
        cum.append(c)
    stat, cum = np.stack(stat, 1), np.stack(cum, 1)
    p = np.stack([liu_pvalue(stat[:, s], cum[:, s]) for s in range(n_sections)], 1)
    best_single = float((p < 0.05).mean(0).max())
    assert float((pooled_liu(stat, cum) < 0.05).mean()) > best_single + 0.3
    assert float((cauchy_combine(p) < 0.05).mean()) > best_single


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown combination"):
        combine_pvalues(np.full((2, 2), 0.5), "mean")
    with pytest.raises(ValueError, match="no weights"):
        combine_pvalues(np.full((2, 2), 0.5), "fisher", np.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        cauchy_combine(np.full((2, 2), 0.5), np.array([1.0, -1.0]))
