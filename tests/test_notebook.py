"""launch/colab_tpu.ipynb: saved clean, and executed headless on CPU with tiny parameters (the
path a Colab TPU user takes, minus the TPU); a copy with one broken cell makes the runner fail."""
import ast
import copy
import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu.ipynb")
PARAMETERS = {"KERNEL_SIZE", "NUM_EPOCHS", "DATA_SOURCE", "WORKDIR", "DATA_DIR", "BATCH_SIZE",
              "DWJAX_SPEC"}


def parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged `parameters`"
    return cells[0]


def assigned_names(source: str) -> set:
    return {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
            for t in node.targets if isinstance(t, ast.Name)}


def run_notebook(nb_or_path, params: dict, cwd: str = ROOT, timeout: int = 600):
    """Executes a notebook in a fresh kernel with `params` set after the parameters cell's own
    values (papermill's convention); returns the executed notebook. Raises
    `nbclient.exceptions.CellExecutionError` at the first cell that fails."""
    nb = (nbformat.read(nb_or_path, as_version=4) if isinstance(nb_or_path, str)
          else copy.deepcopy(nb_or_path))
    cell = parameters_cell(nb)
    unknown = set(params) - assigned_names(cell.source)
    if unknown:
        raise KeyError(f"not parameters of the notebook: {sorted(unknown)}")
    cell.source += "\n# injected\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
    client = nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                     resources={"metadata": {"path": cwd}})
    client.execute()
    return nb


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """The kernel inherits this: a temp DWJAX_HOME, this checkout's dwjax, the CPU."""
    monkeypatch.setenv("DWJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    return tmp_path


def test_saved_notebook_is_clean_and_has_one_parameters_cell_first():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    cell = parameters_cell(nb)
    assert cell is code[0]
    assert assigned_names(cell.source) == PARAMETERS
    # the stages' Python functions, not shell calls
    assert not any(line.lstrip().startswith("!") for c in code for line in c.source.splitlines())


def test_notebook_runs_headless_with_tiny_parameters(kernel_env):
    import pandas as pd

    workdir = str(kernel_env / "run")
    nb = run_notebook(NOTEBOOK, {"NUM_EPOCHS": 1, "BATCH_SIZE": 4096, "WORKDIR": workdir,
                                 "DATA_DIR": str(kernel_env / "data")})
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    assert "dwjax" in text and "global batch 4096" in text
    assert "mean cosine dissimilarity" in text  # training's summary printed
    images = sum("image/png" in o.get("data", {}) for c in code for o in c.outputs)
    assert images >= 3  # spectrum, templates, report figures shown inline
    assert os.path.isfile(os.path.join(workdir, "report", "index.html"))
    rows = pd.read_parquet(os.path.join(workdir, "assignments"))
    assert len(rows) == 23_856  # every 5×5 kernel of the embedded default


def test_a_broken_cell_makes_the_runner_fail(kernel_env):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    code[2].source = "raise RuntimeError('deliberately broken cell')"  # the devices cell
    with pytest.raises(nbclient.exceptions.CellExecutionError, match="deliberately broken"):
        run_notebook(nb, {"WORKDIR": str(kernel_env / "run")})
    with pytest.raises(KeyError, match="NOT_A_PARAMETER"):
        run_notebook(nb, {"NOT_A_PARAMETER": 1})
