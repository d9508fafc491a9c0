"""Comparing per-section effect sizes between the levels of a section-level variable (conditions of a cohort).

A cohort's sections are the replicates of a condition comparison: spots of
one section share its tissue, donor, preparation and sequencing run, so
they are not independent draws from a condition, while two sections are
(as far as the design makes them).  Each gene's evidence in a section is
summarised by one number, the section's effect size (``sv_effect`` /
``du_effect``, comparable across sections of different sizes), and the
effects are compared between levels with a linear model over sections:

- ``anova``: one-way ANOVA, ``e_s = mu + alpha_{level(s)} + error``; the
  F test of the level terms (``L - 1`` and ``S - L`` degrees of freedom).
- ``blocked``: donors crossed with the levels (some donor has sections in
  two or more levels): the additive two-way model
  ``e_s = mu + alpha_{level(s)} + beta_{donor(s)} + error``; the F test of
  the level terms given the donors (extra sum of squares), which compares
  levels within donors.
- ``donor-means``: donors nested in the levels (each donor in one level):
  each donor's sections are averaged first and the donor means are compared
  by one-way ANOVA; the donor is then the replicate (sections of one donor
  are not independent replicates of its level).

Every function is vectorised over genes: effects come as ``(G, S)`` (any
leading shape flattened by the caller), NaN where a section did not test
a gene; each gene is fitted on the sections where it has an effect (genes
with the same missing sections share one least-squares solve).  The F
tests assume independent replicates with normal errors of equal variance
in every level; with few replicates that is all a test can lean on
(permuting 2 x 3 sections gives only 20 arrangements, so a permutation
p-value could never go below 0.05 after any correction).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["COMPARE_TESTS", "CompareDesign", "cell_means", "compare_design", "compare_effects", "group_means",
           "level_codes", "linear_f_test"]

#: the linear models of :func:`compare_effects`
COMPARE_TESTS = ("anova", "blocked", "donor-means")


def level_codes(values: Sequence, order: Sequence | None = None) -> tuple[np.ndarray, list[str]]:
    """Integer codes of a section-level variable and the names of its levels.

    Parameters
    ----------
    values
        One value per section (compared as text).
    order
        The levels in the order wanted (the first is listed first); every
        value must be one of them.  Default: sorted.

    Returns
    -------
    codes, names
        ``(S,)`` codes into ``names``.

    Raises
    ------
    ValueError
        A value not in ``order``, or a repeated level in ``order``.
    """
    text = np.asarray([str(v) for v in values], dtype=object)
    names = sorted(set(text)) if order is None else [str(v) for v in order]
    if len(set(names)) != len(names):
        raise ValueError(f"levels repeated in {names}.")
    index = {n: i for i, n in enumerate(names)}
    missing = sorted(set(text) - set(index))
    if missing:
        raise ValueError(f"values {missing} are not among the levels {names}.")
    return np.array([index[v] for v in text], dtype=np.int64), names


def _indicators(codes: np.ndarray, n: int, drop_first: bool = True) -> np.ndarray:
    """``(S, n - 1)`` (or ``(S, n)``) 0/1 indicator columns of ``codes``."""
    out = (np.asarray(codes)[:, None] == np.arange(n)[None, :]).astype(np.float64)
    return out[:, 1:] if drop_first else out


@dataclass(frozen=True)
class CompareDesign:
    """Which model compares the levels, and its matrices.

    Attributes
    ----------
    test
        One of :data:`COMPARE_TESTS`.
    levels
        ``(S,)`` level code of each section.
    n_levels
        Number of levels.
    donors
        ``(S,)`` donor code of each section (``None`` without blocking).
    n_donors
        Number of donors (0 without blocking).
    df1, df2
        Degrees of freedom of the level terms and of the residual, when every
        section tested the gene.
    """

    test: str
    levels: np.ndarray
    n_levels: int
    donors: np.ndarray | None
    n_donors: int
    df1: int
    df2: int

    def matrices(self) -> tuple[np.ndarray, np.ndarray]:
        """The full and reduced design matrices over the replicates (sections, or donors for ``donor-means``)."""
        if self.test == "donor-means":
            rep_levels = self.donor_levels()
            ones = np.ones((self.n_donors, 1))
            return np.hstack([ones, _indicators(rep_levels, self.n_levels)]), ones
        ones = np.ones((len(self.levels), 1))
        lev = _indicators(self.levels, self.n_levels)
        if self.test == "anova":
            return np.hstack([ones, lev]), ones
        don = _indicators(self.donors, self.n_donors)
        return np.hstack([ones, lev, don]), np.hstack([ones, don])

    def donor_levels(self) -> np.ndarray:
        """``(D,)`` the level of each donor (nested designs: each donor's sections share one level)."""
        out = np.zeros(self.n_donors, dtype=np.int64)
        out[self.donors] = self.levels
        return out


def _rank(x: np.ndarray) -> int:
    return int(np.linalg.matrix_rank(x)) if x.size else 0


def compare_design(levels: np.ndarray, n_levels: int, donors: np.ndarray | None = None,
                   n_donors: int = 0) -> CompareDesign:
    """Choose the model for level codes (and donor codes) of the sections.

    Without donors: ``anova``.  With donors: ``blocked`` when some donor has
    sections in two or more levels (donors crossed with the levels, donor a
    blocking factor), else ``donor-means`` (donors nested in the levels).
    The degrees of freedom are those of a gene tested in every section.
    """
    levels = np.asarray(levels, dtype=np.int64)
    if donors is None:
        test = "anova"
    else:
        donors = np.asarray(donors, dtype=np.int64)
        spans = [len(set(levels[donors == d].tolist())) for d in range(n_donors)]
        test = "blocked" if max(spans, default=0) > 1 else "donor-means"
    design = CompareDesign(test, levels, n_levels, donors, n_donors if donors is not None else 0, 0, 0)
    full, reduced = design.matrices()
    rf = _rank(full)
    return CompareDesign(test, levels, n_levels, design.donors, design.n_donors, rf - _rank(reduced),
                         full.shape[0] - rf)


def linear_f_test(y: np.ndarray, full: np.ndarray, reduced: np.ndarray
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """F test of nested linear models, per gene, over the replicates where the gene has a value.

    ``F = ((RSS_reduced - RSS_full) / df1) / (RSS_full / df2)`` with
    ``df1 = rank(full) - rank(reduced)`` and ``df2 = m - rank(full)`` on the
    gene's ``m`` finite replicates.

    Parameters
    ----------
    y
        ``(G, R)`` responses (NaN: the gene has no value at that replicate).
    full, reduced
        ``(R, a)`` and ``(R, b)`` design matrices, ``reduced`` spanning a
        subspace of ``full``.

    Returns
    -------
    statistic, pvalue, df1, df2
        ``(G,)`` each; NaN statistic and p-value where ``df1 < 1`` or
        ``df2 < 1`` (too few replicates left), or where both residual sums
        are 0 (no variation at all).
    """
    y = np.asarray(y, dtype=np.float64)
    g = y.shape[0]
    stat, pval = np.full(g, np.nan), np.full(g, np.nan)
    df1, df2 = np.zeros(g, dtype=np.int64), np.zeros(g, dtype=np.int64)
    if g == 0:
        return stat, pval, df1, df2
    ok = np.isfinite(y)
    patterns, inverse = np.unique(ok, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    for i, pattern in enumerate(patterns):
        rows = np.flatnonzero(inverse == i)
        cols = np.flatnonzero(pattern)
        xf, xr = full[cols], reduced[cols]
        rf, rr = _rank(xf), _rank(xr)
        d1, d2 = rf - rr, len(cols) - rf
        df1[rows], df2[rows] = d1, d2
        if d1 < 1 or d2 < 1:
            continue
        yy = y[np.ix_(rows, cols)].T  # (m, genes)
        rss_f = _rss(xf, yy)
        rss_r = np.maximum(_rss(xr, yy), rss_f)
        scale = np.maximum(np.abs(yy).max(0), 1e-300) ** 2 * len(cols)
        flat = rss_r <= 1e-24 * scale  # no variation left to explain
        with np.errstate(divide="ignore", invalid="ignore"):
            f = ((rss_r - rss_f) / d1) / (rss_f / d2)
        f = np.where(flat, np.nan, np.where(rss_f <= 1e-24 * scale, np.inf, f))
        stat[rows] = f
        pval[rows] = np.where(np.isnan(f), np.nan, stats.f.sf(f, d1, d2))
    return stat, pval, df1, df2


def _rss(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Residual sums of squares of the columns of ``y`` regressed on ``x`` (least squares, any rank)."""
    if x.shape[1] == 0:
        return (y**2).sum(0)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    return ((y - x @ coef) ** 2).sum(0)


def group_means(y: np.ndarray, codes: np.ndarray, n: int) -> np.ndarray:
    """``(G, n)`` mean of each gene's finite values within each group of the last axis (NaN for an empty one)."""
    y = np.asarray(y, dtype=np.float64)
    member = _indicators(codes, n, drop_first=False)  # (R, n)
    ok = np.isfinite(y)
    total = np.where(ok, y, 0.0) @ member
    count = ok.astype(np.float64) @ member
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / count, np.nan)


def cell_means(y: np.ndarray, design: CompareDesign) -> np.ndarray:
    """``(L, G)`` each level's mean effect: of its sections, or with donors of its donors' means within the level.

    With blocking, each (donor, level) cell's sections are averaged first
    and the level's mean is that of its cells, so a donor with many
    sections counts once per level.
    """
    y = np.asarray(y, dtype=np.float64)
    if design.donors is None:
        return group_means(y, design.levels, design.n_levels).T
    cells = design.donors * design.n_levels + design.levels
    means = group_means(y, cells, design.n_donors * design.n_levels)  # (G, D * L)
    per_level = means.reshape(y.shape[0], design.n_donors, design.n_levels)
    ok = np.isfinite(per_level)
    count = ok.sum(1)
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, np.where(ok, per_level, 0.0).sum(1) / np.maximum(count, 1), np.nan).T


def compare_effects(effects: np.ndarray, design: CompareDesign) -> dict[str, np.ndarray]:
    """Compare each gene's per-section effects between levels by the model of ``design``.

    Parameters
    ----------
    effects
        ``(..., S)`` effect sizes, sections on the last axis (NaN where a
        section did not test the gene).
    design
        From :func:`compare_design`.

    Returns
    -------
    dict
        ``statistic`` and ``pvalue`` (F and its upper tail) of shape ``...``;
        ``effect`` ``(L, ...)``, the levels' mean effects (:func:`cell_means`);
        ``df1``, ``df2`` per gene.
    """
    e = np.asarray(effects, dtype=np.float64)
    lead = e.shape[:-1]
    y = e.reshape(-1, e.shape[-1])
    if design.test == "donor-means":
        reps = group_means(y, design.donors, design.n_donors)
    else:
        reps = y
    full, reduced = design.matrices()
    stat, pval, df1, df2 = linear_f_test(reps, full, reduced)
    level_mean = cell_means(y, design)
    return {"statistic": stat.reshape(lead), "pvalue": pval.reshape(lead),
            "effect": level_mean.reshape(design.n_levels, *lead), "df1": df1.reshape(lead), "df2": df2.reshape(lead)}
