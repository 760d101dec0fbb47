"""The DoG-family figures stage (`python -m dwjax.dog`): every figure written, drawn from
dwjax.patterns.templates, and a bad flag is one line on stderr with nothing written."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import stage_config
from dwjax import dog
from dwjax.errors import UserError
from dwjax.patterns import templates
from dwjax.views import dog_plates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEMS = ("dog_family_grid", "dog_family_3d_on", "dog_family_3d_off", "cross_sum_of_gaussians")
DOG_FAMILIES = ("dog", "dog_dx", "dog_dy", "dog_dxx", "dog_dyy", "dog_dxy")
K = 5


def _run(*args, timeout=300):
    """`python -m dwjax.dog args…` from the repository root (so this checkout's dwjax is used)."""
    return subprocess.run([sys.executable, "-m", "dwjax.dog", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def drawn(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dog"))
    return out, dog.run(stage_config("dog", kernel_size=K), out, log=lambda *_: None)


def test_core_writes_every_figure_as_png_and_pdf(drawn):
    from PIL import Image

    out, written = drawn
    expected = {f"{s}.{fmt}" for s in STEMS for fmt in ("png", "pdf")} | {"dog_family.npz"}
    assert sorted(os.path.basename(p) for p in written) == sorted(expected)
    assert set(os.listdir(out)) == expected  # no temporary files left behind
    for stem in STEMS:
        with Image.open(os.path.join(out, f"{stem}.png")) as im:
            w, h = im.size
        assert 800 <= w <= 3000 and 300 <= h <= 1500 and w > h, (stem, w, h)
        with open(os.path.join(out, f"{stem}.pdf"), "rb") as f:
            assert f.read(5) == b"%PDF-"
        assert os.path.getsize(os.path.join(out, f"{stem}.pdf")) > 10_000


def test_figures_are_drawn_from_the_template_module(drawn):
    out, _ = drawn
    rec = np.load(os.path.join(out, "dog_family.npz"))
    sc, ss = float(rec["sigma_c"]), float(rec["sigma_s"])
    assert sc == pytest.approx(dog.default_sigma_c(K)) and ss == pytest.approx(1.6 * sc)
    x, y = dog_plates.smooth_grid(K)
    step = dog_plates.SMOOTH_STEPS_PER_PIXEL
    for fam in DOG_FAMILIES:
        kernel = getattr(templates, fam)(K, sc, ss)
        smooth = templates.evaluate(fam, x, y, sc, ss)
        for fig in ("dog_family_grid", "dog_family_3d_on"):
            np.testing.assert_array_equal(rec[f"{fig}/On/{fam}/pixels"], kernel)
        for fig in ("dog_family_grid", "dog_family_3d_off"):
            np.testing.assert_array_equal(rec[f"{fig}/Off/{fam}/pixels"], -kernel)
        np.testing.assert_array_equal(rec[f"dog_family_3d_on/On/{fam}/smooth"], smooth)
        np.testing.assert_array_equal(rec[f"dog_family_3d_off/Off/{fam}/smooth"], -smooth)
        # The smooth surface passes through the kernel's pixel values: the same function.
        np.testing.assert_allclose(smooth[::step, ::step], kernel, rtol=1e-6, atol=1e-7)
    sigmas = rec["cross_sigmas"]
    np.testing.assert_allclose(sigmas, [0.4, 0.5, 0.6, 0.7, 0.8])  # configs/dog.py: Fig. 15
    for s in sigmas:
        np.testing.assert_array_equal(rec[f"cross_sum_of_gaussians/cross/{s:g}/pixels"],
                                      templates.cross(K, s))


@pytest.mark.parametrize("k", [3, 7])
def test_evaluate_matches_the_kernel_functions_on_the_pixel_grid(k):
    x, y = templates.pixel_grid(k)
    for fam in DOG_FAMILIES:
        np.testing.assert_allclose(templates.evaluate(fam, x, y, 0.9, 2.0),
                                   getattr(templates, fam)(k, 0.9, 2.0), rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(templates.evaluate(fam, x, y, 0.9),  # σ_s default 1.6·σ_c
                                   getattr(templates, fam)(k, 0.9), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(templates.evaluate("cross", x, y, sigma=0.6),
                               templates.cross(k, 0.6), rtol=1e-6)
    for bad in [dict(family="gabor", sigma_c=1.0), dict(family="dog"),
                dict(family="dog", sigma_c=2.0, sigma_s=1.0), dict(family="cross")]:
        with pytest.raises(ValueError):
            templates.evaluate(x=x, y=y, **bad)


def test_core_formats_accept_a_comma_string_and_case(tmp_path):
    config = stage_config("dog", kernel_size=3, formats="SVG,svg", cross_sigmas="0.5")
    written = dog.run(config, str(tmp_path), log=lambda *_: None)
    assert sorted(os.path.basename(p) for p in written) == sorted(
        [f"{s}.svg" for s in STEMS] + ["dog_family.npz"])


def test_command_writes_the_figures(tmp_path):
    out = str(tmp_path / "dog")
    p = _run(f"--out_dir={out}", f"--kernel_size={K}")
    assert p.returncode == 0, p.stderr
    assert set(os.listdir(out)) == {f"{s}.{fmt}" for s in STEMS for fmt in ("png", "pdf")} | \
        {"dog_family.npz"}


def test_even_kernel_size_is_one_line_and_writes_nothing(tmp_path):
    out = str(tmp_path / "dog")
    p = _run(f"--out_dir={out}", "--kernel_size=4")
    assert p.returncode == 1
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dog: ") and "kernel_size" in lines[0], p.stderr
    assert not os.path.exists(out)


@pytest.mark.parametrize("kwargs", [dict(kernel_size=1), dict(kernel_size=6),
                                    dict(formats="gif"), dict(formats=""),
                                    dict(sigma_c=1.0, sigma_s=0.5), dict(sigma_c=-1.0),
                                    dict(cross_sigmas="0.5,0.0"), dict(cross_sigmas="0.5,x")])
def test_core_rejects_bad_arguments_before_writing(tmp_path, kwargs):
    out = str(tmp_path / "dog")
    with pytest.raises(dog.DogError):
        dog.run(stage_config("dog", **{"kernel_size": 5, **kwargs}), out)
    assert not os.path.exists(out)
    assert issubclass(dog.DogError, UserError)


_KEEPS_BACKEND = """
import matplotlib
matplotlib.use("svg")
import dwjax.dog, dwjax.views.charts, dwjax.views.dog_plates, dwjax.views.plotting
print(matplotlib.get_backend())
"""


def test_library_modules_keep_the_callers_matplotlib_backend():
    """Only a stage's `cli.setup` picks Agg; importing the figure modules (as a notebook does)
    leaves the backend the caller chose."""
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    p = subprocess.run([sys.executable, "-c", _KEEPS_BACKEND], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().lower() == "svg"
