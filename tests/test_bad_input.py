"""The bad-input corpus: every mistake ends in one line naming it, exit code 2 (API: InputError), nothing left behind.

Each case is one line of ``CLI_CASES`` (command-line arguments, with ``{h5ad}``,
``{store}``, ``{out}``... filled in from the fixtures below) or of
``API_CASES`` (a callable of the fixture paths).  Every case runs in its own
empty working directory; the test checks the exit code / exception, that the
message is one line naming the problem, that no traceback is printed, and that
no file anywhere under the test's folders was added, removed or changed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
from conftest import make_adata

import spatialscale
from spatialscale import InputError
from spatialscale.cli import main


def _write(adata, path: Path) -> None:
    adata.write_h5ad(path)


def _variant(base, change) -> object:
    a = base.copy()
    a.obsm["spatial"] = np.array(a.obsm["spatial"], copy=True)
    change(a)
    return a


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs shared by the corpus: good and bad h5ad files, a store, a user folder, an existing result."""
    root = tmp_path_factory.mktemp("corpus")
    base = make_adata(n=100, n_genes=6, seed=1)
    rng = np.random.default_rng(0)
    base.obs["rbp"] = rng.normal(size=base.n_obs)
    base.obs["numtext"] = [f"{i * 0.37:.2f}" for i in range(base.n_obs)]  # e.g. an RBP's level stored as text
    base.obs["withnan"] = np.where(np.arange(base.n_obs) < 3, np.nan, rng.normal(size=base.n_obs))
    base.obs["const"] = 1.0
    base.obs["label"] = pd.Categorical(rng.choice(["a", "b", "c"], base.n_obs))
    base.obs["spotid"] = [f"s{i}" for i in range(base.n_obs)]
    p = {"root": root}

    def bad(name, change):
        p[name] = root / f"{name}.h5ad"
        _write(_variant(base, change), p[name])

    p["h5ad"] = root / "good.h5ad"
    _write(base, p["h5ad"])
    bad("nan_xy", lambda a: a.obsm["spatial"].__setitem__((3, 0), np.nan))
    bad("dup_xy", lambda a: a.obsm["spatial"].__setitem__(4, a.obsm["spatial"][5]))
    bad("xy1", lambda a: a.obsm.__setitem__("spatial", a.obsm["spatial"][:, :1].copy()))
    bad("xy4", lambda a: a.obsm.__setitem__("spatial", np.c_[a.obsm["spatial"], np.zeros((a.n_obs, 2))]))
    bad("negative", lambda a: a.layers.__setitem__("counts", _dense_with(a, -1.0)))
    bad("huge", lambda a: a.layers.__setitem__("counts", _dense_with(a, 1e20)))
    bad("dup_spots", lambda a: setattr(a, "obs_names", [a.obs_names[0], *a.obs_names[1:-1], a.obs_names[0]]))
    bad("dup_isoforms", lambda a: setattr(a, "var_names", [a.var_names[0], *a.var_names[1:-1], a.var_names[0]]))
    _write(base[:5].copy(), root / "five.h5ad")
    p["five"] = root / "five.h5ad"
    _write(base[:12].copy(), root / "twelve.h5ad")
    p["twelve"] = root / "twelve.h5ad"
    p["truncated"] = root / "truncated.h5ad"
    p["truncated"].write_bytes(p["h5ad"].read_bytes()[:2000])
    p["text"] = root / "text.h5ad"
    p["text"].write_text("gene,count\nA,1\n")
    p["dir_h5ad"] = root / "folder.h5ad"
    p["dir_h5ad"].mkdir()
    p["store"] = root / "store.zarr"
    spatialscale.ingest(base, p["store"])
    p["user"] = root / "mydata"
    p["user"].mkdir()
    (p["user"] / "notes.txt").write_text("precious")
    p["a_file"] = root / "a_file.txt"
    p["a_file"].write_text("precious")
    p["results"] = root / "sv.zarr"
    spatialscale.sv_test(p["store"], out=p["results"], scheduler="threads", progress=False)
    return p


