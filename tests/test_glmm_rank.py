"""The GLMM's kernel basis at 10^5 spots: what the truncated rank keeps, and how score-test p-values move with it."""

from __future__ import annotations

import numpy as np
import pytest

import spatialscale
from spatialscale.simulate import simulate_section


@pytest.mark.slow
def test_score_pvalues_at_15000_spots_against_a_higher_rank(tmp_path):
    """glmm-full at 1.5 x 10^4 spots with rank 100 and 200 (far below the default, ceil(4 sqrt(n)) = 490): the
    basis is nested, holds a small part of the kernel's variance, and the score test of a non-spatial
    covariate finds the same genes at both ranks, its p-values well within an order of magnitude
    (docs/statistics.md, "Eigenpairs for the GLMM"). (At 10^5 spots the same holds, rank 100 / 200 holding
    2.7% / 5.2%, in five minutes of this suite; at 3 x 10^4 spots 7.8% / 14.6% in 80 s; 1.5 x 10^4 spots take
    35 s.)"""
    adata = simulate_section(15_000, 6, n_sv=0, n_du=3, isoforms=(3, 3), geometry="hex", seed=1, mean_depth=6.0,
                             effect=0.4)
    store = spatialscale.ingest(adata, tmp_path / "s.zarr")
    is_du = adata.var.groupby("gene_symbol", observed=True)["is_du"].first().reindex(store.genes.index).to_numpy()
    pvals, lams = {}, {}
    for rank in (100, 200):
        lams[rank], _ = store.ensure_eigenpairs(rank)
        ds = spatialscale.du_test(store, "celltype", method="glmm-score", model="glmm-full", glmm={"rank": rank},
                                  scheduler="threads", progress=False)
        assert ds.attrs["glmm_rank"] == rank
        pvals[rank] = ds["du_pvalue"].values
    np.testing.assert_allclose(lams[100], lams[200][:100], rtol=1e-8)
    held = [lams[r].sum() / store.n_spots for r in (100, 200)]
    print(f"rank 100 / 200 hold {held[0]:.3f} / {held[1]:.3f} of tr K")
    assert 0.03 < held[0] < held[1] < 0.35  # tr K = n: a minor part of the kernel
    lo, hi = pvals[100], pvals[200]
    assert np.all(lo[is_du] < 1e-6) and np.all(hi[is_du] < 1e-6)
    assert np.all(lo[~is_du] > 1e-3) and np.all(hi[~is_du] > 1e-3)
    moderate = hi > 1e-6
    assert np.max(np.abs(np.log10(lo[moderate]) - np.log10(hi[moderate]))) < 0.25  # measured: 0.06
