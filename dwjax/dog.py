"""Draw the DoG family (paper Figs. 1, 12, 13, 15).  `python -m dwjax.dog --kernel_size=7`

Writes, under --out_dir (default $DWJAX_HOME/dog), each as PNG and PDF (`--config.formats`):

  dog_family_grid        Fig. 13: On and Off DoG, ∂x, ∂y, ∂xx, ∂yy, ∂xy on the k×k grid
  dog_family_3d_on       Figs. 1, 12: the On functions as smooth 3-D surfaces, k×k 3-D bars and
                         k×k images
  dog_family_3d_off      the same for Off (the negations)
  cross_sum_of_gaussians Fig. 15: exp(−x²/2σ²) + exp(−y²/2σ²) for σ = 0.4 … 0.8

and `dog_family.npz`, every array drawn (`<figure>/<panel>/pixels` `[k, k]`, `…/smooth` `[R, R]`),
plus the σ values. All of it comes from `dwjax.patterns.templates`, the bank the labeller and the
DoG initialisation use. Configured by `configs/dog.py`; the core, `run(config, out_dir)`, is
importable from a notebook.
"""
from __future__ import annotations

import numbers
import os
from typing import Callable

import ml_collections
from absl import flags

from dwjax import cli
from dwjax.errors import ConfigError
from dwjax.io import atomic, paths
from dwjax.patterns import templates
from dwjax.views import dog_plates

class DogError(ConfigError):
    """A bad argument to the dog stage: one line for the user."""


def default_sigma_c(kernel_size: int) -> float:
    """Centre σ for the figures: the geometric middle of `templates.sigma_range` (0.91 px, 7×7)."""
    lo, hi = templates.sigma_range(kernel_size)
    return float((lo * hi) ** 0.5)


def _check(kernel_size, formats, sigma_c, sigma_s, cross_sigmas) -> tuple[float, float]:
    """Raises DogError for a bad argument; returns (σ_c, σ_s) with defaults filled in."""
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, numbers.Integral) \
            or kernel_size < 3 or kernel_size % 2 == 0:
        raise DogError(f"--kernel_size {kernel_size!r}: must be an odd integer >= 3 "
                       "(the DoG family is centred on a pixel)")
    if not formats or set(formats) - set(dog_plates.FORMATS):
        raise DogError(f"--config.formats {','.join(formats)}: expected one or more of "
                       f"{','.join(dog_plates.FORMATS)}")
    sigma_c = default_sigma_c(kernel_size) if sigma_c is None else float(sigma_c)
    sigma_s = templates.SURROUND_RATIOS[0] * sigma_c if sigma_s is None else float(sigma_s)
    if not 0 < sigma_c < sigma_s:
        raise DogError(f"--config.sigma_c {sigma_c:g} --config.sigma_s {sigma_s:g}: need "
                       "0 < sigma_c < sigma_s")
    if not cross_sigmas or any(not s > 0 for s in cross_sigmas):
        raise DogError(f"--config.cross_sigmas {','.join(map(str, cross_sigmas))}: "
                       "need one or more values > 0")
    return sigma_c, sigma_s


def run(config: ml_collections.ConfigDict, out_dir: str, *,
        log: Callable[[str], None] = print) -> list[str]:
    """Draws the DoG-family figures into ``out_dir``; returns every written path (figures, then the
    `dog_family.npz` record). `config` is `configs/dog.py`'s; it is checked before anything is
    written (DogError)."""
    import numpy as np

    kernel_size = config.kernel_size
    # ordered, no repeats, any case
    formats = list(dict.fromkeys(f.strip().lower() for f in config.formats.split(",")
                                 if f.strip()))
    try:
        cross_sigmas = [float(s) for s in config.cross_sigmas.split(",") if s.strip()]
    except ValueError:
        raise DogError(f"--config.cross_sigmas {config.cross_sigmas}: not numbers")
    sigma_c, sigma_s = _check(kernel_size, formats, config.sigma_c, config.sigma_s, cross_sigmas)
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise DogError(f"--out_dir {out_dir}: cannot create it ({e.strerror or e})") from e
    if not os.access(out_dir, os.W_OK):
        raise DogError(f"--out_dir {out_dir}: not writable")
    k = kernel_size
    on = dog_plates.family_panels(k, sigma_c, sigma_s, "On")
    off = dog_plates.family_panels(k, sigma_c, sigma_s, "Off")
    crosses = dog_plates.cross_panels(k, cross_sigmas)
    sig = f"σ_c = {sigma_c:.2f} px, σ_s = {sigma_s:.2f} px"
    figures = {
        "dog_family_grid": (on + off, lambda stem: dog_plates.plot_kernel_grid(
            {"On": on, "Off": off}, stem, formats,
            f"DoG and its derivatives on a {k}×{k} grid ({sig})")),
        "dog_family_3d_on": (on, lambda stem: dog_plates.plot_surfaces(
            on, stem, formats, f"On-Centre DoG and its derivatives ({sig})")),
        "dog_family_3d_off": (off, lambda stem: dog_plates.plot_surfaces(
            off, stem, formats, f"Off-Centre DoG and its derivatives ({sig})")),
        "cross_sum_of_gaussians": (crosses, lambda stem: dog_plates.plot_surfaces(
            crosses, stem, formats,
            f"Cross: sum of orthogonal Gaussians exp(−x²/2σ²) + exp(−y²/2σ²), {k}×{k}")),
    }
    written, record = [], {"sigma_c": np.float64(sigma_c), "sigma_s": np.float64(sigma_s),
                           "cross_sigmas": np.asarray(cross_sigmas)}
    for name, (panels, draw) in figures.items():
        written += draw(os.path.join(out_dir, name))
        for p in panels:
            record[f"{name}/{p.key}/pixels"] = p.pixels
            record[f"{name}/{p.key}/smooth"] = p.smooth
        log(f"{name} → {os.path.join(out_dir, name)}.{{{','.join(formats)}}}")
    npz = os.path.join(out_dir, "dog_family.npz")
    atomic.save_npz(npz, **record)
    written.append(npz)
    return written


FLAGS = flags.FLAGS


def define_flags() -> None:
    """Flags are defined only when run as a program, so importing the core defines none."""
    flags.DEFINE_string("out_dir", None, "Where the figures go (default $DWJAX_HOME/dog).")


def main(argv):
    cli.setup(uses_jax=False)
    out_dir = FLAGS.out_dir or os.path.join(paths.home(), "dog")
    with cli.user_errors("dog"):
        if len(argv) > 1:
            raise DogError(f"unexpected arguments {' '.join(argv[1:])}")
        run(cli.stage_config(), out_dir)


if __name__ == "__main__":
    cli.run_config_stage("dog", main, define_flags, default_kernel_size=7)
