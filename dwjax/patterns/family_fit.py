"""Fitting the paper's kernel families with pose parameters: which family a kernel is, and how well.

Each family is a continuous function of the pixel offsets with a sign (On/Off), a scale and a pose:

* ``dog``: On/Off-Centre ``G(σ_c) − G(σ_s)``, σ_s = ρ·σ_c.
* ``d1``: the directional 1st derivative of a DoG at any angle (named by its bright lobe).
* ``d2``: the directional 2nd derivative ∂²/∂u² (a line; On = negative centre line).
* ``dxy``: the mixed 2nd derivative ∂²/∂u∂v (four lobes), within 45° of ∂²/∂x∂y.
* ``cross``: a sum of two orthogonal Gaussian ridges (paper appendix B), rotated.
* ``square``: a solid block with soft edges, centred or shifted (5×5 only, paper §5).

The pose is an elongation along the family's long axis (DoG and its derivatives), an orientation
and a centre offset up to `max_offset` px; an On/Off-Centre may also have its surround displaced
(an asymmetric centre-surround, still enclosing its centre). Every pixel is the mean of the
function over the pixel's area. The bank samples every family on a grid of these parameters
(`family_bank`); `fit` matches kernels against it with the mean-centred cosine (the clustering
metric, so "how well" reads on the same scale as the clustering threshold) and returns, per class
name, the best score and the template that gave it (`describe` spells its parameters out).
`high_frequency_share` measures the checkerboard-like codes that no family describes.

Grid and sign conventions are those of dwjax.patterns.templates: ``x`` grows left→right, ``y``
top→bottom; an angle θ points along ``(cos θ, sin θ)`` in those coordinates.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from jax.scipy import special

from dwjax.model import preprocess
from dwjax.patterns import templates

FAMILIES = ("dog", "d1", "d2", "dxy", "cross", "square")
ON, OFF = templates.ON, templates.OFF
HIGH_FREQUENCY = templates.HIGH_FREQUENCY

# Surround/centre σ ratios: 1.6 (Marr–Hildreth), a middle one and a weak wide surround.
RATIOS = (1.6, 2.4, 4.0)
# Long-axis/short-axis σ: isotropic up to a bar three times as long as wide.
ELONGATIONS = (1.0, 1.5, 2.25, 3.4)
N_SIGMAS = 9
N_ANGLES = 8  # per half turn for the DoG and its derivatives
OFFSET_STEP = 0.5  # px
SURROUND_SHIFTS = (0.5, 1.0)  # px
MAX_SHIFT = 0.6  # surround shift / surround σ
SQUARE_BLURS = (0.2, 0.35, 0.5)  # px


# Smallest centre σ (px) per family. A DoG may shrink to a one-pixel spike; a derivative must keep
# its lobes a pixel apart, else the pixel grid aliases it into another pattern (a 2nd derivative
# at σ = 0.4 px along a diagonal samples as the discrete Laplacian, an Off-Centre).
MIN_SIGMA = {"dog": 0.4, "d1": 0.5, "d2": 0.55, "dxy": 0.55}


def sigma_grid(kernel_size: int, family: str = "dog") -> np.ndarray:
    """``[N_SIGMAS]`` centre σ (px) of a DoG family, geometric from `MIN_SIGMA` to a blob filling
    the kernel."""
    return np.geomspace(MIN_SIGMA[family], 0.35 * (kernel_size - 1), N_SIGMAS)


def cross_sigma_grid(kernel_size: int) -> np.ndarray:
    """``[N_SIGMAS]`` cross arm σ (px): up to 0.7 px on 5×5 and 1.0 px on 7×7 (paper Fig. 15 draws
    0.4..0.8 on 7×7). Wider arms fill the kernel: a blob, not a cross."""
    return np.geomspace(0.35, 0.15 * (kernel_size - 1) + 0.1, N_SIGMAS)


def max_offset(kernel_size: int) -> float:
    """Largest centre offset (px) per axis of the DoG family and crosses: half a pixel (a pattern
    whose centre falls between pixels). Further off-centre it is no longer "centre"-anything; only
    squares sit further out (paper §5: towards a corner)."""
    del kernel_size
    return 0.5


# ------------------------------------------------------------------------------------- rendering


# Each pixel is the mean of the function over its area (SUPERSAMPLE² points): a σ below one pixel
# then gives a spike, not an aliased sample of a derivative's flank.
SUPERSAMPLE = 4


def _pose(k: int, x0, y0, theta):
    """Rotated coordinates ``(u, v)`` ``[T, k, k, S²]``: u along θ, v across, about ``(x0, y0)``,
    at S² points spread over each pixel."""
    x, y = templates.pixel_grid(k)
    sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE - 0.5
    sy, sx = (g.reshape(-1) for g in np.meshgrid(sub, sub, indexing="ij"))
    col = lambda a: np.asarray(a, np.float64)[:, None, None, None]  # noqa: E731
    dx = (x[..., None] + sx)[None] - col(x0)
    dy = (y[..., None] + sy)[None] - col(y0)
    c, s = np.cos(col(theta)), np.sin(col(theta))
    return dx * c + dy * s, -dx * s + dy * c


def _gauss(u, v, su, sv, order: str):
    """Normalised anisotropic Gaussian (σ_u, σ_v broadcast ``[T, 1, 1]``) or its derivative."""
    g = np.exp(-0.5 * (u * u / (su * su) + v * v / (sv * sv))) / (2 * np.pi * su * sv)
    if order == "":
        return g
    if order == "u":
        return -u / (su * su) * g
    if order == "uu":
        return (u * u / su ** 4 - 1 / (su * su)) * g
    if order == "uv":
        return u * v / (su * su * sv * sv) * g
    raise ValueError(order)


_ORDER = {"dog": "", "d1": "u", "d2": "uu", "dxy": "uv"}


def render(family: str, kernel_size: int, p: dict) -> np.ndarray:
    """``[T, k, k]`` float64 On-sign kernels of one family for parameter arrays ``p`` (each
    ``[T]``).

    Keys: ``x0``, ``y0`` (centre offset, px), ``theta`` (rad), and per family ``sigma`` (centre σ,
    across the long axis), ``ratio`` (σ_s/σ_c), ``elong`` (long/short σ) and for "dog" ``shift``
    (the surround's displacement along θ, px: an asymmetric On-Centre) for dog/d1/d2/dxy;
    ``sigma`` for cross; ``size`` (side, px) and ``blur`` (edge σ, px) for square.
    """
    k = kernel_size
    t = np.asarray(p["theta"], np.float64)
    u, v = _pose(k, p["x0"], p["y0"], t)
    col = lambda name: np.asarray(p[name], np.float64)[:, None, None, None]  # noqa: E731
    if family in _ORDER:
        # The long axis is v (across θ): a d1 edge or a d2 line runs along it.
        sc, ratio, el = col("sigma"), col("ratio"), col("elong")
        order = _ORDER[family]
        shift = col("shift") if family == "dog" and "shift" in p else 0.0
        out = (_gauss(u, v, sc, sc * el, order)
               - _gauss(u - shift, v, sc * ratio, sc * ratio * el, order))
    elif family == "cross":
        s2 = 2 * col("sigma") ** 2
        out = np.exp(-u * u / s2) + np.exp(-v * v / s2)
    elif family == "square":
        half, b = col("size") / 2, np.sqrt(2) * col("blur")
        erf = lambda z: np.asarray(special.erf(z), np.float64)  # noqa: E731
        box = lambda w: 0.5 * (erf((w + half) / b) - erf((w - half) / b))  # noqa: E731
        out = box(u) * box(v)
    else:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return out.mean(axis=-1)


# ------------------------------------------------------------------------------------------ bank


@dataclasses.dataclass(frozen=True)
class Bank:
    """Every family on its parameter grid, On sign only (the Off kernels are the negatives).

    Attributes:
      kernel_size: k.
      embedded: ``[T, k*k-1]`` float32 unit coordinates (`preprocess.embed`).
      family: ``[T]`` int index into `FAMILIES`.
      params: column → ``[T]`` float64 (``x0``, ``y0``, ``theta``, ``sigma``, ``ratio``,
        ``elong``, ``size``, ``blur``; NaN where a family has no such parameter).
      names: ``[2, T]`` int index into ``templates.class_names(k)``: row 0 for a positive match
        (On sign), row 1 for a negative one.
    """

    kernel_size: int
    embedded: np.ndarray
    family: np.ndarray
    params: dict
    names: np.ndarray


def _product(**axes) -> dict:
    grids = np.meshgrid(*[np.asarray(v, np.float64) for v in axes.values()], indexing="ij")
    return {name: g.reshape(-1) for name, g in zip(axes, grids)}


def _offsets(k: int) -> np.ndarray:
    m = max_offset(k)
    return np.arange(-m, m + 1e-9, OFFSET_STEP)


def _family_params(family: str, k: int) -> dict:
    off = _offsets(k)
    sig = sigma_grid(k, family) if family in MIN_SIGMA else None
    half_turn = np.arange(N_ANGLES) * np.pi / N_ANGLES
    # Off the x/y diagonals, where a 1st derivative's name changes from (x) to (y): the nearest
    # grid angle then lies on the right side of every naming boundary.
    between = half_turn + np.pi / (2 * N_ANGLES)
    if family == "dog":
        iso = _product(sigma=sig, ratio=RATIOS, elong=[1.0], theta=[0.0], shift=[0.0], x0=off,
                       y0=off)
        # An asymmetric On-Centre: the surround displaced from the centre (any direction).
        asym = _product(sigma=sig, ratio=RATIOS, elong=[1.0], theta=2 * half_turn,
                        shift=SURROUND_SHIFTS, x0=off, y0=off)
        # The surround still encloses the centre; displaced further, centre and surround are two
        # lobes side by side: a 1st derivative, not an asymmetric On-Centre.
        enclosed = asym["shift"] <= MAX_SHIFT * asym["ratio"] * asym["sigma"]
        asym = {c: v[enclosed] for c, v in asym.items()}
        ani = _product(sigma=sig, ratio=RATIOS, elong=ELONGATIONS[1:], theta=half_turn,
                       shift=[0.0], x0=off, y0=off)
        return {c: np.concatenate([iso[c], asym[c], ani[c]]) for c in iso}
    if family == "d1":
        return _product(sigma=sig, ratio=RATIOS, elong=ELONGATIONS[:3], theta=between, x0=off,
                        y0=off)
    if family == "d2":
        return _product(sigma=sig, ratio=RATIOS, elong=ELONGATIONS[:3], theta=half_turn, x0=off,
                        y0=off)
    if family == "dxy":
        # ∂²/∂x∂y turned by less than 45°: turned by 90° it is its own negative, so On/Off is
        # only defined within 45° of the axes; the grid holds 0° and stays off ±45°.
        quarter = np.arange(-(N_ANGLES // 2 - 1), N_ANGLES // 2) * np.pi / (2 * N_ANGLES)
        return _product(sigma=sig, ratio=RATIOS, elong=[1.0], theta=quarter, x0=off, y0=off)
    if family == "cross":
        # A cross rotated by 90° is itself.
        quarter = np.arange(N_ANGLES // 2) * np.pi / N_ANGLES
        return _product(sigma=cross_sigma_grid(k), theta=quarter, x0=off, y0=off)
    if family == "square":
        # A solid block of whole pixels, at least 2 px wide, edges on pixel boundaries and
        # sharper than half a pixel: anything softer or smaller is a blob, the DoG's territory.
        p = {c: [] for c in ("size", "blur", "theta", "x0", "y0")}
        lim = (k - 1) / 2
        for size in range(2, k):
            cen = np.arange(-lim - 0.5 + size / 2, lim + 0.5 - size / 2 + 1e-9)
            q = _product(size=[size], blur=SQUARE_BLURS, theta=[0.0], x0=cen, y0=cen)
            for c in p:
                p[c].append(q[c])
        return {c: np.concatenate(v) for c, v in p.items()}
    raise ValueError(family)


def name_of(family: str, sign: int, theta, kernel_size: int) -> np.ndarray:
    """``[T]`` class index into ``templates.class_names(k)`` of a family member at angle(s)
    ``theta`` ``[T]`` (rad) with ``sign`` (+1: as `render` draws it, −1: negated).

    Only a 1st derivative's name depends on the angle: it is named by the side its bright
    (positive) lobe points to, as `templates` names ∂DoG/∂x "On-Centre 1st derivative (x)" (bright
    left) and ∂DoG/∂y "On-Centre 1st derivative (y)" (bright top); diagonals go to (x).
    """
    names = templates.class_names(kernel_size)
    theta = np.atleast_1d(np.asarray(theta, np.float64))
    pol = ON if sign > 0 else OFF
    if family == "d1":
        # +∂u of +DoG is positive on the −u side: the bright lobe points at θ+π (On sign), θ (Off).
        beta = theta + (np.pi if sign > 0 else 0.0)
        cx, cy = np.cos(beta), np.sin(beta)
        horizontal = np.abs(cx) >= np.abs(cy)
        out = np.where(horizontal,
                       np.where(cx < 0, names.index(f"{ON} 1st derivative (x)"),
                                names.index(f"{OFF} 1st derivative (x)")),
                       np.where(cy < 0, names.index(f"{ON} 1st derivative (y)"),
                                names.index(f"{OFF} 1st derivative (y)")))
        return out.astype(np.int64)
    single = {"dog": pol, "d2": f"{pol} 2nd derivative", "dxy": f"{pol} 2nd derivative",
              "cross": f"{pol} Cross",
              "square": "On-Square" if sign > 0 else "Off-Square"}[family]
    return np.full(theta.shape, names.index(single), np.int64)


@functools.lru_cache(maxsize=4)
def family_bank(kernel_size: int) -> Bank:
    """Every family of k on its parameter grid (about 22,000 templates for 5×5 and 7×7; built
    once per process, read-only)."""
    templates.class_names(kernel_size)  # validates k
    k = kernel_size
    fams = [f for f in FAMILIES if f != "square" or k in templates.SQUARE_KERNEL_SIZES]
    columns = ("x0", "y0", "theta", "sigma", "ratio", "elong", "shift", "size", "blur")
    kern, fam_idx, params, names = [], [], {c: [] for c in columns}, []
    for f in fams:
        p = _family_params(f, k)
        n = len(p["theta"])
        kern += [render(f, k, {c: v[a:a + 4096] for c, v in p.items()})
                 for a in range(0, n, 4096)]  # bounded memory: S² points per pixel
        fam_idx.append(np.full(n, FAMILIES.index(f)))
        for c in columns:
            params[c].append(p.get(c, np.full(n, np.nan)))
        names.append(np.stack([name_of(f, 1, p["theta"], k), name_of(f, -1, p["theta"], k)]))
    kern = np.concatenate(kern)
    keep = preprocess.valid_mask(kern)
    bank = Bank(k, np.asarray(preprocess.embed(kern[keep].astype(np.float32))),
                np.concatenate(fam_idx)[keep],
                {c: np.concatenate(v)[keep] for c, v in params.items()},
                np.concatenate(names, axis=1)[:, keep])
    for a in (bank.embedded, bank.family, bank.names, *bank.params.values()):
        a.flags.writeable = False  # cached and shared by every caller
    return bank


# ------------------------------------------------------------------------------------------- fit


@dataclasses.dataclass
class Fits:
    """Per kernel and class name: the best cosine over that name's templates and which one.

    Attributes:
      score: ``[N, C]`` float32 best mean-centred cosine per class of ``templates.class_names(k)``
        (−1 for a class without templates, e.g. "Others").
      template: ``[N, C]`` int64 bank row of that best match (−1 where none).
      valid: ``[N]`` bool, False for a dead kernel (its scores are −1).
    """

    score: np.ndarray
    template: np.ndarray
    valid: np.ndarray


@functools.lru_cache(maxsize=4)
def _grouped(kernel_size: int) -> list[tuple[np.ndarray, np.ndarray, int, int]]:
    """The bank split by the (positive-match, negative-match) class pair its rows name:
    ``[(rows [T_g], embedded.T [d, T_g], on class, off class), …]``, each matrix contiguous."""
    bank = family_bank(kernel_size)
    pairs = bank.names[0] * 1000 + bank.names[1]
    out = []
    for pair in np.unique(pairs):
        rows = np.flatnonzero(pairs == pair)
        out.append((rows, np.ascontiguousarray(bank.embedded[rows].T), int(pair // 1000),
                    int(pair % 1000)))
    return out


def fit(kernels, kernel_size: int, chunk: int = 2048) -> Fits:
    """Match ``[N, k, k]`` kernels (any scale/offset) against every family of `family_bank`."""
    k = kernel_size
    kernels = np.asarray(kernels, np.float32).reshape(-1, k, k)
    n_names = len(templates.class_names(k))
    n = len(kernels)
    score = np.full((n, n_names), -1.0, np.float32)
    template = np.full((n, n_names), -1, np.int64)
    if n == 0:
        return Fits(score, template, np.zeros(0, bool))
    x = np.asarray(preprocess.embed(kernels))
    valid = preprocess.valid_mask(kernels)
    for a in range(0, n, chunk):
        xs = x[a:a + chunk]
        at = np.arange(len(xs))
        sc, tp = score[a:a + chunk], template[a:a + chunk]
        for rows, emb_t, on, off in _grouped(k):
            s = xs @ emb_t  # [n, T_g] cosines
            for cls, j in ((on, s.argmax(axis=1)), (off, s.argmin(axis=1))):
                val = s[at, j] * (1.0 if cls == on else -1.0)
                better = val > sc[:, cls]
                sc[:, cls] = np.where(better, val, sc[:, cls])
                tp[:, cls] = np.where(better, rows[j], tp[:, cls])
    score[~valid], template[~valid] = -1.0, -1
    return Fits(score, template, valid)


def describe(kernel_size: int, row: int, cls: int) -> dict:
    """A bank row fitted for class ``cls``, for a labels file: ``family``, ``sign`` (+1 when the
    kernel matched the row itself, −1 its negative) and the family's parameters (σ, offsets and
    sizes in px, ``theta_deg`` in degrees; 3 d.p.)."""
    bank = family_bank(kernel_size)
    out: dict = {"family": FAMILIES[bank.family[row]],
                 "sign": 1 if bank.names[0, row] == cls else -1}
    for key, values in bank.params.items():
        v = float(values[row])
        if not math.isnan(v):
            out["theta_deg" if key == "theta" else key] = round(
                math.degrees(v) if key == "theta" else v, 3)
    return out


# ------------------------------------------------------------------------------ high frequency


def high_frequency_share(kernels) -> np.ndarray:
    """``[N]`` share of each centred kernel's energy in the top spatial-frequency band (the DFT
    bins with the largest |f| along x or y): 1 for a checkerboard, about `_noise_share` for white
    noise, low for every smooth DoG-family pattern. 0 for a constant kernel.

    Args:
      kernels: ``[N, k, k]``, any scale/offset.
    """
    x = np.asarray(kernels, np.float64)
    k = x.shape[-1]
    x = x - x.mean(axis=(-2, -1), keepdims=True)
    power = np.abs(np.fft.fft2(x)) ** 2
    f = np.abs(np.fft.fftfreq(k))
    top = f >= f.max() - 1e-12
    band = top[:, None] | top[None, :]
    total = power.sum(axis=(-2, -1))
    return np.where(total > 0, (power * band).sum(axis=(-2, -1)) / np.maximum(total, 1e-300), 0.0)


def _noise_share(kernel_size: int) -> float:
    """`high_frequency_share` of white noise on average: the band's share of the non-DC bins."""
    k = kernel_size
    return (k * k - (k - 2) ** 2) / (k * k - 1)


def high_frequency_min(kernel_size: int) -> float:
    """Least `high_frequency_share` for "High-frequency": half-way from white noise to a pure
    checkerboard (5×5: 0.83, where noise has 0.67 on average; 7×7: 0.75). Infinite for 3×3, whose
    top band holds every non-DC bin: there "high frequency" says nothing."""
    p = _noise_share(kernel_size)
    return math.inf if p >= 1.0 else p + 0.5 * (1.0 - p)
