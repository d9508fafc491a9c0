"""notebooks/ are executed as a user would run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # in CI too; `-m "not slow"` for a quick local run

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
COHORT = ROOT / "notebooks" / "cohort.ipynb"


def _kernel_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """``python3`` if that kernelspec exists, else one for this interpreter installed into a temp dir."""
    from jupyter_client.kernelspec import KernelSpecManager

    if "python3" in KernelSpecManager().find_kernel_specs():
        return "python3"
    from ipykernel.kernelspec import install

    prefix = tmp_path / "jupyter"
    install(kernel_name="python3", prefix=str(prefix))
    monkeypatch.setenv(
        "JUPYTER_PATH",
        os.pathsep.join(p for p in (str(prefix / "share" / "jupyter"), os.environ.get("JUPYTER_PATH")) if p),
    )
    return "python3"


def _text(cell) -> str:
    """Text of a code cell's outputs (streams, plain-text reprs and errors)."""
    parts = []
    for out in cell.get("outputs", []):
        parts.append(out.get("text", ""))
        parts.append(str(out.get("data", {}).get("text/plain", "")))
    return "".join(parts)


@pytest.mark.parametrize("path", [NOTEBOOK, COHORT], ids=["quickstart", "cohort"])
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


def _execute(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[list, Path]:
    """Run a notebook in an empty working directory; its code cells (with outputs) and that directory."""
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    pythonpath = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in pythonpath if p))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=600, kernel_name=_kernel_name(tmp_path, monkeypatch), resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()  # raises CellExecutionError if any cell fails
    return [c for c in nb.cells if c.cell_type == "code"], workdir


def test_quickstart_runs(tmp_path, monkeypatch):
    code, workdir = _execute(NOTEBOOK, tmp_path, monkeypatch)
    table = next(c for c in code if "table.head(10)" in c.source)
    assert "sv_pvalue" in _text(table) and "truly_sv" in _text(table)
    summary = next(_text(c) for c in code if "true SV genes recovered" in c.source)
    recovered = int(summary.split("; ")[1].split(" of ")[0])
    assert recovered >= 20, summary  # of 30 simulated SV genes
    assert any("image/png" in out.get("data", {}) for c in code for out in c.outputs)
    assert "sv_pvalue_adj" in _text(next(c for c in code if "xr.open_zarr" in c.source))
    # results in the AnnData, the scverse way: the gene table in uns[key_added]
    assert "pvalue_adj" in _text(next(c for c in code if 'adata.uns["sv"]' in c.source))
    # DU: each covariate one test (celltype jointly), and the simulated DU genes found
    encoding = _text(next(c for c in code if "covariate_encoding" in c.source or "how each covariate" in c.source))
    assert "joint" in encoding and "binary" in encoding and "numeric" in encoding, encoding
    du = _text(next(c for c in code if "simulated DU genes found" in c.source))
    found, simulated = (int(w) for w in du.split("celltype: ")[1].split(" simulated")[0].split(" of "))
    assert simulated == 15 and found >= 10, du  # hsic-gp finds most of them
    assert "celltype_ct1" in _text(next(c for c in code if "per_level=True" in c.source))
    assert list(workdir.iterdir()) == [], "the notebook must not write into its working directory"


def test_cohort_notebook_runs(tmp_path, monkeypatch):
    code, workdir = _execute(COHORT, tmp_path, monkeypatch)
    table = next(c for c in code if "best_section_pvalue" in c.source and ".head(10)" in c.source)
    assert "combined_pvalue" in _text(table) and "shared_sv" in _text(table)
    lines = _text(next(c for c in code if "combined:" in c.source)).strip().splitlines()
    per_section = [int(line.split(": ")[1].split(" of ")[0]) for line in lines if line.startswith("section ")]
    combined = int(lines[-1].split(": ")[1].split(" of ")[0])
    assert len(per_section) == 6 and combined > max(per_section), lines  # combining finds what sections miss
    groups = _text(next(c for c in code if "group_combined_pvalue_adj" in c.source))
    assert "control" in groups and "treated" in groups
    assert any("image/png" in out.get("data", {}) for c in code for out in c.outputs)
    assert "found by the pooled test" in _text(next(c for c in code if 'combine="pooled"' in c.source))
    assert list(workdir.iterdir()) == [], "the notebook must not write into its working directory"
