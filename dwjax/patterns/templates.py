"""The DoG-family template bank: class names, analytic kernels, the axis-aligned bank and the DoG
init.

One module for every stage that needs "what an On-Centre kernel looks like": the class vocabulary,
the figures, the paper's DoG initialisation (appendix F), and the conventions the labeller's posed
families (dwjax.patterns.family_fit: any angle, offset and elongation) name their fits by. Pure
numpy: the math is float64, every returned kernel is float32.

Grid and orientation. A k×k kernel is indexed ``[row, col]``; the grid is centred, ``x = col −
(k−1)/2`` grows left→right and ``y = row − (k−1)/2`` grows top→bottom (image convention). Distances
are pixels.

Sign conventions (paper §4.2: "DoG(x, y) appears as an On-Centre pattern, −DoG(x, y) as Off-Centre;
... the Off-Centre and On-Centre first and second-order derivatives of these DoG functions"):

* ``DoG = G(σ_c) − G(σ_s)`` with normalised Gaussians and σ_c < σ_s: positive centre = On-Centre.
* A derivative is "On-Centre" when it is a derivative of +DoG and "Off-Centre" when it is a
derivative of
  −DoG. So ``∂DoG/∂x`` (positive lobe on the LEFT, negative on the right, since the On-Centre peak
  falls off towards +x) is "On-Centre 1st derivative (x)" and its negation (positive lobe on the
  right) is "Off-Centre 1st derivative (x)"; likewise ``∂DoG/∂y`` (positive lobe on TOP) is
  "On-Centre 1st derivative (y)". For 1st derivatives, On/Off is therefore a polarity (which side is
  bright), not a centre sign. ``∂²DoG/∂x²``, ``∂²DoG/∂y²`` and ``∂²DoG/∂x∂y`` are "On-Centre 2nd
  derivative" (note: the On-Centre xx/yy derivative has a NEGATIVE centre line, being the curvature
  of a peak) and their negations "Off-Centre 2nd derivative". Appendix A: 2 DoGs × 2 axes = 4
  first-order and 2 × 3 = 6 second-order derivatives.
* Cross (appendix B): ``exp(−x²/2σ²) + exp(−y²/2σ²)`` is On-Centre Cross, its negation Off-Centre
Cross.
* Square (§5, appendix D, 5×5 only): a solid block displaced from the centre towards the upper-left
or
  bottom-right corner; positive block = On-Square, negative = Off-Square.

The ten 7×7 classes. The paper labels "the 10 most prevalent clusters" (Fig 3) and merges "the four
first derivative subtypes" into one bar (Fig 7). The four subtypes are appendix A's four first-order
derivatives ({On, Off} × {x, y}), which with On/Off-Centre, On/Off-Centre Cross and On/Off-Centre
2nd derivative makes ten. `base_class` drops the orientation, `merged_class` merges all four (Fig
7).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from dwjax.model import preprocess

ON, OFF = "On-Centre", "Off-Centre"
OTHERS = "Others"
# Codes whose pattern alternates sign from pixel to pixel (checkerboards): no DoG-family member, but
# a recognisable pattern of its own, named as what it is rather than hidden among "Others".
HIGH_FREQUENCY = "High-frequency"
FIRST_DERIVATIVE = "1st derivative"  # Fig 7's merged bar
CLASS_NAMES: tuple[str, ...] = (
    "On-Centre",
    "Off-Centre",
    "On-Centre 1st derivative (x)",
    "On-Centre 1st derivative (y)",
    "Off-Centre 1st derivative (x)",
    "Off-Centre 1st derivative (y)",
    "On-Centre 2nd derivative",
    "Off-Centre 2nd derivative",
    "On-Centre Cross",
    "Off-Centre Cross",
)
SQUARE_CLASS_NAMES: tuple[str, ...] = ("On-Square", "Off-Square")
# Squares "emerge only in 5×5 kernels" (Fig 9); the paper trains autoencoders for 5×5 and 7×7 only.
SQUARE_KERNEL_SIZES: tuple[int, ...] = (5,)
CORNERS = ("upper-left", "bottom-right")

# Appendix F: "45% on-center, 10% off-center, 15% cross, 20% first derivative, and the rest second".
PAPER_INIT_MIX: Mapping[str, float] = {
    "on_centre": 0.45,
    "off_centre": 0.10,
    "cross": 0.15,
    "first_derivative": 0.20,
    "second_derivative": 0.10,
}

# Surround/centre σ ratios: 1.6 is the classic Marr–Hildreth DoG≈LoG ratio; 3.0 a weak, wide
# surround.
SURROUND_RATIOS = (1.6, 3.0)
# Appendix B (Fig 15) draws the cross for σ in 0.4..0.8 on a 7×7 grid; up to 1.0 adds wider arms.
CROSS_SIGMA_RANGE = (0.4, 1.0)
N_SIGMAS = 8  # σ values per family in the bank; adjacent templates have centred cosine ≥ 0.95 (7×7)


def class_names(kernel_size: int) -> list[str]:
    """Label vocabulary for ``kernel_size``: the ten DoG-family classes (+ squares for 5×5),
    "High-frequency", then "Others".

    A labels file may add names of its own ("Unnamed pattern 1", a user's rename):
    `dwjax.patterns.labels.label_names` appends them after these, in a stable order.
    """
    _check_size(kernel_size)
    squares = SQUARE_CLASS_NAMES if kernel_size in SQUARE_KERNEL_SIZES else ()
    return [*CLASS_NAMES, *squares, HIGH_FREQUENCY, OTHERS]


def base_class(name: str) -> str:
    """Drop the 1st-derivative orientation: "On-Centre 1st derivative (x)" → "On-Centre 1st
    derivative"."""
    return name.removesuffix(" (x)").removesuffix(" (y)")


def merged_class(name: str) -> str:
    """Fig 7 grouping: the four 1st-derivative subtypes → "1st derivative"; others unchanged."""
    return FIRST_DERIVATIVE if "1st derivative" in name else name


def sigma_range(kernel_size: int) -> tuple[float, float]:
    """(lo, hi) centre σ in pixels for DoG and its derivatives (the bank's grid and the init's
    range).

    lo = 0.55 px: below it the DoG is a one-pixel spike, its 2nd derivatives collapse onto that
    spike
    (cosine 0.93 with the opposite-sign DoG at σ_c = 0.45) and the surround's derivative outweighs
    the centre's one pixel out (∂²/∂x∂y flips polarity at σ_c = 0.45, σ_s = 1.6·σ_c). hi =
    0.5·(k−1)/2 keeps the centre lobe and a 2nd derivative's flanks inside the kernel: 1.5 px for
    7×7, 1.0 px for 5×5; clamped to ≥ 0.7 so 3×3 still gets a range.
    """
    _check_size(kernel_size)
    return 0.55, max(0.7, 0.25 * (kernel_size - 1))


def sigma_grid(kernel_size: int) -> np.ndarray:
    """``[N_SIGMAS]`` bank centre σ: geometric over `sigma_range` (small σ change shape fastest)."""
    return np.geomspace(*sigma_range(kernel_size), N_SIGMAS)


def cross_sigma_grid() -> np.ndarray:
    """``[N_SIGMAS]`` bank cross σ, geometric over `CROSS_SIGMA_RANGE`."""
    return np.geomspace(*CROSS_SIGMA_RANGE, N_SIGMAS)


# --------------------------------------------------------------------------------- analytic kernels


def _grid(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred float64 coordinates ``(x, y)``, each ``[k, k]``; x: column offset, y: row offset."""
    c = (k - 1) / 2.0
    y, x = np.mgrid[0:k, 0:k].astype(np.float64) - c
    return x, y


def _gaussian_derivative(x, y, sigma, order: str) -> np.ndarray:
    """Normalised 2-D Gaussian or its derivative ('', 'x', 'y', 'xx', 'yy', 'xy'); broadcasts σ."""
    s2 = np.square(sigma)
    g = np.exp(-(x * x + y * y) / (2.0 * s2)) / (2.0 * np.pi * s2)
    factor = {
        "": 1.0,
        "x": -x / s2,
        "y": -y / s2,
        "xx": (x * x - s2) / (s2 * s2),
        "yy": (y * y - s2) / (s2 * s2),
        "xy": x * y / (s2 * s2),
    }[order]
    return factor * g


def _dog64(k: int, sigma_c, sigma_s, order: str = "") -> np.ndarray:
    x, y = _grid(k)
    return _gaussian_derivative(x, y, sigma_c, order) - _gaussian_derivative(x, y, sigma_s, order)


def _check_sigmas(sigma_c: float, sigma_s: float | None) -> float:
    sigma_s = SURROUND_RATIOS[0] * sigma_c if sigma_s is None else sigma_s
    if not 0 < sigma_c < sigma_s:
        raise ValueError(f"need 0 < sigma_c < sigma_s, got sigma_c={sigma_c}, sigma_s={sigma_s}")
    return sigma_s


def dog(k: int, sigma_c: float, sigma_s: float | None = None) -> np.ndarray:
    """``[k, k]`` float32 On-Centre DoG ``G(σ_c) − G(σ_s)`` (σ_s defaults to 1.6·σ_c); Off: −dog."""
    return _dog64(k, sigma_c, _check_sigmas(sigma_c, sigma_s)).astype(np.float32)


def dog_dx(k: int, sigma_c: float, sigma_s: float | None = None) -> np.ndarray:
    """``[k, k]`` ∂DoG/∂x: positive lobe left (On-Centre 1st derivative (x))."""
    return _dog64(k, sigma_c, _check_sigmas(sigma_c, sigma_s), "x").astype(np.float32)


def dog_dy(k: int, sigma_c: float, sigma_s: float | None = None) -> np.ndarray:
    """``[k, k]`` ∂DoG/∂y: positive lobe on top (On-Centre 1st derivative (y))."""
    return _dog64(k, sigma_c, _check_sigmas(sigma_c, sigma_s), "y").astype(np.float32)


def dog_dxx(k: int, sigma_c: float, sigma_s: float | None = None) -> np.ndarray:
    """``[k, k]`` ∂²DoG/∂x²: negative vertical centre line, positive left/right flanks."""
    return _dog64(k, sigma_c, _check_sigmas(sigma_c, sigma_s), "xx").astype(np.float32)


def dog_dyy(k: int, sigma_c: float, sigma_s: float | None = None) -> np.ndarray:
    """``[k, k]`` ∂²DoG/∂y²: negative horizontal centre line, positive top/bottom flanks."""
    return _dog64(k, sigma_c, _check_sigmas(sigma_c, sigma_s), "yy").astype(np.float32)


def dog_dxy(k: int, sigma_c: float, sigma_s: float | None = None) -> np.ndarray:
    """``[k, k]`` ∂²DoG/∂x∂y: four lobes, positive upper-left and bottom-right."""
    return _dog64(k, sigma_c, _check_sigmas(sigma_c, sigma_s), "xy").astype(np.float32)


def _cross64(k: int, sigma) -> np.ndarray:
    x, y = _grid(k)
    return _cross_xy(x, y, sigma)


def _cross_xy(x, y, sigma) -> np.ndarray:
    s2 = 2.0 * np.square(sigma)
    return np.exp(-x * x / s2) + np.exp(-y * y / s2)


def cross(k: int, sigma: float) -> np.ndarray:
    """``[k, k]`` On-Centre Cross ``exp(−x²/2σ²) + exp(−y²/2σ²)`` (appendix B). Off = −cross."""
    if not sigma > 0:
        raise ValueError(f"need sigma > 0, got {sigma}")
    return _cross64(k, sigma).astype(np.float32)


# The continuous functions behind the kernels above, for drawing them finer than the pixel grid.
FAMILIES: tuple[str, ...] = ("dog", "dog_dx", "dog_dy", "dog_dxx", "dog_dyy", "dog_dxy", "cross")
_ORDERS = {"dog": "", "dog_dx": "x", "dog_dy": "y", "dog_dxx": "xx", "dog_dyy": "yy",
           "dog_dxy": "xy"}


def pixel_grid(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Centred float64 pixel coordinates ``(x, y)``, each ``[k, k]`` (the kernels' own grid)."""
    return _grid(k)


def evaluate(family: str, x, y, sigma_c: float | None = None, sigma_s: float | None = None,
             sigma: float | None = None) -> np.ndarray:
    """float64 value of a family's continuous function at pixel offsets ``x``, ``y`` (any shape).

    ``family`` is one of `FAMILIES`; the DoG families take ``sigma_c`` (and ``sigma_s``, default
    1.6·σ_c), "cross" takes ``sigma``. On `pixel_grid(k)` it equals the k×k kernel functions
    (`dog`, `dog_dx`, …, `cross`) before their float32 cast.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if family == "cross":
        if sigma is None or not sigma > 0:
            raise ValueError(f"cross needs sigma > 0, got {sigma}")
        return _cross_xy(x, y, sigma)
    if family not in _ORDERS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if sigma_c is None:
        raise ValueError(f"{family} needs sigma_c")
    sigma_s = _check_sigmas(sigma_c, sigma_s)
    order = _ORDERS[family]
    return _gaussian_derivative(x, y, sigma_c, order) - _gaussian_derivative(x, y, sigma_s, order)


def square(k: int, size: int, corner: str = "upper-left") -> np.ndarray:
    """``[k, k]`` On-Square: a solid ``size×size`` block of ones on zeros, displaced towards
    ``corner``.

    The block is placed one step off-centre: its centre sits at (k−1)/2 − ½ px (even size) or − 1 px
    (odd size) along both axes for "upper-left" (mirrored for "bottom-right"), e.g. on 5×5 size 2
    covers rows/cols 1..2, size 3 covers 0..2 and size 4 covers 0..3. Only k ≥ 5 (a 3×3 has no room
    for an off-centre block larger than the centre pixel). Off-Square = −square.
    """
    if k < 5:
        raise ValueError(f"square kernels need kernel_size >= 5, got {k}")
    if corner not in CORNERS:
        raise ValueError(f"corner must be one of {CORNERS}, got {corner!r}")
    if not 2 <= size <= k - 1:
        raise ValueError(f"square size must be in [2, {k - 1}] for k={k}, got {size}")
    shift = 0.5 if size % 2 == 0 else 1.0
    centre = (k - 1) / 2.0 + (-shift if corner == "upper-left" else shift)
    start = int(round(centre - (size - 1) / 2.0))
    out = np.zeros((k, k), np.float32)
    out[start:start + size, start:start + size] = 1.0
    return out


# ------------------------------------------------------------------------------------------- bank


def template_bank(kernel_size: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Every family over a σ grid, both signs, axis-aligned and centred: the paper's patterns as
    drawn in its figures (the spectrum's template gallery). The labeller fits the richer posed
    families of `dwjax.patterns.family_fit` instead.

    Returns:
      kernels: ``[T, k, k]`` float32, raw (not centred; callers embed with `preprocess.embed`).
      class_index: ``[T]`` int64 index into ``class_names(kernel_size)`` (never
        "High-frequency" or "Others").
      params: ``T`` dicts: ``family`` ('dog', 'dog_dx', 'dog_dy', 'dog_dxx', 'dog_dyy', 'dog_dxy',
      'cross',
        'square'), ``sign`` (+1 On / −1 Off) and the family's σ / size / corner values.

    Centre σ: `sigma_grid(k)`, each with σ_s/σ_c in `SURROUND_RATIOS`; cross σ:
    `cross_sigma_grid()`;
    squares (5×5 only) of sizes 2..k−1 at both corners. Templates with ~0 centred norm
    (`preprocess.valid_mask`) are dropped.
    """
    names = class_names(kernel_size)
    k = kernel_size
    kernels, classes, params = [], [], []

    def add(kernel: np.ndarray, sign: int, on_name: str, off_name: str, **p) -> None:
        kernels.append(sign * np.asarray(kernel, np.float64))
        classes.append(names.index(on_name if sign > 0 else off_name))
        params.append({"sign": sign, **p})

    derivs = {"": ("dog", ON, OFF),
              "x": ("dog_dx", f"{ON} 1st derivative (x)", f"{OFF} 1st derivative (x)"),
              "y": ("dog_dy", f"{ON} 1st derivative (y)", f"{OFF} 1st derivative (y)"),
              "xx": ("dog_dxx", f"{ON} 2nd derivative", f"{OFF} 2nd derivative"),
              "yy": ("dog_dyy", f"{ON} 2nd derivative", f"{OFF} 2nd derivative"),
              "xy": ("dog_dxy", f"{ON} 2nd derivative", f"{OFF} 2nd derivative")}
    for order, (family, on_name, off_name) in derivs.items():
        for sc in sigma_grid(k):
            for ratio in SURROUND_RATIOS:
                kern = _dog64(k, sc, ratio * sc, order)
                for sign in (1, -1):
                    add(kern, sign, on_name, off_name, family=family,
                        sigma_c=float(sc), sigma_s=float(ratio * sc))
    for s in cross_sigma_grid():
        for sign in (1, -1):
            add(_cross64(k, s), sign, f"{ON} Cross", f"{OFF} Cross", family="cross", sigma=float(s))
    if k in SQUARE_KERNEL_SIZES:
        for size in range(2, k):
            for corner in CORNERS:
                for sign in (1, -1):
                    add(square(k, size, corner), sign, "On-Square", "Off-Square",
                        family="square", size=size, corner=corner)

    stack = np.stack(kernels)
    keep = preprocess.valid_mask(stack)
    return (stack[keep].astype(np.float32), np.asarray(classes, np.int64)[keep],
            [p for p, kp in zip(params, keep) if kp])


# ------------------------------------------------------------------------------ DoG initialisation


def _allocate(n: int, mix: Mapping[str, float]) -> np.ndarray:
    """Exact per-family counts summing to n (largest remainder), so proportions hold at any n."""
    p = np.asarray(list(mix.values()), np.float64)
    raw = p / p.sum() * n
    counts = np.floor(raw).astype(np.int64)
    counts[np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def sample_dog_init_labelled(
    n: int, kernel_size: int, rng, mix: Mapping[str, float] = PAPER_INIT_MIX
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`sample_dog_init`, also returning each kernel's family and class name (``[n]`` str each)."""
    if set(mix) - set(PAPER_INIT_MIX):
        raise ValueError(f"unknown mix keys {sorted(set(mix) - set(PAPER_INIT_MIX))}; "
                         f"allowed {sorted(PAPER_INIT_MIX)}")
    if any(v < 0 for v in mix.values()) or abs(sum(mix.values()) - 1.0) > 1e-6:
        raise ValueError(f"mix must be non-negative and sum to 1, got {dict(mix)}")
    rng = np.random.default_rng(rng)
    k = kernel_size
    lo, hi = sigma_range(k)
    families = np.repeat(np.asarray(list(mix)), _allocate(n, mix))
    families = families[rng.permutation(n)]

    # Draw every random quantity for every kernel (a fixed draw order: seed-deterministic), then
    # pick.
    sc = rng.uniform(lo, hi, n)[:, None, None]
    ratio = rng.uniform(*SURROUND_RATIOS, n)[:, None, None]
    cross_sigma = rng.uniform(*CROSS_SIGMA_RANGE, n)[:, None, None]
    sign = np.where(rng.random(n) < 0.5, 1.0, -1.0)
    axis1 = rng.choice(np.array(["x", "y"]), n)
    axis2 = rng.choice(np.array(["xx", "yy", "xy"]), n)

    out = np.empty((n, k, k), np.float64)
    names = np.empty(n, dtype=object)
    x, y = _grid(k)
    for fam in mix:
        m = families == fam
        if not m.any():
            continue
        if fam == "cross":
            out[m] = sign[m, None, None] * _cross64(k, cross_sigma[m])
            names[m] = np.where(sign[m] > 0, f"{ON} Cross", f"{OFF} Cross")
            continue
        s = (np.ones(m.sum()) if fam == "on_centre" else -np.ones(m.sum()) if fam == "off_centre"
             else sign[m])
        orders = (axis1[m] if fam == "first_derivative" else axis2[m]
                  if fam == "second_derivative" else np.full(m.sum(), ""))
        for order in np.unique(orders):
            mm = orders == order
            idx = np.flatnonzero(m)[mm]
            g = (_gaussian_derivative(x, y, sc[idx], order)
                 - _gaussian_derivative(x, y, sc[idx] * ratio[idx], order))
            out[idx] = s[mm, None, None] * g
        pol = np.where(s > 0, ON, OFF)
        if fam == "first_derivative":
            names[m] = [f"{p} 1st derivative ({o})" for p, o in zip(pol, orders)]
        elif fam == "second_derivative":
            names[m] = [f"{p} 2nd derivative" for p in pol]
        else:
            names[m] = pol
    # Unit Frobenius norm (DC kept: sums differ by class, Fig 10); the initialiser sets the scale.
    out /= np.linalg.norm(out.reshape(n, k * k), axis=1)[:, None, None]
    return out.astype(np.float32), families.astype(str), names.astype(str)


def sample_dog_init(
    n: int, kernel_size: int, rng, mix: Mapping[str, float] = PAPER_INIT_MIX
) -> np.ndarray:
    """``[n, k, k]`` float32 kernels drawn as the paper's DoG initialisation (appendix F).

    Families in exact proportions (largest-remainder counts, then a seeded shuffle): 45% On-Centre
    DoG, 10% Off-Centre DoG, 15% cross (sign ±1 at random), 20% 1st derivative (axis x/y and On/Off
    at random), 10% 2nd derivative (xx/yy/xy and On/Off at random). "Random variances similar to
    trained kernels": σ_c ~ U(`sigma_range(k)`), σ_s/σ_c ~ U(`SURROUND_RATIOS`), cross σ ~
    U(`CROSS_SIGMA_RANGE`) — the bank's ranges. Each kernel has unit L2 norm (mean kept); multiply
    by the initialiser's scale.

    Args:
      rng: a `np.random.Generator` or an int seed (same seed ⇒ same kernels).
      mix: family → probability, keys from `PAPER_INIT_MIX`, summing to 1.
    """
    return sample_dog_init_labelled(n, kernel_size, rng, mix)[0]


def _check_size(kernel_size: int) -> None:
    if not (
        isinstance(kernel_size, (int, np.integer)) and kernel_size >= 3 and kernel_size % 2 == 1
    ):
        raise ValueError(f"kernel_size must be an odd int >= 3, got {kernel_size!r}")
