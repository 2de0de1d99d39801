"""Execute every notebook source in notebooks/ (jupytext percent-format ``.py``) with nbclient, kernel
``python3``, and check what a reader sees: no error, the figures drawn, the tables filled, the
training loss falling.

Cells say what they show with tags (``# %% tags=["figure"]``, ``["table"]``, ``["training"]``):
a ``figure`` cell must put at least one image in its output, a ``table`` cell must print at least
one markdown table with a data row, and the ``training`` cell's printed losses must end below
where they start. The kernel inherits this process's environment: ``JAX_DILATED_NOTEBOOK_QUICK=1``
makes the training notebook run a short schedule; the full run is what docs/notebooks.md reports.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
#: The fewest images each notebook must show (figure-tagged cells each need one; some show more).
MIN_IMAGES = {"01_quickstart": 1, "02_parity": 1, "03_benchmark_report": 5, "04_ring_attention": 1,
              "05_train_longnet": 2}


def test_all_notebooks_present():
    assert [p.stem for p in PATHS] == list(MIN_IMAGES), [p.name for p in PATHS]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_source_is_a_percent_notebook(path):
    nb = jupytext.read(path)
    kinds = {c.cell_type for c in nb.cells}
    assert kinds == {"markdown", "code"}, kinds
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {path.stem[:2]} ")
    text = path.read_text(encoding="utf-8")
    assert "parity_tests" not in text, f"{path.name} must not import test modules"
    assert not any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def _text(output) -> str:
    if output.output_type == "stream":
        return output.text
    return output.get("data", {}).get("text/plain", "")


def _tables_with_rows(text: str) -> int:
    """Markdown tables in ``text`` whose separator line is followed by at least one data row."""
    lines = text.splitlines()
    separator = re.compile(r"^\|[-:| ]+\|$")
    return sum(1 for i, line in enumerate(lines[:-1])
               if separator.match(line) and lines[i + 1].startswith("|") and not separator.match(lines[i + 1]))


def _has_image(cell) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.outputs)


@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_shows_its_results(path, monkeypatch):
    monkeypatch.setenv("JAX_DILATED_NOTEBOOK_QUICK", "1")
    # notebooks compile at full optimisation, as users run them (conftest lowers it for the test processes)
    flags = os.environ.get("XLA_FLAGS", "").replace("--xla_backend_optimization_level=0", "").strip()
    monkeypatch.setenv("XLA_FLAGS", flags)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend turns figures into images
    # the kernel imports the checkout under test (as the benchmark's workers do), whatever is installed
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    nb = jupytext.read(path)
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]

    images = sum(o.get("data", {}).get("image/png") is not None for c in code for o in c.outputs)
    assert images >= MIN_IMAGES[path.stem], f"{path.name} showed {images} images"
    for cell in code:
        tags = cell.metadata.get("tags", [])
        out = "".join(_text(o) for o in cell.outputs)
        if "figure" in tags:
            assert _has_image(cell), f"{path.name}: no figure from\n{cell.source[:300]}"
        if "table" in tags:
            assert _tables_with_rows(out) >= 1, f"{path.name}: no filled table from\n{cell.source[:300]}\n{out[:500]}"
        if "training" in tags:
            losses = [float(x) for x in re.findall(r"\bloss (\d+\.\d+)", out)]
            assert len(losses) >= 3, out
            assert losses[-1] < losses[0], f"the training loss did not fall: {losses}"