def _dense_with(a, value: float) -> np.ndarray:
    x = np.asarray(a.layers["counts"].todense(), dtype=np.float64)
    x[2, 1] = value
    return x


def _snapshot(root: Path) -> dict[str, tuple[int, bytes | None]]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            small = path.is_file() and path.stat().st_size < 1 << 16
            out[rel] = (path.stat().st_size if path.is_file() else -1, path.read_bytes() if small else None)
    return out


# (id, argv, words the one-line message must contain)
CLI_CASES = [
    ("ingest-missing-input", ["ingest", "{root}/nope.h5ad", "{out}"], "does not exist"),
    ("ingest-truncated-h5ad", ["ingest", "{truncated}", "{out}"], "not a readable .h5ad"),
    ("ingest-text-as-h5ad", ["ingest", "{text}", "{out}"], "not a readable .h5ad"),
    ("ingest-directory-h5ad", ["ingest", "{dir_h5ad}", "{out}"], "neither an .h5ad file nor an AnnData zarr"),
    ("ingest-missing-layer", ["ingest", "{h5ad}", "{out}", "--layer", "raw"], "layer 'raw' not found"),
    ("ingest-missing-gene-key", ["ingest", "{h5ad}", "{out}", "--gene-key", "gene"], "no column 'gene'"),
    ("ingest-missing-spatial-key", ["ingest", "{h5ad}", "{out}", "--spatial-key", "xy"], "no coordinates 'xy'"),
    ("ingest-missing-adjacency", ["ingest", "{h5ad}", "{out}", "--adj-key", "graph"], "no adjacency 'graph'"),
    ("ingest-nan-coordinates", ["ingest", "{nan_xy}", "{out}"], "NaN or infinite coordinates"),
    ("ingest-duplicate-coordinates", ["ingest", "{dup_xy}", "{out}"], "sharing coordinates"),
    ("ingest-one-coordinate-column", ["ingest", "{xy1}", "{out}"], "expected (100, 2)"),
    ("ingest-four-coordinate-columns", ["ingest", "{xy4}", "{out}"], "expected (100, 2) or (100, 3)"),
    ("ingest-negative-counts", ["ingest", "{negative}", "{out}"], "negative counts"),
    ("ingest-counts-beyond-2^53", ["ingest", "{huge}", "{out}"], "above 2^53"),
    ("ingest-duplicate-spot-names", ["ingest", "{dup_spots}", "{out}"], "duplicate spot name"),
    ("ingest-duplicate-isoform-names", ["ingest", "{dup_isoforms}", "{out}"], "duplicate isoform name"),
    ("ingest-five-spots", ["ingest", "{five}", "{out}"], "has 5 spot(s)"),
    ("ingest-fewer-spots-than-k+1", ["ingest", "{twelve}", "{out}", "--k-neighbors", "20"], "at least 21"),
    ("ingest-rho-above-one", ["ingest", "{h5ad}", "{out}", "--rho", "1.5"], "rho must satisfy"),
    ("ingest-zero-neighbours", ["ingest", "{h5ad}", "{out}", "--k-neighbors", "0"], "k_neighbors must be"),
    ("ingest-negative-min-counts", ["ingest", "{h5ad}", "{out}", "--min-counts", "-1"], "min_counts must be"),
    ("ingest-nothing-left", ["ingest", "{h5ad}", "{out}", "--min-counts", "1e9"], "no genes left"),
    ("ingest-existing-store", ["ingest", "{h5ad}", "{store}"], "--overwrite"),
    ("ingest-overwrite-user-folder", ["ingest", "{h5ad}", "{user}", "--overwrite"], "not written by spatialscale"),
    ("ingest-overwrite-results", ["ingest", "{h5ad}", "{results}", "--overwrite"], "no isoform store"),
    ("ingest-store-is-the-input", ["ingest", "{store}", "{store}", "--overwrite"], "overlaps the input"),
    ("ingest-store-is-cwd", ["ingest", "{h5ad}", ".", "--overwrite"], "working directory"),
    ("sv-missing-store", ["sv", "{root}/nope.zarr", "--out", "{out}"], "no isoform store"),
    ("sv-folder-is-no-store", ["sv", "{user}", "--out", "{out}"], "not an isoform store"),
    ("sv-unknown-method", ["sv", "{store}", "--out", "{out}", "--method", "hsic-xx"], "invalid choice: 'hsic-xx'"),
    ("sv-unknown-null", ["sv", "{store}", "--out", "{out}", "--null", "exact"], "invalid choice: 'exact'"),
    ("sv-null-of-the-other-family", ["sv", "{store}", "--out", "{out}", "--null", "chi2"], "unknown null 'chi2'"),
    ("sv-unknown-transformation", ["sv", "{store}", "--out", "{out}", "--transformation", "log"],
     "invalid choice: 'log'"),
    ("sv-transformation-for-counts", ["sv", "{store}", "--out", "{out}", "--method", "hsic-ic", "--transformation",
                                      "clr"], "'transformation' does not apply to method 'hsic-ic'"),
    ("sv-fit-for-hsic", ["sv", "{store}", "--out", "{out}", "--fit", "joint_newton"], "'fit' does not apply"),
    ("sv-bad-glmm-setting", ["sv", "{store}", "--out", "{out}", "--method", "glmm-llr", "--glmm", "learning=1"],
     "invalid GLMM options"),
    ("sv-glmm-setting-not-key-value", ["sv", "{store}", "--out", "{out}", "--glmm", "fast"], "expected KEY=VALUE"),
    ("sv-zero-permutations", ["sv", "{store}", "--out", "{out}", "--null", "perm", "--n-perms", "0"], "n_perms"),
    ("sv-llr-unknown-null", ["sv", "{store}", "--out", "{out}", "--method", "glmm-llr", "--null", "liu"],
     "unknown null 'liu'"),
    ("sv-zero-workers", ["sv", "{store}", "--out", "{out}", "--workers", "0"], "workers must be"),
    ("sv-negative-workers", ["sv", "{store}", "--out", "{out}", "--workers", "-1"], "workers must be"),
    ("sv-zero-batch-size", ["sv", "{store}", "--out", "{out}", "--batch-size", "0"], "batch_size must be"),
    ("sv-batch-memory-text", ["sv", "{store}", "--out", "{out}", "--batch-memory", "abc"], "not a size"),
    ("sv-batch-memory-zero", ["sv", "{store}", "--out", "{out}", "--batch-memory", "0"], "below 64 KiB"),
    ("sv-scheduler-not-an-address", ["sv", "{store}", "--out", "{out}", "--scheduler", "notanaddress"],
     "not a Dask scheduler address"),
    ("sv-scheduler-refused", ["sv", "{store}", "--out", "{out}", "--scheduler", "tcp://127.0.0.1:9"],
     "no Dask scheduler reachable"),
    ("sv-scheduler-file-missing", ["sv", "{store}", "--out", "{out}", "--scheduler", "{root}/sched.json"],
     "does not exist"),
    ("sv-out-is-cwd", ["sv", "{store}", "--out", ".", "--overwrite"], "working directory"),
    ("sv-out-is-the-store", ["sv", "{store}", "--out", "{store}", "--overwrite"], "overlaps the input"),
    ("sv-out-inside-the-store", ["sv", "{store}", "--out", "{store}/res.zarr"], "overlaps the input"),
    ("sv-out-user-folder", ["sv", "{store}", "--out", "{user}", "--overwrite"], "not written by spatialscale"),
    ("sv-out-is-a-file", ["sv", "{store}", "--out", "{a_file}", "--overwrite"], "not a spatialscale results"),
    ("sv-out-other-options", ["sv", "{store}", "--out", "{results}", "--method", "hsic-ic"], "other options"),
    ("sv-out-unwritable", ["sv", "{store}", "--out", "/proc/spatialscale-test.zarr"], "cannot"),
    ("du-unknown-covariate", ["du", "{store}", "--out", "{out}", "--covariates", "nope"], "not found in obs"),
    ("du-repeated-covariate", ["du", "{store}", "--out", "{out}", "--covariates", "rbp,rbp"], "more than once"),
    ("du-numbers-as-text", ["du", "{store}", "--out", "{out}", "--covariates", "numtext"], "different numbers"),
    ("du-covariate-with-nan", ["du", "{store}", "--out", "{out}", "--covariates", "withnan"], "NaN"),
    ("du-constant-covariate", ["du", "{store}", "--out", "{out}", "--covariates", "const"], "constant"),
    ("du-one-level-per-spot", ["du", "{store}", "--out", "{out}", "--covariates", "spotid"], "levels"),
    ("du-t-test-continuous", ["du", "{store}", "--out", "{out}", "--covariates", "rbp", "--method", "t-fisher"],
     "binary"),
    ("du-unknown-gp-backend", ["du", "{store}", "--out", "{out}", "--covariates", "rbp", "--gp", "backend=foo"],
     "unknown gp backend"),
    ("du-residualize-without-gp", ["du", "{store}", "--out", "{out}", "--covariates", "rbp", "--method", "hsic",
                                   "--residualize", "both"], "'residualize' does not apply to method 'hsic'"),
    ("du-unknown-model", ["du", "{store}", "--out", "{out}", "--covariates", "rbp", "--method", "glmm-score",
                          "--model", "glmm"], "invalid choice: 'glmm'"),
    ("du-model-for-kernel-test", ["du", "{store}", "--out", "{out}", "--covariates", "rbp", "--model", "glm"],
     "'model' does not apply to method 'hsic-gp'"),
    ("du-information-for-wald", ["du", "{store}", "--out", "{out}", "--covariates", "rbp", "--method", "glmm-wald",
                                 "--glmm", "information=adjusted"], "applies to method='glmm-score' only"),
    ("du-missing-covariates", ["du", "{store}", "--out", "{out}"], "--covariates"),
    ("glmm-unknown-model", ["glmm", "{store}", "--out", "{out}", "--model", "lmm"], "invalid choice: 'lmm'"),
    ("glmm-unknown-fit", ["glmm", "{store}", "--out", "{out}", "--fit", "lbfgs"], "invalid choice: 'lbfgs'"),
    ("glmm-glm-with-glmm-fit", ["glmm", "{store}", "--out", "{out}", "--model", "glm", "--fit", "joint_gd"],
     "unknown fit method for glm"),
    ("glmm-method-in-settings", ["glmm", "{store}", "--out", "{out}", "--glmm", "method=joint_newton"],
     "not glmm['method']"),
    ("workers-and-scheduler", ["sv", "{store}", "--out", "{out}", "--workers", "2", "--scheduler", "threads"],
     "not allowed with argument"),
    ("summary-on-cuda", ["summary", "{store}", "--out", "{out}", "--device", "auto"], "CPU only"),
]
if spatialscale.options.cuda_available():  # pragma: no cover - CUDA machines
    CLI_CASES = [c for c in CLI_CASES if "cuda" not in c[0]]
