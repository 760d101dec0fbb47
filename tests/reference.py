"""Test-only references: brute force in numpy float64 (moved out of dwjax.nearest, which ships no
test code)."""
import numpy as np

from dwjax import nearest, preprocess


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

