"""Every tutorial notebook runs on CPU with its CI settings, is committed with its outputs stripped, is
numbered without gaps, and reads runs and draws pictures through the library (no hand parsing).

Each ``tutorials/*.ipynb`` is executed top to bottom by nbclient with ``MINISSL_CI=1`` (the notebook's
config cell shrinks its numbers), in a temporary working directory, so nothing is left in the repo.
New notebooks are picked up by the glob.

Strip every notebook in place (outputs and execution counts) before committing::

    python tests/test_notebooks.py --strip
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds per cell (a whole CI notebook should take well under a minute)
KERNEL = "python3"
FIRST_METHOD = 4  # 00-03: quickstart, data, kernels, protocol; then one notebook per method
METHOD_CODE_LINES = 40  # a method notebook is a lesson, a config cell and calls into minissl
BY_HAND = ("sys.path", "torch.load", "log.csv", "metrics.json", "test_cases.json", "csv.DictReader", "json.load")


def _code(path: Path) -> list[str]:
    """Non-blank code lines of a notebook."""
    nb = nbformat.read(path, as_version=4)
    return [line for c in nb.cells if c.cell_type == "code" for line in c.source.splitlines() if line.strip()]


def strip(nb: nbformat.NotebookNode) -> bool:
    """Remove outputs and execution counts from every code cell; return True if anything changed."""
    changed = False
    for cell in nb.cells:
        if cell.cell_type == "code" and (cell.get("outputs") or cell.get("execution_count") is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
    return changed


def _ensure_kernel() -> str:
    """The ``python3`` kernel spec (installed for this interpreter with ipykernel when it is missing)."""
    from jupyter_client.kernelspec import KernelSpecManager

    if KERNEL not in KernelSpecManager().find_kernel_specs():
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", KERNEL], check=True)
    return KERNEL


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_stripped(path: Path):
    nb = nbformat.read(path, as_version=4)
    assert not strip(nb), f"{path.name} has outputs or execution counts: run `python tests/test_notebooks.py --strip`"


def test_notebooks_are_numbered_without_gaps():
    numbers = [int(p.name.split("_")[0]) for p in NOTEBOOKS]
    assert numbers == list(range(len(NOTEBOOKS))), f"tutorials/: expected 00..{len(NOTEBOOKS) - 1}, got {numbers}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_uses_the_library(path: Path):
    code = _code(path)
    found = [word for word in BY_HAND if any(word in line for line in code)]
    assert not found, f"{path.name}: reads files or edits the path by hand ({found}); use minissl.run.Run"
    if int(path.name[:2]) >= FIRST_METHOD:
        assert len(code) <= METHOD_CODE_LINES, f"{path.name}: {len(code)} code lines, expected <= {METHOD_CODE_LINES}"
        assert not any("pyplot" in line for line in code), f"{path.name}: draws by hand; use minissl.report"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import nbclient  # a test extra: a missing install must fail, not skip
    monkeypatch.setenv("MINISSL_CI", "1")  # the kernel inherits this environment
    # small CPU models run fastest single-threaded, and CI machines are shared
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=_ensure_kernel(),
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), f"{path.name}: a code cell did not run"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]


if __name__ == "__main__":
    if sys.argv[1:2] != ["--strip"]:
        sys.exit(f"usage: python {sys.argv[0]} --strip [NOTEBOOK ...]   (default: tutorials/*.ipynb)")
    for p in [Path(a) for a in sys.argv[2:]] or NOTEBOOKS:
        nb = nbformat.read(p, as_version=4)
        if strip(nb):
            nbformat.write(nb, p)
            print(f"stripped {p}")
