"""nearest_codes against the float64 brute force, on 1 and on 8 simulated CPU devices.

Near-ties are excluded explicitly: kernels whose float64 top-2 cosine gap is ≤ 1e-4 are dropped from
the random data (float32 may legitimately pick either of two reconstructions that close). Exact ties
are tested separately with duplicated reconstruction rows (lowest index must win).
"""
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from dwjax import nearest, preprocess
from tests.reference import nearest_codes_reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GAP = 1e-4
# (name, kernel size, N before near-tie exclusion, M, chunk sizes). M is not a multiple of the
# 64-row tile (nearest.DEFAULT_TILE_M); chunks that do and do not divide N, and one larger than N.
CASES = [("k5", 5, 300, 1000, (128, 100, 150, 4096)), ("k7", 7, 200, 2000, (64,))]


def _case(name, k, n, m):
    """Random kernels `[n', k, k]` (near-ties dropped, dead kernels appended) and recon `[m, k*k-1]`."""
    rng = np.random.default_rng(1000 + k)  # fixed: the 8-device subprocess rebuilds the same data
    recon = rng.standard_normal((m, k * k - 1)).astype(np.float32) * rng.uniform(0.5, 2, (m, 1))
    # Half the kernels are noisy copies of reconstructions (realistic small dissimilarities), half
    # random; all get a random affine map a·x + b (a > 0) the dissimilarity must ignore.
    src = recon[rng.integers(0, m, n // 2)]
    near = np.asarray(preprocess.unembed(jnp.asarray(src), k)) + 0.05 * rng.standard_normal((n // 2, k, k))
    kern = np.concatenate([near, rng.standard_normal((n - n // 2, k, k))])
    kern = kern * rng.uniform(0.1, 10, (n, 1, 1)) + rng.uniform(-1, 1, (n, 1, 1))
    flat = kern.reshape(n, -1) - kern.reshape(n, -1).mean(1, keepdims=True)
    x = (flat / np.linalg.norm(flat, axis=1, keepdims=True)) @ preprocess._basis_np(k)
    sims = x @ (recon / np.linalg.norm(recon, axis=1, keepdims=True)).T.astype(np.float64)
    top2 = np.sort(sims, axis=1)[:, -2:]
    keep = top2[:, 1] - top2[:, 0] > GAP
    assert keep.mean() > 0.9
    dead = np.stack([np.zeros((k, k)), np.full((k, k), 3.5), np.full((k, k), -2.0) + 1e-12 * np.eye(k)])
    kern = np.concatenate([kern[keep][:5], dead, kern[keep][5:]]).astype(np.float32)
    return kern, recon


def _run_all() -> dict:
    """Every (case, chunk) result on the current process's devices, as a flat dict of arrays."""
    out = {}
    for name, k, n, m, chunks in CASES:
        kern, recon = _case(name, k, n, m)
        for c in chunks:
            i, d = nearest.nearest_codes(kern, recon, chunk_size=c)
            out[f"{name}/{c}/idx"], out[f"{name}/{c}/dis"] = i, d
    return out


def _check(results: dict):
    for name, k, n, m, chunks in CASES:
        kern, recon = _case(name, k, n, m)
        ri, rd = nearest_codes_reference(kern, recon)
        assert (ri == -1).sum() == 3 and (ri[5:8] == -1).all()
        for c in chunks:
            i, d = results[f"{name}/{c}/idx"], results[f"{name}/{c}/dis"]
            assert i.dtype == np.int32 and d.dtype == np.float32 and i.shape == d.shape == (len(kern),)
            np.testing.assert_array_equal(i, ri, err_msg=f"{name} chunk={c}")
            np.testing.assert_allclose(d, rd, atol=1e-5, rtol=0, err_msg=f"{name} chunk={c}")
            assert (d[ri == -1] == nearest.DEAD_DISSIMILARITY).all() and np.isfinite(d).all()


def test_matches_reference_one_device():
    _check(_run_all())


def test_eight_devices_match_one_device(tmp_path):
    """Same results with each chunk sharded over 8 simulated CPU devices (chunks round up to 8)."""
    path = str(tmp_path / "r8.npz")
    code = ("import sys, jax, numpy as np; assert jax.device_count() == 8, jax.devices(); "
            "from tests.test_nearest import _run_all; np.savez(sys.argv[1], **_run_all())")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, path], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(path) as f:
        r8 = dict(f)
    _check(r8)
    r1 = _run_all()
    for key in r1:  # idx exactly; dis to float32 rounding (per-device blocks round differently)
        if key.endswith("/idx"):
            np.testing.assert_array_equal(r8[key], r1[key], err_msg=key)
        else:
            np.testing.assert_allclose(r8[key], r1[key], atol=1e-6, rtol=0, err_msg=key)


@pytest.mark.parametrize("a,b", [(3, 7), (3, 200), (500, 999)])
def test_exact_tie_lowest_index_wins(a, b):
    """recon[b] = recon[a] (same 64-row tile, across tiles, in the last padded tile): → a."""
    rng = np.random.default_rng(2)
    recon = rng.standard_normal((1000, 24)).astype(np.float32)
    recon[b] = recon[a]
    base = np.asarray(preprocess.unembed(jnp.asarray(recon[a:a + 1]), 5))
    kern = np.concatenate([base, 3 * base - 1, base + 1e-3 * rng.standard_normal((4, 5, 5))])
    i, d = nearest.nearest_codes(kern.astype(np.float32), recon, chunk_size=8)
    assert (i == a).all(), i
    assert (d[:2] < 1e-6).all()


def test_tile_size_and_memmap(tmp_path):
    """Other M tilings give the same answer; an np.memmap input streams like an in-memory one."""
    kern, recon = _case("k5", 5, 300, 1000)
    ri, rd = nearest_codes_reference(kern, recon)
    mm = np.lib.format.open_memmap(str(tmp_path / "k.npy"), mode="w+", dtype=np.float32, shape=kern.shape)
    mm[:] = kern
    mm.flush()
    mm = np.load(str(tmp_path / "k.npy"), mmap_mode="r")
    for tile in (1, 7, 1000, 1024):
        i, d = nearest.nearest_codes(mm, recon, chunk_size=128, tile_m=tile)
        np.testing.assert_array_equal(i, ri, err_msg=f"tile_m={tile}")
        np.testing.assert_allclose(d, rd, atol=1e-5, rtol=0)


def test_dead_kernel_verdict_is_preprocess_valid_mask():
    """Near the dead threshold (centred/raw norm ≈ 1e-5) the verdict is valid_mask's, exactly."""
    rng = np.random.default_rng(4)
    noise = rng.standard_normal((400, 5, 5))
    noise -= noise.mean(axis=(1, 2), keepdims=True)
    noise /= np.linalg.norm(noise.reshape(400, -1), axis=1)[:, None, None]
    level = np.geomspace(0.2, 5.0, 400)[:, None, None] * preprocess.DEAD_RELATIVE_NORM * 5
    kern = (rng.uniform(0.5, 50, (400, 1, 1)) * (1 + noise * level)).astype(np.float32)
    valid = preprocess.valid_mask(kern)
    assert 0 < valid.sum() < 400
    recon = rng.standard_normal((100, 24)).astype(np.float32)
    i, d = nearest.nearest_codes(kern, recon, chunk_size=128)
    np.testing.assert_array_equal(i >= 0, valid)
    assert (d[~valid] == 1.0).all()


def test_edge_cases():
    recon = np.random.default_rng(3).standard_normal((5, 8)).astype(np.float32)
    i, d = nearest.nearest_codes(np.zeros((0, 3, 3), np.float32), recon)
    assert i.shape == d.shape == (0,)
    i, d = nearest.nearest_codes(np.ones((4, 3, 3), np.float32), recon)  # all dead
    assert (i == -1).all() and (d == 1.0).all()
    with pytest.raises(ValueError):
        nearest.nearest_codes(np.zeros((4, 3, 3), np.float32), recon[:, :5])
    with pytest.raises(ValueError):
        nearest.nearest_codes(np.zeros((4, 3, 3), np.float32), recon[:0])
