"""Draw the DoG family (paper Figs. 1, 12, 13, 15).  `python -m dwjax.dog --kernel_size=7`

Writes, under --out_dir (default $DWJAX_HOME/dog), each as PNG and PDF:

  dog_family_grid        Fig. 13: On and Off DoG, ∂x, ∂y, ∂xx, ∂yy, ∂xy on the k×k grid
  dog_family_3d_on       Figs. 1, 12: the On functions as smooth 3-D surfaces, k×k 3-D bars and
                         k×k images
  dog_family_3d_off      the same for Off (the negations)
  cross_sum_of_gaussians Fig. 15: exp(−x²/2σ²) + exp(−y²/2σ²) for σ = 0.4 … 0.8

and `dog_family.npz`, every array drawn (`<figure>/<panel>/pixels` `[k, k]`, `…/smooth` `[R, R]`),
plus the σ values. All of it comes from `dwjax.patterns.templates`, the bank the labeller and the
DoG initialisation use. The core, `draw_dog_family`, is importable from a notebook.
"""
from __future__ import annotations

import numbers
import os
from typing import Callable, Sequence

from absl import app, flags

from dwjax import cli
from dwjax.errors import ConfigError
from dwjax.io import atomic, paths
from dwjax.patterns import templates
from dwjax.views import dog_plates

DEFAULT_CROSS_SIGMAS = (0.4, 0.5, 0.6, 0.7, 0.8)  # Fig. 15's range


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
        raise DogError(f"--formats {','.join(formats)}: expected one or more of "
                       f"{','.join(dog_plates.FORMATS)}")
    sigma_c = default_sigma_c(kernel_size) if sigma_c is None else float(sigma_c)
    sigma_s = templates.SURROUND_RATIOS[0] * sigma_c if sigma_s is None else float(sigma_s)
    if not 0 < sigma_c < sigma_s:
        raise DogError(f"--sigma_c {sigma_c:g} --sigma_s {sigma_s:g}: need 0 < sigma_c < sigma_s")
    if not cross_sigmas or any(not s > 0 for s in cross_sigmas):
        raise DogError(f"--cross_sigmas {','.join(map(str, cross_sigmas))}: "
                       "need one or more values > 0")
    return sigma_c, sigma_s


def draw_dog_family(out_dir: str, kernel_size: int = 7, formats: Sequence[str] = ("png", "pdf"),
                    sigma_c: float | None = None, sigma_s: float | None = None,
                    cross_sigmas: Sequence[float] = DEFAULT_CROSS_SIGMAS,
                    log: Callable[[str], None] = print) -> list[str]:
    """Draws the DoG-family figures into ``out_dir``; returns every written path (figures, then the
    `dog_family.npz` record). Arguments are checked before anything is written (DogError).

    Args:
      kernel_size: k, odd ≥ 3: the kernels are ``[k, k]``.
      formats: file formats, each of `dog_plates.FORMATS`.
      sigma_c, sigma_s: centre and surround σ in pixels (default `default_sigma_c(k)`, 1.6·σ_c).
      cross_sigmas: σ of each cross in the Fig. 15 figure.
    """
    import numpy as np

    if isinstance(formats, str):  # "png,pdf" from a notebook, as the flag takes it
        formats = formats.split(",")
    formats = list(dict.fromkeys(f.strip().lower() for f in formats))  # ordered, no repeats
    cross_sigmas = [float(s) for s in cross_sigmas]
    sigma_c, sigma_s = _check(kernel_size, formats, sigma_c, sigma_s, cross_sigmas)
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
    flags.DEFINE_integer("kernel_size", 7, "Kernel size k (odd, >= 3).")
    flags.DEFINE_list("formats", ["png", "pdf"], "File formats to write: png, pdf, svg.")
    flags.DEFINE_float("sigma_c", None, "Centre σ in pixels (default: middle of the bank's range).")
    flags.DEFINE_float("sigma_s", None, "Surround σ in pixels (default 1.6·sigma_c).")
    flags.DEFINE_list("cross_sigmas", [str(s) for s in DEFAULT_CROSS_SIGMAS],
                      "σ of each cross in the Fig. 15 figure.")


def main(argv):
    cli.setup(uses_jax=False)
    out_dir = FLAGS.out_dir or os.path.join(paths.home(), "dog")
    with cli.user_errors("dog"):
        if len(argv) > 1:
            raise DogError(f"unexpected arguments {' '.join(argv[1:])}")
        try:
            cross_sigmas = [float(s) for s in FLAGS.cross_sigmas]
        except ValueError:
            raise DogError(f"--cross_sigmas {','.join(FLAGS.cross_sigmas)}: not numbers")
        draw_dog_family(out_dir, FLAGS.kernel_size, FLAGS.formats, FLAGS.sigma_c, FLAGS.sigma_s,
                        cross_sigmas)


if __name__ == "__main__":
    define_flags()
    app.run(main)
