"""k-means on min-max-encoded 3×3 kernels (paper §5): encoding, seeding, Lloyd, assignment."""
import numpy as np
import pytest

from dwjax.model import preprocess
from dwjax.search import kmeans


def _blobs(seed=0, n=6000, k=10, d=9, spread=0.02):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (k, d))
    while (
        np.min([np.linalg.norm(a - b) for i, a in enumerate(centres) for b in centres[i + 1 :]])
        < 0.3
    ):
        centres = rng.uniform(0, 1, (k, d))
    labels = rng.integers(0, k, n)
    return (centres[labels] + spread * rng.standard_normal((n, d))).astype(np.float32), labels


def _numpy_assign(x, c):
    d2 = ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1)
    return d2.argmin(1), np.sqrt(d2.min(1)), np.sort(d2, axis=1)


def test_minmax_encode():
    rng = np.random.default_rng(1)
    kern = rng.standard_normal((50, 3, 3)).astype(np.float32)
    kern[3] = 0.0
    kern[7] = 2.5
    x = kmeans.minmax_encode(kern)
    assert x.shape == (50, 9) and x.dtype == np.float32
    valid = preprocess.valid_mask(kern)
    assert not valid[3] and not valid[7] and valid.sum() == 48
    np.testing.assert_allclose(x[valid].min(1), 0.0, atol=1e-7)
    np.testing.assert_allclose(x[valid].max(1), 1.0, atol=1e-6)
    assert (x[~valid] == 0).all()
    np.testing.assert_allclose(kmeans.minmax_encode(3.0 * kern + 1.0)[valid], x[valid], atol=1e-6)
    xv, v = kmeans.encode_valid(kern)
    np.testing.assert_array_equal(v, valid)
    np.testing.assert_array_equal(xv, x[valid])


def test_recovers_separated_clusters_in_canonical_order():
    x, labels = _blobs()
    cents, inertia = kmeans.fit_kmeans(x, 10, seed=0, chunk_size=1000)  # 6 chunks: chunked path
    cluster, dist = kmeans.assign_kmeans(x, cents, chunk_size=1024)
    table = np.zeros((10, 10), int)
    np.add.at(table, (labels, cluster), 1)
    # Each true cluster maps onto exactly one found cluster and vice versa: agreement 100%.
    assert (np.count_nonzero(table, axis=1) == 1).all() and (
        np.count_nonzero(table, axis=0) == 1
    ).all()
    np.testing.assert_allclose(inertia, np.sum(dist.astype(np.float64) ** 2), rtol=1e-4)
    sizes = np.bincount(cluster, minlength=10)
    assert (np.diff(sizes) <= 0).all(), sizes  # canonical: size descending


def test_deterministic_per_seed():
    x, _ = _blobs(seed=3, spread=0.2)  # overlapping: the seed matters
    a = kmeans.fit_kmeans(x, 10, seed=5)
    b = kmeans.fit_kmeans(x, 10, seed=5)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1] == b[1]
    np.testing.assert_array_equal(
        kmeans.kmeans_plus_plus(x, 10, 5), kmeans.kmeans_plus_plus(x, 10, 5)
    )
    assert not np.array_equal(kmeans.kmeans_plus_plus(x, 10, 5), kmeans.kmeans_plus_plus(x, 10, 6))


def test_inertia_decreases_from_init():
    x = np.random.default_rng(4).uniform(0, 1, (5000, 9)).astype(np.float32)
    init = kmeans.kmeans_plus_plus(x, 10, seed=0)
    _, d0 = kmeans.assign_kmeans(x, init)
    _, inertia = kmeans.fit_kmeans(x, 10, seed=0)
    assert inertia < 0.9 * np.sum(d0.astype(np.float64) ** 2)


def test_kmeans_pp_centres_distinct():
    # Only 12 distinct points, heavily repeated: D² sampling must never pick a chosen point again.
    rng = np.random.default_rng(5)
    pts = rng.uniform(0, 1, (12, 9)).astype(np.float32)
    x = pts[rng.integers(0, 12, 4000)]
    for seed in range(5):
        c = kmeans.kmeans_plus_plus(x, 10, seed)
        assert len(np.unique(c, axis=0)) == 10
        assert all((np.abs(pts - ci).sum(1) == 0).any() for ci in c)  # centres are data points
    with pytest.raises(ValueError):
        kmeans.kmeans_plus_plus(x[:5], 10)


def test_assign_matches_numpy():
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (3001, 9)).astype(np.float32)
    c = rng.uniform(0, 1, (10, 9)).astype(np.float32)
    ref, rdist, d2s = _numpy_assign(x, c)
    clear = d2s[:, 1] - d2s[:, 0] > 1e-5  # near-ties excluded (float32 may pick either)
    assert clear.mean() > 0.99
    for chunk in (1000, 4096):  # padded last chunk; N smaller than one chunk
        cl, dist = kmeans.assign_kmeans(x, c, chunk_size=chunk)
        assert cl.dtype == np.int32 and dist.dtype == np.float32
        np.testing.assert_array_equal(cl[clear], ref[clear])
        np.testing.assert_allclose(dist, rdist, atol=1e-5)


def test_streamed_sample_equals_the_concatenated_draw(tmp_path):
    """The 3×3 fit set, read chunk by chunk from memory-mapped arrays, is the very rows the
    whole-array path drew: all live kernels below max_fit, the seeded draw above it."""
    rng = np.random.default_rng(1)
    arrays = []
    for i, n in enumerate((1000, 37, 2500)):
        a = rng.normal(size=(n, 3, 3)).astype(np.float32)
        a[::97] = 0.5  # dead (constant) kernels the draw must skip
        path = str(tmp_path / f"a{i}.npy")
        np.save(path, a)
        arrays.append(np.load(path, mmap_mode="r"))
    whole = np.concatenate([kmeans.encode_valid(a)[0] for a in arrays])
    for max_fit in (10, 1234, len(whole), 10 ** 6):
        expect = whole
        if len(whole) > max_fit:
            expect = whole[np.sort(np.random.default_rng(3).choice(len(whole), max_fit,
                                                                    replace=False))]
        got = kmeans.sample_valid(arrays, max_fit, seed=3, chunk_size=256)
        np.testing.assert_array_equal(got, expect)
