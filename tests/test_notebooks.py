"""Run every notebook in notebooks/ top to bottom with nbclient, as a user would on a CPU.

Each notebook ends with a cell of assertions (conservation, accuracy, equality with Hugging Face,
...), so a notebook that breaks fails here. The kernel is the interpreter running the tests
(a ``python3`` kernelspec written to a temporary folder with ``sys.executable``; a first cell
checks ``sys.prefix``), the working directory is a temporary folder (nothing is written into the
repository), nothing is downloaded (``HF_HUB_OFFLINE=1``) and the Colab install cell is skipped
because ``google.colab`` is not importable. ``OMP_NUM_THREADS=1`` keeps torch's small training
loops from oversubscribing shared CI cores (it changes no result).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))
CELL_TIMEOUT = 300


def test_the_notebooks_are_there():
    names = [p.name for p in NOTEBOOKS]
    assert names == ["01_tabular_binary.ipynb", "02_images.ipynb", "03_bert_sentiment.ipynb",
                     "04_llama_generation.ipynb", "05_moe_experts.ipynb",
                     "06_dataset_vmap.ipynb", "07_detection.ipynb",
                     "08_compare_methods.ipynb", "09_flax_nnx.ipynb"], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_clean(path):
    """Stored without outputs, valid, with a guarded Colab install cell first."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "outputs not stripped"
    assert 'IN_COLAB = "google.colab" in sys.modules' in code[0].source
    assert "!pip install" in code[0].source and "if IN_COLAB:" in code[0].source
    assert "assert" in code[-1].source, "the last cell should check something"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory):
    """A kernel spec named python3 that runs this very interpreter."""
    root = tmp_path_factory.mktemp("kernels")
    (root / "python3").mkdir()
    (root / "python3" / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (tests)", "language": "python"}))
    ksm = KernelSpecManager()
    ksm.kernel_dirs = [str(root)]
    ksm.ensure_native_kernel = False
    return ksm


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, kernel_specs, tmp_path, monkeypatch):
    # the kernel inherits this environment
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import sys\nassert sys.prefix == {sys.prefix!r}, (sys.prefix, sys.executable)"))
    km = KernelManager(kernel_name="python3", kernel_spec_manager=kernel_specs)
    client = NotebookClient(nb, km=km, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    print(f"{path.name}: {time.perf_counter() - start:.1f} s")
    last = nb.cells[-1]
    text = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert "all checks passed" in text, text