else:
    CLI_CASES.append(("sv-cuda-without-gpu", ["sv", "{store}", "--out", "{out}", "--device", "cuda"],
                      "no CUDA device"))


def _fill(arg: str, files: dict, out: Path) -> str:
    return arg.format(**{k: str(v) for k, v in files.items()}, out=str(out))


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize(("argv", "words"), [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input(files, workdir, capsys, argv, words):
    out = workdir / "new.zarr"
    before = _snapshot(files["root"]), _snapshot(workdir)
    try:
        code = main([_fill(a, files, out) for a in argv])
    except SystemExit as exc:  # argparse's usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]  # progress bars aside
    assert len(lines) == 1, err
    assert lines[0].startswith(f"spatialscale {argv[0]}: error: ")
    assert words in lines[0]
    assert "Traceback" not in err
    assert (_snapshot(files["root"]), _snapshot(workdir)) == before
    assert not out.exists()


def _frame_with_other_index(p):
    n = spatialscale.open_store(p["store"]).n_spots
    return pd.DataFrame({"x": np.arange(n, dtype=float)}, index=[f"cell{i}" for i in range(n)])


API_CASES = [
    ("client-and-scheduler", lambda p, out: spatialscale.sv_test(p["store"], client=object(), scheduler="threads",
                                                                 out=out), "give one of"),
    ("workers-bool", lambda p, out: spatialscale.sv_test(p["store"], workers=True, out=out), "workers must be"),
    ("device-unknown", lambda p, out: spatialscale.sv_test(p["store"], device="tpu", out=out), "unknown device"),
    ("overwrite-the-store", lambda p, out: spatialscale.sv_test(p["store"], out=p["store"], overwrite=True),
     "overlaps the input"),
    ("overwrite-user-folder", lambda p, out: spatialscale.du_test(p["store"], "rbp", method="hsic", out=p["user"],
                                                                  overwrite=True), "not written by spatialscale"),
    ("covariate-frame-misaligned", lambda p, out: spatialscale.du_test(p["store"], _frame_with_other_index(p),
                                                                       method="hsic", out=out), "index"),
    ("covariate-array-rows", lambda p, out: spatialscale.du_test(p["store"], np.ones((7, 1)), method="hsic",
                                                                 out=out), "shape (7, 1)"),
    ("glmm-unknown-option", lambda p, out: spatialscale.glmm_fit(p["store"], model="glmm-null",
                                                                 glmm={"learning_rate": 1}, out=out),
     "invalid GLMM options"),
    ("glm-with-glmm-options", lambda p, out: spatialscale.du_test(p["store"], "rbp", method="glmm-score",
                                                                  model="glm", glmm={"lr": 0.1}, out=out),
     "takes no GLMM settings"),
    ("ingest-anndata-coordinates-frame", lambda p, out: spatialscale.ingest(
        _variant(make_adata(n=50, n_genes=3), lambda a: a.obsm.__setitem__(
            "spatial", pd.DataFrame(np.c_[a.obsm["spatial"], np.ones((a.n_obs, 2))], index=a.obs_names))), out),
     "expected (50, 2) or (50, 3)"),
]


@pytest.mark.parametrize(("call", "words"), [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_bad_input(files, workdir, call, words):
    out = workdir / "new.zarr"
    before = _snapshot(files["root"]), _snapshot(workdir)
    with pytest.raises(InputError) as info:
        call(files, out)
    assert words in str(info.value)
    assert "\n" not in str(info.value).strip()
    assert (_snapshot(files["root"]), _snapshot(workdir)) == before


def test_corpus_is_large_enough():
    assert len(CLI_CASES) + len(API_CASES) >= 40


def test_coordinates_as_an_obsm_dataframe_are_used(tmp_path):
    a = make_adata(n=60, n_genes=3)
    xy = a.obsm["spatial"]
    a.obsm["spatial"] = pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]}, index=a.obs_names)
    b = make_adata(n=60, n_genes=3)
    with contextlib.ExitStack():
        one = spatialscale.ingest(a, tmp_path / "a.zarr")
        two = spatialscale.ingest(b, tmp_path / "b.zarr")
    assert one.kernel_token == two.kernel_token
    np.testing.assert_array_equal(one.coords(), two.coords())
    shutil.rmtree(tmp_path / "a.zarr")


def test_unreadable_h5ad_is_closed(files):
    """A damaged file is reported, and not left open (it can be replaced at once)."""
    with pytest.raises(InputError):
        spatialscale.ingest(files["truncated"], files["root"] / "never.zarr")
    with h5py.File(files["root"] / "probe.h5", "w"):
        pass
    assert not (files["root"] / "never.zarr").exists()
    (files["root"] / "probe.h5").unlink()
