"""The README's examples run as written.

Every fenced ```bash and ```python block of README.md is extracted and run, in README order, on a small
simulated section written as ``sample.h5ad`` (obs ``celltype``, ``rbp``, ``region``, as the examples use),
a ``manifest.csv`` of two sections for the cohort examples and ``bins.h5ad`` (a square raster with integer
``array_row`` / ``array_col`` and a tenth of its bins empty) for the raster example.

- bash: each command line (continuations joined, ``# comments`` dropped) runs as a subprocess;
  ``spatialscale ...`` becomes ``python -m spatialscale.cli ...`` (plus ``--no-progress`` where the
  command accepts it). Lines matching ``SKIP`` are not run; each entry gives its reason and must still
  match a README line, so the list cannot go stale. Any other program is an error, not a skip.
- python: each block is ``exec``-ed in a fresh namespace (``__name__ == "__main__"``) by a script run
  with ``sys.executable``; the exec sits under the script's own ``if __name__ == "__main__":``, so Dask's
  worker processes can re-import the script harmlessly. Blocks that use names from earlier blocks get
  the prelude in ``PRELUDES`` (keyed by the block's first line).

The command-line examples and the Python examples are two ways to do the same thing, and both write
``sample.zarr``, ``sv.zarr`` and ``du.zarr`` (ingest never replaces an existing store), so they run in two
folders, ``cli/`` and ``python/``, each starting from the same ``sample.h5ad``.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 180  # seconds per example; each takes a few seconds on the small section

#: bash command lines that are not run: (regex searched in the joined command line, reason)
SKIP = [
    (r"^pip install .*&& spatialscale demo$", "Quick start set-up: installs the package, then the 2,500-spot demo"),
    (r"^pip install .*&& python -m pytest$", "Quick start set-up: installs the package, then the whole test suite"),
    (r"^spatialscale bench\b", "a long benchmark against SPLISOSM (10,000 spots)"),
    (r"--scheduler (tcp|tls)://", "needs an existing remote Dask scheduler"),
]

_CLIENT = 'client = Client(LocalCluster(n_workers=2, host="127.0.0.1"))'
_STORE = 'store = spatialscale.open_store("sample.zarr")  # written by the first Python block'
#: python blocks that use names (store, client) defined by earlier blocks: first line -> prelude
PRELUDES = {
    'cohort = spatialscale.ingest_cohort("manifest.csv", "cohort/", workers=2)   # or open_cohort("cohort/")':
        "import spatialscale\n",
    'ds = spatialscale.du_test(store, ["celltype", "rbp"], method="hsic-gp", client=client, out="du.zarr")':
        f"import spatialscale\nfrom dask.distributed import Client, LocalCluster\n{_CLIENT}\n{_STORE}\n",
    'ds = spatialscale.du_test(store, ["celltype", "rbp"], method="glmm-score", model="glmm-full", client=client)':
        f"import spatialscale\nfrom dask.distributed import Client, LocalCluster\n{_CLIENT}\n{_STORE}\n",
}

_RUNNER = '''\
PRELUDE = {prelude!r}
BLOCK = {block!r}

if __name__ == "__main__":
    ns = {{"__name__": "__main__"}}
    try:
        exec(compile(PRELUDE, "<prelude>", "exec"), ns)
        exec(compile(BLOCK, {name!r}, "exec"), ns)
    finally:
        client = ns.get("client")
        if client is not None:
            cluster = client.cluster
            client.close()
            if cluster is not None:
                cluster.close()
'''


def readme_blocks() -> list[tuple[str, str, int]]:
    """``(language, code, line number)`` of every fenced block of README.md."""
    text = README.read_text()
    blocks = []
    for m in re.finditer(r"^```([^\n]*)\n(.*?)^```[ \t]*$", text, re.S | re.M):
        blocks.append((m.group(1).strip(), m.group(2), text.count("\n", 0, m.start()) + 1))  # line of the fence
    return blocks


def bash_commands(code: str) -> list[tuple[int, list[str]]]:
    """``(line offset in the block, words)`` of each command: continuations joined, comments and blanks dropped."""
    out, pending, start = [], "", 0
    for k, line in enumerate(code.splitlines()):
        if not pending:
            start = k
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        if words:
            out.append((start, words))
    assert not pending, f"bash block ends with a line continuation: {code!r}"
    return out


def skip_reason(words: list[str]) -> str | None:
    for pattern, reason in SKIP:
        if re.search(pattern, " ".join(words)):
            return reason
    return None


def _no_progress_commands() -> set[str]:
    """Subcommands of ``spatialscale`` that accept ``--no-progress``."""
    import argparse

    from spatialscale.cli import _parser

    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name for name, p in sub.choices.items()
            if any("--no-progress" in a.option_strings for a in p._actions)}


def examples() -> list[tuple[str, int, str | list[str], str]]:
    """``(kind, README line, code, folder)`` to run, in README order: bash commands as words, python blocks."""
    out = []
    for lang, code, line in readme_blocks():
        if lang == "bash":
            out += [("bash", line + 1 + k, words, "cli") for k, words in bash_commands(code)
                    if skip_reason(words) is None]
        elif lang == "python":
            out.append(("python", line + 1, code, "python"))
    return out


def test_readme_blocks_are_bash_or_python():
    blocks = readme_blocks()
    assert blocks, "no fenced code blocks found in README.md"
    assert {lang for lang, _, _ in blocks} <= {"bash", "python"}, [lang for lang, _, _ in blocks]


def test_skip_list_is_current():
    commands = [" ".join(w) for lang, code, _ in readme_blocks() if lang == "bash" for _, w in bash_commands(code)]
    for pattern, reason in SKIP:
        assert any(re.search(pattern, c) for c in commands), f"skip entry {pattern!r} ({reason}) matches nothing"
    firsts = {code.splitlines()[0] for lang, code, _ in readme_blocks() if lang == "python"}
    for first in PRELUDES:
        assert first in firsts, f"prelude for {first!r} matches no python block"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from spatialscale.simulate import simulate_section

    base = tmp_path_factory.mktemp("readme")
    adata = simulate_section(n_spots=300, n_genes=24, n_sv=6, n_du=4, seed=0)
    # simulate_section provides every obs column the examples name
    assert adata.obs["celltype"].dtype == "category" and adata.obs["celltype"].nunique() > 2
    assert adata.obs["rbp"].dtype.kind == "f"
    assert adata.obs["region"].dtype == "category" and adata.obs["region"].nunique() == 2
    bins = simulate_section(n_spots=400, n_genes=24, n_sv=6, geometry="grid", seed=1)
    xy = bins.obsm["spatial"]
    bins.obs["array_row"], bins.obs["array_col"] = xy[:, 1].astype(int), xy[:, 0].astype(int)
    bins = bins[np.random.default_rng(0).random(bins.n_obs) > 0.1].copy()
    for sub in ("cli", "python"):
        (base / sub).mkdir()
        adata.write_h5ad(base / sub / "sample.h5ad")
        bins.write_h5ad(base / sub / "bins.h5ad")
        # the cohort examples' manifest: two sections (the same file twice will do)
        (base / sub / "manifest.csv").write_text("section,path,donor\nA1,sample.h5ad,d1\nB1,sample.h5ad,d2\n")
    return base


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess | None, float]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        r = None
    return r, time.perf_counter() - t0


def test_readme_examples_run(workdir):
    no_progress = _no_progress_commands()
    todo = examples()
    assert any(k == "bash" for k, *_ in todo) and any(k == "python" for k, *_ in todo)
    failures, timings = [], []
    for i, (kind, line, code, folder) in enumerate(todo):
        cwd = workdir / folder
        if kind == "bash":
            words = code
            assert words[0] == "spatialscale", f"README.md:{line}: unexpected program in {code!r} (run or skip it)"
            argv = [sys.executable, "-m", "spatialscale.cli", *words[1:]]
            if words[1] in no_progress:
                argv.append("--no-progress")
            label = f"README.md:{line} $ {shlex.join(words)}"
        else:
            first = code.splitlines()[0]
            script = cwd / f"readme_block_{i}.py"
            script.write_text(_RUNNER.format(prelude=PRELUDES.get(first, ""), block=code,
                                             name=f"README.md python block at line {line}"))
            argv = [sys.executable, script.name]
            label = f"README.md:{line} python block starting {first!r}"
        r, seconds = _run(argv, cwd)
        timings.append(f"{seconds:6.1f} s  {label}")
        if r is None:
            failures.append(f"{label}: timed out after {TIMEOUT} s")
        elif r.returncode != 0:
            failures.append(f"{label}: exit code {r.returncode}\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}")
    print("\n".join(timings))
    assert not failures, "\n\n".join(failures)
