"""Covariate encoding of the DU tests: one test per covariate, its reference level, joint and per-level tests."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import spatialscale
from spatialscale import InputError
from spatialscale.covariates import encode_covariates, one_hot, resolve_covariates
from spatialscale.glmm import fit_glm, score_test, wald_test
from spatialscale.stats.du import du_responses, hsic_du
from spatialscale.stats.nulls import liu_pvalue
from tests.conftest import make_adata

KW = {"scheduler": "threads", "progress": False}


@pytest.fixture(scope="module")
def section(tmp_path_factory):
    a = make_adata(300, 12, zero_spots=0.15, seed=3)
    rng = np.random.default_rng(11)
    region = a.obs["region"].astype(str).to_numpy()
    a.obs["is_A"] = region == "A"
    a.obs["region_rev"] = pd.Categorical(region, categories=["B", "A"])  # the same groups, B the reference
    ct = rng.choice(["x", "y", "z"], a.n_obs)
    a.obs["ct"] = pd.Categorical(ct)
    a.obs["ct_rev"] = pd.Categorical(ct, categories=["z", "y", "x"])
    a.obs["cont"] = rng.normal(size=a.n_obs)
    store = spatialscale.ingest(a, tmp_path_factory.mktemp("enc") / "s.zarr")
    return a, store


# --------------------------------------------------------------------------- the encoding itself
def test_encoding_of_booleans_binary_and_multi_level_columns():
    obs = pd.DataFrame({"flag": [True, False, True, True, False, False],
                        "grp": pd.Categorical(list("ababba"), categories=["b", "a", "unused"]),
                        "ct": pd.Categorical(list("xyzxyz")),
                        "num": [0.5, 1.0, 2.0, 3.0, 4.0, 5.5]})
    d = encode_covariates(obs, ["flag", "grp", "ct", "num"])
    assert d.tests == ["flag", "grp", "ct", "num"]
    assert d.reference == ["False", "b", "x", ""]  # booleans: False; categoricals: the first (used) category
    assert d.encoding == ["binary", "binary", "joint", "numeric"]
    assert d.columns == ["flag[True]", "grp[a]", "ct[x]", "ct[y]", "ct[z]", "num"]
    assert d.groups == ((0,), (1,), (2, 3, 4), (5,)) and d.joint == ["ct"]
    np.testing.assert_array_equal(d.z[:, 0], [1, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(d.z[:, 1], [1, 0, 1, 0, 0, 1])  # 1 = level "a", the non-reference one
    np.testing.assert_array_equal(d.z[:, 2:5].sum(1), 1.0)
    # models with an intercept: the reference's indicator left out
    r = encode_covariates(obs, ["ct"], drop_reference=True)
    assert r.columns == ["ct[y]", "ct[z]"] and r.groups == ((0, 1),) and r.reference == ["x"]
    # per level: SPLISOSM's one-hot layout, each level its own test (the unused category dropped)
    p = encode_covariates(obs, ["flag", "grp", "ct"], per_level=True)
    assert p.tests == p.columns == ["flag_False", "flag_True", "grp_b", "grp_a", "ct_x", "ct_y", "ct_z"]
    assert p.column_groups is None and set(p.encoding) == {"level"} and set(p.reference) == {""}
    np.testing.assert_array_equal(p.z[:, 4:], one_hot(obs["ct"], "ct").to_numpy())
    # glmm_fit's fixed effects keep every level, as before
    names, z = resolve_covariates(obs, ["flag", "ct"])
    assert names == ["flag_False", "flag_True", "ct_x", "ct_y", "ct_z"] and z.shape == (6, 5)
    # arrays and DataFrames: one numeric test per column
    a = encode_covariates(obs, np.c_[np.arange(6.0), np.arange(6.0) ** 2])
    assert a.tests == ["factor_1", "factor_2"] and a.encoding == ["numeric"] * 2 and a.column_groups is None
    with pytest.raises(InputError, match=r"'one' takes one value \('k'\) on every spot"):
        encode_covariates(obs.assign(one=pd.Categorical(["k"] * 6, categories=["k", "l"])), ["one"])


# --------------------------------------------------------------------------- binary: one test, either reference
@pytest.mark.parametrize("method", ["hsic", "t-fisher", "t-tippett", "hsic-gp", "glmm-score"])
def test_binary_and_boolean_covariates_are_one_test_whichever_the_reference(section, method):
    _, store = section
    gp = method == "hsic-gp"  # GP fits are slow: two columns
    kw = {**KW, "gp": {"backend": "exact"}} if gp else KW
    covs = ["region", "is_A", "region_rev"][: 2 if gp else 3]
    ds = spatialscale.du_test(store, covs, method=method, **kw)
    assert list(ds.covariate.values) == covs
    assert list(ds.covariate_reference.values) == ["A", "False", "B"][: len(covs)]
    assert list(ds.covariate_encoding.values) == ["binary"] * len(covs)
    assert ds.du_pvalue.shape == (store.n_genes, len(covs))
    p = ds.du_pvalue.values
    # the region genes of the fixture are found (hsic-gp removes region's spatial trend, and them with it)
    assert np.isfinite(p).all() and (gp or p.min() < 1e-3)
    # the tests are symmetric: coding A or B as 1 gives the same p-values, equal to each per-level column's
    for j in range(1, len(covs)):
        np.testing.assert_allclose(p[:, j], p[:, 0], rtol=1e-9)
    old = spatialscale.du_test(store, ["region"], method=method, per_level=True, **kw)
    assert list(old.covariate.values) == ["region_A", "region_B"]
    for level in ("region_A", "region_B"):
        np.testing.assert_allclose(old.du_pvalue.sel(covariate=level).values, p[:, 0], rtol=1e-9)
    # BH is over genes within the one test: the family is the genes, not genes x levels
    np.testing.assert_allclose(ds.du_pvalue_adj.values[:, 0], stats.false_discovery_control(p[:, 0]), rtol=1e-12)


def test_glmm_wald_binary_covariate_does_not_depend_on_the_reference(section):
    _, store = section
    a = spatialscale.du_test(store, ["region", "cont"], method="glmm-wald", **KW)
    b = spatialscale.du_test(store, ["region_rev", "cont"], method="glmm-wald", **KW)
    assert list(a.covariate_reference.values) == ["A", ""] and list(b.covariate_reference.values) == ["B", ""]
    # the same model, the binary column's coefficient negated: equal to the fits' tolerance
    np.testing.assert_allclose(a.du_pvalue.values, b.du_pvalue.values, rtol=1e-5)


# --------------------------------------------------------------------------- k >= 3 levels: jointly
def _brute_force_hsic(counts: np.ndarray, levels: np.ndarray, covered_only: bool) -> tuple[float, float]:
    """Dense ``tr(Y' H L H Y) / (n-1)^2`` with ``L = Z Z'`` the indicator kernel, and Liu's p-value on the
    products of the eigenvalues of ``H L H`` and ``Y' H Y``."""
    tot = counts.sum(1)
    keep = tot > 0 if covered_only else np.ones(len(tot), bool)
    ratios = counts[tot > 0] / tot[tot > 0, None]
    y = np.tile(ratios.mean(0), (len(tot), 1))  # nan_filling="mean": uncovered spots take the mean ratio
    y[tot > 0] = ratios
    y, lv = y[keep], levels[keep]
    n = len(y)
    z = (lv[:, None] == np.unique(levels)[None, :]).astype(float)
    h = np.eye(n) - 1.0 / n
    kern = h @ z @ z.T @ h
    t = np.trace(y.T @ kern @ y)
    lam = np.linalg.eigvalsh(kern)
    mu = np.linalg.eigvalsh(y.T @ h @ y)
    w = np.outer(lam[lam > 1e-5], mu[mu > 1e-5]).ravel()
    c = np.array([(w**r).sum() for r in range(1, 5)])
    return t / (n - 1) ** 2, float(liu_pvalue(np.array([n * t]), c[None])[0])


@pytest.mark.parametrize("nan_filling", ["mean", "none"])
def test_joint_hsic_equals_the_dense_indicator_kernel(section, nan_filling):
    adata, store = section
    ds = spatialscale.du_test(store, ["ct", "cont"], method="hsic", nan_filling=nan_filling, **KW)
    assert list(ds.covariate.values) == ["ct", "cont"] and ds.du_pvalue.shape == (store.n_genes, 2)
    assert list(ds.covariate_reference.values) == ["x", ""]
    assert list(ds.covariate_encoding.values) == ["joint", "numeric"]
    spots = store.obs().index
    levels = adata.obs.loc[spots, "ct"].astype(str).to_numpy()
    counts = np.asarray(adata[spots].layers["counts"].todense(), dtype=np.float64)
    genes = adata.var["gene_symbol"].to_numpy()
    for g in ds.gene.values[:6]:
        stat, p = _brute_force_hsic(counts[:, genes == g], levels, covered_only=nan_filling == "none")
        np.testing.assert_allclose(ds.du_statistic.sel(gene=g, covariate="ct").item(), stat, rtol=1e-9)
        np.testing.assert_allclose(ds.du_pvalue.sel(gene=g, covariate="ct").item(), p, rtol=1e-6)
    # the joint kernel uses every level: the reference does not change it
    rev = spatialscale.du_test(store, ["ct_rev"], method="hsic", nan_filling=nan_filling, **KW)
    np.testing.assert_allclose(rev.du_statistic.values[:, 0], ds.du_statistic.values[:, 0], rtol=1e-10)
    np.testing.assert_allclose(rev.du_pvalue.values[:, 0], ds.du_pvalue.values[:, 0], rtol=1e-9)


def test_joint_hsic_is_calibrated_under_the_null():
    """Null genes (usage independent of three random categoricals of 3, 4 and 6 levels): uniform p-values.

    The null's power sums are the products of both kernels' (measured with a
    rank-one null taking ``lambda = tr(Z_c' Z_c)``: 1.3% at 0.05, KS p 1e-7).
    """
    rng = np.random.default_rng(2)
    n, genes, p = 300, 300, 3
    probs = rng.dirichlet(np.full(p, 2.0), size=(genes, n))  # overdispersed: spot-level usage varies
    counts = rng.multinomial(rng.poisson(3, (genes, n)), probs).astype(np.float64)  # ~5% spots without counts
    blocks, groups = [], []
    for k in (3, 4, 6):
        start = sum(len(g) for g in groups)
        groups.append(tuple(range(start, start + k)))
        blocks.append((rng.choice(k, n)[:, None] == np.arange(k)).astype(np.float64))
    y, used = du_responses(counts, "none", "none")
    assert 0.02 < 1 - used.mean() < 0.1
    _, pval = hsic_du(y, used, np.concatenate(blocks, axis=1), tuple(groups))
    pval = pval.ravel()
    assert 0.025 <= (pval < 0.05).mean() <= 0.08
    assert stats.kstest(pval, "uniform").pvalue > 1e-3


def test_joint_hsic_finds_usage_that_follows_one_level():
    rng = np.random.default_rng(3)
    n, genes = 300, 40
    lv = rng.choice(3, n)
    eta = np.zeros((genes, n, 3))
    eta[:, :, 0] = 0.8 * (lv == 1)  # isoform 1 is used more at level 1
    probs = np.exp(eta) / np.exp(eta).sum(-1, keepdims=True)
    counts = rng.multinomial(rng.poisson(8, (genes, n)), probs).astype(np.float64)
    y, used = du_responses(counts)
    _, pval = hsic_du(y, used, (lv[:, None] == np.arange(3)).astype(np.float64), ((0, 1, 2),))
    assert (pval[:, 0] < 0.01).mean() >= 0.9


def test_glmm_joint_tests_of_a_categorical(section):
    _, store = section
    for method in ("glmm-score", "glmm-wald"):
        ds = spatialscale.du_test(store, ["ct", "cont"], method=method, **KW)
        assert list(ds.covariate.values) == ["ct", "cont"] and list(ds.covariate_reference.values) == ["x", ""]
        p = ds.du_pvalue.values
        assert np.isfinite(p[ds.n_isoforms.values > 1]).all()
        # the robust tests of the levels beside the intercepts do not depend on the reference level
        rev = spatialscale.du_test(store, ["ct_rev", "cont"], method=method, **KW)
        np.testing.assert_allclose(rev.du_pvalue.values, p, rtol=1e-5, err_msg=method)
        # the numeric covariate's test is the one it gets without the categorical (score: tested one at a time)
        if method == "glmm-score":
            alone = spatialscale.du_test(store, ["cont"], method=method, **KW)
            np.testing.assert_allclose(alone.du_pvalue.values[:, 0], p[:, 1], rtol=1e-9)


def _glm_null(seed: int = 0, n: int = 200, genes: int = 4, p: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(p, 3.0), size=(genes, n))
    counts = rng.multinomial(rng.poisson(6, (genes, n)), probs).astype(np.float64)
    return counts, fit_glm(counts)["probs"]


@pytest.mark.parametrize("kw", [{"variance": "robust"}, {"variance": "model"},
                                {"variance": "model", "information": "adjusted"}, {"variance": "pearson"}],
                         ids=["robust", "model", "adjusted", "pearson"])
def test_joint_score_test_is_invariant_to_the_columns_basis(kw):
    """A joint test depends on the space its columns span: ``Z`` and ``Z A`` (``A`` invertible) give the same
    statistic; one-column groups give the per-column test; its degrees of freedom are ``k q``."""
    counts, probs = _glm_null()
    rng = np.random.default_rng(1)
    z = np.c_[rng.normal(size=(200, 2)), rng.random(200) > 0.5]
    a = np.array([[1.0, 0.5], [-0.3, 2.0]])
    joint = ((0, 1), (2,))
    s1, p1 = score_test(counts, probs, z, groups=joint, **kw)
    s2, p2 = score_test(counts, probs, np.c_[z[:, :2] @ a, z[:, 2]], groups=joint, **kw)
    assert s1.shape == (4, 2)
    np.testing.assert_allclose(s2, s1, rtol=1e-6)
    np.testing.assert_allclose(p2, p1, rtol=1e-6)
    single, p_single = score_test(counts, probs, z, **kw)
    np.testing.assert_allclose(s1[:, 1], single[:, 2], rtol=1e-10)
    np.testing.assert_allclose(p1[:, 1], p_single[:, 2], rtol=1e-10)
    same, _ = score_test(counts, probs, z, groups=((0,), (1,), (2,)), **kw)
    np.testing.assert_allclose(same, single, rtol=1e-10)
    if kw["variance"] == "robust":
        np.testing.assert_allclose(p1[:, 0], stats.chi2.sf(s1[:, 0], 2 * 3), rtol=1e-12)


def test_joint_unadjusted_score_of_disjoint_indicators_adds_the_levels():
    counts, probs = _glm_null(seed=4)
    lv = np.random.default_rng(5).choice(3, 200)
    z = (lv[:, None] == np.arange(1, 3)).astype(np.float64)  # levels 1 and 2 beside the reference 0
    single, _ = score_test(counts, probs, z)
    joint, p = score_test(counts, probs, z, groups=((0, 1),))
    np.testing.assert_allclose(joint[:, 0], single.sum(1), rtol=1e-10)  # no cross terms between disjoint levels
    np.testing.assert_allclose(p[:, 0], stats.chi2.sf(single.sum(1), 2 * 3), rtol=1e-10)


@pytest.mark.parametrize("variance", ["robust", "model"])
def test_joint_wald_test_is_invariant_to_the_columns_basis(variance):
    counts, probs = _glm_null(seed=6)
    rng = np.random.default_rng(7)
    z = rng.normal(size=(200, 3))
    beta = rng.normal(scale=0.1, size=(4, 3, 3))
    a = np.array([[2.0, 0.4], [0.1, -1.0]])
    z2 = np.c_[z[:, :2] @ a, z[:, 2]]
    beta2 = beta.copy()
    beta2[:, :2] = np.einsum("ij,bjq->biq", np.linalg.inv(a), beta[:, :2])  # the same eta = Z beta
    s1, p1 = wald_test(counts, probs, z, beta, variance=variance, groups=((0, 1), (2,)))
    s2, p2 = wald_test(counts, probs, z2, beta2, variance=variance, groups=((0, 1), (2,)))
    np.testing.assert_allclose(s2, s1, rtol=1e-6)
    single, _ = wald_test(counts, probs, z, beta, variance=variance)
    np.testing.assert_allclose(s1[:, 1], single[:, 2], rtol=1e-10)
    np.testing.assert_allclose(p1[:, 0], stats.chi2.sf(s1[:, 0], 2 * 3), rtol=1e-12)


# --------------------------------------------------------------------------- per level, refusals
def test_per_level_reproduces_the_one_hot_layout(section):
    adata, store = section
    covs = ["region", "is_A", "ct"]
    new = spatialscale.du_test(store, covs, method="t-fisher", per_level=True, **KW)
    names = ["region_A", "region_B", "is_A_False", "is_A_True", "ct_x", "ct_y", "ct_z"]
    assert list(new.covariate.values) == names
    assert set(new.covariate_encoding.values) == {"level"} and set(new.covariate_reference.values) == {""}
    obs = store.obs()
    frame = pd.concat([one_hot(obs[c], c) for c in covs], axis=1)  # the old encoding, as a design matrix
    old = spatialscale.du_test(store, frame, method="t-fisher", **KW)
    assert list(old.covariate.values) == names
    np.testing.assert_array_equal(new.du_pvalue.values, old.du_pvalue.values)
    np.testing.assert_array_equal(new.du_pvalue_adj.values, old.du_pvalue_adj.values)


def test_t_tests_refuse_multi_level_covariates_without_per_level(section, tmp_path):
    _, store = section
    out = tmp_path / "du.zarr"
    for method in ("t-fisher", "t-tippett"):
        with pytest.raises(InputError) as err:
            spatialscale.du_test(store, ["region", "ct"], method=method, out=out, **KW)
        msg = str(err.value)
        assert "\n" not in msg and "'ct' has 3 levels" in msg and "per_level=True (--per-level)" in msg
        assert "hsic, hsic-gp, glmm-score, glmm-wald" in msg and method in msg
        assert not out.exists()
    with pytest.raises(InputError, match=r"null='gp'.*'ct' has 3 levels.*per_level=True.*null='liu'"):
        spatialscale.du_test(store, ["ct"], method="hsic-gp", null="gp", out=out, **KW)
    with pytest.raises(InputError, match="per_level must be True or False"):
        spatialscale.du_test(store, ["ct"], method="hsic", per_level="yes", **KW)
    # numeric covariates are unchanged by per_level
    a = spatialscale.du_test(store, ["cont"], method="hsic", **KW)
    b = spatialscale.du_test(store, ["cont"], method="hsic", per_level=True, **KW)
    np.testing.assert_array_equal(a.du_pvalue.values, b.du_pvalue.values)


def test_cli_per_level_flag(section, tmp_path, capsys):
    from spatialscale.cli import main

    _, store = section
    args = ["du", str(store.path), "--covariates", "ct", "--method", "t-fisher", "--scheduler", "threads",
            "--no-progress", "--top", "0"]
    assert main([*args, "--out", str(tmp_path / "a.zarr")]) == 2
    assert "--per-level" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "b.zarr"), "--per-level"]) == 0
    ds = spatialscale.open_results(tmp_path / "b.zarr")
    assert list(ds.covariate.values) == ["ct_x", "ct_y", "ct_z"]
