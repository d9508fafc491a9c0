"""Known truth for cohorts, through the engine: calibrated combined p-values on null cohorts, power on weak ones."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import spatialscale
from spatialscale.simulate import null_section, simulate_cohort

pytestmark = pytest.mark.slow  # in CI too


@pytest.fixture(scope="module")
def null_cohort(tmp_path_factory):
    # 8 sections of 300-600 spots, 1200 genes each (gene-specific depths, 5% spots without coverage), no effect
    root = tmp_path_factory.mktemp("nullco")
    rng = np.random.default_rng(0)
    rows = []
    for s in range(8):
        adata = null_section(n_spots=int(rng.integers(300, 601)), n_genes=1200, mean_depth=10.0,
                             zero_spot_frac=0.05, seed=100 + s)
        adata.write_h5ad(root / f"s{s}.h5ad")
        rows.append({"section": f"s{s}", "path": f"s{s}.h5ad", "condition": "ab"[s % 2]})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return spatialscale.ingest_cohort(root / "manifest.csv", root / "co", scheduler="threads", progress=False)


def test_combined_pvalues_are_calibrated_on_a_null_cohort(null_cohort, client, tmp_path):
    from scipy import stats

    out = tmp_path / "null.zarr"
    fractions = {}
    for combine in ("cauchy", "fisher", "stouffer", "pooled"):
        # one output: the sections' batches are computed once (on the LocalCluster) and recombined
        ds = spatialscale.sv_test(null_cohort, null="liu-perm", combine=combine, group_by="condition", out=out,
                                  overwrite=True, client=client, progress=False)
        p = ds["combined_pvalue"].values
        assert p.size >= 1000 and np.isfinite(p).all() and (ds["n_sections_tested"].values == 8).all()
        fractions[combine] = float(np.mean(p < 0.05))
        for g in ds["group"].values:  # within each condition (4 sections) too
            pg = ds["group_combined_pvalue"].sel(group=g).values
            assert 0.03 <= float(np.mean(pg < 0.05)) <= 0.07, (combine, g)
        assert int((ds["combined_pvalue_adj"].values < 0.05).sum()) <= 2, combine
    for combine, frac in fractions.items():
        assert 0.035 <= frac <= 0.065, f"{combine}: {frac:.4f} of null combined p-values below 0.05"
    section_p = ds["sv_pvalue"].values
    assert 0.03 <= np.mean(section_p < 0.05) <= 0.065
    # SPLISOSM's null (the chi-square mixture) is under-dispersed on these sections (discrete isoform ratios):
    # combining keeps that, and Stouffer's combination falls well below the nominal level
    liu = spatialscale.sv_test(null_cohort, combine="stouffer", scheduler="threads", progress=False)
    z = stats.norm.isf(np.clip(liu["sv_pvalue"].values, 1e-300, 1 - 1e-15))
    assert np.std(z) < 0.95 and float(np.mean(liu["combined_pvalue"].values < 0.05)) < 0.035


def test_combining_weak_sections_beats_the_best_single_section(tmp_path):
    # 6 sections in which the same 60 of 300 genes are weakly spatially variable
    manifest, truth = simulate_cohort(tmp_path / "sim", 6, 300, n_shared=60, n_specific=0, spots=(300, 500),
                                      depth=(4.0, 8.0), effect=0.2, seed=4)
    cohort = spatialscale.ingest_cohort(manifest, tmp_path / "co", scheduler="threads", progress=False)
    out = tmp_path / "weak.zarr"
    shared = truth.index[truth["shared"]]
    null = truth.index[~truth["shared"]]
    best, powers = None, {}
    for combine in ("cauchy", "pooled", "fisher"):
        ds = spatialscale.sv_test(cohort, null="liu-perm", combine=combine, out=out, overwrite=True,
                                  scheduler="threads", progress=False)
        found = ds["combined_pvalue_adj"].to_series() < 0.05
        if best is None:
            per_section = (ds["sv_pvalue_adj"] < 0.05).sel(gene=list(shared)).mean("gene")
            best = float(per_section.max())
        power = float(found[shared].mean())
        powers[combine] = power
        assert power > best + 0.1, f"{combine}: power {power:.2f}, best single section {best:.2f}"
        assert float(found[null].sum()) / max(float(found.sum()), 1.0) <= 0.1  # false discoveries stay few
    assert best < 0.6, powers  # the signal is weak in every section
