"""The README's examples run as written.

Every fenced ```bash and ```python block of README.md is extracted and run, in README order, in ONE empty
temporary folder: nothing is made beforehand, so the README's own commands (``spatialscale simulate ...``)
must write the inputs the later blocks use, and a block may use only what earlier blocks wrote to disk.

- bash: each command line (continuations joined, ``# comments`` dropped) runs as the ``spatialscale``
  console script does, ``spatialscale.cli.main(argv)`` (plus ``--no-progress`` where the command accepts
  it), in this process with the folder as working directory, its output captured (a fresh interpreter per
  command cost 1.6 s of imports each, a minute in all; the python blocks and tests/test_cli.py keep
  running the command in fresh processes). Lines matching ``SKIP`` are not run; each entry gives its
  reason and must still match a README line, so the list cannot go stale. Any other program is an error, not a skip.
- python: each block is ``exec``-ed in a fresh interpreter and namespace (``__name__ == "__main__"``) by a
  script run with ``sys.executable``; the exec sits under the script's own ``if __name__ == "__main__":``,
  so Dask's worker processes can re-import the script harmlessly. Nothing is defined for a block: it
  imports and opens what it uses (a ``Client`` included) itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TIMEOUT = 180  # seconds per example; each takes a few seconds on the README's small examples

#: bash command lines that are not run: (regex searched in the joined command line, reason)
SKIP = [
    (r"^pip install .*&& spatialscale demo$", "Quick start set-up: installs the package, then the 2,500-spot demo"),
    (r"^pip install .*&& python -m pytest$", "Quick start set-up: installs the package, then the whole test suite"),
    (r"^spatialscale bench\b", "a long benchmark against SPLISOSM (10,000 spots)"),
    (r"--scheduler (tcp|tls)://", "needs an existing remote Dask scheduler"),
]

_RUNNER = '''\
BLOCK = {block!r}

if __name__ == "__main__":
    ns = {{"__name__": "__main__"}}
    exec(compile(BLOCK, {name!r}, "exec"), ns)
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


def examples() -> list[tuple[str, int, str | list[str]]]:
    """``(kind, README line, code)`` to run, in README order: bash commands as words, python blocks."""
    out = []
    for lang, code, line in readme_blocks():
        if lang == "bash":
            out += [("bash", line + 1 + k, words) for k, words in bash_commands(code) if skip_reason(words) is None]
        elif lang == "python":
            out.append(("python", line + 1, code))
    return out


def test_readme_blocks_are_bash_or_python():
    blocks = readme_blocks()
    assert blocks, "no fenced code blocks found in README.md"
    assert {lang for lang, _, _ in blocks} <= {"bash", "python"}, [lang for lang, _, _ in blocks]


def test_skip_list_is_current():
    commands = [" ".join(w) for lang, code, _ in readme_blocks() if lang == "bash" for _, w in bash_commands(code)]
    for pattern, reason in SKIP:
        assert any(re.search(pattern, c) for c in commands), f"skip entry {pattern!r} ({reason}) matches nothing"


def test_readme_starts_from_nothing():
    """The first command run writes the example input with ``spatialscale simulate``."""
    kind, line, code = examples()[0]
    assert kind == "bash" and code[:2] == ["spatialscale", "simulate"], f"README.md:{line}: {code!r}"


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _run_cli(words: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``spatialscale WORDS...`` through the console script's entry point in ``cwd``; its exit code and output."""
    from spatialscale.cli import main

    out, err = io.StringIO(), io.StringIO()
    t0 = time.perf_counter()
    here = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(words)
            except SystemExit as exc:  # argparse errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(words, code, out.getvalue(), err.getvalue()), time.perf_counter() - t0


def _run(argv: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess | None, float]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        r = None
    return r, time.perf_counter() - t0


def test_readme_examples_run(tmp_path):
    cwd = tmp_path / "readme"
    cwd.mkdir()  # one empty folder for every block, in README order
    no_progress = _no_progress_commands()
    todo = examples()
    assert any(k == "bash" for k, *_ in todo) and any(k == "python" for k, *_ in todo)
    failures, timings = [], []
    for i, (kind, line, code) in enumerate(todo):
        if kind == "bash":
            words = code
            assert words[0] == "spatialscale", f"README.md:{line}: unexpected program in {code!r} (run or skip it)"
            argv = [*words[1:]] + (["--no-progress"] if words[1] in no_progress else [])
            label = f"README.md:{line} $ {shlex.join(words)}"
            r, seconds = _run_cli(argv, cwd)
        else:
            first = code.splitlines()[0]
            script = tmp_path / f"readme_block_{i}.py"  # beside the folder, not in it
            script.write_text(_RUNNER.format(block=code, name=f"README.md python block at line {line}"))
            label = f"README.md:{line} python block starting {first!r}"
            r, seconds = _run([sys.executable, str(script)], cwd)
        timings.append(f"{seconds:6.1f} s  {label}")
        if r is None:
            failures.append(f"{label}: timed out after {TIMEOUT} s")
        elif r.returncode != 0:
            failures.append(f"{label}: exit code {r.returncode}\n--- stdout:\n{r.stdout}\n--- stderr:\n{r.stderr}")
    print("\n".join(timings))
    print(f"{sum(float(t.split()[0]) for t in timings):.1f} s in all")
    assert not failures, "\n\n".join(failures)
