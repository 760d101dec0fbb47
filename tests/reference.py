"""Test-only references: brute force in numpy float64 (moved out of dwjax.search.nearest, which
ships no test code)."""
import numpy as np

from dwjax.model import preprocess
from dwjax.search import nearest


def nearest_codes_reference(kernels, recon) -> tuple[np.ndarray, np.ndarray]:
    """Brute force in numpy float64: `[N, k, k]`, `[M, k*k-1]` → `(idx [N] int32, dis [N])`.

    Same conventions as nearest.nearest_codes (dead → −1 / 1.0; ties → lowest index, here exact
    float64 ties only: near-ties below float32 rounding are the callers' to exclude).
    """
    kernels = np.asarray(kernels, np.float64)
    n = len(kernels)
    k = int(round(np.sqrt(kernels[0].size))) if n else 1
    flat = kernels.reshape(n, -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(centred, axis=1, keepdims=True)
    x = centred / np.where(norm > 0, norm, 1.0) @ preprocess._basis_np(k)
    r = np.asarray(recon, np.float64)
    r = r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)
    sims = x @ r.T
    valid = preprocess.valid_mask(kernels)
    idx = np.where(valid, np.argmax(sims, axis=1), -1).astype(np.int32)
    dis = np.where(valid, 1.0 - sims.max(axis=1, initial=-np.inf), nearest.DEAD_DISSIMILARITY)
    return idx, dis


def similarities(kernels, recon) -> np.ndarray:
    """`[N, M]` float64 cosine of each kernel's embedding with each reconstruction."""
    kernels = np.asarray(kernels, np.float64)
    k = int(round(np.sqrt(kernels[0].size)))
    flat = kernels.reshape(len(kernels), -1)
    centred = flat - flat.mean(axis=1, keepdims=True)
    x = centred / np.maximum(np.linalg.norm(centred, axis=1, keepdims=True), 1e-300)
    x = x @ preprocess._basis_np(k)
    r = np.asarray(recon, np.float64)
    return x @ (r / np.maximum(np.linalg.norm(r, axis=1, keepdims=True), 1e-12)).T


def template_curve(kernel_size: int, m: int, seed: int = 0, n_templates: int = 12) -> np.ndarray:
    """`[m, k*k-1]` float32 unit rows along a smooth 1-D curve, like a trained decoder's codes:
    smoothstep interpolation between `n_templates` random DoG-family templates (plateaus near
    each template, fast transitions between them), so consecutive rows are close."""
    from dwjax.patterns import templates

    rng = np.random.default_rng(seed)
    lo, hi = templates.sigma_range(kernel_size)
    families = [templates.dog, templates.dog_dx, templates.dog_dy, templates.dog_dxx,
                templates.dog_dyy, templates.dog_dxy]
    bank = []
    for i in range(n_templates):
        if i % 4 == 3:
            t = templates.cross(kernel_size, rng.uniform(0.4, 1.0))
        else:
            t = families[rng.integers(len(families))](kernel_size, rng.uniform(lo, hi))
        bank.append(t * rng.choice([-1, 1]))
    e = np.asarray(preprocess.embed(np.stack(bank)), np.float64)
    u = np.linspace(0.0, 1.0, m) * (n_templates - 1)
    i = np.minimum(u.astype(int), n_templates - 2)
    w = u - i
    w = w * w * (3 - 2 * w)
    p = (1 - w)[:, None] * e[i] + w[:, None] * e[i + 1]
    return (p / np.linalg.norm(p, axis=1, keepdims=True)).astype(np.float32)


def curve_kernels(recon: np.ndarray, n: int, seed: int = 0, near: float = 0.7,
                  angle: tuple[float, float] = (0.05, 0.5)) -> np.ndarray:
    """`[n, k, k]` float32 raw kernels: a fraction `near` at a random angle in `angle` (radians)
    from a random row of `recon [M, k*k-1]` (trained kernels cluster near the decoder's curve),
    the rest random directions; each under a random a·x + b (a > 0) the assignment must ignore."""
    rng = np.random.default_rng(seed)
    k = int(round(np.sqrt(recon.shape[1] + 1)))
    n_near = int(round(n * near))
    src = recon[rng.integers(0, len(recon), n_near)].astype(np.float64)
    src /= np.linalg.norm(src, axis=1, keepdims=True)
    z = rng.standard_normal(src.shape)
    z -= (z * src).sum(1, keepdims=True) * src
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    a = rng.uniform(*angle, (n_near, 1))
    far = rng.standard_normal((n - n_near, recon.shape[1]))
    coords = np.concatenate([np.cos(a) * src + np.sin(a) * z,
                             far / np.linalg.norm(far, axis=1, keepdims=True)])[rng.permutation(n)]
    kern = coords @ preprocess._basis_np(k).T
    return (kern.reshape(n, k, k) * rng.uniform(0.1, 3, (n, 1, 1))
            + rng.uniform(-1, 1, (n, 1, 1))).astype(np.float32)
