"""The Colab notebook's install route: never the bare name (no package of ours is on the public
index), a wheel that `launch/build_wheel.sh` builds, or a git URL; the wheel holds every module
the notebook imports, model-file readers included. No network: the wheel is built with the
installed setuptools and installed without dependencies."""
import json
import os
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "launch", "colab_tpu.ipynb")


def install_cell():
    cells = json.load(open(NOTEBOOK))["cells"]
    (cell,) = [c for c in cells if c["cell_type"] == "code"
               and "def dwjax_requirement" in "".join(c["source"])]
    return "".join(cell["source"])


def test_the_install_cell_installs_a_wheel_or_a_url_never_the_name(tmp_path):
    ns = {"DWJAX_SPEC": None}
    exec(install_cell(), ns)  # dwjax is importable here: the cell installs nothing
    requirement = ns["dwjax_requirement"]
    wheel = tmp_path / "dwjax-0.1.0-py3-none-any.whl"
    with pytest.raises(FileNotFoundError, match="launch/build_wheel.sh"):
        requirement(None, [str(tmp_path)])
    wheel.write_bytes(b"")
    assert requirement(None, [str(tmp_path), "/nowhere"]) == f"dwjax[weights] @ file://{wheel}"
    url = "git+https://github.com/someone/dwjax@v0.1"
    assert requirement(url) == f"dwjax[weights] @ {url}"
    assert requirement(str(wheel)) == f"dwjax[weights] @ file://{wheel}"
    params = "".join(next(c for c in json.load(open(NOTEBOOK))["cells"]
                          if "parameters" in c["metadata"].get("tags", []))["source"])
    assert "DWJAX_SPEC = None" in params and '"dwjax[weights]"' not in params


def test_the_built_wheel_carries_the_readers(tmp_path):
    env = dict(os.environ, PIP_WHEEL_ARGS="--no-build-isolation")
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", "build_wheel.sh"),
                        str(tmp_path / "dist")], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    wheel = r.stdout.strip().splitlines()[-1]
    assert os.path.basename(wheel).startswith("dwjax-") and wheel.endswith(".whl")
    target = str(tmp_path / "site")
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--target", target, wheel], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # -S: no .pth files, so this checkout's editable install stays out; the wheel's copy is used
    code = ("import dwjax, dwjax.configs.train, dwjax.io.model_files, dwjax.convert;"
            "print(dwjax.__file__)")
    paths = [target, sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(paths)), cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(target)
