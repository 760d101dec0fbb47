"""launch/colab_tpu.ipynb: saved clean, and executed headless on CPU with tiny parameters (the
path a Colab TPU user takes, minus the TPU: the notebook installs dwjax from the wheel beside it);
a copy with one broken cell makes the runner fail."""
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


# Run first in the kernel (sitecustomize): hides this checkout's editable install, so the
# notebook's install cell finds no dwjax and takes the wheel route, as on a fresh Colab.
_HIDE_EDITABLE = """import sys
sys.meta_path[:] = [f for f in sys.meta_path
                    if "__editable__" not in (getattr(f, "__module__", "") or "")
                    and "__editable__" not in type(f).__module__]
sys.path[:] = [p for p in sys.path if p not in {ROOT!r}]
"""


@pytest.fixture
def wheel_kernel_env(tmp_path, monkeypatch):
    """A kernel that has every dependency but no dwjax, started in a directory holding the wheel
    `launch/build_wheel.sh` builds from this checkout: the notebook installs it (no network, no
    dependencies: PIP_NO_INDEX, PIP_NO_DEPS) into `site/`, which is on the kernel's path."""
    import subprocess

    here = tmp_path / "colab"
    hide, site = tmp_path / "hide", tmp_path / "site"
    for d in (here, hide, site):
        d.mkdir()
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "build_wheel.sh"), str(here)],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, PIP_WHEEL_ARGS="--no-build-isolation"))
    assert r.returncode == 0, r.stderr
    (hide / "sitecustomize.py").write_text(_HIDE_EDITABLE.format(ROOT=ROOT))
    monkeypatch.setenv("DWJAX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hide), str(site)]))
    for name, value in (("PIP_TARGET", str(site)), ("PIP_NO_DEPS", "1"), ("PIP_NO_INDEX", "1"),
                        ("JAX_PLATFORMS", "cpu")):
        monkeypatch.setenv(name, value)
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


def test_notebook_installs_the_wheel_and_runs_headless_with_tiny_parameters(wheel_kernel_env):
    import pandas as pd

    tmp = wheel_kernel_env
    workdir = str(tmp / "run")
    nb = run_notebook(NOTEBOOK, {"NUM_EPOCHS": 1, "BATCH_SIZE": 4096, "WORKDIR": workdir,
                                 "DATA_DIR": str(tmp / "data")}, cwd=str(tmp / "colab"))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), "every code cell ran"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for c in code for o in c.outputs)
    # the wheel beside the notebook, installed by the install cell, is the dwjax that ran
    assert f"installing dwjax[weights] @ file://{tmp / 'colab'}/dwjax-" in text
    assert f"from {tmp / 'site' / 'dwjax' / '__init__.py'}" in text
    assert "global batch 4096" in text
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
