"""Effect sizes of the SV tests (``sv_effect``): the formula, and comparability across sections.

The HSIC effect is the RV coefficient of the responses' Gram matrix and the
centred kernel, less its mean without spatial variability; it should be
about 0 for non-SV genes in any section, and similar for the same pattern in
sections of different sizes (where p-values differ by hundreds of orders of
magnitude).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

import spatialscale
from spatialscale.simulate import simulate_section

RUN = {"scheduler": "threads", "progress": False}


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    a = simulate_section(100, 12, n_sv=4, isoforms=(3, 3), mean_depth=20, seed=5)
    return spatialscale.ingest(a, tmp_path_factory.mktemp("effect") / "s.zarr")


def test_effect_equals_the_dense_rv_coefficient(small_store):
    from test_sv_adjusted import _dense_counts

    from spatialscale.stats.responses import ratio_response

    store = small_store
    n = store.n_spots
    h = np.eye(n) - 1.0 / n
    kc = h @ np.linalg.inv(store.precision().toarray()) @ h
    counts = _dense_counts(store)
    y, _ = ratio_response(counts, "none")
    ds = spatialscale.sv_test(store, **RUN)
    for g in range(counts.shape[0]):
        gram = y[g] @ y[g].T
        rv = np.sum(gram * kc) / np.sqrt(np.sum(gram * gram) * np.sum(kc * kc))
        null_mean = np.trace(kc) * np.trace(gram) / ((n - 1) * np.sqrt(np.sum(gram * gram) * np.sum(kc * kc)))
        assert ds["sv_effect"].values[g] == pytest.approx(rv - null_mean, rel=1e-8)
        assert rv <= 1.0 + 1e-12
    # the same through hsic-gc and an adjusted run: finite, and at most 1
    for kw in ({"method": "hsic-gc"}, {"covariates": "celltype"}):
        eff = spatialscale.sv_test(store, **kw, **RUN)["sv_effect"].values
        assert np.isfinite(eff).all() and (eff <= 1).all()


def test_effect_is_comparable_across_section_sizes(tmp_path):
    """One generative pattern at 400 and 2,500 spots: the effects agree, the p-values do not."""
    out = {}
    for n in (400, 2500):
        a = simulate_section(n, 120, sv_mask=np.arange(120) < 40, isoforms=(3, 3), mean_depth=20, seed=1)
        ds = spatialscale.sv_test(spatialscale.ingest(a, tmp_path / f"s{n}.zarr"), **RUN)
        out[n] = (ds["sv_effect"].values, ds["sv_pvalue"].values)
    for n, (eff, p) in out.items():
        null, sv = eff[40:], eff[:40]
        print(f"{n} spots: null effect mean {null.mean():.4f} (sd {null.std():.4f}); SV effect median "
              f"{np.median(sv):.3f}; SV median -log10 p {np.median(-np.log10(np.clip(p[:40], 1e-300, 1))):.1f}")
        assert abs(null.mean()) < 0.01  # centred: about 0 without SV, whatever the size
        assert np.median(sv) > 10 * null.std()
        # the effect ranks genes as the test does within a section
        assert stats.spearmanr(eff, -np.log10(np.clip(p, 1e-300, 1))).statistic > 0.8
    ratio = np.median(out[2500][0][:40]) / np.median(out[400][0][:40])
    p_ratio = np.median(np.log10(np.clip(out[2500][1][:40], 1e-300, 1))) / np.median(np.log10(out[400][1][:40]))
    print(f"median SV effect 2500 / 400 spots: {ratio:.2f}; median log10 p ratio: {p_ratio:.1f}")
    assert 0.6 < ratio < 1.6
    assert p_ratio > 2.5
