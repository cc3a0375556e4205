"""Every notebook in notebooks/ runs top to bottom on the tiny setting, so none of them rots.

A notebook keeps all its settings in one code cell tagged "parameters" (the first code cell). The
test keeps that cell's defaults and appends tiny values for the shared parameter names (the
papermill convention), then executes the notebook with nbclient from the repository root.
Notebooks are stored without outputs; that is checked too.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from tests.conftest import REPO

NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))
NOTEBOOK_IDS = [path.name for path in NOTEBOOKS]


def _parameter_cell(notebook) -> nbformat.NotebookNode:
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    tagged = [cell for cell in code_cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one code cell must be tagged 'parameters'"
    assert tagged[0] is code_cells[0], "the parameters cell must be the first code cell"
    return tagged[0]


def tiny_parameters(model_dir, files: dict, workdir: Path) -> str:
    values = {
        "MODEL": str(model_dir),
        "TASK": "sst2",
        "DATA_FILES": dict(files),
        "TINY": True,
        "STEPS": 2,
        "WORKDIR": str(workdir),
    }
    return "\n".join(f"{name} = {value!r}" for name, value in values.items())


def test_there_are_notebooks():
    assert {"quickstart.ipynb", "colab_tpu.ipynb"} <= set(NOTEBOOK_IDS)


def _check_colab_tpu(notebook, workdir: Path) -> None:
    """The LoRA adapter the run exported, its merged checkpoint, and the inline plot."""
    adapter = workdir / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert (workdir / "merged" / "config.json").is_file()
    images = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert images, "the curves cell drew no inline image"
    install = next(cell for cell in notebook.cells if "IN_COLAB" in cell.source)
    text = "".join(output.get("text", "") for output in install.outputs)
    assert "Colab: False" in text, "the Colab install cell must be skipped outside Colab"


# Checks of one notebook's own results after it ran, by file name.
NOTEBOOK_CHECKS = {"colab_tpu.ipynb": _check_colab_tpu}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_is_stored_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"cell {index} has outputs"
    names = set()
    for line in _parameter_cell(notebook).source.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            names.add(line.split("=", 1)[0].strip())
    assert {"MODEL", "TASK", "DATA_FILES", "TINY", "STEPS", "WORKDIR"} <= names


# quickstart in the default run; the Colab TPU notebook (the same trainer) with -m slow
_RUNS = [
    pytest.param(p, marks=[pytest.mark.slow] if p.name == "colab_tpu.ipynb" else [], id=p.name)
    for p in NOTEBOOKS
]


@pytest.mark.parametrize("path", _RUNS)
def test_notebook_runs_on_the_tiny_setting(path, tiny_bert_dir, tiny_task_files, tmp_path):
    from nbclient import NotebookClient

    notebook = nbformat.read(path, as_version=4)
    cell = _parameter_cell(notebook)
    workdir = tmp_path / "run"
    cell.source += "\n\n# Injected by tests/test_notebooks.py: the tiny setting.\n"
    cell.source += tiny_parameters(tiny_bert_dir, tiny_task_files, workdir)

    client = NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(REPO)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell

    assert (workdir / "results.json").exists()
    text = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "Traceback" not in text
    check = NOTEBOOK_CHECKS.get(path.name)
    if check is not None:
        check(notebook, workdir)
