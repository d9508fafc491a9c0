"""notebooks/ are executed as a user would run them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]


def _kernel_name(tmp_path: Path, monkeypatch) -> str:
    """A kernel running this interpreter (installed into a temp dir if needed)."""
    from ipykernel.kernelspec import install

    prefix = tmp_path / "kernels"
    install(kernel_name="spatialscale-test", prefix=str(prefix))
    monkeypatch.setenv("JUPYTER_PATH", str(prefix / "share" / "jupyter"))
    return "spatialscale-test"


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    nb = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name=_kernel_name(tmp_path, monkeypatch),
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    def text_of(cell) -> str:
        return "".join(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in cell.outputs)

    outputs = {i: text_of(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(outputs.values())
    assert "sv_pvalue_adj" in text
    recovered = next(v for v in outputs.values() if "true SV genes recovered" in v)
    found = int(recovered.split(" of ")[0].split("; ")[1])
    assert found >= 20  # of 30 true SV genes
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
