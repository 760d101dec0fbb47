"""The device check, rehearsed on CPU: the search as an accelerator runs it (brute force, its tile
size) gives the rows of the float64 reference and of the CPU's own choice, and the script runs
every accelerator-relevant test file without stopping at the first failure."""
import os
import re

import numpy as np

from dwjax.search import nearest
from tests.reference import nearest_codes_reference
from tests.test_nearest import curve_kernels, template_curve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_accelerator_search_settings_rehearsed_on_cpu():
    k = 5
    recon = template_curve(k, 10_000, seed=11)
    kern = curve_kernels(recon, 300, seed=12)
    gpu = nearest.choose_method("gpu", len(kern), len(recon), 0.01)
    assert gpu == "brute"
    idx, dis = nearest.nearest_codes(kern, recon, method=gpu,
                                     tile_m=nearest.default_tile_m("gpu"), chunk_size=128)
    ref_idx, ref_dis = nearest.nearest_codes(kern, recon, chunk_size=128)  # the CPU's choice
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(dis, ref_dis, atol=1e-6, rtol=0)
    ri, rd = nearest_codes_reference(kern, recon)
    np.testing.assert_allclose(dis, rd, atol=2e-6, rtol=0)


def test_device_check_script_runs_every_relevant_test_without_stopping():
    with open(os.path.join(ROOT, "launch", "device_check.sh")) as f:
        script = f.read()
    pytest_line = " ".join(script.split("python3 -m pytest", 1)[1].split("\n  ")[:4])
    assert " -x" not in pytest_line and "-rs" in pytest_line
    files = set(re.findall(r"tests/(test_\w+)\.py", pytest_line))
    assert {"test_nearest", "test_precision", "test_kmeans", "test_decoder", "test_train",
            "test_device_check"} <= files
    for name in files:
        assert os.path.exists(os.path.join(ROOT, "tests", f"{name}.py")), name
